"""Qwen3 (dense): a tiny random Qwen3ForCausalLM (per-head q/k RMSNorm, no q/k/v bias, explicit
head_dim 32 with hidden 64 and 4 heads, GQA, tied embeddings) converted to llama.cpp's `qwen3`,
against transformers: F32 logits to 1e-4 (full forward and token by token), quantized within their
rounding, in a batch of sequences."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_qwen3
from pyengine_convert import convert


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    hf_dir = make_qwen3(d / "hf")
    files = {}
    for q in ("f32", "q8_0"):
        files[q] = d / f"{q}.gguf"
        convert(hf_dir, files[q], qtype=q, output_qtype=None if q == "f32" else q)
    return load_hf_model(hf_dir), files


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_file(qwen3):
    _, files = qwen3
    r = gguf.GGUFReader(str(files["f32"]))
    names = {t.name for t in r.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    assert not any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in names)
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "qwen3"


def test_logits_match_transformers(qwen3):
    model, files = qwen3
    ids = np.random.default_rng(5).integers(3, 250, size=33).tolist()
    ref = reference(model, ids)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(files["f32"], n_ctx=64, kv_type="f32")
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:4])] + [llm.eval([t]) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(steps), ref[3:], **tol)
    # Q8_0 weights and 8-bit activations: within a few percent of the logit scale.
    q8 = pyengine.LLM(files["q8_0"], n_ctx=64).logits(ids)
    np.testing.assert_allclose(q8, ref, atol=5e-2 * np.abs(ref).max())


def test_batch(qwen3):
    model, files = qwen3
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 250, size=n).tolist() for n in (2, 17, 9)]
    eng = pyengine.Engine(files["f32"], n_ctx=64, n_seq_max=3, kv_type="f32")
    out = eng.decode([t for p in prompts for t in p], [i for i, p in enumerate(prompts) for _ in p])
    at = np.cumsum([0] + [len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ref = reference(model, p)
        np.testing.assert_allclose(out[at[i]:at[i + 1]], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_llama_cpp_cross_checks(qwen3, tmp_path_factory):
    """llama.cpp's conversion of the folder gives transformers' logits in pyengine, and llama-perplexity on
    our file gives our perplexity."""
    from llama_cpp_ref import check_llama_cpp_reads, llama_cpp_convert

    model, files = qwen3
    hf_dir = files["f32"].parent / "hf"
    tmp = tmp_path_factory.mktemp("qwen3_llama")
    ids = np.random.default_rng(16).integers(3, 250, size=40).tolist()
    ref = reference(model, ids)
    theirs = llama_cpp_convert(hf_dir, tmp / "llama.gguf")
    got = pyengine.LLM(theirs, n_ctx=64, kv_type="f32").logits(ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    check_llama_cpp_reads(files["f32"], tmp)
