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


def test_cache_holds_only_the_window(mistral):
    """Every layer is windowed, so the cache keeps a window's worth of pages per sequence, whatever n_ctx
    is: 300-token prompts in passes of 16 rows and 4096 positions of context run in a pool of a few pages
    per sequence (released pages reused), still equal to transformers."""
    model, path = mistral
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 200, size=n).tolist() for n in (300, 170)]
    eng = pyengine.Engine(path, n_ctx=4096, n_seq_max=2, n_batch=16, kv_type="f32")
    c = eng.config
    per_position = c["n_layer"] * 2 * c["n_head_kv"] * (c["n_embd"] // c["n_head"]) * 4  # K and V, F32
    kv = eng.memory_plan()["kv_cache"]
    assert kv == eng.memory_plan(n_ctx=65536)["kv_cache"]  # independent of n_ctx
    assert kv <= 2 * 2 * 64 * per_position  # two pages of 64 positions per sequence (a window of 8 + 16 rows)
    out = eng.decode([t for p in prompts for t in p], [i for i, p in enumerate(prompts) for _ in p])
    at = np.cumsum([0] + [len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ref = reference(model, p)
        np.testing.assert_allclose(out[at[i]:at[i + 1]], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=str(i))
    # Token by token past the prompt: still the window's pages only.
    more = prompts[0] + rng.integers(3, 200, size=40).tolist()
    ref = reference(model, more)
    steps = [eng.decode([t], [0])[0] for t in more[300:]]
    np.testing.assert_allclose(np.stack(steps), ref[300:], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_truncate_behind_the_window_starts_over(mistral):
    model, path = mistral
    ids = np.random.default_rng(6).integers(3, 200, size=200).tolist()
    ref = reference(model, ids)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(path, n_ctx=1024, n_batch=16, kv_type="f32")
    llm.eval(ids[:150])
    llm.truncate(145)  # the next token's window is still held
    assert llm.n_past == 145
    np.testing.assert_allclose(llm.eval(ids[145:160], all_logits=True), ref[145:160], **tol)
    llm.truncate(40)  # keys the next token needs were released: the sequence starts over
    assert llm.n_past == 0
    np.testing.assert_allclose(llm.eval(ids[:60], all_logits=True), ref[:60], **tol)
    # A prompt-cache reuse through generate: the text equals a fresh context's.
    fresh = pyengine.LLM(path, n_ctx=1024, n_batch=16, kv_type="f32")
    for prompt in (ids[:180], ids[:100], ids[:190]):
        assert llm.generate(prompt, max_new_tokens=5, temperature=0) == fresh.generate(prompt, max_new_tokens=5,
                                                                                        temperature=0)
