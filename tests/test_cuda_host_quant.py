"""The CUDA kernels' dequantisation (csrc/cuda/quant_blocks.cuh), run on the host.

_C.cuda_host_dequantize decodes with the very functions the GPU kernels call, compiled by the host
compiler, so this machine checks them without a GPU: they must equal the CPU backend bit for bit and
gguf-py's dequantize. The bindings are compiled in every build, with or without CUDA.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

from pyengine import _C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
LEGACY_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

# Byte offsets of the fp16 scales in each block: random bytes elsewhere are valid quants.
SCALE_OFFSETS = {
    QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
    QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
}  # fmt: skip


def random_blocks(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with sane fp16 scales: every quant bit pattern, every scale/min byte."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        d = (rng.uniform(0.001, 0.01, (rows, cols // block)) * rng.choice([-1, 1], (rows, cols // block)))
        raw[:, :, off : off + 2] = d.astype(np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def make_weights(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Raw GGUF bytes (rows, row_bytes) of rows x cols matrices of type qtype, a few ways."""
    if qtype == QT.F32:
        w = rng.standard_normal(rows * cols).astype(np.float32)
        specials = np.array([np.inf, -np.inf, np.nan, 1e-40, -0.0, 3e38, -1e-45], dtype=np.float32)
        w[: len(specials)] = specials[: w.size]
        return [w.reshape(rows, cols).view(np.uint8)]
    if qtype in (QT.F16, QT.BF16):
        # Every bit pattern is a value: normals, subnormals, zeros, infinities, NaNs.
        return [rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint16).view(np.uint8)]
    out = [random_blocks(qtype, rows, cols, rng)]
    if qtype in LEGACY_TYPES:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 10, (rows, 1)).astype(np.float32)
        out.append(np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(rows, -1))
    return out


def gguf_dequant(qtype: QT, raw: np.ndarray, cols: int) -> np.ndarray:
    if qtype == QT.F32:
        return raw.view(np.float32).reshape(-1, cols)
    if qtype == QT.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, cols)
    return gguf.quants.dequantize(raw, qtype).reshape(-1, cols)


def cols_for(qtype: QT) -> list[int]:
    if qtype in FLOAT_TYPES:
        return [32, 64, 200, 577]  # 200 and 577 end in a partial chunk
    if qtype in K_TYPES:
        return [256, 768, 1280]
    return [32, 96, 576]


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == np.float32 and want.dtype == np.float32 and got.shape == want.shape, what
    bad = got.view(np.uint32) != want.view(np.uint32)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {bad.sum()} elements differ, first at {i}: {got[i]!r} vs {want[i]!r}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_host_dequantize_matches_cpu_and_gguf(qtype):
    rng = np.random.default_rng(1000 + int(qtype))
    for rows in (1, 3, 37):
        for cols in cols_for(qtype):
            for raw in make_weights(qtype, rows, cols, rng):
                what = f"{qtype.name} {rows}x{cols}"
                got = _C.cuda_host_dequantize(raw, int(qtype), rows, cols)
                assert got.shape == (rows, cols)
                assert_bits_equal(got, _C.dequantize(raw, int(qtype), rows, cols), what + " vs CPU")
                # gguf-py: equal values (NaN where NaN; its F16 conversion may quieten NaN payloads).
                np.testing.assert_array_equal(got, gguf_dequant(qtype, raw, cols), err_msg=what + " vs gguf")


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_host_half_conversion_exhaustive(qtype):
    """All 65536 bit patterns, including subnormals, infinities and NaN payloads."""
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    got = _C.cuda_host_dequantize(raw, int(qtype), 2, 1 << 15)
    assert_bits_equal(got, _C.dequantize(raw, int(qtype), 2, 1 << 15), qtype.name)
    bits = np.arange(1 << 16, dtype=np.uint32).reshape(2, -1)
    if qtype == QT.BF16:
        want = (bits << 16).view(np.float32)
    else:
        want = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    finite = ~np.isnan(want)
    assert_bits_equal(got[finite], want[finite], qtype.name + " vs numpy")
    assert np.isnan(got[~finite]).all()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_host_gemv_staging_matches_dequantize(qtype):
    """The CUDA GEMV's staging of 32-chunk spans in shared memory, for every alignment of the rows:
    the warp's pieces cover each span exactly once with aligned loads (checked inside the binding),
    and decoding the staged span chunk by chunk gives the row's values bit for bit."""
    rng = np.random.default_rng(2000 + int(qtype))
    # Several spans (1024 columns each), a partial last span, rows of odd byte length (Q4_0 / Q5_0 / Q8_0
    # with an odd block count, odd float lengths), spans starting off 16-byte boundaries (Q3_K, Q6_K).
    if qtype in FLOAT_TYPES:
        cols_list = [1, 31, 577, 2080, 8451]
    elif qtype in K_TYPES:
        cols_list = [256, 2304, 8448]
    else:
        cols_list = [32, 544, 2080, 8448]
    misaligns = range(0, 16, 4 if qtype == QT.F32 else 2)
    for cols in cols_list:
        for raw in make_weights(qtype, 3, cols, rng):
            want = _C.cuda_host_dequantize(raw, int(qtype), 3, cols)
            for mis in misaligns:
                got = _C.cuda_host_gemv_staged_dequantize(raw, int(qtype), 3, cols, mis)
                assert_bits_equal(got, want, f"{qtype.name} 3x{cols} at {mis} mod 16")



