"""Baichuan and Baichuan 2 (llama.cpp's `baichuan`): tiny checkpoint folders as the hub's (W_pack, remote
code config) converted to GGUF, against references written from the published modeling code
(baichuan_ref.py): 7B-style (RoPE) against transformers' LlamaForCausalLM with the W_pack rows split,
13B-style (ALiBi, power-of-two and other head counts) against a torch forward of Baichuan-13B's
attention with its _gen_alibi_mask; Baichuan 2's NormHead. F32 logits to 1e-4, full forward, token by
token and batched; ALiBi and NormHead shown to matter. With the layer counts llama.cpp recognises (32:
RoPE, 40: ALiBi), llama.cpp's converter's files give the same logits in pyengine and llama-perplexity on
our files gives our perplexity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyengine
from pyengine import _C
from baichuan_ref import alibi_reference, get_interleave, llama_reference
from checkpoints import make_baichuan
from pyengine_convert import ConversionError, convert


def llama_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def check_engine(path, ids, ref, n_ctx=64):
    """Full forward, token by token, and as the second sequence of a batch."""
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(path, n_ctx=n_ctx, kv_type="f32")
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:3])] + [llm.eval([t]) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(steps), ref[2:], **tol)
    eng = pyengine.Engine(path, n_ctx=n_ctx, n_seq_max=2, kv_type="f32")
    out = eng.decode(ids[:9] + ids, [0] * 9 + [1] * len(ids))
    np.testing.assert_allclose(out[9:], ref, **tol)


@pytest.mark.parametrize("n_head", list(range(1, 41)) + [48, 64])
def test_alibi_slopes_are_baichuans(n_head):
    np.testing.assert_allclose(_C.alibi_slopes(n_head, 8.0), get_interleave(n_head), rtol=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_7b_rope_matches_transformers_llama(tmp_path, version):
    hf_dir = make_baichuan(tmp_path / "hf", version=version)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    md = pyengine.LLM(tmp_path / "f32.gguf").metadata
    assert md["general.architecture"] == "baichuan"
    assert md["baichuan.attention.max_alibi_bias"] == 0.0   # 2 layers: llama.cpp's rule would give no positions
    ids = np.random.default_rng(21).integers(3, 400, size=40).tolist()
    ref = llama_logits(llama_reference(hf_dir), ids)
    check_engine(tmp_path / "f32.gguf", ids, ref)
    if version == 2:   # the NormHead changes the logits
        plain = llama_logits(llama_reference(hf_dir, norm_head=False), ids)
        assert np.abs(plain - ref).max() > 1e-2


@pytest.mark.parametrize("n_head,hidden", [(4, 64), (6, 96), (12, 96)])
@pytest.mark.parametrize("version", [1, 2])
def test_13b_alibi_matches_reference(tmp_path, n_head, hidden, version):
    hf_dir = make_baichuan(tmp_path / "hf", version=version, alibi=True, n_heads=n_head, hidden=hidden)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    llm = pyengine.LLM(tmp_path / "f32.gguf")
    assert llm.metadata["baichuan.attention.max_alibi_bias"] == 8.0
    ids = np.random.default_rng(22).integers(3, 400, size=40).tolist()
    ref = alibi_reference(hf_dir, ids).numpy()
    check_engine(tmp_path / "f32.gguf", ids, ref)
    assert np.abs(alibi_reference(hf_dir, ids, alibi=False).numpy() - ref).max() > 1e-2   # ALiBi matters
    if version == 2:
        assert np.abs(alibi_reference(hf_dir, ids, norm_head=False).numpy() - ref).max() > 1e-2


def test_13b_alibi_quantized(tmp_path):
    hf_dir = make_baichuan(tmp_path / "hf", alibi=True, version=2)
    convert(hf_dir, tmp_path / "q8.gguf", qtype="q8_0", output_qtype="q8_0")
    ids = np.random.default_rng(23).integers(3, 400, size=40).tolist()
    ref = alibi_reference(hf_dir, ids).numpy()
    got = pyengine.LLM(tmp_path / "q8.gguf", n_ctx=64).logits(ids)
    np.testing.assert_allclose(got, ref, atol=5e-2 * np.abs(ref).max())


def test_converter_splits_w_pack_as_llama_cpp(tmp_path):
    """attn_q/attn_k/attn_v are W_pack's row thirds, q and k permuted for adjacent-pair RoPE; the
    NormHead's rows are written normalised."""
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    from pyengine_convert.arch import permute_rope_rows

    hf_dir = make_baichuan(tmp_path / "hf", version=2)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    sd = load_file(str(hf_dir / "model.safetensors"))
    t = {x.name: np.asarray(x.data) for x in GGUFReader(tmp_path / "f32.gguf").tensors}
    q, k, v = np.split(sd["model.layers.1.self_attn.W_pack.weight"], 3)
    np.testing.assert_array_equal(t["blk.1.attn_q.weight"], permute_rope_rows(q, 4))
    np.testing.assert_array_equal(t["blk.1.attn_k.weight"], permute_rope_rows(k, 4))
    np.testing.assert_array_equal(t["blk.1.attn_v.weight"], v)
    assert "blk.1.attn_qkv.weight" not in t
    head = sd["lm_head.weight"]
    np.testing.assert_allclose(t["output.weight"], head / np.linalg.norm(head, axis=1, keepdims=True), rtol=1e-6)


