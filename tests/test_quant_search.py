"""Error-feedback quantization (`pyengine quantize --calibration`, csrc/cpu/quant_search.h).

References: numpy for X^T X; transformers' forward hooks for the covariance the engine collects; gguf-py's
dequantizers for what the blocks mean; the ggml path (`_C.quantize`, byte-equal to llama-quantize per
tests/test_quantize.py) for the error to beat; llama-perplexity for reading the files.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_llama
from pyengine import _C
from pyengine_convert import convert
from pyengine_convert.calibrate import collect_covariances, load_text
from pyengine_convert.requantize import requantize

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parents[1]
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 8
N_CTX = 32


def correlated_inputs(rows: int, n: int, seed: int) -> np.ndarray:
    """Activations with correlated channels of uneven scale, as a layer's inputs have."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)).astype(np.float32) * 0.2 + np.eye(n, dtype=np.float32)
    return (rng.standard_normal((rows, n)).astype(np.float32) @ mix) * (0.2 + 2 * rng.random(n, dtype=np.float32))


def output_error(w: np.ndarray, raw: np.ndarray, qtype: Q, x: np.ndarray) -> np.ndarray:
    """Per row, the squared error of the layer's output on x: ||(W - Q) x^T||^2, Q decoded by gguf-py."""
    deq = gguf.quants.dequantize(raw, qtype).reshape(w.shape)
    return (((w - deq).astype(np.float64) @ x.T.astype(np.float64)) ** 2).sum(axis=1)


def test_xtx_equals_numpy():
    x = correlated_inputs(203, 96, 1)  # rows not a multiple of the kernel's 8
    h = _C.xtx(x)
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    np.testing.assert_allclose(np.triu(h), np.triu(ref), rtol=0, atol=1e-5 * np.abs(ref).max())
    assert not np.tril(h, -1).any()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_feedback_never_above_ggml(qtype):
    """Per row, the output error on the calibration inputs is never above ggml's imatrix quantization of
    the same row (the ggml path is byte-equal to llama-quantize's), and in all it is clearly lower."""
    n, rows = 768, 40  # three K-quant super-blocks, 24 blocks of 32
    x = correlated_inputs(3000, n, 2)
    w = np.random.default_rng(3).standard_normal((rows, n)).astype(np.float32)
    h = _C.xtx(x)
    imp = (np.einsum("ij,ij->j", x, x) / len(x)).astype(np.float32)
    ours, kept = _C.quantize_feedback(w, int(qtype), h, imp)
    theirs = _C.quantize(w, int(qtype), imp)
    assert ours.shape == theirs.shape == (rows, gguf.quants.quant_shape_to_byte_shape((rows, n), qtype)[1])
    e_ours, e_theirs = output_error(w, ours, qtype, x), output_error(w, theirs, qtype, x)
    assert np.all(e_ours <= e_theirs * (1 + 1e-6)), (e_ours / e_theirs).max()
    assert kept < rows // 4
    assert e_ours.sum() < 0.9 * e_theirs.sum(), e_ours.sum() / e_theirs.sum()
    # the error C++ measures is the same e H e^T
    deq = gguf.quants.dequantize(ours, qtype).reshape(w.shape)
    np.testing.assert_allclose(_C.weighted_errors(w - deq, h), e_ours, rtol=1e-3)


def test_feedback_argument_errors():
    w = np.zeros((4, 64), np.float32)
    with pytest.raises(pyengine.ModelFormatError, match="attn_q.*64 x 64"):
        _C.quantize_feedback(w, int(Q.Q4_0), np.zeros((32, 32), np.float32), name="attn_q")
    with pytest.raises(pyengine.ModelFormatError, match="block size"):
        _C.quantize_feedback(np.zeros((4, 48), np.float32), int(Q.Q4_0), np.zeros((48, 48), np.float32))
    # an all-zero covariance (a layer the text never reached) is dampened to the identity, not refused
    raw, _ = _C.quantize_feedback(w + 1, int(Q.Q4_0), np.zeros((64, 64), np.float32))
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, Q.Q4_0).reshape(4, 64), 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    hf_dir = make_llama(d / "hf", hidden=256, ff=512, n_heads=4, n_kv_heads=2)
    path = d / "f32.gguf"
    convert(hf_dir, path, qtype="f32")
    text = d / "calib.txt"
    text.write_text(TEXT)
    return hf_dir, path, text


