"""Calibration for error-feedback quantization: every linear layer's input covariance X^T X, collected by
running the engine (not torch) over a calibration text, as `pyengine imatrix` collects its diagonal.

`pyengine quantize IN OUT TYPE --calibration TEXT` runs IN (F16/F32/BF16, or any type pyengine runs) over
the text in chunks of `n_ctx` tokens (BOS first, as llama-imatrix) and hands each tensor's X^T X to
`_C.quantize_feedback` (csrc/cpu/quant_search.h). Layers that read the same input (q/k/v, gate/up) share
one matrix: a layer of n input columns holds n^2 floats (SmolLM2-135M: about 0.4 GB in all, a 7B model
~22 GB). So that they need not all be in memory at once, `max_bytes` splits the blocks into groups whose
matrices fit, runs the text once per group (the engine collecting only that group's matrices) and
writes each group's matrices to a temporary folder, read back (memory-mapped) one tensor at a time when
quantizing; the model is freed before that. The matrices are the engine's own (no copy).
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConversionError


@dataclass
class Covariances:
    """{tensor name: float32 (cols, cols) sums of x^T x} in memory and {tensor name: .npy file} written to
    disk, {tensor name: float64 (cols,) sums of x^2}, the rows summed per tensor, and what was run."""
    xtx: dict[str, np.ndarray]
    sum2: dict[str, np.ndarray]
    rows: dict[str, int]
    n_chunks: int
    n_ctx: int
    files: dict[str, Path] = field(default_factory=dict)
    passes: int = 1
    _folder: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def __contains__(self, name: str) -> bool:
        return name in self.xtx or name in self.files

    def matrix(self, name: str) -> np.ndarray | None:
        """`name`'s x^T x (memory-mapped when it was written to disk), or None."""
        if name in self.xtx:
            return self.xtx[name]
        return np.load(self.files[name], mmap_mode="r") if name in self.files else None

    def release(self, name: str) -> None:
        """Drops `name`'s matrix (freed once no other tensor shares it)."""
        self.xtx.pop(name, None)
        self.files.pop(name, None)

    def close(self) -> None:
        """Deletes the matrices written to disk."""
        self.files.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def importance(self, name: str) -> np.ndarray | None:
        """The imatrix entry of `name` (mean x^2 per column), from the same run."""
        if name not in self.sum2:
            return None
        return (self.sum2[name] / max(1, self.rows[name])).astype(np.float32)


def _block_groups(model_path: Path, max_bytes: int) -> list[list[str]]:
    """The 2-D weights in groups of whole consecutive blocks (`blk.N.`, `enc.blk.N.`, ...) whose matrices
    (counted as one per weight, cols^2 floats: an upper bound, as some share one) fit in max_bytes; a block
    alone may not. Weights outside blocks join the last group."""
    from .gguf_stream import GGUFHeader

    blocks: dict[str, list] = {}  # in file order
    others = []
    for t in GGUFHeader(model_path).tensors:
        if len(t.dims) != 2:
            continue
        m = re.match(r"(.*?blk\.\d+)\.", t.name)
        if m:
            blocks.setdefault(m.group(1), []).append(t)
        else:
            others.append(t)
    groups: list[list[str]] = []
    size = max_bytes + 1
    for tensors in blocks.values():
        need = sum(4 * t.cols * t.cols for t in tensors)
        if size + need > max_bytes:
            groups.append([])
            size = 0
        groups[-1] += [t.name for t in tensors]
        size += need
    if groups:
        groups[-1] += [t.name for t in others]
    return groups


def collect_covariances(model_path: str | os.PathLike, text: str, n_ctx: int = 512, n_chunks: int | None = None,
                        n_threads: int | None = None, progress: bool = False, kv_type: str = "f16",
                        max_bytes: int | None = None) -> Covariances:
    """X^T X of every linear layer's input over `n_chunks` chunks of `text` (all when None); the KV cache
    in `kv_type` (F16, as llama-imatrix's default). max_bytes: hold at most about this many bytes of
    matrices in memory (one pass over the text per group of blocks, the matrices written to a temporary
    folder); None: one pass, all in memory."""
    from .imatrix_cmd import load_chunks, run_chunks

    groups = _block_groups(Path(model_path), max_bytes) if max_bytes is not None else []
    if len(groups) <= 1:
        groups = [None]  # one pass, every matrix in memory
    xtx, files, sum2, rows = {}, {}, {}, {}
    folder = tempfile.TemporaryDirectory(prefix="pyengine-xtx-") if len(groups) > 1 else None
    llm, chunks = load_chunks(Path(model_path), text, n_ctx, n_chunks, n_threads, kv_type)  # once for all passes
    for g, names in enumerate(groups):
        run_chunks(llm, chunks, progress, covariance=True, covariance_tensors=names)
        stats = llm.input_stats()
        cov = llm.input_covariance(take=True)  # no copy; the engine lets go of them
        if g == 0:
            sum2 = {k: v[0] for k, v in stats.items()}
            rows = {k: int(v[1]) for k, v in stats.items()}
        if folder is None:
            xtx = {k: v[0] for k, v in cov.items()}
            continue
        written: dict[int, Path] = {}  # q/k/v (gate/up) share one matrix: one file
        for name, (h, _) in cov.items():
            if id(h) not in written:
                written[id(h)] = Path(folder.name) / f"{len(files)}.npy"
                np.save(written[id(h)], h)
            files[name] = written[id(h)]
        del cov
    del llm  # the model's memory, before quantizing
    return Covariances(xtx=xtx, sum2=sum2, rows=rows, n_chunks=len(chunks), n_ctx=n_ctx, files=files,
                       passes=len(groups), _folder=folder)


def quantize_feedback(x: np.ndarray, qtype: int, cov: Covariances, name: str, importance: np.ndarray | None = None,
                      damp: float = 0.01, n_threads: int = 0) -> np.ndarray | None:
    """Tensor `name` (float32 (rows, cols)) as ggml blocks of `qtype` with error feedback over its input
    covariance; None when the calibration run has no covariance for it (embeddings, the LM head). Rows
    where ggml's plain quantization has the lower output error keep ggml's blocks."""
    from pyengine import _C

    h = cov.matrix(name)
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
