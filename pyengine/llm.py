"""The `LLM` class: a GGUF model loaded into the C++ engine, with one inference context."""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _C


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
        self._ctx = _C.Context(self._model, int(n_ctx), int(n_threads), int(n_batch), kv_type)

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

    def __repr__(self) -> str:
        c = self.config
        return (f"LLM({str(self.model_path)!r}, arch={c['arch']}, n_layer={c['n_layer']}, n_embd={c['n_embd']}, "
                f"n_ctx={self.n_ctx}, n_threads={self.n_threads})")
