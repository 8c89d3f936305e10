"""The converter (pyengine_convert): HF checkpoint folder -> GGUF, checked by reading the file back with
gguf.GGUFReader, against gguf-py's quantizers, against transformers' own GGUF loader, and against peft."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from checkpoints import load_hf_model, make_llama, make_mistral, make_qwen2
from pyengine_convert import ConversionError, convert, main
from pyengine_convert import quants
from pyengine_convert.arch import permute_rope_rows

QTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
LLAMA_BLOCK = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


# --- helpers ------------------------------------------------------------------------------------------

def fields(path: Path) -> dict:
    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in GGUFReader(path).tensors}


def f32_tensor(t: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (HF) shape."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))


def hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_hf_model(model_dir).state_dict().items()}


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".part"))


# --- checkpoints (built once per session) -------------------------------------------------------------

@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 40, "eos_token_id": [318, 319]}
    return {
        "llama": make_llama(d / "llama", tied=False, generation=gen),
        "llama_tied": make_llama(d / "llama_tied", tied=True, n_kv_heads=4, n_layers=1),
        "qwen2": make_qwen2(d / "qwen2", tied=True),
        "spm": make_mistral(d / "spm_model"),   # transformers' GGUF loader treats names with "mistral" specially
        "smollm": make_llama(d / "smollm", tokenizer="smollm", tied=True, n_layers=1),
        "gpt2tok": make_llama(d / "gpt2tok", tokenizer="gpt2", n_layers=1),
    }


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "model.gguf"


# --- quantizers ---------------------------------------------------------------------------------------

def _nasty_matrix(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    x[0, :32] = 0                                    # d = 0
    x[1, :32] = 0.25                                 # max == min
    x[2, :32] = np.linspace(-1, 1, 32)               # exact halves after scaling
    x[3, :32] = -x[3, :32].max() * 2                 # negative extreme, ties in |max|
    x[4, 5], x[4, 9] = 3.0, -3.0                     # first-of-ties sign decides Q4_0's scale
    x[5] *= 1e4
    x[6] *= 1e-30                                    # subnormal-ish scales
    return x


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16, Q.F16])
@pytest.mark.parametrize("shape", [(8, 32), (33, 96), (128, 256)])
def test_quantizers_match_gguf_reference(qtype, shape):
    x = _nasty_matrix(*shape, seed=shape[1])
    ours, ref = quants.quantize(x, qtype), gguf.quants.quantize(x, qtype)
    assert ours.nbytes == ref.nbytes == quants.nbytes(qtype, shape)
    assert ours.tobytes() == ref.tobytes()


def test_quantizer_chunks_do_not_change_result(monkeypatch):
    x = _nasty_matrix(64, 128, seed=1)
    whole = quants.quantize(x, Q.Q4_1)
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 300)   # a few rows per chunk, last chunk partial
    assert quants.quantize(x, Q.Q4_1).tobytes() == whole.tobytes()


def test_roundf_is_half_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 7.4999995], dtype=np.float32)
    assert quants.roundf(x).tolist() == [1, 2, 3, -1, -3, 0, 0, 7]


def test_bf16_rounds_to_nearest_even_and_keeps_nan():
    x = np.array([1.0, np.nan, -np.inf, 1.00390625, 1.01171875], dtype=np.float32)
    assert quants.to_bf16(x).tobytes() == gguf.quants.quantize(x, Q.BF16).tobytes()


# --- layout, names, types, metadata -------------------------------------------------------------------

@pytest.mark.parametrize("qtype", QTYPES)
def test_llama_every_qtype_names_shapes_types(ckpts, out, qtype):
    report = convert(ckpts["llama"], out, qtype=qtype)
    ts = tensors(out)
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{b}.{n}.weight" for b in range(2) for n in LLAMA_BLOCK}
    assert set(ts) == expected
    main_type = Q[qtype.upper()]
    out_type = Q.Q8_0 if qtype.startswith("q4") else main_type
    state = hf_state(ckpts["llama"])
    for name, t in ts.items():
        want = out_type if name in ("token_embd.weight", "output.weight") else Q.F32 if len(t.shape) == 1 else main_type
        assert t.tensor_type == want, name
    assert [int(d) for d in ts["token_embd.weight"].shape] == [64, 320]       # GGUF order: ne0 first
    assert [int(d) for d in ts["blk.0.attn_k.weight"].shape] == [64, 32]
    assert [int(d) for d in ts["blk.1.ffn_down.weight"].shape] == [128, 64]
    # values survive within the type's error
    tol = {"f32": 0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 0.3, "q4_1": 0.3}[qtype]
    got, ref = f32_tensor(ts["blk.1.ffn_up.weight"]), state["model.layers.1.mlp.up_proj.weight"]
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    f = fields(out)
    assert f["general.file_type"] == int({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2, "q4_1": 3}[qtype])
    assert report.n_tensors == len(expected) and report.file_size == out.stat().st_size
    assert report.bits_per_weight == pytest.approx(out.stat().st_size * 8 / report.n_params)


def test_llama_metadata(ckpts, out):
    convert(ckpts["llama"], out, qtype="q8_0")
    f = fields(out)
    cfg = json.loads((ckpts["llama"] / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["general.name"] == "llama"
    assert f["general.quantization_version"] == 2
    assert f["llama.vocab_size"] == 320
    assert f["llama.context_length"] == 256
    assert f["llama.embedding_length"] == 64
    assert f["llama.block_count"] == 2
    assert f["llama.feed_forward_length"] == 128
    assert f["llama.attention.head_count"] == 4
    assert f["llama.attention.head_count_kv"] == 2
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.rope.dimension_count"] == 16
    assert "rope_freqs.weight" not in tensors(out)
    # generation_config.json -> llama.cpp's sampling keys + our eos list
    assert f["general.sampling.temp"] == pytest.approx(0.6)
    assert f["general.sampling.top_p"] == pytest.approx(0.9)
    assert f["general.sampling.top_k"] == 40
    assert f["pyengine.generation.eos_token_ids"] == [318, 319]


def test_output_qtype_override(ckpts, out):
    convert(ckpts["llama"], out, qtype="q4_1", output_qtype="f16")
    ts = tensors(out)
    assert ts["token_embd.weight"].tensor_type == Q.F16 and ts["output.weight"].tensor_type == Q.F16
    assert ts["blk.0.attn_q.weight"].tensor_type == Q.Q4_1


def test_tied_embeddings_have_no_output(ckpts, out):
    convert(ckpts["llama_tied"], out, qtype="f16")
    assert "output.weight" not in tensors(out)
    assert "token_embd.weight" in tensors(out)


def test_qwen2_biases_not_permuted(ckpts, out):
    convert(ckpts["qwen2"], out, qtype="f32")
    ts, state, f = tensors(out), hf_state(ckpts["qwen2"]), fields(out)
    assert f["general.architecture"] == "qwen2"
    assert f["qwen2.attention.head_count_kv"] == 2
    for n in ("q", "k", "v"):
        assert ts[f"blk.0.attn_{n}.bias"].tensor_type == Q.F32
        np.testing.assert_array_equal(f32_tensor(ts[f"blk.1.attn_{n}.bias"]), state[f"model.layers.1.self_attn.{n}_proj.bias"])
        np.testing.assert_array_equal(f32_tensor(ts[f"blk.1.attn_{n}.weight"]), state[f"model.layers.1.self_attn.{n}_proj.weight"])
    assert "output.weight" not in ts


def test_llama_qk_rows_permuted_like_llama_cpp(ckpts, out):
    convert(ckpts["llama"], out, qtype="f32")
    ts, state = tensors(out), hf_state(ckpts["llama"])
    q = state["model.layers.0.self_attn.q_proj.weight"]
    k = state["model.layers.0.self_attn.k_proj.weight"]
    got_q, got_k = f32_tensor(ts["blk.0.attn_q.weight"]), f32_tensor(ts["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(got_q, permute_rope_rows(q, 4))
    np.testing.assert_array_equal(got_k, permute_rope_rows(k, 2))
    # head 0, first rows: HF rows 0 and d/2 = 8 become adjacent rows 0 and 1
    np.testing.assert_array_equal(got_q[0], q[0])
    np.testing.assert_array_equal(got_q[1], q[8])
    np.testing.assert_array_equal(got_k[16 + 1], k[16 + 8])
    np.testing.assert_array_equal(f32_tensor(ts["blk.0.attn_v.weight"]), state["model.layers.0.self_attn.v_proj.weight"])


def test_quantized_tensor_bytes_equal_reference(ckpts, out):
    convert(ckpts["llama"], out, qtype="q4_0")
    ts, state = tensors(out), hf_state(ckpts["llama"])
    ref = gguf.quants.quantize(permute_rope_rows(state["model.layers.1.self_attn.k_proj.weight"], 2), Q.Q4_0)
    assert np.asarray(ts["blk.1.attn_k.weight"].data).tobytes() == ref.tobytes()
    ref = gguf.quants.quantize(state["model.embed_tokens.weight"], Q.Q8_0)
    assert np.asarray(ts["token_embd.weight"].data).tobytes() == ref.tobytes()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_transformers_gguf_loader_gives_same_logits(ckpts, name):
    """transformers reads llama.cpp GGUFs (undoing llama.cpp's Q/K permutation): an f32 file must give
    the original model's logits exactly."""
    from transformers import AutoModelForCausalLM

    out = ckpts[name].parent / f"{name}.f32.gguf"
    convert(ckpts[name], out, qtype="f32")
    ref = load_hf_model(ckpts[name])
    got = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 50, 7, 199, 2, 64, 300, 11]])
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


