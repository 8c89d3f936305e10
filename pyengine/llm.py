"""The `LLM` class: a GGUF model loaded into the C++ engine, with one inference context.

    llm = pyengine.LLM("model.gguf")
    llm.generate("Once upon a time", max_new_tokens=64, temperature=0.7, seed=1)    # -> str
    for piece in llm.chat([{"role": "user", "content": "Hi"}], stream=True): ...
    chat = llm.chat_session(system="Be brief.")                                     # keeps the KV cache
    print(chat.send("What is the capital of France?", stream=False).text)
"""
from __future__ import annotations

import dataclasses
import os
import weakref
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from . import _C

if TYPE_CHECKING:
    from .quality import PerplexityResult
    from .chat_template import ChatTemplate
    from .generation import ChatSession, Generation
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer

# Sampling when the GGUF has no `general.sampling.*` keys: llama.cpp's defaults.
DEFAULT_SAMPLING: dict[str, Any] = dict(
    max_new_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0
)
# SamplingParams field <- GGUF key, as tools/convert/convert.py writes them from generation_config.json.
SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
}
# Tokenizers are built once per model (a large vocabulary takes a second) and shared by its contexts.
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Tokenizer]" = weakref.WeakKeyDictionary()


def default_threads() -> int:
    """Physical cores: hyper-threads share the core's vector units, so they only add contention."""
    return max(1, _C.physical_core_count())