QUANT_TYPES = LEGACY_TYPES + K_TYPES


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_host_int_chunks_match_gguf(qtype):
    """The decode GEMV's integer form of each chunk (cuda/quant_dot.cuh): q per element, scale and
    offset per 16-element half, with scale * q + offset equal to gguf-py's value up to the one float
    rounding gguf-py does in its last step."""
    rng = np.random.default_rng(3000 + int(qtype))
    for cols in cols_for(qtype):
        for raw in make_weights(qtype, 5, cols, rng):
            q, scale, offset = _C.cuda_host_int_chunks(raw, int(qtype), 5, cols)
            assert q.shape == (5, cols) and q.dtype == np.int8 and scale.shape == offset.shape == (5, cols // 16)
            s = np.repeat(scale, 16, axis=1).astype(np.float64)
            o = np.repeat(offset, 16, axis=1).astype(np.float64)
            got = s * q + o
            want = gguf_dequant(qtype, raw, cols).astype(np.float64)
            bound = 2.0**-23 * (np.abs(s * q) + np.abs(o)) + 1e-38
            bad = np.abs(got - want) > bound
            assert not bad.any(), f"{qtype.name} 5x{cols}: {bad.sum()} values off, first at {np.argwhere(bad)[0]}"


def quantize_x_ref(x: np.ndarray) -> np.ndarray:
    """x rounded to 8 bits per 32-element chunk as the GPU does (d = max|x| / 127, xq = round-half-even
    of x * (127 / max|x|), float32 arithmetic), returned as the float64 values d * xq."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        factor = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.rint(xb * factor)
    d = (amax / np.float32(127)).astype(np.float32)
    return (xq.astype(np.float64) * d).reshape(x.shape)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_host_int_matmul_matches_numpy(qtype):
    """x W^T through the decode GEMV's arithmetic (8-bit x, dp4a sums, per-chunk scales) against numpy
    in float64 on the same rounded x: only float rounding may separate them (a wrong nibble, half,
    scale or offset is off by orders of magnitude more). Also within the 8-bit rounding of exact x."""
    rng = np.random.default_rng(4000 + int(qtype))
    for cols in cols_for(qtype):
        for raw in make_weights(qtype, 7, cols, rng):
            for m in (1, 3, 8):
                x = rng.standard_normal((m, cols)).astype(np.float32) * rng.uniform(0.1, 10, (m, 1)).astype(np.float32)
                x[0, :32] = 0  # an all-zero chunk
                got = _C.cuda_host_int_matmul(raw, int(qtype), 7, cols, x)
                assert got.shape == (m, 7) and got.dtype == np.float32
                w = gguf_dequant(qtype, raw, cols).astype(np.float64)
                xr = quantize_x_ref(x)
                q, scale, offset = _C.cuda_host_int_chunks(raw, int(qtype), 7, cols)
                s16, o16 = np.repeat(scale, 16, axis=1), np.repeat(offset, 16, axis=1)
                parts = np.abs(s16 * q.astype(np.float64)) + np.abs(o16)
                # Per chunk a handful of float roundings of terms below |xr| @ parts; the chunks' float
                # sum adds up to (cols / 32) roundings of the running sum.
                bound = (cols / 32 + 8) * 2.0**-23 * (np.abs(xr) @ parts.T) + 1e-30
                err = np.abs(got - xr @ w.T)
                worst = np.max(err / bound)
                assert (err <= bound).all(), f"{qtype.name} m={m} cols={cols}: worst {worst:.3g}x the bound"
                # The 8-bit rounding of x: |x - xr| <= max|x| / 254 per element of each chunk.
                amax = np.abs(x.reshape(m, -1, 32)).max(axis=-1).astype(np.float64)
                x_err = np.repeat(amax / 254 * (1 + 1e-5), 32, axis=1)
                exact = x.astype(np.float64) @ w.T
                assert (np.abs(got - exact) <= bound + x_err @ np.abs(w).T).all(), f"{qtype.name} m={m} vs exact x"


def test_host_int_matmul_propagates_nan():
    raw = np.ascontiguousarray(gguf.quants.quantize(np.ones((2, 64), dtype=np.float32), QT.Q8_0)).view(np.uint8)
    x = np.ones((2, 64), dtype=np.float32)
    x[1, 40] = np.nan
    y = _C.cuda_host_int_matmul(raw, int(QT.Q8_0), 2, 64, x)
    np.testing.assert_allclose(y[0], [64, 64], rtol=1e-3)  # Q8_0 rounds 1.0 to 127 * fp16(1 / 127)
    assert np.isnan(y[1]).all()
    with pytest.raises(ValueError):
        _C.cuda_host_int_matmul(raw, int(QT.F16), 2, 64, x)  # no integer form for a float type

def gemm_weights(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes of a finite rows x cols matrix: quantized blocks with sane scales, or normal floats."""
    if qtype in FLOAT_TYPES:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if qtype == QT.F16:
            return w.astype(np.float16).view(np.uint8)
        return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(rows, -1)
    return random_blocks(qtype, rows, cols, rng)


@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if t != QT.F32], ids=lambda t: t.name)
def test_host_gemm_matches_numpy(qtype):
    """The tensor-core GEMM's blocks, threads, warps and lanes run on the host (cuda_host_gemm: the
    kernel's staging assignments, fragment offsets and epilogue from cuda/gemm_tile.cuh, mma.sync by its
    PTX definition) against numpy on the same half-rounded inputs: a wrong offset, lane, stage or tile
    edge is off by far more than float accumulation (and an unstaged element reads as NaN). Shapes
    cross tile edges in every direction: rows and m below, at and past one 128-row tile, K steps of 64
    ending mid-step or mid-chunk; unsplit and split along K as on a GPU with more SMs than tiles."""
    rng = np.random.default_rng(5000 + int(qtype))
    shapes = [(7, 9), (130, 129), (300, 40)]  # (rows of W, rows of x)
    for k, (rows, m) in enumerate(shapes):
        cols = cols_for(qtype)[(k + 1) % len(cols_for(qtype))]
        raw = gemm_weights(qtype, rows, cols, rng)
        x = rng.standard_normal((m, cols)).astype(np.float32) * rng.uniform(0.1, 10, (m, 1)).astype(np.float32)
        wh = gguf_dequant(qtype, raw, cols).astype(np.float16).astype(np.float64)
        xh = x.astype(np.float16).astype(np.float64)
        want = xh @ wh.T
        # Each mma adds 16 exact products to a float accumulator: one rounding per 16 columns (and
        # split-K's sum of at most 8 partials a few more).
        bound = (cols / 16 + 10) * 2.0**-24 * (np.abs(xh) @ np.abs(wh).T) + 1e-30
        # sms=132 (an H100's count) splits the small grids here along K (2 to 5 splits for most shapes).
        for sms in (0, 132):
            got = _C.cuda_host_gemm(raw, int(qtype), rows, cols, x, sms=sms)
            assert got.shape == (m, rows) and got.dtype == np.float32
            err = np.abs(got - want)
            assert np.isfinite(got).all() and (err <= bound).all(), (
                f"{qtype.name} rows={rows} m={m} cols={cols} sms={sms}: worst {np.max(err / bound):.3g}x the bound")