# --- inputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,n_shards", [("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_sharded_and_bin_inputs_give_same_file_content(tmp_path, fmt, n_shards):
    a = make_llama(tmp_path / "single", n_layers=1, seed=3)
    b = make_llama(tmp_path / "other", n_layers=1, seed=3, fmt=fmt, n_shards=n_shards)
    assert not (b / "model.safetensors").exists()
    convert(a, tmp_path / "a.gguf", qtype="q8_0")
    convert(b, tmp_path / "b.gguf", qtype="q8_0")
    ta, tb = tensors(tmp_path / "a.gguf"), tensors(tmp_path / "b.gguf")
    assert list(ta) == list(tb)
    for name in ta:
        assert np.asarray(ta[name].data).tobytes() == np.asarray(tb[name].data).tobytes(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sources(tmp_path, dtype):
    d = make_llama(tmp_path / "m", n_layers=1, dtype=dtype)
    state = {k: v.float().numpy() for k, v in load_hf_model(d).state_dict().items()}
    same = "bf16" if dtype == torch.bfloat16 else "f16"
    convert(d, tmp_path / "x.gguf", qtype=same)
    ts = tensors(tmp_path / "x.gguf")
    np.testing.assert_array_equal(f32_tensor(ts["blk.0.ffn_gate.weight"]), state["model.layers.0.mlp.gate_proj.weight"])
    np.testing.assert_array_equal(f32_tensor(ts["blk.0.ffn_norm.weight"]), state["model.layers.0.post_attention_layernorm.weight"])


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    d = make_llama(tmp_path / "m", n_layers=1, rope_scaling=scaling, rope_theta=500000.0, max_position=1024,
                   hidden=128, n_heads=2, n_kv_heads=1)
    convert(d, tmp_path / "x.gguf", qtype="q8_0")
    ts, f = tensors(tmp_path / "x.gguf"), fields(tmp_path / "x.gguf")
    assert f["llama.rope.freq_base"] == pytest.approx(500000.0)
    assert not any(k.startswith("llama.rope.scaling") for k in f)
    freqs = ts["rope_freqs.weight"]
    assert freqs.tensor_type == Q.F32 and [int(x) for x in freqs.shape] == [32]
    config = LlamaConfig.from_pretrained(d)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    got = np.asarray(freqs.data)
    np.testing.assert_allclose(got, (plain / scaled).numpy(), rtol=1e-5)
    assert got[0] == 1.0 and got[-1] == pytest.approx(8.0) and ((got > 1) & (got < 8)).any()


def test_linear_rope_scaling_keys(tmp_path):
    d = make_llama(tmp_path / "m", n_layers=1, rope_scaling={"rope_type": "linear", "factor": 4.0})
    convert(d, tmp_path / "x.gguf", qtype="f16", vocab_only=True)
    f = fields(tmp_path / "x.gguf")
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == pytest.approx(4.0)


# --- tokenizers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,pre", [("llama", "llama-bpe"), ("qwen2", "qwen2"), ("smollm", "smollm"), ("gpt2tok", "gpt-2")])
def test_bpe_vocab(ckpts, out, name, pre):
    convert(ckpts[name], out, vocab_only=True)
    f = fields(out)
    tj = json.loads((ckpts[name] / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == pre
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    for text, i in tj["model"]["vocab"].items():
        assert tokens[i] == text and types[i] == gguf.TokenType.NORMAL
    for a in tj["added_tokens"]:
        assert tokens[a["id"]] == a["content"] and types[a["id"]] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    assert "tokenizer.ggml.scores" not in f
    assert tensors(out) == {}


def test_llama3_special_tokens_and_template(ckpts, out):
    convert(ckpts["llama"], out, vocab_only=True)
    f = fields(out)
    tokens = f["tokenizer.ggml.tokens"]
    assert tokens[f["tokenizer.ggml.bos_token_id"]] == "<|begin_of_text|>"
    assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|eot_id|>"
    assert tokens[f["tokenizer.ggml.eot_token_id"]] == "<|eot_id|>"
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == (ckpts["llama"] / "chat_template.jinja").read_text()


def test_qwen2_special_tokens(ckpts, out):
    convert(ckpts["qwen2"], out, vocab_only=True)
    f = fields(out)
    tokens = f["tokenizer.ggml.tokens"]
    assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert tokens[f["tokenizer.ggml.padding_token_id"]] == "<|endoftext|>"
    assert tokens[f["tokenizer.ggml.eot_token_id"]] == "<|im_end|>"
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in f["tokenizer.chat_template"]


def test_sentencepiece_vocab(ckpts, out):
    import sentencepiece as spm

    convert(ckpts["spm"], out, qtype="q8_0")
    f = fields(out)
    sp = spm.SentencePieceProcessor(model_file=str(ckpts["spm"] / "tokenizer.model"))
    assert f["general.architecture"] == "llama"
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == f["llama.vocab_size"]
    byte_ids = [i for i in range(sp.vocab_size()) if sp.IsByte(i)]
    assert len(byte_ids) == 256 and all(types[i] == gguf.TokenType.BYTE for i in byte_ids)
    assert tokens[byte_ids[0]] == "<0x00>"
    for i in range(3, sp.vocab_size()):
        assert tokens[i] == sp.IdToPiece(i) and scores[i] == pytest.approx(sp.GetScore(i))
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert "[INST]" in f["tokenizer.chat_template"]


@pytest.mark.parametrize("name", ["llama", "qwen2", "smollm", "spm"])
def test_gguf_vocab_round_trips_through_transformers(ckpts, name):
    """transformers rebuilds a tokenizer from the GGUF metadata; it must encode like the original."""
    from transformers import AutoTokenizer

    out = ckpts[name].parent / f"{name}.vocab.gguf"
    convert(ckpts[name], out, vocab_only=True)
    ref = AutoTokenizer.from_pretrained(ckpts[name]) if name != "spm" else None
    if ref is None:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(ckpts[name] / "tokenizer.model"))
    got = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in ["Hello, world! The quick brown fox.", "numbers 12345 and 3.14", "Ünïcödé 日本語 🦙 llamas",
                 "  spaces\tand\nnewlines\n\n", "We'll see what they've done"]:
        if name == "spm" and text.startswith(" "):
            continue    # transformers' SentencePiece rebuild from GGUF differs on leading whitespace
        want = ref(text, add_special_tokens=False).input_ids if ref is not None else sp.encode(text)
        assert got(text, add_special_tokens=False).input_ids == want, text


# --- LoRA ---------------------------------------------------------------------------------------------

def _make_adapter(base: Path, out_dir: Path, **lora_kwargs) -> tuple[Path, dict[str, np.ndarray]]:
    """A random (non-zero B) PEFT adapter and the weights of peft's merge_and_unload()."""
    from peft import LoraConfig, get_peft_model

    model = load_hf_model(base)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(out_dir)
    merged = peft_model.merge_and_unload()
    return out_dir, {k: v.float().numpy() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_merge_matches_peft(ckpts, tmp_path, rslora):
    adapter, merged = _make_adapter(ckpts["llama"], tmp_path / "adapter", r=4, lora_alpha=16, use_rslora=rslora,
                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    report = convert(ckpts["llama"], tmp_path / "x.gguf", qtype="f32", lora=adapter)
    assert report.lora_modules == 2 * 5
    ts = tensors(tmp_path / "x.gguf")
    base = hf_state(ckpts["llama"])
    for gguf_name, hf_name, heads in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                                      ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2),
                                      ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight", 0),
                                      ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", 0),
                                      ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", 0)]:
        want = permute_rope_rows(merged[hf_name], heads) if heads else merged[hf_name]
        np.testing.assert_allclose(f32_tensor(ts[gguf_name]), want, rtol=1e-5, atol=1e-6)
        if "up" not in gguf_name:
            assert not np.allclose(merged[hf_name], base[hf_name], atol=1e-3), "adapter changed nothing"


def test_lora_embedding_and_modules_to_save(ckpts, tmp_path):
    adapter, merged = _make_adapter(ckpts["llama"], tmp_path / "adapter", r=2, lora_alpha=4,
                                    target_modules=["embed_tokens", "gate_proj"], modules_to_save=["lm_head"])
    convert(ckpts["llama"], tmp_path / "x.gguf", qtype="f32", lora=adapter)
    ts = tensors(tmp_path / "x.gguf")
    np.testing.assert_allclose(f32_tensor(ts["token_embd.weight"]), merged["model.embed_tokens.weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f32_tensor(ts["blk.1.ffn_gate.weight"]), merged["model.layers.1.mlp.gate_proj.weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f32_tensor(ts["output.weight"]), merged["lm_head.weight"], rtol=1e-5, atol=1e-6)


def test_lora_that_does_not_fit(ckpts, tmp_path):
    out = tmp_path / "x.gguf"
    adapter, _ = _make_adapter(ckpts["llama"], tmp_path / "a1", r=4, lora_alpha=8, target_modules=["k_proj"],
                               layers_to_transform=[0])
    with pytest.raises(ConversionError, match=r"does not fit: model.layers.0.self_attn.k_proj.weight is \[64, 64\]"):
        convert(ckpts["llama_tied"], out, lora=adapter)       # 4 kv heads there, 2 in the adapter's base
    assert not out.exists() and leftovers(tmp_path) == []
    adapter, _ = _make_adapter(ckpts["llama"], tmp_path / "a2", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ConversionError, match="does not fit: it adapts model.layers.1.self_attn.q_proj.weight"):
        convert(ckpts["smollm"], out, lora=adapter)           # 1 layer there
    assert not out.exists() and leftovers(tmp_path) == []


# --- errors -------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _expect_error(model_dir: Path, out: Path, match: str, **kw) -> ConversionError:
    with pytest.raises(ConversionError, match=match) as e:
        convert(model_dir, out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and leftovers(out.parent) == []
    return e.value


def test_error_missing_config(ckpts, tmp_path, out):
    d = _copy(ckpts["llama_tied"], tmp_path / "m")
    (d / "config.json").unlink()
    _expect_error(d, out, "missing file: .*config.json")


def test_error_unsupported_architecture_lists_supported(ckpts, tmp_path, out):
    d = _copy(ckpts["llama_tied"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    e = _expect_error(d, out, "unsupported architecture GPTNeoXForCausalLM")
    assert "LlamaForCausalLM" in str(e) and "Qwen2ForCausalLM" in str(e) and "MistralForCausalLM" in str(e)


def test_error_shape_mismatch_names_tensor(ckpts, tmp_path, out):
    d = _copy(ckpts["llama_tied"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(d, out, r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape")


def test_error_missing_tensor_and_missing_shard(tmp_path, out):
    d = make_llama(tmp_path / "m", n_layers=1, n_shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (d / shard).rename(tmp_path / "away")
    _expect_error(d, out, f"missing file: .*{shard}")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (tmp_path / "away").rename(d / shard)
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(d, out, r"missing tensor model\.layers\.1\.")


def test_error_unsupported_dtype(tmp_path, out):
    from safetensors.torch import save_file

    d = make_llama(tmp_path / "m", n_layers=1)
    state = {k: v for k, v in load_hf_model(d).state_dict().items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.int32)
    save_file(state, str(d / "model.safetensors"))
    _expect_error(d, out, "unsupported dtype I32 of tensor model.embed_tokens.weight")
    # int8 is read only as THUDM's quantized weights
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.int8)
    save_file(state, str(d / "model.safetensors"))
    _expect_error(d, out, "tensor model.embed_tokens.weight is int8 but .*config.json names no quantization")


def test_error_unreadable_weights_and_bad_qtype(ckpts, tmp_path, out):
    d = _copy(ckpts["llama_tied"], tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 4)
    _expect_error(d, out, "cannot read .*model.safetensors")
    _expect_error(ckpts["llama_tied"], out, "unknown qtype 'q3_k'", qtype="q3_k")


@pytest.mark.parametrize("where", ["read", "write"])
def test_failure_midway_leaves_no_file(ckpts, tmp_path, monkeypatch, where):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"old")                                  # an existing file survives a failed conversion
    from pyengine_convert import source

    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)
    if where == "read":
        original = source.Checkpoint._load
        monkeypatch.setattr(source.Checkpoint, "_load", lambda self, t: fail_on_third(self, t))
        match = "cannot read tensor .* No space left"
    else:
        original = gguf.GGUFWriter.write_tensor_data
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", lambda self, t: fail_on_third(self, t))
        match = f"cannot write {out}: .*No space left"
    with pytest.raises(ConversionError, match=match):
        convert(ckpts["llama_tied"], out, qtype="q8_0")
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_llama_attention_biases_permuted(tmp_path):
    d = make_llama(tmp_path / "m", n_layers=1, attention_bias=True, mlp_bias=True)
    convert(d, tmp_path / "x.gguf", qtype="q8_0")
    ts, state = tensors(tmp_path / "x.gguf"), hf_state(d)
    np.testing.assert_array_equal(f32_tensor(ts["blk.0.attn_q.bias"]), permute_rope_rows(state["model.layers.0.self_attn.q_proj.bias"], 4))
    np.testing.assert_array_equal(f32_tensor(ts["blk.0.attn_k.bias"]), permute_rope_rows(state["model.layers.0.self_attn.k_proj.bias"], 2))
    np.testing.assert_array_equal(f32_tensor(ts["blk.0.attn_output.bias"]), state["model.layers.0.self_attn.o_proj.bias"])
    np.testing.assert_array_equal(f32_tensor(ts["blk.0.ffn_down.bias"]), state["model.layers.0.mlp.down_proj.bias"])


def test_sliding_window_is_stored(tmp_path):
    d = make_mistral(tmp_path / "m", n_layers=1, sliding_window=64)
    report = convert(d, tmp_path / "x.gguf", qtype="q8_0")
    assert not any("sliding_window" in w for w in report.warnings)
    field = gguf.GGUFReader(str(tmp_path / "x.gguf")).fields["llama.attention.sliding_window"]
    assert int(field.parts[field.data[0]][0]) == 64


# --- CLI ----------------------------------------------------------------------------------------------

def test_cli_converts_and_reports(ckpts, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main([str(ckpts["qwen2"]), "-o", str(out), "--qtype", "q4_1"]) == 0
    err = capsys.readouterr().err
    assert "26/26 [" in err and "MB/s" in err                   # progress (a line per 10% when not a tty)
    assert f"wrote {out}" in err and "bits/weight" in err
    assert tensors(out)["blk.0.attn_q.weight"].tensor_type == Q.Q4_1


def test_cli_error_is_one_line_exit_1(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main([str(tmp_path / "nope"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model folder not found") and err.count("\n") == 1
    assert not out.exists()


def test_python_m_entry_point(ckpts, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "x.gguf"
    r = subprocess.run([sys.executable, "-m", "tools.convert", str(ckpts["llama_tied"]), "-o", str(out),
                        "--qtype", "q8_0", "--vocab-only"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert fields(out)["tokenizer.ggml.model"] == "gpt2"
