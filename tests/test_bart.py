"""BART and mBART (pyengine's `bart` / `mbart`, encoder-decoder) against transformers on tiny random checkpoints:
BartForConditionalGeneration (post-norm, forced BOS <s> and EOS </s>) and MBartForConditionalGeneration
(pre-norm, final norms, scaled embeddings, decoder start </s> then the forced target language). Decoder logits,
token-by-token decoding, batches, quantized files, greedy generation and beam search with transformers'
settings, the tokenizers (tokenizer.json and the older vocab.json + merges.txt / sentencepiece.bpe.model
folders), the text-to-text API, and bad files and checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

import pyengine  # noqa: E402
from pyengine import _C  # noqa: E402
from pyengine_convert import ConversionError, convert  # noqa: E402

from checkpoints import make_bart  # noqa: E402
from seq2seq_ref import Seq2SeqCase, assert_close, context, gguf_of, ref_logits  # noqa: E402
from seq2seq_ref import test_sequences_in_one_batch_equal_each_alone, test_token_by_token_equals_full_decoder  # noqa: E402,F401

VARIANTS = ("bart", "mbart")
SRC = [5, 17, 33, 8, 100, 42, 9, 60, 11, 2]
TGT = [2, 12, 7, 55, 3, 20, 4]
TEXTS = ["translate English to German: The house is wonderful.", "Der schnelle braune Fuchs  springt über den Hund.",
         " Ça va très bien, merci ", "我想在苹果公司工作。今天天气很好，我们去公园散步吧。",
         "Llamas live in the Andes;\tthey are related to camels."]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """transformers' generate on these tiny models stalls for seconds at a time when torch's threads share the
    two cores with the engine's and other processes' (40 s against 2 s here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request, tmp_path_factory):
    """The checkpoint the logits and quantization tests use (_randomize's weights)."""
    d = make_bart(tmp_path_factory.mktemp(request.param), mbart=request.param == "mbart")
    return d, transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def seq2seq(model):
    """What seq2seq_ref's shared tests run on."""
    return Seq2SeqCase(*model, SRC, TGT, [44, 3, 19, 2], [2, 9, 31])


@pytest.fixture(scope="module", params=VARIANTS + ("mbart50",))
def gen_model(request, tmp_path_factory):
    """The checkpoint the generation tests use: blocks 3x larger, whose texts vary (see make_bart); mbart50 is
    mBART's architecture with mBART-50's tokenizer (its source language in front, zh_CN forced first)."""
    d = make_bart(tmp_path_factory.mktemp(request.param + "_gen"), mbart=request.param == "mbart",
                  mbart50=request.param == "mbart50", block_gain=3.0)
    return d, transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()




def test_file_is_the_architecture_it_says(model):
    d, hf = model
    m = _C.Model(str(gguf_of(d)))
    c = m.config
    arch = hf.config.model_type
    assert c["arch"] == arch and c["family"] == "encoder-decoder"
    assert c["decoder_start_token_id"] == hf.generation_config.decoder_start_token_id == 2
    md = pyengine.LLM(str(gguf_of(d)), n_ctx=64).metadata
    assert md[f"{arch}.embedding_scale"] == pytest.approx(8.0 if arch == "mbart" else 1.0)  # sqrt(64): scale_embedding
    names = {t["name"] for t in m.file.tensors}
    assert ("enc.output_norm.weight" in names) == ("dec.output_norm.bias" in names) == (arch == "mbart")
    assert "output.weight" not in names and "output.bias" in names  # tied, with final_logits_bias


def test_decoder_logits_match_transformers(model):
    d, hf = model
    ctx = context(gguf_of(d))
    ctx.encode(np.array(SRC, np.int32), 0)
    assert_close(ctx.eval(np.array(TGT, np.int32), "all", 0), ref_logits(hf, SRC, TGT))


def test_longer_decoder_and_positions_near_the_table_end(tmp_path):
    """A decoder deeper than the encoder (decoder_block_count), and inputs that reach the last learned position
    (BART's table has max_position_embeddings + 2 rows; the file keeps the ones positions reach)."""
    d = make_bart(tmp_path / "deep", n_layers=1, n_dec_layers=3, max_position=24)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    assert _C.Model(str(gguf_of(d))).config["n_layer"] == 3
    src = (SRC * 3)[:24]
    tgt = (TGT * 4)[:24]
    ctx = _C.Context(_C.Model(str(gguf_of(d))), _C.Executor(2), 24, 1, 512, "f32")
    ctx.encode(np.array(src, np.int32), 0)
    assert_close(ctx.eval(np.array(tgt, np.int32), "all", 0), ref_logits(hf, src, tgt))
    with pytest.raises(_C.ContextLengthError):
        _C.Context(_C.Model(str(gguf_of(d))), _C.Executor(2), 25, 1, 512, "f32")