def test_engine_covariance_equals_transformers(tiny):
    hf_dir, path, _ = tiny
    hf = load_hf_model(hf_dir)
    llm = pyengine.Engine(path, n_ctx=N_CTX)
    ids = llm.tokenizer.encode(TEXT, add_special_tokens=True)
    n_chunks = len(ids) // N_CTX
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    xtx: dict[str, np.ndarray] = {}

    def hook(name):
        def add(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            xtx[name] = xtx.get(name, 0) + (x.T @ x).numpy()
        return add

    handles = []
    for name, module in hf.named_modules():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m and m.group(2) in names:
            handles.append(module.register_forward_hook(hook(f"blk.{m.group(1)}.{names[m.group(2)]}.weight")))
    with torch.no_grad():
        for i in range(n_chunks):
            chunk = list(ids[i * N_CTX:(i + 1) * N_CTX])
            if llm.tokenizer.add_bos:
                chunk[0] = llm.tokenizer.bos_id
            hf(torch.tensor([chunk]))
    for h in handles:
        h.remove()

    cov = collect_covariances(path, TEXT, n_ctx=N_CTX, kv_type="f32")
    assert cov.n_chunks == n_chunks >= 3 and set(cov.xtx) == set(xtx)
    for name, ref in xtx.items():
        assert cov.rows[name] == n_chunks * N_CTX
        np.testing.assert_allclose(cov.xtx[name], ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=name)
        np.testing.assert_allclose(np.diag(cov.xtx[name]), cov.sum2[name], rtol=1e-4, err_msg=name)
    assert cov.xtx["blk.0.attn_q.weight"] is cov.xtx["blk.0.attn_v.weight"]  # one input, one matrix
    assert cov.xtx["blk.0.ffn_gate.weight"] is cov.xtx["blk.0.ffn_up.weight"]


def test_covariances_in_groups_equal_one_pass(tiny):
    """With a memory bound the blocks' matrices come from several passes over the text, each collecting a
    group of blocks and writing it to disk: the same matrices, bit for bit, as one pass holding them all."""
    _, path, _ = tiny
    whole = collect_covariances(path, TEXT, n_ctx=N_CTX)
    tensors = gguf.GGUFReader(path).tensors  # shape: columns first
    one_block = sum(4 * int(t.shape[0]) ** 2 for t in tensors if t.name.startswith("blk.0.") and len(t.shape) == 2)
    grouped = collect_covariances(path, TEXT, n_ctx=N_CTX, max_bytes=one_block)
    assert whole.passes == 1 and grouped.passes == 2 and not grouped.xtx  # the tiny model's two blocks
    folder = next(iter(grouped.files.values())).parent
    assert set(grouped.files) == set(whole.xtx) and grouped.n_chunks == whole.n_chunks
    for name, h in whole.xtx.items():
        np.testing.assert_array_equal(grouped.matrix(name), h, err_msg=name)
        np.testing.assert_array_equal(grouped.sum2[name], whole.sum2[name], err_msg=name)
    grouped.close()
    assert not folder.exists()
    engine = pyengine.Engine(path, n_ctx=N_CTX)
    with pytest.raises(pyengine.EngineError, match="no tensor named 'blk.9.attn_q.weight'"):
        engine.collect_input_stats(True, covariance=True, covariance_tensors=["blk.9.attn_q.weight"])


@pytest.mark.parametrize("preset", ["q4_k_m", "q4_0"])
def test_calibrated_file_is_standard_and_read_by_llama_cpp(tiny, tmp_path, preset):
    """The file has the tensor types, shapes and size of ggml's imatrix quantization, gguf-py reads every
    block, the blocks differ from ggml's, and llama-perplexity reads it as pyengine does: position by
    position the two engines agree on it as closely as on the ggml file (whose bytes equal llama-quantize's;
    on this random tiny model they differ by a mean KL of ~1e-4 there, 8-bit activations in both)."""
    _, path, text = tiny
    cov = collect_covariances(path, TEXT, n_ctx=N_CTX)
    ours, theirs = tmp_path / "feedback.gguf", tmp_path / "ggml.gguf"
    report = requantize(path, ours, preset, calibration=cov)
    requantize(path, theirs, preset, imatrix={k: cov.importance(k) for k in cov.sum2})
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    tb = {t.name: t for t in b.tensors}
    changed = 0
    for t in a.tensors:
        u = tb[t.name]
        assert (t.tensor_type, list(t.shape), t.n_bytes) == (u.tensor_type, list(u.shape), u.n_bytes), t.name
        assert np.isfinite(gguf.quants.dequantize(t.data, t.tensor_type)).all()
        changed += not np.array_equal(np.asarray(t.data), np.asarray(u.data))
    assert changed >= 10  # every block linear layer of the two layers but the few rows ggml wins
    assert ours.stat().st_size <= theirs.stat().st_size and report.file_size == ours.stat().st_size
    from llama_cpp_ref import llama_kl_base
    from pyengine.quality import kl_divergence

    def engines_disagree(p: Path):
        """pyengine's log-probabilities position by position against llama-perplexity's on the same file."""
        base = llama_kl_base(p, tmp_path / f"{p.stem}.kl", n_ctx=N_CTX, n_chunks=8)
        return kl_divergence(pyengine.LLM(p, n_ctx=N_CTX), base)

    r_ours, r_theirs = engines_disagree(ours), engines_disagree(theirs)
    assert r_ours.kld < 2 * r_theirs.kld + 1e-5 and r_ours.same_top >= r_theirs.same_top - 0.05, (r_ours, r_theirs)
    assert r_ours.ppl != r_theirs.ppl


def test_quantize_command_calibration(tiny, tmp_path):
    _, path, text = tiny
    out = tmp_path / "q.gguf"
    r = subprocess.run([sys.executable, "-m", "pyengine", "quantize", str(path), str(out), "q4_0", "--calibration",
                        str(text), "-q"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert pyengine.LLM(out, n_ctx=64).generate("It is a truth", max_new_tokens=4, temperature=0) is not None
    # The command takes the engine's matrices and frees each once written; a caller's Covariances object
    # (collected with the command's defaults) gives the same file and is left whole.
    cov = collect_covariances(path, load_text(text))
    again = tmp_path / "again.gguf"
    requantize(path, again, "q4_0", calibration=cov)
    assert again.read_bytes() == out.read_bytes()
    assert "blk.0.attn_q.weight" in cov.xtx
    # One block's matrices at a time (two passes over the text): the same file again.
    small = subprocess.run([sys.executable, "-m", "pyengine", "quantize", str(path), str(again), "q4_0",
                            "--calibration", str(text), "--calibration-memory", "0.01", "-q"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert small.returncode == 0, small.stderr
    assert again.read_bytes() == out.read_bytes()
    neg = subprocess.run([sys.executable, "-m", "pyengine", "quantize", str(path), str(again), "q4_0",
                          "--calibration", str(text), "--calibration-memory", "-1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert neg.returncode == 1 and "calibration memory" in neg.stderr
    bad = subprocess.run([sys.executable, "-m", "pyengine", "quantize", str(path), str(out), "q4_0", "--method",
                          "feedback"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and "--calibration" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    both = subprocess.run([sys.executable, "-m", "pyengine", "quantize", str(path), str(out), "q4_0", "--method", "ggml",
                           "--calibration", str(text)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert both.returncode == 1 and "--method ggml" in both.stderr
    missing = subprocess.run([sys.executable, "-m", "pyengine", "quantize", str(path), str(out), "q4_0",
                              "--calibration", str(tmp_path / "none.txt")], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert missing.returncode == 1 and "none.txt" in missing.stderr
