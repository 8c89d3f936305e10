"""GGML block quantizers in numpy, byte-for-byte equal to ggml's reference `quantize_row_*_ref`.

Each quantizer works on a whole 2-D float32 tensor (rows, cols) with cols a multiple of 32 and returns
the packed blocks as uint8 of shape (rows, cols // 32 * type_size), ready for GGUF. Work is done in
chunks of rows, on a thread pool (one thread per core), so that temporaries stay small and in cache
whatever the tensor size.

Layouts (ggml-common.h):
  Q8_0: fp16 d, int8 qs[32]                       x = d * q
  Q4_0: fp16 d, uint8 qs[16] (lo nibble: x[j], hi: x[j+16])   x = d * (q - 8)
  Q4_1: fp16 d, fp16 m, uint8 qs[16]                          x = d * q + m

Two methods (`quantize(..., method=)`):
  "rtn"     round to nearest with the scale fixed by the block's extreme value: ggml's reference, what
            llama-quantize does without an importance matrix. Byte-equal to gguf.quants.
  "search"  per block, try a grid of scales around the RTN one, refit the scale (and for Q4_1 the
            offset) by weighted least squares for the codes each gives, and keep the candidate with the
            smallest weighted squared error; the RTN candidate is always among them, so the error is never
            higher than RTN's. Weights are llama.cpp's `quantize_row_q4_0_impl` ones:
            importance[col] * sqrt(sigma2 + x^2), sigma2 the row's mean square, importance the per-input-
            channel mean squared activation from a calibration text (imatrix.py) or 1. The result is
            still standard Q4_0/Q4_1 blocks that any GGUF reader dequantizes.

Default: "rtn" without a calibration text, "search" with one (convert.py). Measured on SmolLM2-135M
(benchmarks/quant_quality.py, 20 x 512-token chunks of pride_and_prejudice.txt, PPL increase over F16):
Q4_0 rtn +4.89, search +4.40, search with a calibration text +2.21. The uncalibrated search gains ~10%
for a conversion ~40x slower and files that differ from llama-quantize's, so it stays opt-in; the gain
that matters comes from the activation weights.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK = 32
CHUNK_ELEMENTS = 1 << 18   # 1 MiB of float32: temporaries stay in L2


def roundf(x: np.ndarray) -> np.ndarray:
    """C `roundf` (half away from zero), exact in float32: floor(2*frac) is 1 iff frac >= 0.5."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.copysign(fl + np.floor(2 * (a - fl)), x)


def _reciprocal(d: np.ndarray) -> np.ndarray:
    # ggml: id = d ? 1.0f/d : 0.0f
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 codes 0..15 -> (n, 16): byte j holds q[j] in the low and q[j+16] in the high nibble."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def quantize_blocks_q8_0(b: np.ndarray) -> np.ndarray:
    amax = np.abs(b).max(axis=1, keepdims=True)
    d = amax / np.float32(127)
    q = roundf(b * _reciprocal(d)).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def quantize_blocks_q4_0(b: np.ndarray) -> np.ndarray:
    # the signed value of largest magnitude (first one on ties), mapped to -8
    imax = np.abs(b).argmax(axis=1)[:, None]
    vmax = np.take_along_axis(b, imax, axis=1)
    d = vmax / np.float32(-8)
    # (int8_t)(x*id + 8.5f) truncates toward zero; the value is >= 0.5, so trunc == floor
    q = np.minimum(np.trunc(b * _reciprocal(d) + np.float32(8.5)), np.float32(15)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)


def quantize_blocks_q4_1(b: np.ndarray) -> np.ndarray:
    vmin = b.min(axis=1, keepdims=True)
    vmax = b.max(axis=1, keepdims=True)
    d = (vmax - vmin) / np.float32(15)
    q = np.minimum(np.trunc((b - vmin) * _reciprocal(d) + np.float32(0.5)), np.float32(15)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), vmin.astype(np.float16).view(np.uint8),
                           _pack_nibbles(q)], axis=1)


# --- error-minimising scale search ---------------------------------------------------------------------

# Candidate inverse scales, as multiples of the RTN one: llama.cpp's make_qx_quants tries nmax + 0.1*is for
# is in -9..9; a slightly wider and finer grid costs little in numpy and finds a few more better blocks.
SEARCH_STEPS = np.linspace(-1.2, 1.2, 25, dtype=np.float32)
SEARCH_REFINE_ITERS = 2   # code <-> scale alternations after the grid (Lloyd-style), each can only help


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def block_weights(b: np.ndarray, importance: np.ndarray | None, row_sigma2: np.ndarray) -> np.ndarray:
    """Per-element weights of the squared error (llama.cpp's quantize_row_q4_0_impl): importance *
    sqrt(sigma2 + x^2); importance is (n, 32) or None (all ones), row_sigma2 is (n, 1)."""
    w = np.sqrt(row_sigma2 + b * b)
    return w if importance is None else w * importance