# Bounds: max |logit difference| / max |logit| measured on make_bart's models for seeds 0, 1, 2 (F16: 0.0002;
# Q8_0: 0.0076 bart, 0.0050 mbart; Q4_0: 0.025, 0.013; Q4_1: 0.019, 0.014) with a margin of about 1.6x; a
# wrong dequantization, layout or scale gives differences of the order of the logits.
QUANT_BOUNDS = {"f16": 0.0004, "q8_0": 0.013, "q4_0": 0.04, "q4_1": 0.03}


@pytest.mark.parametrize("qtype", list(QUANT_BOUNDS))
def test_quantized_within_bounds(model, qtype):
    d, hf = model
    ctx = context(gguf_of(d, qtype))
    ctx.encode(np.array(SRC, np.int32), 0)
    ours = ctx.eval(np.array(TGT, np.int32), "all", 0)
    ref = ref_logits(hf, SRC, TGT)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < QUANT_BOUNDS[qtype], err


TOKENIZER_TEXTS = TEXTS + ["Hello <mask> world 🦙🚀 and  two  spaces", " Это предложение на русском языке.",
                           "中文文本测试，机器翻译。 ｆｕｌｌｗｉｄｔｈ ① 12345 3.14", "", "ro_RO </s> en_XX<s>"]


@pytest.mark.parametrize("variant", VARIANTS + ("mbart50",))
@pytest.mark.parametrize("tokenizer_json", [True, False], ids=["tokenizer.json", "vocab-files"])
def test_tokenizer_matches_transformers(tmp_path, variant, tokenizer_json):
    """pyengine's tokenizer from the GGUF equals transformers' on the same folder, from a tokenizer.json or
    from BART's vocab.json + merges.txt / mBART's sentencepiece.bpe.model alone; decoding too. mbart50:
    MBart50Tokenizer with src_lang ro_RO, `ro_RO X </s>`, whose pipeline transformers 5 rebuilds."""
    d = make_bart(tmp_path / variant, mbart=variant == "mbart", mbart50=variant == "mbart50",
                  tokenizer_json=tokenizer_json, d_model=32, n_heads=2, ffn=32, n_layers=1, n_dec_layers=1)
    assert (d / "tokenizer.json").exists() == tokenizer_json
    ref = transformers.AutoTokenizer.from_pretrained(d)
    assert type(ref).__name__.startswith("MBart50Tokenizer") == (variant == "mbart50")
    path = tmp_path / "vocab.gguf"
    convert(d, path, vocab_only=True)
    tok = pyengine.Tokenizer.from_gguf(path)
    assert tok.model == ("gpt2" if variant == "bart" else "t5")
    if variant == "mbart50":
        assert tok.encode("Hi")[0] == ref.convert_tokens_to_ids("ro_RO") and tok.token_to_id("sl_SI") == len(ref) - 2
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids, text
        assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids, text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
        pieces = tok.detokenizer(skip_special_tokens=True)
        assert "".join(pieces.add(i) for i in ids) + pieces.flush() == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("tokenizer_class,src_lang", [("MBartTokenizer", "ro_RO"), ("MBartTokenizerFast", None),
                                                      ("MBart50Tokenizer", "zh_CN"), ("MBart50TokenizerFast", None)])
