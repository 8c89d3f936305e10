"""CUDA matmul and get_rows against the CPU backend and float64 numpy references, for every weight type.

Each result is held to a bound derived from how it rounds (see gpu_tolerance / cpu_tolerance), so a
wrong index, a missed chunk or a stale tile shows up as an error far above the bound, while honest
rounding never does. Dequantisation (get_rows) must equal the CPU's bit for bit.
"""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

from pyengine import _C  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_C.has_cuda and getattr(_C, "cuda_device_count", lambda: 0)() > 0),
                       reason="needs a CUDA build and a CUDA device"),
]

FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
LEGACY_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

# Byte offsets of the fp16 super-block scales in each K-quant block (ggml's block_qN_K).
K_SCALE_OFFSETS = {QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}

M_LIST = [1, 2, 3, 5, 8, 9, 16, 33, 100, 129, 260]  # <= 8: the GEMV kernel; > 8: the tensor-core GEMM (128-row tiles)
ROWS = [1, 7, 67, 300]
GEMV_MAX_M = 8


def cols_for(qtype: QT) -> list[int]:
    # Chunks of 32 elements; the GEMV stages x in slices of 1024 columns at m = 8 (so 2080 is three
    # slices, the last partial), the GEMM takes K steps of 64 (so 32, 96 and 544 end mid-step) and
    # tiles of 128 x 128 (300 rows of W and 129 or 260 of x end mid-tile).
    if qtype in FLOAT_TYPES:
        return [64, 200, 577, 2080]  # 200 and 577 end in a partial chunk
    if qtype in K_TYPES:
        return [256, 768, 2304]
    return [32, 96, 544, 2080]


