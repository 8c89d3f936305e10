"""Chat templates: a model's `tokenizer.chat_template`, rendered as transformers renders it.

Templates come with downloaded model files, so they are untrusted code: they run in Jinja2's
`ImmutableSandboxedEnvironment`, and anything the sandbox blocks (reaching `__class__`, `__globals__`,
mutating the inputs) raises `TemplateError`. What a template sees is transformers'
`apply_chat_template`: `messages`, `add_generation_prompt`, `tools`, `documents`, the special tokens
(`bos_token`, `eos_token`, ...), `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML, `trim_blocks` and `lstrip_blocks` on, and the loop-control extension.

Models without a template get a built-in one (ChatML, Llama 2, Llama 3, ChatGLM3, ChatGLM2, ChatGLM-6B), by name or by
what the vocabulary looks like.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "TemplateError", "guess_template_name", "render_chat_template"]


class TemplateError(ValueError):
    """A chat template failed to parse or render, called `raise_exception`, or broke the sandbox rules."""


BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Meta's Llama 2 chat format, as in its tokenizer_config.json.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Meta's Llama 3 Instruct format.
    "llama3": (
        "{% for message in messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # THUDM's ChatGLM3 format (as llama.cpp writes it).
    "chatglm3": (
        "[gMASK]sop"
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n ' + message['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
    # THUDM's ChatGLM2-6B chat() prompt: rounds from 1, blank lines; its tokenizer puts [gMASK]sop first.
    "chatglm2": (
        "[gMASK]sop{% set ns = namespace(round=1) %}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[Round ' ~ ns.round ~ ']\n\n问：' + message['content'] + '\n\n答：' }}"
        "{% set ns.round = ns.round + 1 %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + '\n\n' }}{% endif %}"
        "{% endfor %}"
    ),
    # THUDM's ChatGLM-6B chat() prompt; the model generates after [gMASK]<sop>, which its tokenizer appends.
    "chatglm1": (
        "{% set ns = namespace(round=0) %}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[Round ' ~ ns.round ~ ']\n问：' + message['content'] + '\n答：' }}"
        "{% set ns.round = ns.round + 1 %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + '\n' }}{% endif %}"
        "{% endfor %}[gMASK]<sop>"
    ),
}


def guess_template_name(tokenizer: "Tokenizer") -> str:
    """The built-in template that fits a vocabulary without a template of its own."""
    has = lambda token: tokenizer.token_to_id(token) is not None  # noqa: E731
    if has("<|start_header_id|>") and has("<|eot_id|>"):
        return "llama3"
    if has("<|im_start|>"):
        return "chatml"
    if has("[gMASK]") and has("<|user|>"):
        return "chatglm3"
    if has("[gMASK]") and has("<sop>"):
        return "chatglm1"
    if has("[gMASK]") and has("sop"):
        return "chatglm2"
    if tokenizer.model == "llama" or has("[INST]"):
        return "llama2"
    return "chatml"


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot store into dunders."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick keeps `namespace(self=...)` working
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the `dict` class."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing loudly: by default an unsafe attribute reads as an undefined
    value that renders as "", so `{{ f.__globals__ }}` would pass silently."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _TemplateDict()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def _plain(value: Any) -> Any:
    """Inputs rebuilt from JSON types, so a template cannot call methods of the caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _with_reasoning_aliases(message: dict) -> dict:
    # As transformers: reasoning under any of its names is visible as both `reasoning_content` and `thinking`.
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render a Jinja chat template as transformers' `apply_chat_template(..., tokenize=False)` does."""
    template = _compile(source)
    chat = [_with_reasoning_aliases(m) for m in _plain(list(messages))]
    for message in chat:
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be dicts, got {message!r}")
    try:
        return template.render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template blocked by the sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # a template can raise anything Python can (TypeError, ZeroDivisionError, ...)
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


@dataclasses.dataclass
class ChatTemplate:
    """A chat template plus the special-token variables it is rendered with."""

    source: str
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # bos_token, eos_token, ...
    name: str | None = None  # the built-in's name, or None for the model's own template

    @classmethod
    def builtin(cls, name: str, special_tokens: Mapping[str, str] | None = None) -> "ChatTemplate":
        """One of BUILTIN_TEMPLATES by name."""
        if name not in BUILTIN_TEMPLATES:
            raise TemplateError(f"no built-in chat template {name!r}; known: {', '.join(BUILTIN_TEMPLATES)}")
        return cls(BUILTIN_TEMPLATES[name], dict(special_tokens or {}), name)

    @classmethod
    def for_tokenizer(cls, tokenizer: "Tokenizer", name: str | None = None) -> "ChatTemplate":
        """The model's own template (`tokenizer.chat_template` in the GGUF), else a built-in.

        `name` forces a built-in ("chatml", "llama2", "llama3", "chatglm3", "chatglm2", "chatglm1"); without one the
        built-in is guessed from the vocabulary.
        """
        special = {}
        for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                              ("unk_token", tokenizer.unk_id), ("pad_token", tokenizer.pad_id)):
            if token_id is not None:
                special[key] = tokenizer.id_to_token(token_id)
        if name is None and tokenizer.chat_template:
            return cls(tokenizer.chat_template, special)
        return cls.builtin(name or guess_template_name(tokenizer), special)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **variables: Any,
    ) -> str:
        """The prompt text for `messages`; `variables` override the special tokens and add others."""
        return render_chat_template(
            self.source, messages, add_generation_prompt, tools, documents, **{**self.special_tokens, **variables}
        )
