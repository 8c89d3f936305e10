"""T5 (llama.cpp's `t5`, encoder-decoder) against transformers on tiny random checkpoints: T5 v1.0 (ReLU
FFN, tied embeddings with the d_model^-0.5 output scale) and v1.1 (gated-GELU FFN, untied lm_head, a
decoder deeper than the encoder). Decoder logits, token-by-token decoding, batches, quantized files,
greedy generation, beam search, the unigram tokenizer, and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

import pyengine  # noqa: E402
from pyengine import _C  # noqa: E402
from pyengine_convert import ConversionError, convert  # noqa: E402

from checkpoints import make_t5  # noqa: E402
from seq2seq_ref import Seq2SeqCase, assert_close, context, gguf_of, ref_logits  # noqa: E402
from seq2seq_ref import test_sequences_in_one_batch_equal_each_alone, test_token_by_token_equals_full_decoder  # noqa: E402,F401

VARIANTS = {"v1_0": dict(gated=False, tied=True), "v1_1": dict(gated=True, tied=False)}
SRC = [5, 17, 33, 8, 100, 42, 9, 60, 11, 1]
TGT = [0, 12, 7, 55, 3, 20, 4]


@pytest.fixture(scope="module", params=list(VARIANTS))
def t5(request, tmp_path_factory):
    d = make_t5(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    hf = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
    return d, hf


@pytest.fixture(scope="module")
def seq2seq(t5):
    """What seq2seq_ref's shared tests run on."""
    return Seq2SeqCase(*t5, SRC, TGT, [44, 3, 19, 1], [0, 9, 31])



def test_decoder_logits_match_transformers(t5):
    d, hf = t5
    ctx = context(gguf_of(d))
    ctx.encode(np.array(SRC, np.int32), 0)
    assert_close(ctx.eval(np.array(TGT, np.int32), "all", 0), ref_logits(hf, SRC, TGT))


def test_decoder_deeper_than_encoder(tmp_path):
    """{arch}.decoder_block_count (T5's num_decoder_layers) differs from block_count. (transformers'
    generate cannot run such a model: its cache has num_layers layers, so only logits are compared.)"""
    d = make_t5(tmp_path / "deep", gated=True, tied=False, n_layers=2, n_dec_layers=3)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
    ctx = context(gguf_of(d))
    assert ctx is not None and _C.Model(str(gguf_of(d))).config["n_layer"] == 3
    ctx.encode(np.array(SRC, np.int32), 0)
    assert_close(ctx.eval(np.array(TGT, np.int32), "all", 0), ref_logits(hf, SRC, TGT))


def test_mt5_logits_match_transformers(tmp_path):
    d = make_t5(tmp_path / "mt5", gated=True, tied=False, mt5=True)
    assert json.loads((d / "config.json").read_text())["architectures"] == ["MT5ForConditionalGeneration"]
    hf = transformers.MT5ForConditionalGeneration.from_pretrained(d).eval()
    ctx = context(gguf_of(d))
    ctx.encode(np.array(SRC, np.int32), 0)
    assert_close(ctx.eval(np.array(TGT, np.int32), "all", 0), ref_logits(hf, SRC, TGT))


def test_custom_class_with_t5_weights_converts_as_t5(tmp_path):
    """A folder whose config.json names a class of its own around T5's weights (ChatLM-mini-Chinese's
    architectures ["TextToTextModel"], model_type "t5") converts as t5 by its model_type; an unknown class of
    an unknown model_type is still refused by name."""
    d = make_t5(tmp_path / "chatlm")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["TextToTextModel"]}))
    report = convert(d, tmp_path / "chatlm.gguf", qtype="f32", output_qtype="f32")
    assert (report.arch, report.hf_arch) == ("t5", "TextToTextModel")
    ctx = context(report.out_path)
    ctx.encode(np.array(SRC, np.int32), 0)
    assert_close(ctx.eval(np.array(TGT, np.int32), "all", 0), ref_logits(hf, SRC, TGT))
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["TextToTextModel"], "model_type": "other"}))
    with pytest.raises(ConversionError, match="unsupported architecture TextToTextModel"):
        convert(d, tmp_path / "other.gguf", qtype="f32")


def test_seq_copy_shares_the_encoder_output(t5):
    d, hf = t5
    ctx = context(gguf_of(d), n_seq=2)
    ctx.encode(np.array(SRC, np.int32), 0)
    ctx.eval(np.array(TGT[:3], np.int32), "none", 0)
    ctx.seq_copy(0, 1)
    assert_close(ctx.eval(np.array(TGT[3:], np.int32), "all", 1), ref_logits(hf, SRC, TGT)[3:])


