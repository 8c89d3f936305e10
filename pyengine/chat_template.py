"""Chat templates: a model's `tokenizer.chat_template`, rendered as transformers renders it.

Templates come with downloaded model files, so they are untrusted code: they run in Jinja2's
`ImmutableSandboxedEnvironment`, and anything the sandbox blocks (reaching `__class__`, `__globals__`,
mutating the inputs) raises `TemplateError`. What a template sees is transformers'
`apply_chat_template`: `messages`, `add_generation_prompt`, `tools`, `documents`, the special tokens
(`bos_token`, `eos_token`, ...), `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML, `trim_blocks` and `lstrip_blocks` on, and the loop-control extension.

A template may also not take more than its share: rendering stops with `TemplateError` after
`MAX_RENDER_SECONDS`, and no string or list it builds (with `*`, `+`, `%`, `**`, the string methods and
filters that pad, join, replace or indent, or its whole output) may exceed `MAX_TEMPLATE_CHARS`; the
source itself is at most `MAX_TEMPLATE_SOURCE` characters. Real templates are far inside these (the
largest we know, with tool calling, are ~20 KB and render in milliseconds).

Models without a template get a built-in one (ChatML, Llama 2, Llama 3, ChatGLM3, ChatGLM2, ChatGLM-6B), by name or by
what the vocabulary looks like.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import re
import threading
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["BUILTIN_TEMPLATES", "ChatTemplate", "MAX_RENDER_SECONDS", "MAX_TEMPLATE_CHARS", "MAX_TEMPLATE_SOURCE",
           "TemplateError", "guess_template_name", "render_chat_template"]

MAX_RENDER_SECONDS = 10.0  # parse + render
MAX_TEMPLATE_CHARS = 1 << 24  # any string or list a template builds, and its output (16 Mi characters)
MAX_TEMPLATE_SOURCE = 1 << 20


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
    if isinstance(indent, str):
        _check_size(len(indent) * 64, "tojson indent")
    elif indent is not None:
        _check_size(int(indent) * 64, "tojson indent")  # a width repeated per nesting level and line
    return _sized(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))


# ---- resource limits ----------------------------------------------------------------------------------------


def _check_size(n: int, what: str) -> None:
    if n > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"chat template too large: {what} of {n} characters or items "
                            f"(the limit is {MAX_TEMPLATE_CHARS})")


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)):
        _check_size(len(value), "string or list")
    return value


_WIDTHS = re.compile(r"\d+")


def _check_format_widths(fmt: str) -> None:
    """Widths and precisions in a %-format or str.format string ('%100000000d', '{:>99999999}')."""
    for m in _WIDTHS.finditer(fmt):
        if len(m.group()) > 8 or int(m.group()) > MAX_TEMPLATE_CHARS:
            _check_size(10 ** min(len(m.group()), 30), "formatted field")


def _is_int(v: Any) -> bool:
    return isinstance(v, int)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    sized = (str, list, tuple)
    if operator == "*":
        if isinstance(left, sized) and _is_int(right):
            _check_size(len(left) * max(int(right), 0), "repeated string or list")
        elif isinstance(right, sized) and _is_int(left):
            _check_size(len(right) * max(int(left), 0), "repeated string or list")
    elif operator == "+":
        if isinstance(left, sized) and isinstance(right, sized):
            _check_size(len(left) + len(right), "concatenated string or list")
    elif operator == "%" and isinstance(left, str):
        _check_format_widths(left)
        for v in right if isinstance(right, tuple) else (right,):
            if _is_int(v):
                _check_size(abs(int(v)), "formatted field")  # '%*d' % (width, x)
    elif operator == "**" and _is_int(left) and _is_int(right) and abs(int(left)) > 1 and int(right) > 0:
        bits = int(right) * math.log2(abs(int(left)))
        if bits > 1 << 16:
            raise TemplateError(f"chat template computes a {bits:.3g}-bit power")


def _check_str_method(obj: Any, args: tuple, kwargs: dict) -> None:
    """Bounds for the str methods whose output can be far larger than their input."""
    s, name = obj.__self__, obj.__name__
    params = list(args) + list(kwargs.values())
    if name in ("center", "ljust", "rjust", "zfill") and params and _is_int(params[0]):
        _check_size(int(params[0]), f"str.{name} result")
    elif name == "expandtabs":
        _check_size(len(s) * (int(params[0]) if params and _is_int(params[0]) else 8), "str.expandtabs result")
    elif name == "join" and params and isinstance(params[0], (list, tuple)):
        items = params[0]
        _check_size(sum(len(x) for x in items if isinstance(x, str)) + len(s) * len(items), "joined string")
    elif name == "replace" and len(params) >= 2 and isinstance(params[0], str) and isinstance(params[1], str):
        old, new = params[0], params[1]
        if len(new) > len(old):
            hits = len(s) + 1 if not old else s.count(old)
            _check_size(len(s) + hits * (len(new) - len(old)), "replaced string")


def _limited_filter(name: str, f: Any) -> Any:
    """Jinja's filters that can make large strings, with the size checks of the str methods above."""

    def check(args: tuple, kwargs: dict) -> None:
        skip = 1 if name in ("join", "replace") else 0  # these two take Jinja's eval context first
        value = args[skip] if len(args) > skip else None
        rest = args[skip + 1:]
        if name == "center":
            _check_str_method(str(value).center, rest, kwargs)
        elif name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            w = len(width) if isinstance(width, str) else int(width) if _is_int(width) else 0
            _check_size(w * (str(value).count("\n") + 1) + len(str(value)), "indented string")
        elif name == "format" and kwargs:
            _check_format_widths(str(value))
        elif name == "format" and isinstance(value, str):
            _check_binop("%", value, tuple(rest))
        elif name == "join" and isinstance(value, (list, tuple)):
            d = rest[0] if rest else kwargs.get("d", "")
            _check_str_method(str(d).join, ([str(x) for x in value],), {})
        elif name == "replace" and isinstance(value, str):
            _check_str_method(value.replace, rest, kwargs)

    def limited(*args: Any, **kwargs: Any) -> Any:
        check(args, kwargs)
        return _sized(f(*args, **kwargs))

    for attr in ("jinja_pass_arg",):  # keep Jinja's pass_eval_context / pass_environment marks
        if hasattr(f, attr):
            setattr(limited, attr, getattr(f, attr))
    return limited


