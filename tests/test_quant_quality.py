"""The converter's error-minimising INT4 quantization (quant_method="search", --calibration): never a
higher weighted error than round-to-nearest, standard blocks that gguf-py dequantizes, RTN unchanged."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from pyengine_convert import ConversionError, convert, quants

QK = 32


def random_rows(seed: int, rows: int = 64, cols: int = 256) -> np.ndarray:
    """Weight-like rows: gaussian with a few outliers and varied row scales, plus degenerate blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 1, (rows, 1)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 8
    x[0, :QK] = 0                                   # all-zero block
    x[1, :QK] = 0.5                                 # constant block
    x[2, :QK] = -x[2, :QK].__abs__()                # one-signed block
    return x


def dequant(data: np.ndarray, qtype: Q, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(data, qtype).reshape(shape)


def weighted_block_error(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (w * (x - y) ** 2).reshape(-1, QK).sum(axis=1)


def search_weights(x: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    sigma2 = (x * x).mean(axis=1, keepdims=True)
    w = np.sqrt(sigma2 + x * x)
    return w if importance is None else w * importance[None, :]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("calibrated", [False, True])
def test_search_never_worse_than_rtn_per_block(qtype, seed, calibrated):
    x = random_rows(seed)
    rng = np.random.default_rng(100 + seed)
    importance = rng.lognormal(0, 1.5, x.shape[1]).astype(np.float32) if calibrated else None
    rtn = dequant(quants.quantize(x, qtype), qtype, x.shape)
    found = dequant(quants.quantize(x, qtype, "search", importance), qtype, x.shape)
    w = search_weights(x, importance)
    e_rtn, e_found = weighted_block_error(x, rtn, w), weighted_block_error(x, found, w)
    assert np.all(e_found <= e_rtn * (1 + 1e-6) + 1e-12)
    nonzero = e_rtn > 0
    assert np.mean(e_found[nonzero] / e_rtn[nonzero]) < 0.95   # and clearly better on a typical block
    assert np.all(found[0, :QK] == 0)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_search_output_is_standard_blocks(qtype):
    """Sizes as gguf expects, and our own reading of the block layout agrees with gguf.quants."""
    x = random_rows(3, rows=8, cols=64)
    data = quants.quantize(x, qtype, "search")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8 and data.shape == (8, 64 // block_size * type_size)
    blocks = data.reshape(-1, type_size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, -16:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
    mine = d * (q - 8) if qtype == Q.Q4_0 else d * q + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(mine.reshape(x.shape), dequant(data, qtype, x.shape))
    assert np.abs(mine.reshape(x.shape) - x).max() < np.abs(x).max() / 4


def test_importance_steers_the_error_to_unimportant_columns():
    x = random_rows(4, rows=128, cols=64)
    importance = np.ones(64, np.float32)
    importance[:8] = 100.0                          # the first 8 input channels matter most
    plain = dequant(quants.quantize(x, Q.Q4_0, "search"), Q.Q4_0, x.shape)
    steered = dequant(quants.quantize(x, Q.Q4_0, "search", importance), Q.Q4_0, x.shape)
    err = lambda y: ((x - y) ** 2)[:, :8].sum()     # noqa: E731
    assert err(steered) < 0.8 * err(plain)


def test_rtn_is_still_byte_equal_to_gguf_and_other_types_ignore_search():
    x = random_rows(5)
    for qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        assert quants.quantize(x, qtype, "rtn").tobytes() == gguf.quants.quantize(x, qtype).tobytes()
    assert quants.quantize(x, Q.Q8_0, "search").tobytes() == gguf.quants.quantize(x, Q.Q8_0).tobytes()
    with pytest.raises(ValueError, match="method"):
        quants.quantize(x, Q.Q4_0, "gptq")
    with pytest.raises(ValueError, match="importance"):
        quants.quantize(x, Q.Q4_0, "search", np.ones(3, np.float32))


def test_convert_with_calibration_writes_readable_q4_0(tmp_path):
    pytest.importorskip("torch")
    from checkpoints import load_hf_model, make_llama
    from pyengine_convert.imatrix import collect_imatrix

    hf = make_llama(tmp_path / "hf")
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    stats = collect_imatrix(hf, text)
    name = "model.layers.0.mlp.down_proj.weight"
    model = load_hf_model(hf)
    assert stats[name].shape == (model.config.intermediate_size,) and np.all(stats[name] >= 0)
    assert stats["model.layers.1.self_attn.q_proj.weight"].shape == (model.config.hidden_size,)

    convert(hf, tmp_path / "rtn.gguf", qtype="q4_0")
    convert(hf, tmp_path / "cal.gguf", qtype="q4_0", calibration=calib)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    rtn = {t.name: t for t in GGUFReader(tmp_path / "rtn.gguf").tensors}
    cal = {t.name: t for t in GGUFReader(tmp_path / "cal.gguf").tensors}
    t = cal["blk.0.ffn_down.weight"]
    assert t.tensor_type == Q.Q4_0
    x = state[name]
    y_cal = gguf.quants.dequantize(cal["blk.0.ffn_down.weight"].data, Q.Q4_0).reshape(x.shape)
    y_rtn = gguf.quants.dequantize(rtn["blk.0.ffn_down.weight"].data, Q.Q4_0).reshape(x.shape)
    w = search_weights(x, stats[name])
    assert weighted_block_error(x, y_cal, w).sum() < weighted_block_error(x, y_rtn, w).sum()
    with pytest.raises(ConversionError, match="search"):
        convert(hf, tmp_path / "bad.gguf", qtype="q4_0", quant_method="rtn", calibration=calib)