def _lsq_scale(b: np.ndarray, w: np.ndarray, L: np.ndarray) -> np.ndarray:
    sumlx = (w * b * L).sum(axis=1, keepdims=True)
    suml2 = (w * L * L).sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(suml2 > 0, sumlx / suml2, 0).astype(np.float32)


def _sq_err(b: np.ndarray, w: np.ndarray, approx: np.ndarray) -> np.ndarray:
    return (w * (b - approx) ** 2).sum(axis=1)


def search_q4_0(b: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (n, 32) and weights -> (fp16-exact scale d (n, 1), codes 0..15 (n, 32)) minimising
    sum w * (x - d*(q-8))^2 over the candidates, RTN's included."""
    imax = np.abs(b).argmax(axis=1)[:, None]
    vmax = np.take_along_axis(b, imax, axis=1)
    # RTN, as quantize_blocks_q4_0
    best_d = _f16(vmax / np.float32(-8))
    q = np.minimum(np.trunc(b * _reciprocal(vmax / np.float32(-8)) + np.float32(8.5)), np.float32(15))
    best_L = q - 8
    best_err = _sq_err(b, w, best_d * best_L)

    def consider(L: np.ndarray) -> None:
        nonlocal best_d, best_L, best_err
        d = _f16(_lsq_scale(b, w, L))
        err = _sq_err(b, w, d * L)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better[:, None], d, best_d)
        best_L = np.where(better[:, None], L, best_L)

    with np.errstate(divide="ignore", invalid="ignore"):
        for sign, nmax in ((-1, 8), (1, 7)):  # the extreme value mapped to -8 (as RTN) or to +7
            for t in SEARCH_STEPS:
                iscale = np.where(vmax != 0, sign * (nmax + t) / vmax, 0).astype(np.float32)
                consider(np.clip(np.rint(b * iscale), -8, 7))
        for _ in range(SEARCH_REFINE_ITERS):
            consider(np.clip(np.rint(b * _reciprocal(best_d)), -8, 7))
    return best_d, (best_L + 8).astype(np.uint8)


def _lsq_scale_min(b: np.ndarray, w: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares for x ~ d*L + m per block."""
    sw = w.sum(axis=1, keepdims=True)
    sl = (w * L).sum(axis=1, keepdims=True)
    sl2 = (w * L * L).sum(axis=1, keepdims=True)
    sx = (w * b).sum(axis=1, keepdims=True)
    sxl = (w * b * L).sum(axis=1, keepdims=True)
    det = sw * sl2 - sl * sl
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = det > 1e-12 * sw * sl2
        d = np.where(ok, (sw * sxl - sl * sx) / det, 0)
        m = np.where(ok, (sl2 * sx - sl * sxl) / det, sx / np.where(sw > 0, sw, 1))
    return d.astype(np.float32), m.astype(np.float32)


def search_q4_1(b: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks (n, 32) and weights -> (fp16-exact d, fp16-exact m, codes 0..15) minimising
    sum w * (x - (d*q + m))^2 over the candidates, RTN's included."""
    vmin = b.min(axis=1, keepdims=True)
    vmax = b.max(axis=1, keepdims=True)
    d_rtn = (vmax - vmin) / np.float32(15)
    best_L = np.minimum(np.trunc((b - vmin) * _reciprocal(d_rtn) + np.float32(0.5)), np.float32(15))
    best_d, best_m = _f16(d_rtn), _f16(vmin)
    best_err = _sq_err(b, w, best_d * best_L + best_m)

    def consider(L: np.ndarray) -> None:
        nonlocal best_d, best_m, best_L, best_err
        d, m = _lsq_scale_min(b, w, L)
        d, m = _f16(d), _f16(m)
        err = _sq_err(b, w, d * L + m)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better[:, None], d, best_d)
        best_m = np.where(better[:, None], m, best_m)
        best_L = np.where(better[:, None], L, best_L)

    rng = vmax - vmin
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in SEARCH_STEPS:
            iscale = np.where(rng > 0, (15 + t) / rng, 0).astype(np.float32)
            consider(np.clip(np.rint((b - vmin) * iscale), 0, 15))
        for _ in range(SEARCH_REFINE_ITERS):
            consider(np.clip(np.rint((b - best_m) * _reciprocal(best_d)), 0, 15))
    return best_d, best_m, best_L.astype(np.uint8)


def quantize_blocks_q4_0_search(b: np.ndarray, w: np.ndarray) -> np.ndarray:
    d, q = search_q4_0(b, w)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)


