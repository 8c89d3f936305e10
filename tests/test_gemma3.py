"""Gemma 3 (text): a tiny random Gemma3ForCausalLM (q/k norms, windowed layers with their own RoPE
base and a global one, (1 + w) norms, embeddings x sqrt(d)) converted to llama.cpp's `gemma3`,
against transformers' eager attention: F32 logits to 1e-4 past five windows, full forward, token by
token, batched; the local RoPE base and the window pattern shown to matter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import make_gemma3
from pyengine_convert import convert


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("gemma3")
    hf_dir = make_gemma3(d / "hf")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    convert(hf_dir, d / "f32.gguf", qtype="f32")
    return model, d / "f32.gguf", hf_dir


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_logits_match_transformers(gemma3):
    model, path, _ = gemma3
    ids = np.random.default_rng(4).integers(3, 400, size=40).tolist()
    ref = reference(model, ids)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(path, n_ctx=64, kv_type="f32")
    assert llm.metadata["gemma3.attention.sliding_window_pattern"] == 6
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:5])] + [llm.eval([t]) for t in ids[5:]]
    np.testing.assert_allclose(np.stack(steps), ref[4:], **tol)
    eng = pyengine.Engine(path, n_ctx=64, n_seq_max=2, kv_type="f32")
    out = eng.decode(ids[:9] + ids, [0] * 9 + [1] * len(ids))
    np.testing.assert_allclose(out[9:], ref, **tol)


def test_local_base_and_pattern_matter(gemma3):
    from transformers import AutoModelForCausalLM

    model, _, hf_dir = gemma3
    ids = np.random.default_rng(4).integers(3, 400, size=40).tolist()
    ref = reference(model, ids)
    cfg = model.config
    params = {k: dict(v) for k, v in cfg.rope_parameters.items()}
    params["sliding_attention"]["rope_theta"] = params["full_attention"]["rope_theta"]
    for override in ({"rope_parameters": params}, {"sliding_window": 4096}):
        other = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                     **override).eval()
        assert np.abs(reference(other, ids) - ref).max() > 1e-2, override


def test_query_pre_attn_scalar_matches_transformers(tmp_path):
    """Gemma 3 27B scales queries by query_pre_attn_scalar = n_embd / n_head (168), which llama.cpp infers
    from 62 layers; a tiny model's scalar (24, neither head_dim 16 nor n_embd / n_head 16) is written as
    gemma3.attention.scale, honoured by the engine; the scale is shown to matter."""
    from transformers import AutoModelForCausalLM

    hf_dir = make_gemma3(tmp_path / "hf", query_pre_attn_scalar=24)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    ids = np.random.default_rng(8).integers(3, 400, size=30).tolist()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref = reference(model, ids)
    llm = pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32")
    assert llm.metadata["gemma3.attention.scale"] == pytest.approx(24 ** -0.5)
    np.testing.assert_allclose(llm.logits(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    default = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                   query_pre_attn_scalar=16).eval()
    assert np.abs(reference(default, ids) - ref).max() > 1e-2


def test_llama_cpp_cross_checks(gemma3, tmp_path):
    """llama.cpp's conversion of the folder gives transformers' logits in pyengine, and llama-perplexity on
    our file gives our perplexity (past five windows: 64-token chunks)."""
    from llama_cpp_ref import check_llama_cpp_reads, llama_cpp_convert

    model, path, hf_dir = gemma3
    ids = np.random.default_rng(16).integers(3, 400, size=40).tolist()
    ref = reference(model, ids)
    theirs = llama_cpp_convert(hf_dir, tmp_path / "llama.gguf")
    got = pyengine.LLM(theirs, n_ctx=64, kv_type="f32").logits(ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    check_llama_cpp_reads(path, tmp_path)


def test_27b_rule_without_a_key(tmp_path):
    """62 layers (llama.cpp's Gemma 3 27B) with query_pre_attn_scalar = n_embd / n_head = 24 != head_dim 16:
    the reader's rule gives the scalar, so no key is written; our file and llama.cpp's conversion of the
    folder both give transformers' logits."""
    from transformers import AutoModelForCausalLM

    from llama_cpp_ref import llama_cpp_convert

    hf_dir = make_gemma3(tmp_path / "hf", n_layers=62, hidden=96, ff=64, query_pre_attn_scalar=24)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    ids = np.random.default_rng(9).integers(3, 400, size=30).tolist()
    ref = reference(model, ids)
    llm = pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32")
    assert "gemma3.attention.scale" not in llm.metadata
    assert llm.config["kq_scale"] == pytest.approx(24 ** -0.5)
    np.testing.assert_allclose(llm.logits(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    theirs = pyengine.LLM(llama_cpp_convert(hf_dir, tmp_path / "llama.gguf"), n_ctx=64, kv_type="f32")
    np.testing.assert_allclose(theirs.logits(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
