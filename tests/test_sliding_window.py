"""Mistral's sliding window: each token attends to its last `sliding_window` positions. A tiny random
MistralForCausalLM with a window of 8, converted (the window stored as llama.attention.sliding_window),
against transformers on a 40-token prompt (five windows), full forward and token-by-token decode, in
one sequence and in a batch of sequences of different lengths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_mistral
from pyengine_convert import convert

WINDOW = 8


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    d = tmp_path_factory.mktemp("swa")
    hf_dir = make_mistral(d / "hf", n_layers=2, sliding_window=WINDOW)
    out = d / "f32.gguf"
    convert(hf_dir, out, qtype="f32")
    return load_hf_model(hf_dir), out


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_window_matches_transformers(mistral):
    model, path = mistral
    assert pyengine.Engine(path, n_ctx=16).metadata["llama.attention.sliding_window"] == WINDOW
    ids = np.random.default_rng(2).integers(3, 200, size=40).tolist()
    ref = reference(model, ids)
    # Without the window the logits past position 8 would differ: make sure the test can tell.
    with torch.no_grad():
        model.config.sliding_window = None
        full = model(torch.tensor([ids])).logits[0].float().numpy()
        model.config.sliding_window = WINDOW
    assert np.abs(full[WINDOW + 2:] - ref[WINDOW + 2:]).max() > 1e-2
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(path, n_ctx=64, kv_type="f32")
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:5])] + [llm.eval([t]) for t in ids[5:]]
    np.testing.assert_allclose(np.stack(steps), ref[4:], **tol)


def test_window_in_a_batch(mistral):
    model, path = mistral
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 200, size=n).tolist() for n in (3, 21, 40, 9)]
    eng = pyengine.Engine(path, n_ctx=64, n_seq_max=len(prompts), kv_type="f32")
    out = eng.decode([t for p in prompts for t in p], [i for i, p in enumerate(prompts) for _ in p])
    at = np.cumsum([0] + [len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ref = reference(model, p)
        np.testing.assert_allclose(out[at[i]:at[i + 1]], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=str(i))
