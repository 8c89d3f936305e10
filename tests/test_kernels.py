"""Matmul and dequantization kernels against numpy references, on every CPU path this machine has.

Dequantization must equal gguf-py's exactly. Matmul with a quantized weight is compared with
x_q @ dequant(W).T, where x_q is x quantized to 8 bits per 32-element block exactly as the kernels do
it (d = max|x| / 127, q = round-half-even(x * 127 / max|x|)), so the only difference left is float
rounding and the tolerance can be tight.
"""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

import pyengine  # noqa: E402
from pyengine import _C  # noqa: E402

PATH_ORDER = ["portable", "avx2", "avx512", "amx"]
PATHS = PATH_ORDER[: PATH_ORDER.index(_C.best_cpu_path()) + 1]

FLOAT_TYPES = [QT.F32, QT.F16, QT.BF16]
LEGACY_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

# Byte offsets of the fp16 super-block scales in each K-quant block (ggml's block_qN_K).
K_SCALE_OFFSETS = {QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


@pytest.fixture(params=PATHS)
def cpu_path(request):
    before = _C.cpu_path()
    _C.set_cpu_path(request.param)
    yield request.param
    _C.set_cpu_path(before)


def make_weights(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes (rows, row_bytes) of a random rows x cols matrix."""
    if qtype == QT.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype in K_TYPES:
        # Random bytes are valid K-quant blocks once the fp16 super-block scales are sane.
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype]:
            d = rng.uniform(0.001, 0.01, (rows, cols // block)).astype(np.float16)
            raw[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8)


def dequant_ref(qtype: QT, raw: np.ndarray, cols: int) -> np.ndarray:
    if qtype == QT.F32:
        return raw.view(np.float32).reshape(-1, cols)
    if qtype == QT.F16:
        return raw.view(np.float16).astype(np.float32).reshape(-1, cols)
    return gguf.quants.dequantize(raw, qtype).reshape(-1, cols)


def quantize_x_ref(x: np.ndarray) -> np.ndarray:
    """x as the kernels see it after 8-bit quantization per 32 elements (float32 arithmetic)."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(m, k)


def matmul_ref(qtype: QT, raw: np.ndarray, cols: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference Y and the scale of its rounding error (sum of |x_k w_k|)."""
    w = dequant_ref(qtype, raw, cols).astype(np.float64)
    xr = x.astype(np.float64) if qtype in FLOAT_TYPES else quantize_x_ref(x)
    return xr @ w.T, np.abs(xr) @ np.abs(w).T


def cols_for(qtype: QT) -> list[int]:
    block = GGML_QUANT_SIZES[qtype][0]
    if qtype in FLOAT_TYPES:
        return [64, 200, 577]
    if block == 256:
        return [256, 768]
    return [32, 96, 576]


SHAPES = [(1, 1), (37, 1), (70, 2), (37, 3), (50, 5), (33, 17), (70, 64)]  # (rows, m)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype, cpu_path):
    rng = np.random.default_rng(int(qtype))
    for cols in cols_for(qtype):
        raw = make_weights(qtype, 7, cols, rng)
        got = _C.dequantize(raw, int(qtype), 7, cols)
        want = dequant_ref(qtype, raw, cols)
        assert got.dtype == np.float32 and got.shape == (7, cols)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(qtype, cpu_path):
    rng = np.random.default_rng(100 + int(qtype))
    rtol = 2e-5 if qtype in FLOAT_TYPES else 1e-4
    for (rows, m), cols in itertools.product(SHAPES, cols_for(qtype)):
        raw = make_weights(qtype, rows, cols, rng)
        x = rng.standard_normal((m, cols)).astype(np.float32)
        want, scale = matmul_ref(qtype, raw, cols, x)
        for n_threads, panels in itertools.product((1, 2, 3), (False, True)):
            got = _C.matmul(raw, int(qtype), rows, cols, x, n_threads, panels=panels)
            assert got.shape == (m, rows) and got.dtype == np.float32
            err = np.abs(got - want)
            bad = err > rtol * scale + 1e-30
            assert not bad.any(), (
                f"{qtype.name} {cpu_path} rows={rows} cols={cols} m={m} threads={n_threads} panels={panels}: "
                f"{bad.sum()} bad, worst {err.max():.3g} vs scale {scale.max():.3g}"
            )


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest, ties to even), as float64."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)
    return r.view(np.float32).astype(np.float64)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0], ids=lambda t: t.name)
def test_matmul_bf16_rounding(qtype, cpu_path):
    """rounding='bf16' (ops/matmul.h's MatmulRounding::Bf16, an encoder pass's). On the amx path a call of
    64 rows or more rounds x and W's dequantized values to bfloat16 and sums the products in float32: it must
    equal numpy's float64 product of those roundings within float32 summation's worst case (cols * 2^-24 *
    sum |x w|), and be closer to the exact product than the int8 path. Below 64 rows, and on every other
    path, it is the int8 path bit for bit. Weight row counts off the 32-row pairs and 16-row panels,
    activation rows off the 16-row tiles, the group form, 1-3 threads, with and without panels."""
    rng = np.random.default_rng(900 + int(qtype))
    bf16_path = cpu_path == "amx"
    for rows, m, cols in [(64, 64, 96), (37, 100, 576), (80, 65, 32), (16, 130, 288), (50, 16, 96), (5, 200, 64), (33, 15, 64)]:
        raw = make_weights(qtype, rows, cols, rng)
        x = (rng.standard_normal((m, cols)) * np.exp(rng.standard_normal((m, cols)))).astype(np.float32)
        w = dequant_ref(qtype, raw, cols)
        want = bf16_round(x) @ bf16_round(w).T
        bound = cols * 2.0**-24 * (np.abs(bf16_round(x)) @ np.abs(bf16_round(w)).T)
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        for n_threads, panels in itertools.product((1, 2, 3), (False, True)):
            got = _C.matmul(raw, int(qtype), rows, cols, x, n_threads, panels=panels, rounding="bf16")
            int8 = _C.matmul(raw, int(qtype), rows, cols, x, n_threads, panels=panels)
            where = f"{qtype.name} {cpu_path} rows={rows} m={m} cols={cols} threads={n_threads} panels={panels}"
            if bf16_path and m >= 16:
                err = np.abs(got - want)
                assert (err <= bound).all(), f"{where}: worst {err.max():.3g}, bound there {bound[err > bound].min():.3g}"
                assert np.abs(got - exact).mean() < np.abs(int8 - exact).mean(), where
            else:
                np.testing.assert_array_equal(got, int8, err_msg=where)
        group = _C.matmul_group([raw, raw[: rows // 2 + 1]], int(qtype), [rows, rows // 2 + 1], cols, x, 2,
                                panels=True, rounding="bf16")
        alone = _C.matmul(raw, int(qtype), rows, cols, x, 2, panels=True, rounding="bf16")
        np.testing.assert_array_equal(group[:, :rows], alone)
        np.testing.assert_array_equal(group[:, rows:], alone[:, : rows // 2 + 1])
    with pytest.raises(ValueError, match="rounding"):
        _C.matmul(raw, int(qtype), rows, cols, x, 1, rounding="fp8")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_group_equals_one_by_one(qtype, cpu_path):
    """matmul's group form (q/k/v, gate/up: x quantized once, all rows in one hand-off to the threads) gives
    each weight's product as matmul alone does, which test_matmul_matches_reference checks against numpy:
    bit for bit on quantized weights, within that test's bound on float ones (their kernels may sum a row
    differently with other rows beside it). Row counts that are not multiples of the 16-row panel."""
    rng = np.random.default_rng(500 + int(qtype))
    cols = cols_for(qtype)[-1]
    groups = [(37, 5, 70), (64, 16), (1, 33, 17)]
    for group, m, n_threads, panels in itertools.product(groups, (1, 3, 9, 40), (1, 2, 3), (False, True)):
        raws = [make_weights(qtype, r, cols, rng) for r in group]
        x = rng.standard_normal((m, cols)).astype(np.float32)
        got = _C.matmul_group(raws, int(qtype), list(group), cols, x, n_threads, panels=panels)
        want = np.concatenate([_C.matmul(w, int(qtype), r, cols, x, n_threads, panels=panels)
                               for w, r in zip(raws, group)], axis=1)
        assert got.shape == want.shape
        if qtype in FLOAT_TYPES:
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{qtype.name} {cpu_path} {group} m={m} "
                                                             f"threads={n_threads} panels={panels}")


@pytest.mark.parametrize("qtype", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
def test_panel_layout_gives_the_same_bits(qtype, cpu_path):
    """Weights repacked into the panel layout (cpu/panels.h, what a loaded model's CPU weights use) give
    bit for bit what the file's row-major bytes give, for decode and prefill row counts, partial last
    panels (rows not a multiple of 8 or 16) and every thread split."""
    rng = np.random.default_rng(400 + int(qtype))
    for rows, cols in [(16, cols_for(qtype)[0]), (37, cols_for(qtype)[-1]), (70, cols_for(qtype)[-1])]:
        raw = make_weights(qtype, rows, cols, rng)
        x = rng.standard_normal((40, cols)).astype(np.float32)
        for m, n_threads in itertools.product((1, 2, 3, 5, 8, 9, 17, 40), (1, 2, 3)):
            want = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads)
            got = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads, panels=True)
            np.testing.assert_array_equal(got, want, err_msg=f"{qtype.name} {cpu_path} rows={rows} m={m} "
                                                             f"threads={n_threads}")


def test_time_matmul_checks_its_arguments():
    """_C.time_matmul (benchmarks/bench_kernels.py's clock) validates what matmul validates, plus the
    repeat count, and times the products (a positive, finite number of seconds)."""
    rng = np.random.default_rng(7)
    raw = make_weights(QT.Q4_0, 32, 64, rng)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    seconds = _C.time_matmul(raw, int(QT.Q4_0), 32, 64, x, 2, repeat=2)
    assert np.isfinite(seconds) and seconds > 0
    with pytest.raises(ValueError, match="repeat"):
        _C.time_matmul(raw, int(QT.Q4_0), 32, 64, x, repeat=0)
    with pytest.raises(ValueError, match="shape"):
        _C.time_matmul(raw, int(QT.Q4_0), 32, 64, x[:, :32])
    with pytest.raises(ValueError, match="take"):
        _C.time_matmul(raw[:16], int(QT.Q4_0), 32, 64, x)


@pytest.fixture
def restore_decode_tuning():
    before = _C.decode_tuning()
    yield
    _C.set_decode_tuning(*before)


@pytest.mark.parametrize("qtype", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
def test_decode_tuning_gives_the_same_bits(qtype, cpu_path, restore_decode_tuning):
    """Decode's per-vendor tuning (cpu/matmul_kernels.h DecodeTuning: one or two panels per loop, software
    prefetch or not, spread prefetch or not, how far ahead for several rows) changes only how the weights
    are walked: every choice gives the bits of the file's row-major bytes under the vendor's default, with
    a two-panel loop, a single panel after it and a partial last panel (70 rows), for every decode row count
    and thread split."""
    rng = np.random.default_rng(900 + int(qtype))
    rows, cols = 70, cols_for(qtype)[-1]
    raw = make_weights(qtype, rows, cols, rng)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    for m, n_threads in itertools.product((1, 2, 3), (1, 2)):
        want = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads)
        for two_panels, prefetch, spread, rows_prefetch in itertools.product((False, True), (0, 64, 1024), (0, 1728),
                                                                              (0, 4096)):
            _C.set_decode_tuning(two_panels, prefetch, spread, rows_prefetch)
            for panels in (False, True):
                got = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads, panels=panels)
                np.testing.assert_array_equal(got, want, err_msg=f"{qtype.name} {cpu_path} m={m} threads={n_threads} "
                                                                 f"two_panels={two_panels} prefetch={prefetch} "
                                                                 f"spread={spread} rows_prefetch={rows_prefetch}")
    with pytest.raises(pyengine.EngineError, match="prefetch"):
        _C.set_decode_tuning(True, -1)
    with pytest.raises(pyengine.EngineError, match="spread"):
        _C.set_decode_tuning(True, 64, -1)
    with pytest.raises(pyengine.EngineError, match="several rows"):
        _C.set_decode_tuning(True, 64, 0, 1 << 21)


@pytest.mark.parametrize("qtype", LEGACY_TYPES, ids=lambda t: t.name)
def test_passes_before_packing_give_the_same_bits(qtype, cpu_path, restore_decode_tuning):
    """How many passes of the few-row kernels a 32-element block type takes before packing panels
    (DecodeTuning's small_passes_32) changes only the walk: 9 to 49 activation rows give the bits of
    the default, in passes or packed, on the file's rows and on the panel copy, for 1 and 2 threads."""
    rng = np.random.default_rng(950 + int(qtype))
    rows, cols = 70, cols_for(qtype)[-1]
    raw = make_weights(qtype, rows, cols, rng)
    x = rng.standard_normal((49, cols)).astype(np.float32)
    base = _C.decode_tuning()
    for m, n_threads in itertools.product((9, 17, 25, 40, 49), (1, 2)):
        want = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads)
        for passes in (1, 2, 6, 7):
            _C.set_decode_tuning(*base[:4], passes)
            for panels in (False, True):
                got = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads, panels=panels)
                np.testing.assert_array_equal(got, want, err_msg=f"{qtype.name} {cpu_path} m={m} "
                                                                 f"threads={n_threads} passes={passes}")
    with pytest.raises(pyengine.EngineError, match="passes"):
        _C.set_decode_tuning(*base[:4], 65)


@pytest.mark.parametrize("qtype", LEGACY_TYPES + K_TYPES, ids=lambda t: t.name)
def test_amx_gives_the_avx512_bits(qtype):
    """The AMX prefill (cpu/matmul_amx.h; Q4_0 and Q8_0 weights, the other types on the AVX-512 register
    tiles) takes the integer dot products from tile multiplies and must give the AVX-512 path's results
    bit for bit: every activation-row count around its 16-row
    tiles (the rows past the last whole 16 run on tiles configured with fewer rows), one and two panels,
    partial last panels, rows as stored and packed into panels (Q8_0's are read in place), thread
    splits, and zero and huge activation blocks."""
    if "amx" not in PATHS:
        pytest.skip("this CPU (or its OS) does not offer AMX")
    rng = np.random.default_rng(500 + int(qtype))
    before = _C.cpu_path()
    try:
        for rows, cols in [(16, cols_for(qtype)[0]), (37, cols_for(qtype)[-1]), (70, cols_for(qtype)[1])]:
            raw = make_weights(qtype, rows, cols, rng)
            x = rng.standard_normal((81, cols)).astype(np.float32)
            x[3] = 0
            x[20, :32] *= 1e4
            want, scale = matmul_ref(qtype, raw, cols, x)
            for m, n_threads, panels in itertools.product((16, 17, 31, 32, 33, 48, 63, 81), (1, 3), (False, True)):
                got = {}
                for path in ("avx512", "amx"):
                    _C.set_cpu_path(path)
                    got[path] = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads, panels=panels)
                where = f"{qtype.name} rows={rows} cols={cols} m={m} threads={n_threads} panels={panels}"
                np.testing.assert_array_equal(got["amx"], got["avx512"], err_msg=where)
                assert np.all(np.abs(got["amx"] - want[:m]) <= 1e-4 * scale[:m]), where
    finally:
        _C.set_cpu_path(before)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_paths_agree(qtype):
    if len(PATHS) < 2:
        pytest.skip("only one CPU path on this machine")
    rng = np.random.default_rng(200 + int(qtype))
    cols = cols_for(qtype)[-1]
    before = _C.cpu_path()
    try:
        for rows, m in [(37, 1), (70, 17)]:
            raw = make_weights(qtype, rows, cols, rng)
            x = rng.standard_normal((m, cols)).astype(np.float32)
            _, scale = matmul_ref(qtype, raw, cols, x)
            results = {}
            for path in PATHS:
                _C.set_cpu_path(path)
                results[path] = _C.matmul(raw, int(qtype), rows, cols, x, 2)
            for a, b in itertools.combinations(PATHS, 2):
                assert np.all(np.abs(results[a] - results[b]) <= 1e-5 * scale), (qtype.name, a, b, rows, m)
    finally:
        _C.set_cpu_path(before)


def test_large_values_and_zeros(cpu_path):
    """All-zero activation blocks (scale 0) and large magnitudes must not produce NaN or overflow."""
    rng = np.random.default_rng(7)
    raw = make_weights(QT.Q4_0, 20, 128, rng)
    x = rng.standard_normal((3, 128)).astype(np.float32) * 1e4
    x[1] = 0
    x[2, :32] = 0
    want, scale = matmul_ref(QT.Q4_0, raw, 128, x)
    got = _C.matmul(raw, int(QT.Q4_0), 20, 128, x)
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - want) <= 1e-4 * scale)
    assert np.all(got[1] == 0)