def test_decoding_without_an_input_is_refused(t5):
    d, _ = t5
    ctx = context(gguf_of(d))
    with pytest.raises(_C.EngineError, match="encode"):
        ctx.eval(np.array([0], np.int32), "last", 0)


# Bounds: max |logit difference| / max |logit| measured on these models (Q8_0: 0.009 v1.0, 0.022 v1.1;
# Q4_0: 0.075, 0.187) with a margin of about 1.6x; a wrong dequantization, layout or scale gives
# differences of the order of the logits.
QUANT_BOUNDS = {"q8_0": 0.035, "q4_0": 0.3}


@pytest.mark.parametrize("qtype", list(QUANT_BOUNDS))
def test_quantized_within_bounds(t5, qtype):
    d, hf = t5
    ctx = context(gguf_of(d, qtype))
    ctx.encode(np.array(SRC, np.int32), 0)
    ours = ctx.eval(np.array(TGT, np.int32), "all", 0)
    ref = ref_logits(hf, SRC, TGT)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < QUANT_BOUNDS[qtype], err


@pytest.mark.parametrize("qtype", list(QUANT_BOUNDS))
def test_quantized_long_input_within_bounds(t5, qtype):
    """An input of 100 tokens: where the CPU path is amx, the encoder's matmuls of many rows round to
    bfloat16 (ops/matmul.h's MatmulRounding::Bf16; tests/test_kernels.py checks the kernel itself); the
    logits stay within the int8 path's measured bounds."""
    d, hf = t5
    ctx = _C.Context(_C.Model(str(gguf_of(d, qtype))), _C.Executor(2), 128, 1, 512, "f32")
    src = [int(t) for t in np.random.default_rng(7).integers(2, 100, 99)] + [1]
    ctx.encode(np.array(src, np.int32), 0)
    ours = ctx.eval(np.array(TGT, np.int32), "all", 0)
    ref = ref_logits(hf, src, TGT)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < QUANT_BOUNDS[qtype], err


TEXTS = ["translate English to German: The house is wonderful.", "Der schnelle braune Fuchs  springt über den Hund.",
         " Ça va très bien, merci ", "¿Dónde está la biblioteca? 日本語のテキスト ｆｕｌｌｗｉｄｔｈ ①",
         "Llamas live in the Andes;\tthey are related to camels."]