class LLM:
    """A model and its inference context (KV cache for one sequence).

    Args:
        model_path: a GGUF file.
        n_ctx: context length in tokens (KV cache size); 0 means the model's training context.
        n_threads: CPU threads; default: the number of physical cores.
        n_batch: tokens evaluated per forward pass when prefilling a long prompt.
        kv_type: KV cache element type, "f16" (default, half the memory) or "f32".
    """

    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
                 n_batch: int = 512, kv_type: str = "f16"):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        self.model_path = path
        self._model = _C.Model(str(path))
        self._init_context(n_ctx, n_threads, n_batch, kv_type)

    def _init_context(self, n_ctx: int, n_threads: int | None, n_batch: int, kv_type: str) -> None:
        cfg = self._model.config
        if n_ctx <= 0:
            n_ctx = int(cfg["n_ctx_train"])
        if n_threads is None or n_threads <= 0:
            n_threads = default_threads()
        self._ctx = _C.Context(self._model, _C.Executor(int(n_threads)), int(n_ctx), 1, int(n_batch), kv_type)

    def new_context(self, n_ctx: int | None = None, n_threads: int | None = None, n_batch: int = 512,
                    kv_type: str = "f16") -> "LLM":
        """Another `LLM` on the same weights (shared, not copied) with its own KV cache: one per
        concurrent conversation, e.g. a server slot."""
        other = object.__new__(type(self))
        other.model_path = self.model_path
        other._model = self._model
        other._init_context(self.n_ctx if n_ctx is None else n_ctx, n_threads or self.n_threads, n_batch, kv_type)
        return other

    # --- model facts -------------------------------------------------------------------------
    @cached_property
    def metadata(self) -> dict[str, Any]:
        """The GGUF metadata (keys as in the file)."""
        return self._model.file.metadata

    @property
    def config(self) -> dict[str, Any]:
        """Hyper-parameters the engine runs with (arch, n_embd, n_layer, n_head, ...)."""
        return self._model.config

    @property
    def n_vocab(self) -> int:
        return int(self._model.config["n_vocab"])

    @property
    def n_ctx(self) -> int:
        return self._ctx.n_ctx

    @property
    def n_threads(self) -> int:
        return self._ctx.n_threads

    @property
    def n_past(self) -> int:
        """Tokens currently held in the KV cache."""
        return self._ctx.n_past

    # --- evaluation ----------------------------------------------------------------------------
    def eval(self, token_ids: Sequence[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the context and return float32 logits: of the last token ([n_vocab]),
        or of every new token ([len(token_ids), n_vocab]) with ``all_logits``.

        Raises ``pyengine.ContextLengthError`` if the context would exceed ``n_ctx``.
        """
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("eval needs at least one token")
        return self._ctx.eval(ids, "all" if all_logits else "last")

    def logits(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits of every position of ``token_ids`` in a fresh context: float32 [len, n_vocab]."""
        self.reset()
        return self.eval(token_ids, all_logits=True)

    def reset(self) -> None:
        """Empty the context."""
        self._ctx.truncate(0)

    def truncate(self, n_past: int) -> None:
        """Keep the first ``n_past`` tokens of the context and forget the rest."""
        self._ctx.truncate(int(n_past))

    # --- text in, text out --------------------------------------------------------------------
    @property
    def tokenizer(self) -> "Tokenizer":
        """The model's tokenizer, built from the GGUF metadata on first use and shared by `new_context` copies."""
        from .tokenizer import Tokenizer

        tokenizer = _TOKENIZERS.get(self._model)
        if tokenizer is None:
            tokenizer = _TOKENIZERS[self._model] = Tokenizer.from_metadata(self.metadata)
        return tokenizer

    @cached_property
    def chat_template(self) -> "ChatTemplate":
        """The model's chat template (`tokenizer.chat_template`), else a built-in guessed from the vocabulary."""
        from .chat_template import ChatTemplate

        return ChatTemplate.for_tokenizer(self.tokenizer)

    @cached_property
    def sampling_defaults(self) -> dict[str, Any]:
        """`SamplingParams` fields this model generates with unless told otherwise: the
        `general.sampling.*` keys of the GGUF (from the checkpoint's generation_config.json), else
        `DEFAULT_SAMPLING`; plus the extra end-of-generation ids that generation_config.json lists."""
        md = self.metadata
        defaults = dict(DEFAULT_SAMPLING)
        for name, key in SAMPLING_KEYS.items():
            if md.get(key) is not None:
                defaults[name] = type(DEFAULT_SAMPLING[name])(md[key])
        eos = md.get("pyengine.generation.eos_token_ids")
        if eos is not None:
            defaults["stop_token_ids"] = tuple(int(i) for i in np.atleast_1d(eos))
        return defaults

    def sampling_params(self, params: "SamplingParams | None" = None, **overrides: Any) -> "SamplingParams":
        """`SamplingParams` from the model's defaults (or `params`), with `overrides` applied.

        Overrides are SamplingParams fields (transformers' names): max_new_tokens, temperature,
        top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, stop,
        stop_token_ids, ignore_eos. A value of None keeps the default.
        """
        from .sampling import SamplingParams

        fields = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        base = dataclasses.asdict(params) if params is not None else dict(self.sampling_defaults)
        given = {k: v for k, v in overrides.items() if v is not None}
        if params is None and "stop_token_ids" in given:  # the model's own end ids keep stopping it
            given["stop_token_ids"] = (*given["stop_token_ids"], *base.get("stop_token_ids", ()))
        return SamplingParams(**{**base, **given})

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False, params: "SamplingParams | None" = None,
                 add_special_tokens: bool = True, **sampling: Any) -> "str | Generation":
        """Continue `prompt` (text, or token ids) as a raw completion, without a chat template.

        Keyword arguments are the sampling settings of `sampling_params` (max_new_tokens,
        temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
        seed, stop, ...); what is not given comes from the model (`sampling_defaults`).
        Returns the generated text; with ``stream=True`` a `Generation`: iterate it for text pieces,
        then read its `text` and `stats`. Each call evaluates its prompt from scratch, so equal
        arguments and seed give equal text. `add_special_tokens` adds BOS where the model wants one.
        """
        from .generation import Generation

        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = [int(t) for t in prompt]
        generation = Generation(self, self.tokenizer, ids, self.sampling_params(params, **sampling))
        return generation if stream else generation.wait()

    def chat(self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False,
             params: "SamplingParams | None" = None, **sampling: Any) -> "str | Generation":
        """The assistant's reply to `messages` ([{"role": "system" | "user" | "assistant", "content": ...}]),
        rendered with the model's chat template.

        Sampling keyword arguments and `stream` are as in `generate`. Stateless: for a conversation
        that reuses the KV cache from turn to turn, use `chat_session`.
        """
        text = self.chat_template.render(list(messages), add_generation_prompt=True)
        # As transformers' apply_chat_template: the template writes BOS itself where the model wants one.
        return self.generate(text, stream=stream, params=params, add_special_tokens=False, **sampling)

    def perplexity(self, text: str, n_ctx: int = 512, n_chunks: int | None = None) -> "PerplexityResult":
        """Perplexity of ``text`` with llama-perplexity's protocol (chunks of ``n_ctx`` tokens, second
        half of each scored); ``.ppl`` and ``.uncertainty`` on the result. See pyengine.quality."""
        from .quality import perplexity

        return perplexity(self, text, n_ctx=n_ctx, n_chunks=n_chunks)

    def chat_session(self, system: str | None = None, *, params: "SamplingParams | None" = None,
                     **sampling: Any) -> "ChatSession":
        """A stateful conversation on this model's context: `session.send(text)` returns the reply's
        `Generation`, and each turn evaluates only the tokens the KV cache does not hold yet.

        `system` is the system prompt (None: the template's default, if it has one). Sampling
        keyword arguments are as in `generate`; `send` can override them per turn with a
        `SamplingParams` (see `sampling_params`).
        """
        from .generation import ChatSession

        return ChatSession(self, self.tokenizer, self.chat_template, system, self.sampling_params(params, **sampling))

    def __repr__(self) -> str:
        c = self.config
        return (f"LLM({str(self.model_path)!r}, arch={c['arch']}, n_layer={c['n_layer']}, n_embd={c['n_embd']}, "
                f"n_ctx={self.n_ctx}, n_threads={self.n_threads})")