def test_mbart_source_language_as_transformers(tmp_path, tokenizer_class, src_lang):
    """transformers puts tokenizer_config.json's src_lang (default en_XX) around the text whatever tokenizer.json
    says: MBartTokenizer after it, `$A </s> src_lang`; MBart50Tokenizer in front, `src_lang $A </s>` (its
    tokenizer.json was saved with ro_RO here), and it rebuilds the rest of the pipeline too (here tokenizer.json
    splits on whitespace before "▁", as older converters wrote it, which it drops). So does the converted file."""
    from checkpoints import make_mbart_tokenizer

    mbart50 = tokenizer_class.startswith("MBart50")
    n = make_mbart_tokenizer(tmp_path, mbart50=mbart50, src_lang="ro_RO" if mbart50 else None)
    if mbart50:
        tj = json.loads((tmp_path / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, tj["pre_tokenizer"]]}
        (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tok_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tok_config.pop("src_lang", None)
    tok_config.update({"tokenizer_class": tokenizer_class}, **({"src_lang": src_lang} if src_lang else {}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["MBartForConditionalGeneration"], "model_type": "mbart", "vocab_size": n, "d_model": 32,
        "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 32, "decoder_start_token_id": 2}))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    convert(tmp_path, tmp_path / "vocab.gguf", vocab_only=True)
    tok = pyengine.Tokenizer.from_gguf(tmp_path / "vocab.gguf")
    lang = tok.token_to_id(src_lang or "en_XX")
    for text in TOKENIZER_TEXTS:
        ids = ref(text).input_ids
        assert ids[0 if mbart50 else -1] == lang and tok.encode(text) == ids, text


def _hf_generate(hf, src, **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor([src]), do_sample=False, **kw)[:, 1:].tolist()


def test_greedy_generation_matches_transformers(gen_model):
    """Token for token, the forced first token (BART's <s>, mBART's target language) and the forced </s> at the
    length limit included."""
    d, hf = gen_model
    llm = pyengine.LLM(str(gguf_of(d)), n_ctx=64, kv_type="f32")
    eos = hf.generation_config.eos_token_id
    for text in TEXTS:
        src = llm.tokenizer.encode(text)
        ref = _hf_generate(hf, src, max_new_tokens=12, num_beams=1)[0]
        gen = llm.generate(text, max_new_tokens=12, temperature=0, stream=True)
        gen.wait()
        assert gen.token_ids[0] == hf.generation_config.forced_bos_token_id, text
        assert gen.token_ids == ref[:len(gen.token_ids)] and gen.token_ids[-1] == eos, text
    if hf.config.model_type == "mbart":  # another target language, given to generate
        de = llm.tokenizer.token_to_id("de_DE")
        src = llm.tokenizer.encode(TEXTS[0])
        ref = _hf_generate(hf, src, max_new_tokens=12, num_beams=1, forced_bos_token_id=de)[0]
        gen = llm.generate(TEXTS[0], max_new_tokens=12, temperature=0, forced_bos_token_id=de, stream=True)
        gen.wait()
        assert gen.token_ids[0] == de and gen.token_ids == ref[:len(gen.token_ids)]


BEAM_SETTINGS = [dict(length_penalty=1.0), dict(length_penalty=0.6), dict(length_penalty=2.0),
                 dict(length_penalty=1.0, early_stopping=True), dict(length_penalty=1.0, no_repeat_ngram_size=2)]


def test_beam_search_matches_transformers(gen_model):
    d, hf = gen_model
    llm = pyengine.LLM(str(gguf_of(d)), n_ctx=64, kv_type="f32")
    gc = hf.generation_config  # transformers pads the shorter hypotheses with `pad_token_id or eos_token_id`
    pad = gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
    lengths = set()
    for text in TEXTS[:4]:
        src = llm.tokenizer.encode(text)
        for kw in BEAM_SETTINGS:
            kw = {"early_stopping": False, **kw}
            ref = _hf_generate(hf, src, max_new_tokens=10, num_beams=4, num_return_sequences=3, **kw)
            hyps = llm.beam_search(text, num_beams=4, max_new_tokens=10, num_return_sequences=3, **kw)
            assert [h.token_ids + [pad] * (len(ref[0]) - len(h.token_ids)) for h in hyps] == ref, (text, kw)
            lengths.update(len(h.token_ids) for h in hyps)
    if hf.config.model_type == "mbart":  # its hypotheses end before the length limit too (BART's do not)
        assert min(lengths) < 10, lengths


@pytest.fixture(scope="module", params=VARIANTS)
def min_length_model(request, tmp_path_factory):
    """gen_model's checkpoint with </s> made likelier (its texts end early) and min_length 8 in its
    generation_config.json, as BART-large-cnn has min_length 56."""
    import shutil

    src = make_bart(tmp_path_factory.mktemp(request.param + "_src"), mbart=request.param == "mbart", block_gain=3.0)
    d = tmp_path_factory.mktemp(request.param + "_min_length")
    shutil.copytree(src, d, dirs_exist_ok=True)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    with torch.no_grad():
        hf.final_logits_bias[0, hf.config.eos_token_id] += 4.0
    hf.generation_config.min_length = 8
    hf.save_pretrained(d)
    return d, transformers.AutoModelForSeq2SeqLM.from_pretrained(d).eval()


def test_min_length_as_transformers(min_length_model):
    """The converter keeps generation_config.json's min_length; greedy, sampling and beam search suppress </s>
    until the decoder sequence (its start token counted) is that long, token for token as transformers'
    generate with the same config; min_length / min_new_tokens given to generate override it."""
    d, hf = min_length_model
    llm = pyengine.LLM(str(gguf_of(d)), n_ctx=64, kv_type="f32")
    assert llm.metadata["pyengine.generation.min_length"] == 8 and llm.sampling_params().min_length == 8
    gc = hf.generation_config  # transformers pads the shorter hypotheses with `pad_token_id or eos_token_id`
    eos, pad = gc.eos_token_id, gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
    ended_early = 0
    for text in TEXTS:
        src = llm.tokenizer.encode(text)
        ended_early += len(_hf_generate(hf, src, max_new_tokens=12, num_beams=1, min_length=0)[0]) < 7
        for kw in ({}, dict(min_length=5), dict(min_new_tokens=10)):
            ref = _hf_generate(hf, src, max_new_tokens=12, num_beams=1, **kw)[0]
            gen = llm.generate(text, max_new_tokens=12, temperature=0, stream=True, **kw)
            gen.wait()
            assert gen.token_ids == ref[:len(gen.token_ids)] and gen.token_ids[-1] == eos, (text, kw)
            assert len(gen.token_ids) >= (kw["min_new_tokens"] + 1 if "min_new_tokens" in kw else kw.get("min_length", 8))
            ref = _hf_generate(hf, src, max_new_tokens=12, num_beams=4, num_return_sequences=2, **kw)
            hyps = llm.beam_search(text, num_beams=4, max_new_tokens=12, num_return_sequences=2, **kw)
            assert [h.token_ids + [pad] * (len(ref[0]) - len(h.token_ids)) for h in hyps] == ref, (text, kw)
            assert llm.generate(text, num_beams=4, max_new_tokens=12, **kw) == llm.tokenizer.decode(
                hyps[0].token_ids, skip_special_tokens=True)
        sampled = llm.generate(text, max_new_tokens=12, temperature=1.0, seed=3, stream=True)
        sampled.wait()
        assert eos not in sampled.token_ids[:7], text
    assert ended_early, "without min_length no text ends early: the test could not fail"


def test_text_to_text_api_batch_sampling_and_beams(gen_model):
    """LLM.generate on a list runs the inputs as one batch, each giving its text alone; sampling with a seed
    repeats and still starts with the forced token; generate(num_beams=...) is beam_search's best."""
    d, hf = gen_model
    llm = pyengine.LLM(str(gguf_of(d)), n_ctx=64, kv_type="f32")
    alone = [llm.generate(t, max_new_tokens=8, temperature=0) for t in TEXTS[:3]]
    assert llm.generate(TEXTS[:3], max_new_tokens=8, temperature=0) == alone
    ref = _hf_generate(hf, llm.tokenizer.encode(TEXTS[0]), max_new_tokens=8, num_beams=1)[0]
    assert alone[0] == llm.tokenizer.decode(ref, skip_special_tokens=True)
    sampled = [llm.generate(TEXTS[1], max_new_tokens=8, temperature=1.0, seed=s, stream=True) for s in (1, 1)]
    for g in sampled:
        g.wait()
    assert sampled[0].token_ids == sampled[1].token_ids
    assert sampled[0].token_ids[0] == hf.generation_config.forced_bos_token_id
    best = llm.beam_search(TEXTS[0], num_beams=4, max_new_tokens=8)[0].token_ids
    assert llm.generate(TEXTS[0], num_beams=4, max_new_tokens=8) == llm.tokenizer.decode(best, skip_special_tokens=True)


def test_generate_command(gen_model):
    """`pyengine generate -m FILE -p TEXT` prints the text-to-text output, as LLM.generate gives it."""
    import subprocess
    import sys

    d, _ = gen_model
    path = gguf_of(d)
    want = pyengine.LLM(str(path), n_ctx=64, kv_type="f32").generate(TEXTS[3], max_new_tokens=8, temperature=0)
    r = subprocess.run([sys.executable, "-m", "pyengine", "generate", "-m", str(path), "-p", TEXTS[3], "-n", "8",
                        "--temp", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want and want


def test_every_qtype_converts_and_loads(model, tmp_path):
    d, _ = model
    for qtype in ("bf16", "q5_0", "q5_1"):
        out = tmp_path / f"{qtype}.gguf"
        convert(d, out, qtype=qtype)
        ctx = context(out)
        ctx.encode(np.array(SRC, np.int32), 0)
        assert np.isfinite(ctx.eval(np.array(TGT, np.int32), "all", 0)).all()


@pytest.mark.parametrize("change,match", [
    (lambda arch: dict(tensors={"dec.position_embd.weight": None}), "dec.position_embd.weight"),
    (lambda arch: dict(tensors={"enc.token_embd_norm.weight": None}), "enc.token_embd_norm.weight"),
    (lambda arch: dict(tensors={"dec.blk.1.cross_attn_norm.weight": None}), "dec.blk.1.cross_attn_norm.weight"),
    (lambda arch: dict(tensors={"enc.blk.0.attn_o.weight": None}), "enc.blk.0.attn_o.weight"),
    (lambda arch: dict(tensors={"dec.blk.0.cross_attn_v.bias": None}), "dec.blk.0.cross_attn_v.bias"),
    (lambda arch: dict(tensors={"enc.blk.1.ffn_norm.bias": None}), "enc.blk.1.ffn_norm.bias"),
    (lambda arch: dict(tensors={"enc.position_embd.weight": np.zeros((64, 32), np.float32)}), "enc.position_embd.weight"),
    (lambda arch: dict(tensors={"output.bias": np.zeros(7, np.float32)}), "output.bias"),
    (lambda arch: dict(drop_keys=(f"{arch}.decoder_start_token_id",)), "decoder_start_token_id"),
    (lambda arch: dict(extra_keys={f"{arch}.embedding_scale": -1.0}), "embedding_scale"),
], ids=["dec.position_embd", "enc.token_embd_norm", "cross_attn_norm", "attn_o", "cross_attn_v.bias",
        "ffn_norm.bias", "position_embd shape",
        "output.bias shape", "decoder_start_token_id", "embedding_scale"])
def test_bad_file_names_the_culprit(model, tmp_path, change, match):
    from gguf_craft import rewrite

    d, hf = model
    bad = tmp_path / "bad.gguf"
    rewrite(gguf_of(d), bad, **change(hf.config.model_type))
    with pytest.raises((_C.ModelFormatError, _C.UnsupportedModelError), match=match.replace(".", r"\.")):
        _C.Model(str(bad))


def test_mbart_needs_its_final_norms(tmp_path):
    from gguf_craft import rewrite

    d = make_bart(tmp_path / "m", mbart=True, d_model=32, n_heads=2, ffn=32, n_layers=1, n_dec_layers=1)
    bad = tmp_path / "bad.gguf"
    rewrite(gguf_of(d), bad, tensors={"enc.output_norm.weight": None})
    with pytest.raises(_C.ModelFormatError, match=r"enc\.output_norm\.weight"):
        _C.Model(str(bad))


@pytest.mark.parametrize("edit,match", [
    ("drop model.decoder.layers.1.encoder_attn.k_proj.weight", "decoder.layers.1.encoder_attn.k_proj.weight"),
    ("drop model.encoder.embed_positions.weight", "embed_positions"),
    ("drop model.encoder.layers.0.fc2.bias", "encoder.layers.0.fc2.bias"),
    ("shape model.decoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.weight"),
    ("config activation_function=relu", "activation_function"),
    ("config decoder_ffn_dim=48", "decoder_ffn_dim"),
])
def test_bad_checkpoint_names_the_culprit(tmp_path, edit, match):
    from safetensors.torch import load_file, save_file

    d = make_bart(tmp_path / "b", d_model=32, n_heads=2, ffn=32, n_layers=1, n_dec_layers=2)
    kind, what = edit.split(" ", 1)
    if kind == "config":
        key, value = what.split("=")
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = int(value) if value.isdigit() else value
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        state = load_file(str(d / "model.safetensors"))
        if kind == "drop":
            del state[what]
        else:
            state[what] = state[what][:-1].contiguous()
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=match.replace(".", r"\.")):
        convert(d, tmp_path / "bad.gguf", qtype="f32")
    assert not (tmp_path / "bad.gguf").exists()


def test_gpu_offload_is_refused_by_name(model):
    d, hf = model
    with pytest.raises(_C.UnsupportedModelError, match=f"{hf.config.model_type}.*n_gpu_layers=0"):
        _C.Model(str(gguf_of(d))).offload(1)


def test_tokenizer_json_must_agree_with_the_vocabulary(model):
    """A file whose tokenizer.huggingface.json gives other ids than tokenizer.ggml.tokens is refused by name."""
    d, _ = model
    md = pyengine.LLM(str(gguf_of(d)), n_ctx=64).metadata
    tj = json.loads(md["tokenizer.huggingface.json"])
    tj["added_tokens"][0]["content"] = "<S>"
    md = dict(md, **{"tokenizer.huggingface.json": json.dumps(tj)})
    with pytest.raises(pyengine.ModelFormatError, match="tokenizer.huggingface.json has token '<S>' at id"):
        pyengine.Tokenizer.from_metadata(md)