def test_unigram_tokenizer_matches_transformers(t5):
    d, _ = t5
    ref = transformers.AutoTokenizer.from_pretrained(d)
    tok = pyengine.LLM(str(gguf_of(d)), n_ctx=64).tokenizer
    assert tok.model == "t5"
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(d / "spiece.model"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert ids == sp.encode(text) + [sp.eos_id()], text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def _hf_generate(hf, src, **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor([src]), do_sample=False, **kw)[:, 1:].tolist()


def test_greedy_generation_matches_transformers(t5):
    d, hf = t5
    llm = pyengine.LLM(str(gguf_of(d)), n_ctx=64, kv_type="f32")
    for text in TEXTS[:3]:
        src = llm.tokenizer.encode(text)
        ref = _hf_generate(hf, src, max_new_tokens=12, num_beams=1)[0]
        gen = llm.generate(text, max_new_tokens=12, temperature=0, stream=True)
        gen.wait()
        assert gen.token_ids == ref[:len(gen.token_ids)] and (len(gen.token_ids) == 12 or gen.token_ids[-1] == 1), text


def test_beam_search_matches_transformers(t5):
    d, hf = t5
    llm = pyengine.LLM(str(gguf_of(d)), n_ctx=64, kv_type="f32")
    for text, lp in ((TEXTS[0], 1.0), (TEXTS[2], 0.6), (TEXTS[4], 2.0)):
        src = llm.tokenizer.encode(text)
        ref = _hf_generate(hf, src, max_new_tokens=10, num_beams=4, length_penalty=lp, num_return_sequences=3,
                           early_stopping=False)
        hyps = llm.beam_search(text, num_beams=4, max_new_tokens=10, length_penalty=lp, num_return_sequences=3)
        gc = hf.generation_config  # transformers pads the shorter hypotheses with `pad_token_id or eos_token_id`
        pad = gc.pad_token_id or gc.eos_token_id
        assert [h.token_ids + [pad] * (len(ref[0]) - len(h.token_ids)) for h in hyps] == ref, text


def test_bad_bucket_count_names_the_key(t5, tmp_path):
    d, _ = t5
    bad = tmp_path / "bad"
    shutil.copytree(d, bad, ignore=shutil.ignore_patterns("*.gguf"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["relative_attention_num_buckets"] = 31
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="relative_attention_num_buckets"):
        convert(bad, tmp_path / "bad.gguf", qtype="f32")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converter_matches_llama_cpp(tmp_path, variant):
    """Every key and tensor llama.cpp's convert_hf_to_gguf.py (T5Model) writes for the same folder, we write
    with the same value (tensors bit for bit at F32), and no other tensor."""
    from llama_cpp_ref import compare_gguf, llama_cpp_convert

    d = make_t5(tmp_path / variant, **VARIANTS[variant])
    ours = convert(d, tmp_path / "ours.gguf", qtype="f32", output_qtype="f32").out_path
    theirs = llama_cpp_convert(d, tmp_path / "llama.gguf")
    compare_gguf(ours, theirs, allowed_extra=("pyengine.generation.eos_token_ids",))


def test_text_to_text_api_batch_sampling_and_cli(t5, tmp_path):
    """LLM.generate on a list runs the inputs as one batch, each giving its text alone; sampling with a
    seed repeats; generate(num_beams=...) is beam_search's best; `pyengine generate` prints the text."""
    import subprocess
    import sys

    d, hf = t5
    path = gguf_of(d)
    llm = pyengine.LLM(str(path), n_ctx=64, kv_type="f32")
    alone = [llm.generate(t, max_new_tokens=8, temperature=0) for t in TEXTS[:3]]
    assert llm.generate(TEXTS[:3], max_new_tokens=8, temperature=0) == alone
    ref = _hf_generate(hf, llm.tokenizer.encode(TEXTS[0]), max_new_tokens=8, num_beams=1)[0]
    assert alone[0] == llm.tokenizer.decode([t for t in ref if t != 1], skip_special_tokens=True)
    sampled = [llm.generate(TEXTS[1], max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    best = llm.beam_search(TEXTS[0], num_beams=4, max_new_tokens=8)[0].token_ids
    assert llm.generate(TEXTS[0], num_beams=4, max_new_tokens=8) == llm.tokenizer.decode(
        [t for t in best if t not in llm.tokenizer.eog_ids])
    r = subprocess.run([sys.executable, "-m", "pyengine", "generate", "-m", str(path), "-p", TEXTS[0], "-n", "8",
                        "--temp", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == alone[0]


@pytest.mark.parametrize("change,match", [
    (dict(tensors={"dec.blk.0.attn_rel_b.weight": None}), "dec.blk.0.attn_rel_b.weight"),
    (dict(tensors={"enc.blk.1.attn_o.weight": None}), "enc.blk.1.attn_o.weight"),
    (dict(tensors={"dec.blk.1.cross_attn_k.weight": None}), "dec.blk.1.cross_attn_k.weight"),
    (dict(tensors={"enc.blk.0.attn_rel_b.weight": np.zeros((16, 4), np.float32)}), "enc.blk.0.attn_rel_b.weight"),
    (dict(drop_keys=("t5.attention.relative_buckets_count",)), "t5.attention.relative_buckets_count"),
    (dict(drop_keys=("t5.decoder_start_token_id",)), "t5.decoder_start_token_id"),
])
def test_bad_file_names_the_culprit(t5, tmp_path, change, match):
    from gguf_craft import rewrite

    d, _ = t5
    bad = tmp_path / "bad.gguf"
    rewrite(gguf_of(d), bad, **change)
    with pytest.raises((_C.ModelFormatError, _C.UnsupportedModelError), match=match.replace(".", r"\.")):
        _C.Model(str(bad))


def test_gpu_offload_is_refused_by_name(t5):
    d, _ = t5
    model = _C.Model(str(gguf_of(d)))
    with pytest.raises(_C.UnsupportedModelError, match="t5.*n_gpu_layers=0"):
        model.offload(1)


@pytest.mark.parametrize("tensor,where", [("enc.blk.1.ffn_down.weight", "enc.blk.1"),
                                          ("dec.blk.0.cross_attn_o.weight", "dec.blk.0")])
def test_non_finite_weights_name_the_stack_and_layer(t5, tmp_path, tensor, where):
    from gguf import GGUFReader
    from gguf_craft import rewrite

    d, _ = t5
    t = next(t for t in GGUFReader(gguf_of(d)).tensors if t.name == tensor)
    w = np.array(t.data, np.float32).reshape([int(x) for x in reversed(t.shape)])
    w[0, 0] = np.nan
    bad = tmp_path / "nan.gguf"
    rewrite(gguf_of(d), bad, tensors={tensor: w})
    ctx = context(bad)
    with pytest.raises(_C.NumericalError, match=where.replace(".", r"\.")):
        ctx.encode(np.array(SRC, np.int32), 0)
        ctx.eval(np.array(TGT, np.int32), "all", 0)