def test_bad_input(tmp_path):
    from gguf_craft import rewrite

    from safetensors.torch import load_file, save_file

    hf_dir = make_baichuan(tmp_path / "hf", n_layers=1)
    weights = hf_dir / "model.safetensors"
    good = load_file(str(weights))
    name = "model.layers.0.self_attn.W_pack.weight"
    save_file({**good, name: good[name][:128].contiguous()}, str(weights))   # q and k only
    with pytest.raises(ConversionError, match=rf"{name} has shape \[128, 64\] but config.json implies \[192, 64\]"):
        convert(hf_dir, tmp_path / "x.gguf", qtype="f32")
    save_file(good, str(weights))
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    with pytest.raises(ConversionError, match="W_pack holds as many key/value heads as query heads"):
        convert(hf_dir, tmp_path / "x.gguf", qtype="f32")
    (hf_dir / "config.json").write_text(json.dumps(config))
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    # without the key, a layer count llama.cpp does not know (it would run the model with no positions)
    rewrite(tmp_path / "f32.gguf", tmp_path / "nokey.gguf", drop_keys=("baichuan.attention.max_alibi_bias",))
    with pytest.raises(pyengine.UnsupportedModelError, match="baichuan.attention.max_alibi_bias"):
        pyengine.LLM(tmp_path / "nokey.gguf")


def test_bad_max_alibi_bias(tmp_path):
    from gguf_craft import rewrite

    hf_dir = make_baichuan(tmp_path / "hf", n_layers=1, alibi=True)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    for value, match in ((float("nan"), "is nan"), (-1.0, "is -1")):
        rewrite(tmp_path / "f32.gguf", tmp_path / "bad.gguf", extra_keys={"baichuan.attention.max_alibi_bias": value})
        with pytest.raises(pyengine.ModelFormatError, match=f"baichuan.attention.max_alibi_bias' {match}"):
            pyengine.LLM(tmp_path / "bad.gguf")


# --- llama.cpp ------------------------------------------------------------------------------------------
# llama.cpp tells 7B from 13B by the layer count alone: 32 layers and 40 layers, with tiny widths.

