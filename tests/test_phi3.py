"""Phi-3: a tiny random Phi3ForCausalLM (fused qkv_proj and gate_up_proj, GQA), full and partial
rotary, converted to llama.cpp's `phi3`, against transformers: F32 logits to 1e-4 (full forward,
token by token, batched). LongRoPE (the 128k models) as llama.cpp runs it: the long factors when the
context exceeds the original one, else the short, cos/sin times the attention factor; against
transformers (which chooses per forward by the sequence length) with both factor sets, the converter's
file against llama.cpp's converter, and llama-perplexity on our files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_phi3
from pyengine_convert import ConversionError, convert


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_logits_match_transformers(tmp_path, partial):
    hf_dir = make_phi3(tmp_path / "hf", partial_rotary_factor=partial)
    model = load_hf_model(hf_dir)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    ids = np.random.default_rng(7).integers(3, 200, size=30).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32")
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:4])] + [llm.eval([t]) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(steps), ref[3:], **tol)
    eng = pyengine.Engine(tmp_path / "f32.gguf", n_ctx=64, n_seq_max=2, kv_type="f32")
    out = eng.decode(ids[:7] + ids, [0] * 7 + [1] * len(ids))
    np.testing.assert_allclose(out[7:], ref, **tol)


# --- LongRoPE ------------------------------------------------------------------------------------------

def test_llama_cpp_cross_checks(tmp_path):
    """Without LongRoPE: llama.cpp's conversion of the folder gives transformers' logits in pyengine, and
    llama-perplexity on our file gives our perplexity."""
    from llama_cpp_ref import check_llama_cpp_reads, llama_cpp_convert

    hf_dir = make_phi3(tmp_path / "hf")
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    ids = np.random.default_rng(15).integers(3, 400, size=40).tolist()
    ref = reference(load_hf_model(hf_dir), ids)
    theirs = llama_cpp_convert(hf_dir, tmp_path / "llama.gguf")
    got = pyengine.LLM(theirs, n_ctx=64, kv_type="f32").logits(ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    check_llama_cpp_reads(tmp_path / "f32.gguf", tmp_path)


def make_longrope(out_dir, original=32, partial=1.0, **kwargs):
    """A tiny Phi-3 with LongRoPE: max_position_embeddings 256 over an original context of `original`
    (attention factor sqrt(1 + ln(256 / original) / ln(original))), short and long factors that differ per pair."""
    n_pairs = int(16 * partial) // 2
    rng = np.random.default_rng(11)
    short = (1.0 + rng.uniform(0, 0.5, n_pairs)).round(4).tolist()
    long = np.geomspace(1.0, 12.0, n_pairs).round(4).tolist()
    return make_phi3(out_dir, partial_rotary_factor=partial, original_max_position_embeddings=original,
                     rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long,
                                   "partial_rotary_factor": partial}, **kwargs)


@pytest.fixture(scope="module", params=[1.0, 0.5], ids=["full", "partial"])
def longrope(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("longrope")
    hf_dir = make_longrope(d / "hf", partial=request.param)
    convert(hf_dir, d / "f32.gguf", qtype="f32")
    return load_hf_model(hf_dir), d / "f32.gguf", hf_dir


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_longrope_short_factors(longrope):
    """n_ctx 32 <= the original 32: short factors; a 30-token prompt is short for transformers too."""
    model, path, _ = longrope
    ids = np.random.default_rng(12).integers(3, 400, size=30).tolist()
    ref = reference(model, ids)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(path, n_ctx=32, kv_type="f32")
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:4])] + [llm.eval([t]) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(steps), ref[3:], **tol)
    eng = pyengine.Engine(path, n_ctx=32, n_seq_max=2, kv_type="f32")
    out = eng.decode(ids[:7] + ids, [0] * 7 + [1] * len(ids))
    np.testing.assert_allclose(out[7:], ref, **tol)
    # a context longer than the original takes the long factors whatever the prompt (llama.cpp's choice),
    # which transformers does not use for this prompt: the factor sets differ visibly
    long_ctx = pyengine.LLM(path, n_ctx=64, kv_type="f32").logits(ids)
    assert np.abs(long_ctx - ref).max() > 1e-2


def test_longrope_long_factors(longrope):
    """n_ctx 64 > the original 32 and a 50-token prompt: long factors in both."""
    model, path, _ = longrope
    ids = np.random.default_rng(13).integers(3, 400, size=50).tolist()
    ref = reference(model, ids)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(pyengine.LLM(path, n_ctx=64, kv_type="f32").logits(ids), ref, **tol)
    eng = pyengine.Engine(path, n_ctx=64, n_seq_max=2, kv_type="f32")
    out = eng.decode(ids[:7] + ids, [0] * 7 + [1] * len(ids))
    np.testing.assert_allclose(out[7:], ref, **tol)


def test_longrope_attention_factor_matters(longrope):
    from transformers import AutoModelForCausalLM

    model, path, hf_dir = longrope
    assert pyengine.LLM(path).metadata["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(8) / np.log(32)) ** 0.5)
    ids = np.random.default_rng(12).integers(3, 400, size=30).tolist()
    params = dict(model.config.rope_parameters, attention_factor=1.0)
    other = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, rope_parameters=params).eval()
    assert np.abs(reference(other, ids) - reference(model, ids)).max() > 1e-2


def test_longrope_file_matches_llama_cpp(longrope, tmp_path):
    """Our converter's tensors (the factor sets included, bit for bit) and model keys are llama.cpp's
    convert_hf_to_gguf.py's for the same folder (the tokenizer keys are another test's subject; we also
    write phi3.vocab_size, as for every architecture), and llama.cpp's file gives transformers' logits in
    pyengine with either factor set."""
    from llama_cpp_ref import compare_gguf, llama_cpp_convert, read_gguf

    _, path, hf_dir = longrope
    theirs = llama_cpp_convert(hf_dir, tmp_path / "llama.gguf")
    compare_gguf(path, theirs, skip_prefixes=("tokenizer.",), allowed_extra=("phi3.vocab_size",))
    md, tensors = read_gguf(theirs)
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= set(tensors)
    assert md["phi3.rope.scaling.original_context_length"] == 32
    model = longrope[0]
    for n_ctx, n_ids in ((32, 30), (64, 50)):   # short, then long factors, in pyengine and transformers alike
        ids = np.random.default_rng(14).integers(3, 400, size=n_ids).tolist()
        ref = reference(model, ids)
        got = pyengine.LLM(theirs, n_ctx=n_ctx, kv_type="f32").logits(ids)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("n_ctx,factors", [(64, "short"), (512, "long")])
def test_longrope_llama_cpp_perplexity(tmp_path, n_ctx, factors):
    """llama-perplexity on our file gives our perplexity, with an original context of 256 (llama.cpp rounds
    its context per sequence up to a multiple of 256): -c 64 takes the short factors, -c 512 the long. Its
    log-probabilities position by position (--kl-divergence-base) too, and not with the other factor set."""
    from gguf import GGUFReader

    from gguf_craft import rewrite
    from llama_cpp_ref import check_llama_cpp_reads

    hf_dir = make_longrope(tmp_path / "hf", original=256, max_position=1024)
    path = tmp_path / "f32.gguf"
    convert(hf_dir, path, qtype="f32")
    other = "short" if factors == "long" else "long"
    t = {x.name: np.asarray(x.data) for x in GGUFReader(path).tensors}
    rewrite(path, tmp_path / "swapped.gguf", {f"rope_factors_{factors}.weight": t[f"rope_factors_{other}.weight"]})
    check_llama_cpp_reads(path, tmp_path, n_ctx=n_ctx, n_chunks=2, n_batch=n_ctx, other=tmp_path / "swapped.gguf")


def test_longrope_bad_input(tmp_path):
    """Factor lists of the wrong length, an unknown rope type, factor tensors of the wrong length or
    only one of them: a clear error naming the culprit."""
    hf_dir = make_longrope(tmp_path / "hf", n_layers=1)
    cfg = json.loads((hf_dir / "config.json").read_text())
    good = json.dumps(cfg)
    for key, value, match in (("long_factor", [2.0] * 5, r"rope_scaling.long_factor must be a list of 8 positive"),
                              ("short_factor", [1.0] * 7 + [-1.0], "rope_scaling.short_factor"),
                              ("rope_type", "dynamicish", "unsupported rope scaling type 'dynamicish'")):
        bad = json.loads(good)
        bad["rope_parameters"][key] = value
        (hf_dir / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConversionError, match=match):
            convert(hf_dir, tmp_path / "x.gguf", qtype="f32")
    (hf_dir / "config.json").write_text(good)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    from gguf_craft import rewrite

    rewrite(tmp_path / "f32.gguf", tmp_path / "short.gguf", {"rope_factors_long.weight": np.ones(6)})
    with pytest.raises(pyengine.ModelFormatError, match=r"rope_factors_long.weight' has shape \[6\], expected \[8\]"):
        pyengine.LLM(tmp_path / "short.gguf")
    rewrite(tmp_path / "f32.gguf", tmp_path / "one.gguf", {"rope_factors_short.weight": None})
    with pytest.raises(pyengine.ModelFormatError, match="rope_factors_short.weight' is missing"):
        pyengine.LLM(tmp_path / "one.gguf")
    rewrite(tmp_path / "f32.gguf", tmp_path / "neg.gguf", {"rope_factors_short.weight": -np.ones(8)})
    with pytest.raises(pyengine.ModelFormatError, match="rope_factors_short.weight' holds -1"):
        pyengine.LLM(tmp_path / "neg.gguf")