def quantize_blocks_q4_1_search(b: np.ndarray, w: np.ndarray) -> np.ndarray:
    d, m, q = search_q4_1(b, w)
    return np.concatenate([d.astype(np.float16).view(np.uint8), m.astype(np.float16).view(np.uint8),
                           _pack_nibbles(q)], axis=1)


SEARCH_QUANTIZERS = {
    GGMLQuantizationType.Q4_0: quantize_blocks_q4_0_search,
    GGMLQuantizationType.Q4_1: quantize_blocks_q4_1_search,
}
QUANT_METHODS = ("rtn", "search")


BLOCK_QUANTIZERS = {
    GGMLQuantizationType.Q8_0: quantize_blocks_q8_0,
    GGMLQuantizationType.Q4_0: quantize_blocks_q4_0,
    GGMLQuantizationType.Q4_1: quantize_blocks_q4_1,
}


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16) as ggml_compute_fp32_to_bf16: round to nearest even, NaN kept quiet."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(64), rounded)
    return out.astype(np.uint16)


# Every block type the engine's C++ quantizers write (csrc/cpu/quantize.cpp: ggml's quantize_<type>,
# byte-equal, with the importance-weighted variant when an imatrix is given).
CPP_TYPES = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
             GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q2_K,
             GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
             GGMLQuantizationType.Q6_K)


def is_quantized(qtype: GGMLQuantizationType) -> bool:
    return qtype in CPP_TYPES


def nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of numpy `shape` takes in GGUF as `qtype`."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block_size * type_size


def can_quantize(shape: tuple[int, ...], qtype: GGMLQuantizationType | None = None) -> bool:
    """Whether rows of this shape are whole blocks of `qtype` (of 32 elements if None)."""
    block = GGML_QUANT_SIZES[qtype][0] if qtype is not None else QK
    return len(shape) >= 1 and shape[-1] % block == 0


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, method: str = "rtn",
             importance: np.ndarray | None = None) -> np.ndarray:
    """Convert a float array to the bytes/values GGUF stores for `qtype` (F32, F16, BF16, or a block type
    of CPP_TYPES).

    method: "rtn" (ggml's quantizers, in C++: the reference rounding without `importance`, the
    importance-weighted search of llama-quantize --imatrix with it) or "search" (this file's numpy
    error-minimising scale search for Q4_0/Q4_1; other types are unaffected). importance: per-column
    (input channel) weights, shape (cols,), e.g. mean squared activations from imatrix.py.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown quantization method {method!r} (choose from {', '.join(QUANT_METHODS)})")
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    if qtype == GGMLQuantizationType.BF16:
        return to_bf16(x)
    search = method == "search" and qtype in SEARCH_QUANTIZERS
    if not can_quantize(x.shape, qtype):
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the {qtype.name} block size "
                         f"{GGML_QUANT_SIZES[qtype][0]}")
    if not search:
        from pyengine import _C

        if importance is not None:
            importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        return _C.quantize(np.ascontiguousarray(x, dtype=np.float32), int(qtype), importance)
    quantize_blocks = BLOCK_QUANTIZERS[qtype]
    _, type_size = GGML_QUANT_SIZES[qtype]
    rows = x.reshape(-1, x.shape[-1])
    blocks_per_row = rows.shape[1] // QK
    out = np.empty((rows.shape[0], blocks_per_row * type_size), dtype=np.uint8)
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        if importance.size != rows.shape[1]:
            raise ValueError(f"importance has {importance.size} values for {rows.shape[1]} columns")
    # the search keeps ~10 chunk-sized temporaries alive: smaller chunks keep them in cache
    step = max(1, (CHUNK_ELEMENTS // 8 if search else CHUNK_ELEMENTS) // rows.shape[1])

    def quantize_rows(r0: int) -> None:
        chunk = np.asarray(rows[r0:r0 + step], dtype=np.float32)
        if search:
            sigma2 = np.repeat((chunk * chunk).mean(axis=1), rows.shape[1] // QK)[:, None]
            imp = None if importance is None else np.broadcast_to(importance, chunk.shape).reshape(-1, QK)
            b = chunk.reshape(-1, QK)
            blocks = SEARCH_QUANTIZERS[qtype](b, block_weights(b, imp, sigma2))
        else:
            blocks = quantize_blocks(chunk.reshape(-1, QK))
        out[r0:r0 + step] = blocks.reshape(chunk.shape[0], -1)

    starts = range(0, rows.shape[0], step)
    if len(starts) == 1:
        quantize_rows(0)
    else:
        # numpy releases the GIL inside ufuncs, so row chunks quantize in parallel on threads
        list(_pool().map(quantize_rows, starts))
    return out.reshape(*x.shape[:-1], blocks_per_row * type_size)


_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="quantize")
    return _executor
