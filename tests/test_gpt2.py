"""GPT-2: a tiny random GPT2LMHeadModel (Conv1D weights, learned positions, LayerNorm with biases,
tanh GELU, tied output) converted to llama.cpp's `gpt2`, against transformers: F32 logits to 1e-4
(full forward, token by token, batched), Q8_0 within its rounding, the GPT-2 BPE tokenizer equal to
transformers', and greedy text equal."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import make_bpe_tokenizer
from pyengine_convert import convert


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("gpt2")
    hf = d / "hf"
    hf.mkdir()
    n_tokens = make_bpe_tokenizer(hf, style="gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=n_tokens, n_embd=64, n_layer=2, n_head=4, n_positions=96)).eval()
    with torch.no_grad():
        for p in model.parameters():  # beyond the init's small values: biases and norms matter too
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(hf)
    files = {}
    for q in ("f32", "q8_0"):
        files[q] = d / f"{q}.gguf"
        convert(hf, files[q], qtype=q, output_qtype=None if q == "f32" else q)
    return model, hf, files


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_logits_match_transformers(gpt2):
    model, _, files = gpt2
    ids = np.random.default_rng(1).integers(0, 250, size=40).tolist()
    ref = reference(model, ids)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(files["f32"], kv_type="f32")
    assert llm.n_ctx == 96  # capped at the learned positions
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:3])] + [llm.eval([t]) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(steps), ref[2:], **tol)
    q8 = pyengine.LLM(files["q8_0"]).logits(ids)
    np.testing.assert_allclose(q8, ref, atol=5e-2 * np.abs(ref).max())


def test_batch_and_text(gpt2):
    from transformers import AutoTokenizer

    model, hf, files = gpt2
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 250, size=n).tolist() for n in (5, 30, 12)]
    eng = pyengine.Engine(files["f32"], n_seq_max=3, kv_type="f32")
    out = eng.decode([t for p in prompts for t in p], [i for i, p in enumerate(prompts) for _ in p])
    at = np.cumsum([0] + [len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ref = reference(model, p)
        np.testing.assert_allclose(out[at[i]:at[i + 1]], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    tok = AutoTokenizer.from_pretrained(hf)
    llm = pyengine.LLM(files["f32"])
    for text in ("Hello world, this is GPT-2.", "  spaces\tand\nnewlines 123 ünïcödé"):
        assert llm.tokenizer.encode(text, add_special_tokens=False) == tok(text)["input_ids"]
    ids = tok("Once upon a time")["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    got = llm.generate(ids, max_new_tokens=10, temperature=0, ignore_eos=True)
    assert got == tok.decode(want)


def test_llama_cpp_reads_our_file(gpt2):
    """llama.cpp's llama-perplexity on our gpt2 file gives pyengine's perplexity (same text, chunks)."""
    from llama_cpp_ref import TEXT, llama_perplexity

    _, _, files = gpt2
    theirs = llama_perplexity(files["f32"], n_ctx=64, n_chunks=3)
    mine = pyengine.LLM(files["f32"]).perplexity(TEXT.read_text(), n_ctx=64, n_chunks=3).ppl
    assert mine == pytest.approx(theirs, rel=1e-4)
