"""GGML block quantizers in numpy, byte-for-byte equal to ggml's reference `quantize_row_*_ref`.

Each quantizer works on a whole 2-D float32 tensor (rows, cols) with cols a multiple of 32 and returns
the packed blocks as uint8 of shape (rows, cols // 32 * type_size), ready for GGUF. Work is done in
chunks of rows, on a thread pool (one thread per core), so that temporaries stay small and in cache
whatever the tensor size.

Layouts (ggml-common.h):
  Q8_0: fp16 d, int8 qs[32]                       x = d * q
  Q4_0: fp16 d, uint8 qs[16] (lo nibble: x[j], hi: x[j+16])   x = d * (q - 8)
  Q4_1: fp16 d, fp16 m, uint8 qs[16]                          x = d * q + m
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


def is_quantized(qtype: GGMLQuantizationType) -> bool:
    return qtype in BLOCK_QUANTIZERS


def nbytes(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of numpy `shape` takes in GGUF as `qtype`."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block_size * type_size


def can_quantize(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 1 and shape[-1] % QK == 0


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Convert a float array to the bytes/values GGUF stores for `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1)."""
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    if qtype == GGMLQuantizationType.BF16:
        return to_bf16(x)
    quantize_blocks = BLOCK_QUANTIZERS[qtype]
    if not can_quantize(x.shape):
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {QK}")
    _, type_size = GGML_QUANT_SIZES[qtype]
    rows = x.reshape(-1, x.shape[-1])
    blocks_per_row = rows.shape[1] // QK
    out = np.empty((rows.shape[0], blocks_per_row * type_size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])

    def quantize_rows(r0: int) -> None:
        chunk = np.asarray(rows[r0:r0 + step], dtype=np.float32)
        out[r0:r0 + step] = quantize_blocks(chunk.reshape(-1, QK)).reshape(chunk.shape[0], -1)

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
