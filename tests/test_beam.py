"""Beam search against transformers' `generate(num_beams=...)` on the same tiny random Llama (F32):
the same hypotheses, token for token, in the same order, with the same scores (to float rounding),
across length penalties, early-stopping modes, n-gram blocking and several returned sequences; the
end id is chosen as a token the model does produce, so beams finish early and the finished-hypothesis
bookkeeping is exercised."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_llama
from pyengine.beam import beam_search
from pyengine_convert import convert


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("beam")
    hf_dir = make_llama(d / "hf", tied=False, n_kv_heads=2)
    convert(hf_dir, d / "f32.gguf", qtype="f32")
    return load_hf_model(hf_dir), d / "f32.gguf"


def hf_beams(model, prompt, eos, **kw):
    with torch.no_grad():
        pad = eos if isinstance(eos, int) else eos[0]
        out = model.generate(torch.tensor([prompt]), do_sample=False, eos_token_id=eos, pad_token_id=pad,
                             output_scores=True, return_dict_in_generate=True, top_k=None, top_p=None,
                             temperature=None, **kw)
    seqs = [s[len(prompt):].tolist() for s in out.sequences]
    scores = out.sequences_scores.numpy() if getattr(out, "sequences_scores", None) is not None else None
    return seqs, scores


def trim(seq: list[int], eos: int) -> list[int]:
    """transformers pads finished hypotheses after their end id with the pad id (= eos here)."""
    return seq[:seq.index(eos) + 1] if eos in seq else seq


CASES = [
    dict(num_beams=4, max_new_tokens=10),
    dict(num_beams=3, max_new_tokens=12, length_penalty=0.0, num_return_sequences=3),
    dict(num_beams=4, max_new_tokens=10, length_penalty=2.0, early_stopping=True, num_return_sequences=2),
    dict(num_beams=5, max_new_tokens=9, early_stopping="never", length_penalty=-0.5, num_return_sequences=2),
    dict(num_beams=4, max_new_tokens=14, no_repeat_ngram_size=2, num_return_sequences=4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_beam_search_matches_transformers(llama, case):
    model, path = llama
    engine = pyengine.Engine(path, n_ctx=64)
    rng = np.random.default_rng(4)
    prompt = rng.integers(3, 256, size=6).tolist()
    greedy, _ = hf_beams(model, prompt, eos=-1 % 256, num_beams=1, max_new_tokens=6)
    eos = greedy[0][2]  # a token the model does emit: some beams end early
    ref, ref_scores = hf_beams(model, prompt, eos=eos, **case)
    kw = {k: v for k, v in case.items() if k not in ("num_beams", "max_new_tokens")}
    got = beam_search(engine, prompt, case["num_beams"], case["max_new_tokens"], [eos], **kw)
    assert [h.token_ids for h in got] == [trim(s, eos) for s in ref]
    np.testing.assert_allclose([h.score for h in got], ref_scores, rtol=1e-4, atol=1e-4)


def test_generate_with_num_beams(llama):
    model, path = llama
    llm = pyengine.LLM(path, n_ctx=64)
    prompt = [1, 17, 42, 99, 5]
    eos = sorted(llm.tokenizer.eog_ids)
    texts = llm.generate(prompt, num_beams=3, max_new_tokens=8, num_return_sequences=2)
    ref, _ = hf_beams(model, prompt, eos=eos, num_beams=3, max_new_tokens=8, num_return_sequences=2)
    strip = lambda s: [t for t in s if t not in eos]  # noqa: E731
    assert texts == [llm.tokenizer.decode(strip(s)) for s in ref]
    with pytest.raises(ValueError, match="does not stream"):
        llm.generate(prompt, num_beams=2, stream=True)
