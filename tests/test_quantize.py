"""The C++ quantizers (pyengine._C.quantize) against independent references.

- ggml itself: ggml-quants.c from the llama.cpp sources, compiled by tests/ggml_ref.py; every type's
  bytes must equal ggml's quantize_<type>, with and without importance weights (skipped when the
  llama.cpp sources are not unpacked; benchmarks/llama_cpp_tools.py --build unpacks them).
- gguf-py: its reference quantizers for Q8_0/Q4_0/Q4_1 (byte-equal) and its dequantizers for every
  type, which must read our blocks exactly as the engine's own dequantization does.
- Properties that hold whatever the reference: more bits give less error, importance weights lower
  the weighted error they are given, threads do not change the bytes.
"""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

import pyengine  # noqa: E402
from pyengine import _C  # noqa: E402

import ggml_ref  # noqa: E402

TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
needs_ggml = pytest.mark.skipif(ggml_ref.source_dir() is None, reason="llama.cpp sources not unpacked")


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows of varied scale with the cases quantizers trip on: an all-zero super-block, a
    constant block, a lone outlier, all-positive and tiny values."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    x[1, :256] = 0
    x[2, 32:64] = 0.75
    x[3, 7] = 40.0
    x[4] = np.abs(x[4])
    x[5] *= 1e-6
    return x


def _real() -> list[tuple[str, np.ndarray]]:
    """A few SmolLM2-135M matrices (from the Q8_0 file: close to the original weights), cut to whole
    256-element blocks and 64 rows."""
    from pathlib import Path

    path = Path.home() / ".cache" / "pyengine" / "models" / "smollm2-135m-q8_0.gguf"
    if not path.is_file():
        return []
    r = gguf.GGUFReader(path)
    out = []
    for t in r.tensors:
        if t.name in ("blk.0.ffn_down.weight", "blk.29.attn_v.weight", "blk.15.ffn_gate.weight"):
            x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
            out.append((t.name, np.ascontiguousarray(x[:64, : x.shape[1] // 256 * 256], dtype=np.float32)))
    return out


@needs_ggml
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_importance", [False, True], ids=["ref", "imatrix"])
def test_bytes_equal_ggml(qtype, with_importance):
    x = weights(24, 1024, int(qtype))
    imp = None
    if with_importance:
        imp = np.random.default_rng(7).uniform(0, 4, x.shape[1]).astype(np.float32)
        imp[:40] = 0  # columns that were never active
    got = _C.quantize(x, int(qtype), imp)
    want = ggml_ref.quantize(x, int(qtype), imp)
    assert got.shape == want.shape
    bad = np.flatnonzero((got != want).any(axis=1))
    assert bad.size == 0, f"rows {bad.tolist()} differ from ggml's quantize_{qtype.name.lower()}"


@needs_ggml
@pytest.mark.parametrize("qtype", K_TYPES + [QT.Q4_0], ids=lambda t: t.name)
def test_bytes_equal_ggml_real_weights(qtype):
    tensors = _real()
    if not tensors:
        pytest.skip("smollm2-135m-q8_0.gguf not cached")
    for name, x in tensors:
        imp = (np.abs(x).mean(axis=0) + 1e-3).astype(np.float32)  # any positive per-column weights
        for w in (None, imp):
            got, want = _C.quantize(x, int(qtype), w), ggml_ref.quantize(x, int(qtype), w)
            assert np.array_equal(got, want), f"{name} as {qtype.name} (importance={w is not None})"


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
def test_bytes_equal_gguf_py(qtype):
    x = weights(16, 512, 3)
    assert np.array_equal(_C.quantize(x, int(qtype)), gguf.quants.quantize(x, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_py_reads_blocks_as_engine(qtype):
    x = weights(12, 768, 11)
    raw = _C.quantize(x, int(qtype), None)
    ours = _C.dequantize(raw, int(qtype), 12, 768)
    theirs = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(ours, theirs)
    # and the dequantized weights are close to the input (a broken packer would still pass the above)
    rel = np.sqrt(((theirs - x) ** 2).mean() / (x ** 2).mean())
    assert rel < {QT.Q2_K: 0.45, QT.Q3_K: 0.25}.get(qtype, 0.15), rel


def test_error_falls_with_bits():
    x = weights(32, 1024, 5)
    err = {t: float(((gguf.quants.dequantize(_C.quantize(x, int(t)), t) - x) ** 2).mean()) for t in K_TYPES}
    assert err[QT.Q6_K] < err[QT.Q5_K] < err[QT.Q4_K] < err[QT.Q3_K] < err[QT.Q2_K], err
    # the K-quants beat the 32-element types of the same bits (ggml's reference choice of types)
    q4_0 = float(((gguf.quants.dequantize(gguf.quants.quantize(x, QT.Q4_0), QT.Q4_0) - x) ** 2).mean())
    assert err[QT.Q4_K] < q4_0


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K],
                         ids=lambda t: t.name)
def test_importance_lowers_weighted_error(qtype):
    rng = np.random.default_rng(21)
    x = weights(64, 1024, 21)
    imp = np.exp(rng.standard_normal(1024) * 1.5).astype(np.float32)  # a few columns dominate
    def weighted(raw):
        return float((imp * (gguf.quants.dequantize(raw, qtype) - x) ** 2).sum())
    assert weighted(_C.quantize(x, int(qtype), imp)) < weighted(_C.quantize(x, int(qtype)))


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K, QT.Q4_0], ids=lambda t: t.name)
def test_threads_do_not_change_bytes(qtype):
    x = weights(97, 512, 9)
    one = _C.quantize(x, int(qtype), None, n_threads=1)
    assert np.array_equal(one, _C.quantize(x, int(qtype), None, n_threads=2))
    assert np.array_equal(one, _C.quantize(x, int(qtype), None, n_threads=3))


def test_shapes_and_errors():
    x = weights(6, 512, 1).reshape(2, 3, 512)
    out = _C.quantize(x, int(QT.Q4_K))
    assert out.shape == (2, 3, 512 // 256 * GGML_QUANT_SIZES[QT.Q4_K][1]) and out.dtype == np.uint8
    with pytest.raises(pyengine.ModelFormatError, match="blk.0.attn_q.weight.*576.*block size 256"):
        _C.quantize(np.zeros((2, 576), np.float32), int(QT.Q4_K), name="blk.0.attn_q.weight")
    with pytest.raises(pyengine.ModelFormatError, match="importance has 3 values for 512 columns"):
        _C.quantize(x, int(QT.Q4_K), np.ones(3, np.float32))
    with pytest.raises(pyengine.UnsupportedModelError, match="cannot quantize to type F16"):
        _C.quantize(x, int(QT.F16))