def test_host_gemm_fragments_follow_the_ptx_isa():
    """cuda_host_gemm multiplies by the same fragment coordinates the kernel loads with, so it cannot
    see a wrong coordinate: here they are held to the PTX ISA's tables for mma.m16n8k16 with .f16 A
    and B and .f32 C ("Matrix Fragments for mma.m16n8k16 with floating point type"), written out from
    the ISA's element-wise formulas. A register holds elements 2r and 2r + 1 of a lane's fragment."""
    f = _C.cuda_host_gemm_fragments()
    lane = np.arange(32)[:, None]
    group, tig = lane >> 2, lane % 4
    a = np.arange(8)[None, 0::2]  # a_i, i = 2r: the first element of A register r
    np.testing.assert_array_equal(f["a_row"], np.where((a < 2) | ((a >= 4) & (a < 6)), group, group + 8))
    np.testing.assert_array_equal(f["a_k"], np.where(a < 4, tig * 2 + (a & 1), tig * 2 + (a & 1) + 8))
    b = np.arange(4)[None, 0::2]  # b_i, i = 2r
    np.testing.assert_array_equal(f["b_k"], np.where(b < 2, tig * 2 + (b & 1), tig * 2 + (b & 1) + 8))
    np.testing.assert_array_equal(f["b_n"], np.broadcast_to(group, (32, 2)))
    c = np.arange(4)[None, :]  # c_i, one float per register
    np.testing.assert_array_equal(f["c_row"], np.where(c < 2, group, group + 8))
    np.testing.assert_array_equal(f["c_col"], tig * 2 + (c & 1))