class _RenderTimeout(BaseException):
    """Raised inside a render that ran past MAX_RENDER_SECONDS (a BaseException: nothing catches it on the way)."""


def _run_limited(fn: Any, what: str) -> Any:
    """fn() on a worker thread, stopped by an asynchronous exception after MAX_RENDER_SECONDS.

    Python cannot kill a thread, but it can raise in one at its next bytecode: template loops are
    Python code, and the size checks keep any single C-level step (a string repeat, a join) short.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
            error.append(e)

    worker = threading.Thread(target=work, name="pyengine-chat-template", daemon=True)
    worker.start()
    worker.join(MAX_RENDER_SECONDS)
    if worker.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_RenderTimeout))
        worker.join(1.0)
        raise TemplateError(f"chat template took more than {MAX_RENDER_SECONDS:g} s to {what}")
    if error:
        e = error[0]
        if isinstance(e, _RenderTimeout):
            raise TemplateError(f"chat template took more than {MAX_RENDER_SECONDS:g} s to {what}") from None
        raise e
    return result[0]


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
    """Jinja's immutable sandbox, failing loudly (by default an unsafe attribute reads as an undefined
    value that renders as "", so `{{ f.__globals__ }}` would pass silently) and within size limits."""

    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Any:
        # str.format / format_map are wrapped by the sandbox at attribute access, not checked in call().
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_format_widths(value.__self__)
        return lambda *args, **kwargs: _sized(wrapped(*args, **kwargs))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if isinstance(getattr(__obj, "__self__", None), str):
            _check_str_method(__obj, args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    for name in ("center", "indent", "format", "join", "replace"):
        env.filters[name] = _limited_filter(name, env.filters[name])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _TemplateDict()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from None
    except (RecursionError, MemoryError) as e:  # nesting deeper than the parser's recursion
        raise TemplateError(f"chat template does not parse: {type(e).__name__}") from None


def _render_output(template: jinja2.Template, context: dict) -> str:
    parts, n = [], 0
    for piece in template.generate(**context):
        n += len(piece)
        _check_size(n, "rendered prompt")
        parts.append(piece)
    return "".join(parts)


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
    if len(source) > MAX_TEMPLATE_SOURCE:
        raise TemplateError(f"chat template has {len(source)} characters, more than the limit of {MAX_TEMPLATE_SOURCE}")
    chat = [_with_reasoning_aliases(m) for m in _plain(list(messages))]
    for message in chat:
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be dicts, got {message!r}")
    context = dict(messages=chat, tools=_plain(tools), documents=_plain(documents),
                   add_generation_prompt=add_generation_prompt, **_plain(variables))
    try:
        return _run_limited(lambda: _render_output(_compile(source), context), "render")
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
