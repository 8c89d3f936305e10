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