def test_host_gemv_staging_rejects_bad_alignment():
    raw = np.zeros((1, 64), dtype=np.float32).view(np.uint8)
    with pytest.raises(ValueError):
        _C.cuda_host_gemv_staged_dequantize(raw, int(QT.F32), 1, 64, 2)  # F32 rows are 4-byte aligned
    with pytest.raises(ValueError):
        _C.cuda_host_gemv_staged_dequantize(raw, int(QT.F32), 1, 64, 16)


def test_host_dequantize_rejects_bad_input():
    raw = np.zeros(18, dtype=np.uint8)
    with pytest.raises(ValueError):
        _C.cuda_host_dequantize(raw, int(QT.Q4_0), 1, 64)  # 36 bytes expected
    with pytest.raises(ValueError):
        _C.cuda_host_dequantize(raw, int(QT.Q4_0), 1, 48)  # not a whole block
    with pytest.raises(ValueError):  # a type without a chunk decoder (Q8_K)
        _C.cuda_host_dequantize(np.zeros(292, dtype=np.uint8), int(QT.Q8_K), 1, 256)
    with pytest.raises(ValueError):
        _C.cuda_host_dequantize(np.zeros(4, dtype=np.float32), int(QT.F32), 1, 4)  # not raw bytes
    with pytest.raises(ValueError):
        _C.cuda_host_dequantize(np.zeros((2, 36), dtype=np.uint8)[:, ::2], int(QT.Q4_0), 2, 32)  # strided
    assert _C.cuda_host_dequantize(raw[:0], int(QT.Q4_0), 0, 32).shape == (0, 32)


def test_host_dequantize_in_every_build():
    """The host mirror is part of _C whether or not the build has CUDA, and works the same."""
    assert hasattr(_C, "cuda_host_dequantize")
    assert isinstance(_C.has_cuda, bool)
    raw = np.ascontiguousarray(gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32)[None], QT.Q8_0))
    got = _C.cuda_host_dequantize(raw.view(np.uint8), int(QT.Q8_0), 1, 64)
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, QT.Q8_0).reshape(1, 64))


def _pybind11_includes() -> list[str]:
    pybind11 = pytest.importorskip("pybind11")
    py_inc = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    return ["-I" + pybind11.get_include(), "-I" + py_inc]


def test_host_mirror_compiles_without_cuda():
    """bindings_cuda_quant.cpp and quant_blocks.cuh compile with a plain C++ compiler and pull in no
    CUDA header: a build without CUDA compiles them too. The header is also warning-free."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    src = ROOT / "csrc" / "bindings_cuda_quant.cpp"
    deps = subprocess.run(
        [cxx, "-std=c++17", "-M", "-I", str(ROOT / "csrc"), *_pybind11_includes(), str(src)],
        capture_output=True, text=True,
    )
    assert deps.returncode == 0, deps.stderr
    headers = deps.stdout.replace("\\\n", " ").split()
    cuda_headers = [h for h in headers if Path(h).name.startswith(("cuda", "cuda_")) or "/cuda/include" in h]
    assert not cuda_headers, cuda_headers
    probe = (
        '#include "cuda/quant_blocks.cuh"\n'
        "float probe(pe::GGMLType t, const uint8_t* row) {\n"
        "  float out[32];\n"
        "  return pe::cuda::dequantize_chunk(t, row, 256, 3, out) ? out[5] : 0.0f;\n"
        "}\n"
    )
    res = subprocess.run(
        [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "csrc"), "-x", "c++", "-"],
        input=probe, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
