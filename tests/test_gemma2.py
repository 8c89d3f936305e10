"""Gemma 2: a tiny random Gemma2ForCausalLM (embeddings x sqrt(d), (1 + w) RMSNorms before and after
attention and the FFN, tanh-GeGLU, soft-capped attention scores and logits with caps small enough to
matter, a sliding window of 8 on even layers, head_dim 16) converted to llama.cpp's `gemma2`, against
transformers' eager attention: F32 logits to 1e-4 on a 40-token prompt (five windows), full forward,
token by token and batched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import make_gemma2
from pyengine_convert import convert


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("gemma2")
    hf_dir = make_gemma2(d / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    convert(hf_dir, d / "f32.gguf", qtype="f32")
    return model, d / "f32.gguf", hf_dir


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_logits_match_transformers(gemma2):
    model, path, _ = gemma2
    ids = np.random.default_rng(3).integers(3, 400, size=40).tolist()
    ref = reference(model, ids)
    assert np.abs(ref).max() < 3.0 + 1e-4  # the final soft-cap is in force
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(path, n_ctx=64, kv_type="f32")
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:5])] + [llm.eval([t]) for t in ids[5:]]
    np.testing.assert_allclose(np.stack(steps), ref[4:], **tol)
    eng = pyengine.Engine(path, n_ctx=64, n_seq_max=2, kv_type="f32")
    out = eng.decode(ids[:11] + ids, [0] * 11 + [1] * len(ids))
    np.testing.assert_allclose(out[11:], ref, **tol)
    np.testing.assert_allclose(out[:11], reference(model, ids[:11]), **tol)


def test_every_feature_matters(gemma2):
    """Each Gemma 2 feature changes the logits here, so the comparison above checks all of them."""
    from transformers import AutoModelForCausalLM

    model, _, hf_dir = gemma2
    ids = np.random.default_rng(3).integers(3, 400, size=40).tolist()
    ref = reference(model, ids)
    for key, value in (("attn_logit_softcapping", None), ("final_logit_softcapping", None), ("sliding_window", 4096)):
        other = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                     **{key: value}).eval()
        assert np.abs(reference(other, ids) - ref).max() > 1e-2, key


# --- query_pre_attn_scalar -----------------------------------------------------------------------------
# transformers scales queries by query_pre_attn_scalar ** -0.5; llama.cpp infers the scalar from the layer
# count (46 layers, Gemma 2 27B: n_embd // n_head; else head_dim) and never reads gemma2.attention.scale.

def test_query_pre_attn_scalar_matches_transformers(tmp_path):
    """A scalar (24) that is neither head_dim (16) nor n_embd / n_head (16): the converter writes
    gemma2.attention.scale and the engine honours it; the scale is shown to matter."""
    from transformers import AutoModelForCausalLM

    hf_dir = make_gemma2(tmp_path / "hf", n_layers=2, query_pre_attn_scalar=24)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    ids = np.random.default_rng(8).integers(3, 400, size=30).tolist()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref = reference(model, ids)
    llm = pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32")
    assert llm.metadata["gemma2.attention.scale"] == pytest.approx(24 ** -0.5)
    assert llm.config["kq_scale"] == pytest.approx(24 ** -0.5)
    np.testing.assert_allclose(llm.logits(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    default = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                   query_pre_attn_scalar=16).eval()
    assert np.abs(reference(default, ids) - ref).max() > 1e-2


@pytest.fixture(scope="module")
def gemma2_27b_shape(tmp_path_factory):
    """46 layers (llama.cpp's 27B), n_embd / n_head = 24 = query_pre_attn_scalar != head_dim 16."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("gemma2_27b")
    hf_dir = make_gemma2(d / "hf", n_layers=46, hidden=96, ff=64, query_pre_attn_scalar=24)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    convert(hf_dir, d / "f32.gguf", qtype="f32")
    return model, d / "f32.gguf", hf_dir


def test_27b_rule_without_a_key(gemma2_27b_shape):
    """The reader's rule gives the scalar: no key is written, and the engine's rule matches transformers."""
    model, path, _ = gemma2_27b_shape
    ids = np.random.default_rng(9).integers(3, 400, size=30).tolist()
    ref = reference(model, ids)
    llm = pyengine.LLM(path, n_ctx=64, kv_type="f32")
    assert "gemma2.attention.scale" not in llm.metadata
    assert llm.config["kq_scale"] == pytest.approx(24 ** -0.5)
    np.testing.assert_allclose(llm.logits(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_llama_cpp_files_load_with_equal_logits(gemma2, gemma2_27b_shape, tmp_path):
    """llama.cpp's own conversions of the folders (the default tiny model and the 27B-shaped one) give
    transformers' logits in pyengine."""
    from llama_cpp_ref import llama_cpp_convert

    for i, (model, _, hf_dir) in enumerate((gemma2, gemma2_27b_shape)):
        theirs = llama_cpp_convert(hf_dir, tmp_path / f"llama{i}.gguf")
        ids = np.random.default_rng(10).integers(3, 400, size=40).tolist()
        ref = reference(model, ids)
        got = pyengine.LLM(theirs, n_ctx=64, kv_type="f32").logits(ids)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("which", ["default", "27b_shape"])
def test_llama_cpp_reads_our_file(which, gemma2, gemma2_27b_shape, tmp_path):
    """llama.cpp's llama-perplexity on our file gives pyengine's perplexity and log-probabilities (same text,
    context, chunks); for the 27B-shaped file, not with the head_dim scale (which llama.cpp would take
    for another layer count)."""
    from gguf_craft import rewrite
    from llama_cpp_ref import check_llama_cpp_reads

    _, path, _ = gemma2 if which == "default" else gemma2_27b_shape
    other = None
    if which == "27b_shape":
        other = tmp_path / "head_dim_scale.gguf"
        rewrite(path, other, extra_keys={"gemma2.attention.scale": 16 ** -0.5})
    check_llama_cpp_reads(path, tmp_path, other=other)
