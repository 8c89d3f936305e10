"""Calibration for error-feedback quantization: every linear layer's input covariance X^T X, collected by
running the engine (not torch) over a calibration text, as `pyengine imatrix` collects its diagonal.

`pyengine quantize IN OUT TYPE --calibration TEXT` runs IN (F16/F32/BF16, or any type pyengine runs) over
the text in chunks of `n_ctx` tokens (BOS first, as llama-imatrix) and hands each tensor's X^T X to
`_C.quantize_feedback` (csrc/cpu/quant_search.h). Layers that read the same input (q/k/v, gate/up) share
one matrix: a layer of n input columns holds n^2 floats (SmolLM2-135M: about 0.4 GB in all). The matrices
are the engine's own (no copy); the model is freed before quantizing, and each matrix as soon as the last
tensor that reads it is written (`Covariances.release`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConversionError


@dataclass
class Covariances:
    """{tensor name: float32 (cols, cols) sums of x^T x}, {tensor name: float64 (cols,) sums of x^2}, the
    rows summed per tensor, and what was run."""
    xtx: dict[str, np.ndarray]
    sum2: dict[str, np.ndarray]
    rows: dict[str, int]
    n_chunks: int
    n_ctx: int

    def release(self, name: str) -> None:
        """Drops `name`'s matrix (freed once no other tensor shares it)."""
        self.xtx.pop(name, None)

    def importance(self, name: str) -> np.ndarray | None:
        """The imatrix entry of `name` (mean x^2 per column), from the same run."""
        if name not in self.sum2:
            return None
        return (self.sum2[name] / max(1, self.rows[name])).astype(np.float32)


def collect_covariances(model_path: str | os.PathLike, text: str, n_ctx: int = 512, n_chunks: int | None = None,
                        n_threads: int | None = None, progress: bool = False, kv_type: str = "f16") -> Covariances:
    """X^T X of every linear layer's input over `n_chunks` chunks of `text` (all when None); the KV cache
    in `kv_type` (F16, as llama-imatrix's default)."""
    from .imatrix_cmd import run_chunks

    llm, count = run_chunks(Path(model_path), text, n_ctx, n_chunks, n_threads, progress, kv_type, covariance=True)
    stats = llm.input_stats()
    cov = llm.input_covariance(take=True)  # no copy; the model's memory goes with `llm` on return
    del llm
    return Covariances(xtx={k: v[0] for k, v in cov.items()}, sum2={k: v[0] for k, v in stats.items()},
                       rows={k: int(v[1]) for k, v in stats.items()}, n_chunks=count, n_ctx=n_ctx)


def quantize_feedback(x: np.ndarray, qtype: int, cov: Covariances, name: str, importance: np.ndarray | None = None,
                      damp: float = 0.01, n_threads: int = 0) -> np.ndarray | None:
    """Tensor `name` (float32 (rows, cols)) as ggml blocks of `qtype` with error feedback over its input
    covariance; None when the calibration run has no covariance for it (embeddings, the LM head). Rows
    where ggml's plain quantization has the lower output error keep ggml's blocks."""
    from pyengine import _C

    h = cov.xtx.get(name)
    if h is None or x.ndim != 2 or h.shape != (x.shape[1], x.shape[1]):
        return None
    if importance is None:
        importance = cov.importance(name)
    data, _ = _C.quantize_feedback(x, int(qtype), h, importance, damp=damp, n_threads=n_threads, name=name)
    return data


def load_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"calibration text not found: {p}")
    return p.read_text(encoding="utf-8", errors="replace")
