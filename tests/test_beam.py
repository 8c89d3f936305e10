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


# --- ties: torch.topk's order -----------------------------------------------------------------------------

def _tied_scores(rng, n):
    """Scores with many exact ties: a few distinct values, some -inf, now and then a NaN."""
    x = rng.integers(0, int(rng.choice([2, 4, 50])), n).astype(np.float32)
    x[rng.random(n) < 0.2] = -np.inf
    if rng.random() < 0.1:
        x[rng.integers(0, n)] = np.nan
    return x


@pytest.mark.parametrize("n", [1, 3, 8, 12, 17, 100, 511, 512, 1024, 4 * 1000, 4 * 32128])
def test_topk_order_equals_torch_topk_with_ties(n):
    """Our top-k is torch.topk's on the CPU, index for index, with ties, -inf and NaN: both of torch's
    algorithms (nth_element + sort below k * 64 values, partial_sort from there) and the sizes beam search uses
    (2 x beams of beams x vocab, num_beams of 2 x beams, num_beams of 3 x beams)."""
    from pyengine.topk import topk

    rng = np.random.default_rng(n)
    for trial in range(60 if n < 10000 else 8):
        x = _tied_scores(rng, n)
        k = int(rng.integers(1, min(n, 33) + 1))
        want = torch.topk(torch.from_numpy(x), k).indices.numpy()
        assert topk(x, k).tolist() == want.tolist(), (trial, k, x.tolist() if n < 64 else None)
    x = np.zeros(n, np.float32)  # all tied: torch's order is not "lowest index first"
    k = min(n, 8)
    assert topk(x, k).tolist() == torch.topk(torch.from_numpy(x), k).indices.tolist()


class _TiedLogits:
    """A stand-in engine whose logits are a function of the sequence so far, with many exact ties (a few
    distinct values); the same function feeds transformers' generate through a logits processor."""

    vocab = 256

    def __init__(self, prompt_len):
        self.prompt_len = prompt_len

    def row(self, seq):
        rng = np.random.default_rng(abs(hash(tuple(seq))) % (2 ** 32))
        return rng.integers(0, 3, self.vocab).astype(np.float32)

    def new_context(self, n_ctx, n_seq_max):
        outer = self

        class Context:
            seqs: dict = {}

            def decode(self, tokens, seqs, want=None):
                rows = []
                for t, s in zip(tokens, seqs):
                    self.seqs.setdefault(int(s), []).append(int(t))
                    rows.append(outer.row(self.seqs[int(s)]))
                rows = np.stack(rows)
                return rows[np.asarray(want)] if want is not None else rows

            def seq_copy(self, src, dst):
                self.seqs[int(dst)] = list(self.seqs[int(src)])

        return Context()


@pytest.mark.parametrize("case", [dict(num_beams=4, num_return_sequences=4), dict(num_beams=3, length_penalty=0.0),
                                  dict(num_beams=4, no_repeat_ngram_size=2, num_return_sequences=2)],
                         ids=["beams4", "beams3", "ngram2"])
def test_beam_search_with_tied_scores_matches_transformers(llama, case):
    """Candidates with equal scores (every row has only three distinct logits) are picked in transformers'
    order: its generate, with a logits processor that replaces the model's log-probabilities by the same
    tied rows, gives the same hypotheses as our beam search on a stand-in engine with those logits."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, _ = llama
    prompt = [1, 17, 42, 99, 5]
    fake = _TiedLogits(len(prompt))

    class Tied(LogitsProcessor):
        def __call__(self, input_ids, scores):
            rows = np.stack([fake.row(s) for s in input_ids.tolist()])
            return torch.log_softmax(torch.from_numpy(rows), dim=-1)

    eos = 7
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, eos_token_id=eos, pad_token_id=eos,
                             max_new_tokens=8, logits_processor=LogitsProcessorList([Tied()]), top_k=None,
                             top_p=None, temperature=None, num_return_sequences=case.get("num_return_sequences", 1),
                             **{k: v for k, v in case.items() if k != "num_return_sequences"})
    ref = [trim(s[len(prompt):].tolist(), eos) for s in out]
    got = beam_search(fake, prompt, max_new_tokens=8, eos_ids=[eos], **case)
    assert [h.token_ids for h in got] == ref


@pytest.mark.parametrize("kw", [dict(min_length=11), dict(min_new_tokens=4)], ids=["min_length", "min_new_tokens"])
def test_min_length_on_a_decoder_only_model(llama, kw):
    """transformers' min_length (counting the prompt) and min_new_tokens: the end id is suppressed until then, in
    greedy generation and in beam search, token for token as its generate."""
    model, path = llama
    llm = pyengine.LLM(path, n_ctx=64)
    prompt = np.random.default_rng(4).integers(3, 256, size=6).tolist()
    free, _ = hf_beams(model, prompt, eos=-1 % 256, num_beams=1, max_new_tokens=6)
    eos = free[0][1]  # without a minimum the generation would end at its second token
    ref, _ = hf_beams(model, prompt, eos=eos, num_beams=1, max_new_tokens=10, **kw)
    gen = llm.generate(prompt, max_new_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[eos],
                       stream=True, **kw)
    gen.wait()
    assert gen.token_ids == trim(ref[0], eos) and len(gen.token_ids) > 2
    ref, ref_scores = hf_beams(model, prompt, eos=eos, num_beams=4, max_new_tokens=10, num_return_sequences=3, **kw)
    got = beam_search(llm, prompt, 4, 10, [eos], num_return_sequences=3, **kw)
    assert [h.token_ids for h in got] == [trim(s, eos) for s in ref]
    np.testing.assert_allclose([h.score for h in got], ref_scores, rtol=1e-4, atol=1e-4)