def test_matmul_argument_errors():
    rng = np.random.default_rng(0)
    raw = make_weights(QT.Q4_0, 4, 64, rng)
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="bytes"):
        _C.matmul(raw[:, :-1], int(QT.Q4_0), 4, 64, x)
    with pytest.raises(ValueError, match="shape"):
        _C.matmul(raw, int(QT.Q4_0), 4, 64, np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        _C.matmul(raw, int(QT.Q4_0), 4, 64, np.zeros(64, np.float32))
    with pytest.raises(pyengine.ModelFormatError, match="multiple"):
        _C.matmul(raw, int(QT.Q4_0), 4, 48, np.zeros((2, 48), np.float32))
    with pytest.raises(pyengine.UnsupportedModelError):
        _C.matmul(raw, 9999, 4, 64, x)
    with pytest.raises(pyengine.UnsupportedModelError):
        _C.matmul(raw, int(QT.IQ2_XXS), 4, 64, x)
    with pytest.raises(ValueError, match="contiguous"):
        _C.matmul(np.asfortranarray(raw), int(QT.Q4_0), 4, 64, x)
    with pytest.raises(ValueError, match="raw bytes"):
        _C.matmul(raw.view(np.uint16), int(QT.Q4_0), 4, 64, x)
    with pytest.raises(ValueError, match="n_threads"):
        _C.matmul(raw, int(QT.Q4_0), 4, 64, x, 0)
    with pytest.raises(ValueError, match="bytes"):
        _C.dequantize(raw, int(QT.Q4_0), 5, 64)
    # Empty activations are fine.
    assert _C.matmul(raw, int(QT.Q4_0), 4, 64, np.zeros((0, 64), np.float32)).shape == (0, 4)
    # bytes objects work as weights too.
    np.testing.assert_array_equal(
        _C.dequantize(raw.tobytes(), int(QT.Q4_0), 4, 64), _C.dequantize(raw, int(QT.Q4_0), 4, 64)
    )


def batch_bound(qtype: QT, path: str, cols: int, scale: np.ndarray) -> np.ndarray | float:
    """How far row i of a batched matmul may be from row i alone: 0 (bit-identical) everywhere except
    float weights on AVX-512, whose many-row kernel (16 or more rows: outer products over transposed
    panels) sums each dot product serially over k while the few-row kernel sums 16 lanes of k and
    reduces them. Both are recursive float32 sums, each within (depth) * 2^-24 * sum|x w| of the exact
    value (depth <= k serial steps + 1 for the final reduction's rounding, k / 16 + 4 for the lanes),
    so they are within the sum of the two bounds of each other."""
    if qtype in FLOAT_TYPES and path in ("avx512", "amx"):  # amx: the AVX-512 float kernels
        return (cols + 1 + cols / 16 + 4) * 2.0**-24 * scale
    return 0.0


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_row_does_not_depend_on_batch(qtype, cpu_path):
    """Row i of X @ W.T is the same whether X has 1 row or m, and wherever row i sits in the kernels'
    register tiles or the threads' split: batched decoding of many sequences must give each sequence
    what it would get alone (a last-bit difference can flip an 8-bit activation rounding in the next
    layer, which then shows as a ~1e-3 change in the logits)."""
    rng = np.random.default_rng(300 + int(qtype))
    cols = cols_for(qtype)[-1]
    for rows in (37, 70):
        raw = make_weights(qtype, rows, cols, rng)
        x = rng.standard_normal((20, cols)).astype(np.float32)
        _, scale = matmul_ref(qtype, raw, cols, x)
        alone = np.concatenate([_C.matmul(raw, int(qtype), rows, cols, x[i : i + 1]) for i in range(20)])
        bound = batch_bound(qtype, cpu_path, cols, scale)
        for m, n_threads in itertools.product(range(1, 21), (1, 3)):
            got = _C.matmul(raw, int(qtype), rows, cols, x[:m], n_threads)
            err = np.abs(got - alone[:m])
            bad = err > (bound[:m] if isinstance(bound, np.ndarray) else bound)
            assert not bad.any(), (
                f"{qtype.name} {cpu_path} rows={rows} m={m} threads={n_threads}: rows {np.nonzero(bad)[0]} "
                f"differ from the row alone by up to {err.max():.3g}"
            )


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_zero_weighted_columns_change_nothing(qtype, cpu_path):
    """Float weights: appending columns whose activations are 0 leaves every result bit-identical.
    Attention relies on it: decode sums P V over the keys a token sees, prefill over all the chunk's
    keys with P = 0 beyond, and the two must agree."""
    rng = np.random.default_rng(400 + int(qtype))
    for n in range(1, 50):
        for extra in (1, 7, 16, 33):
            w = make_weights(qtype, 19, n + extra, rng).reshape(19, n + extra, -1)
            x = np.zeros((17, n + extra), np.float32)
            x[:, :n] = rng.standard_normal((17, n))
            for m in (1, 17):
                short = _C.matmul(np.ascontiguousarray(w[:, :n]).reshape(19, -1), int(qtype), 19, n,
                                  np.ascontiguousarray(x[:m, :n]))
                padded = _C.matmul(w.reshape(19, -1), int(qtype), 19, n + extra, x[:m])
                np.testing.assert_array_equal(short, padded, err_msg=f"{qtype.name} {cpu_path} k={n}+{extra} m={m}")


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 17, 33, 100, 257, 1000])
@pytest.mark.parametrize("scale", [1.0, 0.125, 3.0])
def test_attention_softmax_matches_numpy(cpu_path, n, scale):
    """Attention's softmax kernel (its own vector exp on AVX2/AVX-512) against float64 numpy: ordinary
    scores, a wide range whose small terms underflow, and rows with ties at the maximum."""
    rng = np.random.default_rng(n)
    rows = np.stack([rng.standard_normal(n) * 4, rng.uniform(-300, 20, n), np.round(rng.standard_normal(n))])
    rows = rows.astype(np.float32)
    got = _C.attention_softmax(rows, scale)
    x = rows.astype(np.float64) * np.float32(scale)
    ref = np.exp(x - x.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    # Float32 rounding: the exponent scale * x - max is rounded twice (relative error of the term about
    # |exponent| * 2^-24 each), the exp and the final scaling add a few ulp, and the sum runs in vector
    # lanes of n / W terms each. Terms below ~1e-38 may come out as 1e-38 instead of 0.
    lanes = {"portable": 1, "avx2": 8, "avx512": 16, "amx": 16}[cpu_path]
    ulp = 2.0 ** -24
    tol = ref * ulp * (2 * (np.abs(x) + np.abs(x).max(axis=1, keepdims=True)) + n / lanes + 10) + 1e-37
    bad = np.abs(got - ref) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} terms off: got {got[bad][:4]}, numpy {ref[bad][:4]}"