@pytest.fixture(scope="module", params=["7b_rope", "13b_alibi"])
def llama_cpp_sized(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    alibi = request.param == "13b_alibi"
    hf_dir = make_baichuan(d / "hf", alibi=alibi, n_layers=40 if alibi else 32, hidden=96 if alibi else 64,
                           n_heads=6 if alibi else 4, ff=64)
    convert(hf_dir, d / "f32.gguf", qtype="f32")
    return alibi, hf_dir, d / "f32.gguf"


def sized_reference(alibi, hf_dir, ids):
    return alibi_reference(hf_dir, ids).numpy() if alibi else llama_logits(llama_reference(hf_dir), ids)


def test_llama_cpp_sizes_need_no_key(llama_cpp_sized):
    alibi, hf_dir, path = llama_cpp_sized
    llm = pyengine.LLM(path, n_ctx=64, kv_type="f32")
    assert "baichuan.attention.max_alibi_bias" not in llm.metadata
    ids = np.random.default_rng(24).integers(3, 400, size=40).tolist()
    ref = sized_reference(alibi, hf_dir, ids)
    np.testing.assert_allclose(llm.logits(ids), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_llama_cpp_file_gives_equal_logits(llama_cpp_sized, tmp_path):
    """llama.cpp's convert_hf_to_gguf.py output for the same folder (with its Baichuan recursion fixed,
    llama_cpp_ref.py): the same tensors and model keys, and the same logits in pyengine."""
    from llama_cpp_ref import BAICHUAN_RECURSION_FIX, compare_gguf, llama_cpp_convert

    alibi, hf_dir, path = llama_cpp_sized
    theirs = llama_cpp_convert(hf_dir, tmp_path / "llama.gguf", patch=BAICHUAN_RECURSION_FIX)
    # we also write the vocabulary size, and the KV head count and RoPE base that llama.cpp takes by default
    compare_gguf(path, theirs, skip_prefixes=("tokenizer.",), allowed_extra=(
        "baichuan.vocab_size", "baichuan.attention.head_count_kv", "baichuan.rope.freq_base"))
    ids = np.random.default_rng(25).integers(3, 400, size=40).tolist()
    ref = sized_reference(alibi, hf_dir, ids)
    got = pyengine.LLM(theirs, n_ctx=64, kv_type="f32").logits(ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_llama_cpp_reads_our_file(llama_cpp_sized, tmp_path):
    """llama-perplexity on our file gives our perplexity, and its log-probabilities position by position
    (--kl-divergence-base); with the other position encoding (max_alibi_bias written the other way) they
    differ."""
    from gguf_craft import rewrite
    from llama_cpp_ref import check_llama_cpp_reads

    alibi, _, path = llama_cpp_sized
    rewrite(path, tmp_path / "other.gguf", extra_keys={"baichuan.attention.max_alibi_bias": 0.0 if alibi else 8.0})
    check_llama_cpp_reads(path, tmp_path, other=tmp_path / "other.gguf")


def test_tokenizer_is_sentencepiece(tmp_path):
    """Baichuan's tokenizer is a SentencePiece model (BaichuanTokenizer): pyengine's encoding of the
    converted vocabulary is sentencepiece's."""
    import sentencepiece as spm

    from checkpoints import CORPUS

    hf_dir = make_baichuan(tmp_path / "hf", n_layers=1)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    tok = pyengine.LLM(tmp_path / "f32.gguf").tokenizer
    for text in CORPUS.splitlines() + ["Hello world", "  two  spaces", "ünïcödé 日本語 🦙"]:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_llama_cpp_leaves_baichuan2_norm_head_raw(tmp_path):
    """For a Baichuan 2 folder llama.cpp's converter writes lm_head as stored (its files then give other
    logits than transformers' NormHead); ours differs from it only in that tensor: its rows normalised."""
    from gguf import GGUFReader

    from llama_cpp_ref import BAICHUAN_RECURSION_FIX, llama_cpp_convert

    hf_dir = make_baichuan(tmp_path / "hf", version=2, n_layers=32, ff=64)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    theirs = llama_cpp_convert(hf_dir, tmp_path / "llama.gguf", patch=BAICHUAN_RECURSION_FIX)
    ours = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "f32.gguf").tensors}
    raw = {t.name: np.asarray(t.data) for t in GGUFReader(theirs).tensors}
    assert set(ours) == set(raw)
    for name in raw:
        if name != "output.weight":
            np.testing.assert_array_equal(ours[name], raw[name], err_msg=name)
    head = raw["output.weight"]
    np.testing.assert_allclose(ours["output.weight"], head / np.linalg.norm(head, axis=1, keepdims=True), rtol=1e-6)
    ids = np.random.default_rng(26).integers(3, 400, size=30).tolist()
    ref = llama_logits(llama_reference(hf_dir), ids)
    np.testing.assert_allclose(pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32").logits(ids), ref,
                               rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.abs(pyengine.LLM(theirs, n_ctx=64, kv_type="f32").logits(ids) - ref).max() > 1e-2