def make_weights(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes (rows, row_bytes) of a random rows x cols matrix."""
    if qtype in K_TYPES:
        # Random bytes are valid K-quant blocks once the fp16 super-block scales are sane.
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype]:
            d = rng.uniform(0.001, 0.01, (rows, cols // block)).astype(np.float16)
            raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == QT.F32:
        return w.view(np.uint8)
    if qtype == QT.F16:
        return w.astype(np.float16).view(np.uint8)
    return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(rows, -1)


def dequant_ref(qtype: QT, raw: np.ndarray, cols: int) -> np.ndarray:
    if qtype == QT.F32:
        return raw.view(np.float32).reshape(-1, cols)
    if qtype == QT.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, cols)
    return gguf.quants.dequantize(raw, qtype).reshape(-1, cols)


def gpu_tolerance(qtype: QT, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bound on |y_gpu - x @ w.T| (float64 x, w: the exact inputs), elementwise."""
    ax, aw = np.abs(x.astype(np.float64)), np.abs(w)
    scale = ax @ aw.T  # sum_k |x_k w_k|: every rounding error below is relative to a term of it
    if qtype == QT.F32 and x.shape[0] > GEMV_MAX_M:
        # The fp32 GEMM: each thread sums all cols terms in order with float FMAs, so the error is
        # below cols * 2^-24 * scale (the worst case; random signs give far less).
        return x.shape[1] * 2.0**-24 * scale + 1e-30
    if x.shape[0] <= GEMV_MAX_M and qtype not in FLOAT_TYPES:
        # GEMV on quantized weights: x rounded to 8 bits per 32-element chunk with d = amax / 127 and
        # integer dot products (csrc/cuda/quant_dot.cuh), the rounding the CPU does: the CPU's bound.
        return cpu_tolerance(qtype, x, w)
    if x.shape[0] <= GEMV_MAX_M:
        # GEMV on float weights: float x, weights converted exactly to float, float FMAs. A lane sums
        # cols / 32 terms and five shuffles join the lanes, so the error is below (cols / 32 + 5) * 2^-24 * scale:
        # 1e-4 covers cols up to ~50000.
        return 1e-4 * scale + 1e-30
    # Tensor cores: x and w rounded to half. In half's normal range each rounding is within a relative
    # 2^-11, so a product is within (2^-10 + 2^-22) |x_k w_k|; below it (|v| < 2^-14) within an absolute
    # 2^-25, adding at most 2^-25 (|w_k| + |x_k|) per product. The float accumulation adds ~cols * 2^-24
    # relative, negligible here. 2.5e-3 leaves a margin of 2.5 over the half rounding.
    return 2.5e-3 * scale + 2.0**-24 * (ax.sum(1)[:, None] + aw.sum(1)[None, :]) + 1e-30


def cpu_tolerance(qtype: QT, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bound on |y_cpu - x @ w.T|, elementwise (tests/test_kernels.py holds the CPU to these)."""
    ax, aw = np.abs(x.astype(np.float64)), np.abs(w)
    scale = ax @ aw.T
    if qtype in FLOAT_TYPES:
        return 2e-5 * scale + 1e-30
    # The CPU rounds x to 8 bits per 32-element block (d = amax / 127), so |x - x_q| <= amax / 254 per
    # element; its integer dot products then hold within 1e-4 of the sums over |x_q| |w|.
    m, k = x.shape
    amax = np.abs(x.reshape(m, k // 32, 32)).max(axis=-1).astype(np.float64)
    x_err = np.repeat(amax / 254 * (1 + 1e-5), 32, axis=1)
    q_err = x_err @ aw.T
    return q_err + 1e-4 * (scale + q_err) + 1e-30


def check_matmul(qtype: QT, rows: int, cols: int, m: int, rng: np.random.Generator) -> str | None:
    """None if the GPU result is within bounds of the reference and of the CPU, else a description."""
    raw = make_weights(qtype, rows, cols, rng)
    w = dequant_ref(qtype, raw, cols).astype(np.float64)
    x = rng.standard_normal((m, cols)).astype(np.float32)
    got = _C.matmul(raw, int(qtype), rows, cols, x, device="cuda")
    cpu = _C.matmul(raw, int(qtype), rows, cols, x, n_threads=4)
    assert got.shape == (m, rows) and got.dtype == np.float32
    want = x.astype(np.float64) @ w.T
    tol_gpu = gpu_tolerance(qtype, x, w)
    tol_cpu = cpu_tolerance(qtype, x, w)
    for name, err, tol in (("reference", np.abs(got - want), tol_gpu), ("CPU", np.abs(got - cpu), tol_gpu + tol_cpu)):
        if not np.isfinite(got).all() or (err > tol).any():
            ratio = np.where(np.isfinite(err), err / tol, np.inf)
            i = np.unravel_index(np.argmax(ratio), ratio.shape)
            return (
                f"{qtype.name} rows={rows} cols={cols} m={m}: vs {name}, {(~(err <= tol)).sum()} bad, worst at {i}: "
                f"gpu {got[i]} want {want[i]} cpu {cpu[i]} err {err[i]:.3g} tol {tol[i]:.3g}"
            )
    return None


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_matmul_matches_cpu_and_reference(qtype):
    rng = np.random.default_rng(300 + int(qtype))
    cols_list = cols_for(qtype)
    failures = []
    # Every (m, rows) pair; cols rotate so that every m and every row count meets every cols.
    for i, m in enumerate(M_LIST):
        for j, rows in enumerate(ROWS):
            msg = check_matmul(qtype, rows, cols_list[(i + j) % len(cols_list)], m, rng)
            if msg:
                failures.append(msg)
    assert not failures, "\n".join(failures[:10])


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q4_0, QT.Q8_0, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_cuda_matmul_long_rows(qtype):
    """Rows longer than one GEMV x slice even at m = 1 (8192 columns); odd float lengths."""
    rng = np.random.default_rng(400 + int(qtype))
    cols = 8451 if qtype in FLOAT_TYPES else 8448
    failures = [msg for m in (1, 2, 8, 9) if (msg := check_matmul(qtype, 67, cols, m, rng))]
    assert not failures, "\n".join(failures)


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape, what
    bad = got.view(np.uint32) != want.view(np.uint32)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {bad.sum()} elements differ, first at {i}: {got[i]!r} vs {want[i]!r}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_dequantize_equals_cpu(qtype):
    """get_rows on the GPU decodes every element exactly as the CPU does."""
    rng = np.random.default_rng(500 + int(qtype))
    for rows in (1, 7, 300):
        for cols in cols_for(qtype):
            raw = make_weights(qtype, rows, cols, rng)
            got = _C.dequantize(raw, int(qtype), rows, cols, device="cuda")
            assert_bits_equal(got, _C.dequantize(raw, int(qtype), rows, cols), f"{qtype.name} {rows}x{cols}")


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_cuda_half_conversion_exhaustive(qtype):
    """All 65536 bit patterns through the device's fp16 / bf16 decoding: subnormals, inf, NaN payloads."""
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    got = _C.dequantize(raw, int(qtype), 2, 1 << 15, device="cuda")
    assert_bits_equal(got, _C.dequantize(raw, int(qtype), 2, 1 << 15), qtype.name)


def test_cuda_dequantize_many_rows():
    """More rows than a grid's y dimension holds (65535): the row index is blockIdx.x."""
    rng = np.random.default_rng(7)
    rows, cols = 70000, 32
    raw = make_weights(QT.Q4_0, rows, cols, rng)
    got = _C.dequantize(raw, int(QT.Q4_0), rows, cols, device="cuda")
    assert_bits_equal(got, _C.dequantize(raw, int(QT.Q4_0), rows, cols), "Q4_0 70000x32")