def test_attention_softmax_nonfinite_rows_are_nan(cpu_path):
    """A row holding an infinite or NaN score (corrupt weights) comes out all NaN on every path, so the
    layer check reports it, and finite rows beside it are untouched. Found by the fuzzer: [inf, NaN, 1]
    made the portable max skip both, and e^inf reached a float-to-int conversion (undefined behaviour)."""
    inf, nan = np.inf, np.nan
    for n in (3, 8, 17, 40):
        for bad in ([inf, nan, 1.0], [nan, inf], [-inf], [inf], [nan]):
            row = np.linspace(-2, 2, n).astype(np.float32)
            for at, v in zip((0, n // 2, n - 1), bad):
                row[at] = v
            rows = np.stack([row, np.linspace(-2, 2, n).astype(np.float32)])
            got = _C.attention_softmax(rows, 0.5)
            assert np.isnan(got[0]).all(), (cpu_path, n, bad, got[0])
            ref = np.exp(rows[1].astype(np.float64) * 0.5 - 1.0)
            np.testing.assert_allclose(got[1], ref / ref.sum(), rtol=1e-5)
    # A finite score times a large scale overflows: the same.
    big = np.array([[3e38, 1.0, 2.0]], np.float32)
    assert np.isnan(_C.attention_softmax(big, 4.0)).all()


def test_default_path_is_the_best_granted():
    """Without PYENGINE_CPU a process runs the best path the CPU has (AMX where the OS also grants the
    tile state, else AVX-512), and PYENGINE_CPU picks a lower one, never a higher one."""
    env = {k: v for k, v in os.environ.items() if k != "PYENGINE_CPU"}
    code = "import pyengine._C as C; print(C.cpu_path())"
    best = _C.best_cpu_path()
    granted = best
    if best == "amx":
        before = _C.cpu_path()
        try:
            _C.set_cpu_path("amx")  # raises where the OS refuses the tile state: then avx512 is right
        except pyengine.EngineError:
            granted = "avx512"
        finally:
            _C.set_cpu_path(before)
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert default.stdout.strip() == granted
    for asked in PATH_ORDER:
        got = subprocess.run([sys.executable, "-c", code], env={**env, "PYENGINE_CPU": asked}, capture_output=True,
                             text=True, check=True)
        want = asked if PATH_ORDER.index(asked) <= PATH_ORDER.index(granted) else granted
        assert got.stdout.strip() == want, asked


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 576, 1000, 1536])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_sigmoid_activations_equal_numpy(act, cols):
    """SiLU and tanh-GELU (computed as x * sigmoid(z) over 16 lanes) against numpy in float64, gated and not:
    a few float32 roundings (the exp polynomial is ~2 ulp), over inputs from -100 to 100 (e^-|z| clamped at
    ~1e-38, far below the sum it enters), odd row lengths (the padded tail), 1 and 2 threads; NaN stays NaN
    and +Inf gives Inf."""
    rng = np.random.default_rng(cols)
    rows = 5
    gate = np.concatenate([rng.standard_normal((rows - 1, cols)) * 4, np.linspace(-100, 100, cols)[None]])
    gate = gate.astype(np.float32)
    up = rng.standard_normal((rows, cols)).astype(np.float32)
    g, u = gate.astype(np.float64), up.astype(np.float64)
    if act == "silu":
        want = g / (1 + np.exp(-g))
        rel = 4e-7
    else:
        # 0.5 g (1 + tanh(y)) written as g sigmoid(2y): the same function, without float64's cancellation
        # in 1 + tanh(y) (exactly 0 below g ~ -7, where the value is ~1e-16 and the kernel gets it). The
        # kernel's z = 2y is itself a float32 result (a few roundings, ~2e-7 |z| absolute), and e^-|z|
        # carries that error relative: the bound grows with |z|.
        z = 2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)
        with np.errstate(over="ignore"):  # e^-z = inf below g ~ -10: the value is -0
            want = g / (1 + np.exp(-z))
        rel = 4e-7 + 2e-7 * np.abs(z)
    for threads in (1, 2):
        for got, ref in ((_C.activation(gate, act, up, threads), want * u), (_C.activation(gate, act, None, threads), want)):
            err = np.abs(got - ref)
            assert np.all(err <= rel * np.abs(ref) + 1e-30), np.max(err / np.maximum(np.abs(ref), 1e-30))
    special = np.array([[np.nan, np.inf, 0.0, -0.0]], dtype=np.float32)
    got = _C.activation(special, act, np.ones_like(special))
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == 0 and got[0, 3] == 0
