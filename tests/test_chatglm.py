"""THUDM ChatGLM checkpoints: convert, read back, and run against independent references.

* ChatGLM2/3 / GLM-4 (GGUF `chatglm`): transformers' `GlmForCausalLM` is the same math (RMSNorm, RoPE on
  adjacent pairs of the first half of each head, grouped-query attention, fused [gate; up] SwiGLU) in HF's
  layout. A tiny random one is rewritten into THUDM's layout (fused query_key_value, dense_h_to_4h) with a
  THUDM config.json, converted, and pyengine's logits are compared with transformers'.
* ChatGLM-6B (GGUF `chatglm1`, ours): no library runs it offline, so `chatglm1_reference` below is a torch
  forward pass written from THUDM's modeling_chatglm.py (2-D RoPE, bidirectional prefix, alpha residuals).
"""
import json
import math

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import _randomize, make_sentencepiece_tokenizer
from pyengine_convert import ConversionError, convert
from test_model import kl_div

# --- ChatGLM2/3, GLM-4 against transformers' GlmForCausalLM -------------------------------------------------

HIDDEN, N_LAYER, N_HEAD, N_KV, HEAD_DIM, FF, ROPE_RATIO = 64, 2, 4, 2, 16, 96, 2.0


def make_chatglm2(out_dir, seed=0):
    """A tiny THUDM-layout ChatGLM2/3 checkpoint and the GlmForCausalLM it was made from."""
    from safetensors.torch import save_file
    from transformers import GlmConfig, GlmForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    n_vocab = make_sentencepiece_tokenizer(out_dir) + 16  # room for [MASK] .. <|observation|>
    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    del tok_config["chat_template"]  # as chatglm3-6b's first releases: the ChatGLM3 fallback applies
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = GlmConfig(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=N_LAYER,
                       num_attention_heads=N_HEAD, num_key_value_heads=N_KV, head_dim=HEAD_DIM, attention_bias=True,
                       rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * ROPE_RATIO,
                                        "partial_rotary_factor": 0.5})
    torch.manual_seed(seed)
    model = GlmForCausalLM(config).eval()
    _randomize(model, seed)
    sd = model.state_dict()
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": torch.ones(HEAD_DIM // 4)}
    for i in range(N_LAYER):
        hf, th = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[th + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[th + "input_layernorm.weight"] = sd[hf + "input_layernorm.weight"]
        out[th + "self_attention.dense.weight"] = sd[hf + "self_attn.o_proj.weight"]
        out[th + "post_attention_layernorm.weight"] = sd[hf + "post_attention_layernorm.weight"]
        out[th + "mlp.dense_h_to_4h.weight"] = sd[hf + "mlp.gate_up_proj.weight"]
        out[th + "mlp.dense_4h_to_h.weight"] = sd[hf + "mlp.down_proj.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "model.safetensors"))
    thudm = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": N_LAYER,
             "padded_vocab_size": n_vocab, "hidden_size": HIDDEN, "ffn_hidden_size": FF, "kv_channels": HEAD_DIM,
             "num_attention_heads": N_HEAD, "multi_query_attention": True, "multi_query_group_num": N_KV,
             "seq_length": 256, "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_qkv_bias": True,
             "add_bias_linear": False, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
             "rope_ratio": ROPE_RATIO, "original_rope": True, "torch_dtype": "float32", "eos_token_id": 2,
             "pad_token_id": 0}
    (out_dir / "config.json").write_text(json.dumps(thudm, indent=2))
    return model


@pytest.fixture(scope="module")
def glm2(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm2")
    model = make_chatglm2(d / "hf")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=40).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return dict(dir=d, hf_dir=d / "hf", ids=ids, ref=ref)


def glm2_gguf(glm2, qtype):
    out = glm2["dir"] / f"{qtype}.gguf"
    if not out.exists():
        convert(glm2["hf_dir"], out, qtype=qtype, output_qtype=qtype)
    return out


def test_chatglm2_f32_matches_transformers_glm(glm2):
    got = pyengine.LLM(glm2_gguf(glm2, "f32"), n_ctx=128, kv_type="f32").logits(glm2["ids"])
    ref = glm2["ref"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("qtype,max_rel_rms,max_kl", [("f16", 2e-3, 1e-5), ("q8_0", 0.04, 1e-3), ("q4_0", 0.4, 2e-2)])
def test_chatglm2_quantized_close(glm2, qtype, max_rel_rms, max_kl):
    got, ref = pyengine.LLM(glm2_gguf(glm2, qtype), n_ctx=128).logits(glm2["ids"]), glm2["ref"]
    rel_rms = float(np.sqrt(np.mean((got - ref) ** 2)) / ref.std())
    assert rel_rms < max_rel_rms and kl_div(ref, got) < max_kl, (rel_rms, kl_div(ref, got))


def test_chatglm2_incremental(glm2):
    ids = glm2["ids"]
    llm = pyengine.LLM(glm2_gguf(glm2, "f32"), n_ctx=128, n_batch=8, kv_type="f32")
    full = llm.logits(ids)
    llm.reset()
    llm.eval(ids[:10])
    for i in range(10, 20):
        np.testing.assert_allclose(llm.eval([ids[i]]), full[i], rtol=1e-4, atol=1e-4 * np.abs(full).max())


def test_chatglm2_gguf_has_llama_cpp_keys(glm2):
    from gguf import GGUFReader

    r = GGUFReader(glm2_gguf(glm2, "f32"))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "chatglm"
    assert field("chatglm.rope.dimension_count") == HEAD_DIM // 2
    assert field("chatglm.rope.freq_base") == pytest.approx(10000 * ROPE_RATIO)
    assert field("chatglm.attention.head_count_kv") == N_KV
    assert field("chatglm.feed_forward_length") == FF
    assert field("chatglm.context_length") == 256
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.add_bos_token") is False
    tokens = field("tokenizer.ggml.tokens")
    for special in ("[gMASK]", "sop", "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>"):
        assert field("tokenizer.ggml.token_type")[tokens.index(special)] == 3  # CONTROL
    assert field("tokenizer.ggml.eot_token_id") == tokens.index("<|user|>")
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    q_kv = N_HEAD * HEAD_DIM + 2 * N_KV * HEAD_DIM
    assert shapes["blk.0.attn_qkv.weight"] == [HIDDEN, q_kv] and shapes["blk.0.attn_qkv.bias"] == [q_kv]
    assert shapes["blk.1.ffn_up.weight"] == [HIDDEN, 2 * FF] and shapes["blk.1.ffn_down.weight"] == [FF, HIDDEN]
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_output.weight",
            "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"} <= set(shapes)


def test_chatglm2_chat_prompt(glm2):
    llm = pyengine.LLM(glm2_gguf(glm2, "q8_0"), n_ctx=128)
    tok = llm.tokenizer
    prompt = llm.chat_template.render([{"role": "user", "content": "hello"}])
    assert prompt.startswith("[gMASK]sop<|user|>") and prompt.endswith("<|assistant|>")
    ids = tok.encode(prompt)
    assert ids[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("sop")]
    assert ids[-1] == tok.token_to_id("<|assistant|>")
    assert tok.is_eog(tok.token_to_id("<|user|>"))


def thudm_quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's quantization.py: one float16 scale per row (max |w| / 127 or / 7), rounded int8 codes; at 4
    bits two codes per byte, even column in the high nibble (cpm_kernels' int4WeightCompression)."""
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale.float()[:, None]).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)
    return q, scale


@pytest.mark.parametrize("bits", [8, 4])
def test_thudm_prequantized_checkpoint(tmp_path, bits):
    """chatglm2-6b-int4 / -int8 style folders are dequantized (then quantized as asked); the reference is
    transformers running the dequantized weights."""
    from safetensors.torch import load_file, save_file

    model = make_chatglm2(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    hf_sd = model.state_dict()
    hf_names = {"self_attention.query_key_value": None, "self_attention.dense": "self_attn.o_proj",
                "mlp.dense_h_to_4h": "mlp.gate_up_proj", "mlp.dense_4h_to_h": "mlp.down_proj"}
    for i in range(N_LAYER):
        for th, hf in hf_names.items():
            name = f"transformer.encoder.layers.{i}.{th}.weight"
            q, scale = thudm_quantize(sd[name], bits)
            sd[name], sd[name + "_scale"] = q, scale
            codes = q if bits == 8 else torch.stack([q >> 4, (q << 4) >> 4], dim=-1).reshape(q.shape[0], -1)
            deq = codes.float() * scale.float()[:, None]
            if hf is None:  # fused q|k|v rows
                q_rows, kv_rows = N_HEAD * HEAD_DIM, N_KV * HEAD_DIM
                for p, part in zip("qkv", deq.split([q_rows, kv_rows, kv_rows])):
                    hf_sd[f"model.layers.{i}.self_attn.{p}_proj.weight"] = part
            else:
                hf_sd[f"model.layers.{i}.{hf}.weight"] = deq
    model.load_state_dict(hf_sd)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "quantization_bit": bits}))

    convert(tmp_path / "hf", tmp_path / "f32.gguf", qtype="f32")
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32").logits(ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_thudm_prequantized_bad_input(tmp_path, glm2):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "q"
    d.mkdir()
    config = json.loads((glm2["hf_dir"] / "config.json").read_text())
    sd = load_file(str(glm2["hf_dir"] / "model.safetensors"))
    (d / "tokenizer.model").write_bytes((glm2["hf_dir"] / "tokenizer.model").read_bytes())
    (d / "config.json").write_text(json.dumps({**config, "quantization_bit": 3}))
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match="quantization_bit=3"):
        convert(d, tmp_path / "x.gguf")
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"
    (d / "config.json").write_text(json.dumps(config))
    save_file({**sd, name: sd[name].to(torch.int8)}, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=f"tensor {name} is int8"):
        convert(d, tmp_path / "x.gguf")
    (d / "config.json").write_text(json.dumps({**config, "quantization_bit": 8}))
    save_file({**sd, name: sd[name].to(torch.int8), name + "_scale": torch.ones(3).half()}, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match="not a THUDM 8-bit weight"):
        convert(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# --- ChatGLM-6B (v1) against a torch reference of THUDM's math ----------------------------------------------

# Chinese + English + code, with the newlines, tabs and space runs ChatGLM-6B's tokenizer rewrites.
ZH_EN = [
    "你好，我是人工智能助手。很高兴认识你！",
    "ChatGLM-6B 是一个开源的、支持中英双语的对话语言模型，基于 General Language Model 架构。",
    "def f(x):\n    return x  # 注释\n\n\tindented\t\ttwice",
    "价格是 3.14 元，  两个空格   三个空格" + " " * 85 + "八十五个空格" + " " * 161 + "end",
    "Hello\nworld\r\n  第二行\n\n\n",
    " leading space and trailing  ",
    "混合 English and 中文 text, emojis 🦙🚀, Ünïcödé.",
]

V1_HIDDEN, V1_LAYERS, V1_HEADS, V1_FF = 64, 2, 4, 256
V1_SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


# ice_text.model's own pieces for what THUDM's tokenizer rewrites: newline, tab, runs of 2..80 spaces.
V1_TEXT_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]


def train_ice_text(out_path, remove_extra_whitespaces=False) -> "spm.SentencePieceProcessor":  # noqa: F821
    """A small SentencePiece BPE model shaped like ChatGLM-6B's ice_text.model (special and rewrite
    pieces user-defined, byte fallback), trained on English, Chinese and code."""
    import io

    import sentencepiece as spm

    from checkpoints import CORPUS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((CORPUS + "\n".join(ZH_EN)).splitlines() * 4), model_writer=buf, vocab_size=600,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=1,
        user_defined_symbols=V1_SPECIAL + V1_TEXT_PIECES, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=remove_extra_whitespaces, minloglevel=2)
    out_path.write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def make_chatglm1(out_dir, seed=0, n_image=20000, remove_extra_whitespaces=False):
    """A tiny ChatGLM-6B folder (ice_text.model, THUDM config and tensor names); returns the state dict.
    `n_image` image tokens come before the text pieces: 20000 in the first release, 0 since."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sp = train_ice_text(out_dir / "ice_text.model", remove_extra_whitespaces)
    n_vocab = n_image + sp.vocab_size()
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.05: torch.randn(shape, generator=g) * s  # noqa: E731
    h = V1_HIDDEN
    sd = {"transformer.word_embeddings.weight": rnd(n_vocab, h, s=0.5),
          "transformer.final_layernorm.weight": 1 + rnd(h, s=0.2), "transformer.final_layernorm.bias": rnd(h, s=0.1)}
    for i in range(V1_LAYERS):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + rnd(h, s=0.2), rnd(h, s=0.1)
        for name, (rows, cols) in {"attention.query_key_value": (3 * h, h), "attention.dense": (h, h),
                                   "mlp.dense_h_to_4h": (V1_FF, h), "mlp.dense_4h_to_h": (h, V1_FF)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = rnd(rows, cols, s=0.1), rnd(rows, s=0.1)
        sd[p + "attention.rotary_emb.inv_freq"] = torch.ones(h // V1_HEADS // 4)
    save_file(sd, str(out_dir / "model.safetensors"))
    ids = {t: n_image + sp.PieceToId(t) for t in V1_SPECIAL}
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": n_vocab, "hidden_size": h,
              "num_layers": V1_LAYERS, "num_attention_heads": V1_HEADS, "inner_hidden_size": V1_FF,
              "max_sequence_length": 256, "layernorm_epsilon": 1e-5, "position_encoding_2d": True,
              "bos_token_id": ids["<sop>"], "eos_token_id": ids["<eop>"], "mask_token_id": ids["[MASK]"],
              "gmask_token_id": ids["[gMASK]"], "pad_token_id": n_image + 1, "torch_dtype": "float32"}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<sop>", "eos_token": "<eop>",
                                                               "mask_token": "[MASK]", "gmask_token": "[gMASK]"}))
    return {k: v.double() for k, v in sd.items()}, config


def chatglm1_reference(sd, config, ids):
    """ChatGLM-6B's forward pass (THUDM modeling_chatglm.py), in float64, for one sequence that holds [gMASK]
    and <sop>: logits of every position."""
    n, h, heads, n_layer = len(ids), config["hidden_size"], config["num_attention_heads"], config["num_layers"]
    hd = h // heads
    ctx_len = ids.index(config["bos_token_id"])           # get_masks / get_position_ids: context_length
    mask_pos = ids.index(config["gmask_token_id"])
    pos = torch.tensor([t if t < ctx_len else mask_pos for t in range(n)], dtype=torch.float64)
    block = torch.tensor([0 if t < ctx_len else t - ctx_len + 1 for t in range(n)], dtype=torch.float64)
    allowed = torch.ones(n, n).tril().bool()
    allowed[:, :ctx_len] = True                            # the context attends bidirectionally
    half = hd // 2                                         # RotaryEmbedding(hd // 2) per half of a head
    inv_freq = 1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float64) / half)

    def rotary(x, p):                                      # x [n, heads, half], rotate_half style
        angle = torch.cat([p[:, None] * inv_freq] * 2, dim=-1)[:, None, :]
        x1, x2 = x[..., : half // 2], x[..., half // 2:]
        return x * angle.cos() + torch.cat([-x2, x1], dim=-1) * angle.sin()

    def layer_norm(x, name):
        return torch.nn.functional.layer_norm(x, (h,), sd[name + ".weight"], sd[name + ".bias"],
                                              config["layernorm_epsilon"])

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * x * (1 + 0.044715 * x * x)))

    alpha = math.sqrt(2 * n_layer)
    x = sd["transformer.word_embeddings.weight"][ids]
    for i in range(n_layer):
        p = f"transformer.layers.{i}."
        a = layer_norm(x, p + "input_layernorm")
        q, k, v = linear(a, p + "attention.query_key_value").view(n, heads, 3 * hd).split(hd, dim=-1)
        q = torch.cat([rotary(q[..., :half], pos), rotary(q[..., half:], block)], dim=-1)
        k = torch.cat([rotary(k[..., :half], pos), rotary(k[..., half:], block)], dim=-1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, h)
        x = a * alpha + linear(attn, p + "attention.dense")
        m = layer_norm(x, p + "post_attention_layernorm")
        x = m * alpha + linear(gelu(linear(m, p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h")
    x = layer_norm(x, "transformer.final_layernorm")
    return (x @ sd["transformer.word_embeddings.weight"].T).numpy()  # lm_head tied to the embedding


@pytest.fixture(scope="module")
def glm1(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm1")
    sd, config = make_chatglm1(d / "hf")
    rng = np.random.default_rng(2)
    prompt = rng.integers(20010, config["vocab_size"], size=12).tolist()
    ids = prompt + [config["gmask_token_id"], config["bos_token_id"]] + rng.integers(20010, config["vocab_size"], size=8).tolist()
    out = d / "f32.gguf"
    convert(d / "hf", out, qtype="f32")
    return dict(dir=d, gguf=out, ids=ids, n_prompt=len(prompt) + 2, config=config,
                ref=chatglm1_reference(sd, config, ids))


def test_chatglm1_f32_matches_reference(glm1):
    got = pyengine.LLM(glm1["gguf"], n_ctx=64, kv_type="f32").logits(glm1["ids"])
    ref = glm1["ref"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_chatglm1_generation_steps_and_replay(glm1):
    ids, n_prompt, ref = glm1["ids"], glm1["n_prompt"], glm1["ref"]
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(glm1["gguf"], n_ctx=64, n_batch=4, kv_type="f32")  # the prefix must stay one chunk
    np.testing.assert_allclose(llm.eval(ids[:n_prompt]), ref[n_prompt - 1], **tol)
    for i in range(n_prompt, len(ids)):
        np.testing.assert_allclose(llm.eval([ids[i]]), ref[i], **tol)
    llm.reset()  # the prompt in two calls: the part before <sop> is evaluated again with it
    llm.eval(ids[:5])
    np.testing.assert_allclose(llm.eval(ids[5:], all_logits=True), ref[5:], **tol)


def test_chatglm1_gguf_metadata(glm1):
    from gguf import GGUFReader

    r = GGUFReader(glm1["gguf"])
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "chatglm1"
    assert field("chatglm1.residual_scale") == pytest.approx(math.sqrt(2 * V1_LAYERS))
    assert field("chatglm1.rope.dimension_count") == V1_HIDDEN // V1_HEADS // 2
    assert field("tokenizer.ggml.mask_token_id") == glm1["config"]["gmask_token_id"]
    assert field("tokenizer.ggml.bos_token_id") == glm1["config"]["bos_token_id"]
    assert "output.weight" not in {t.name for t in r.tensors}  # tied, as transformers ties ChatGLM-6B's lm_head


# --- GLM-4's tiktoken tokenizer ------------------------------------------------------------------------------

GLM4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # tokenization_chatglm.py's pat_str
GLM4_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_byte_bpe(text: str, n_merges: int) -> dict[bytes, int]:
    """tiktoken-style ranks: the 256 bytes, then greedy BPE merges over the pre-tokenized text."""
    import regex

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(GLM4_SPLIT, text)]
    for _ in range(n_merges):
        counts: dict[tuple[bytes, bytes], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        ranks[best[0] + best[1]] = len(ranks)
        for i, w in enumerate(words):
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    return ranks


def tiktoken_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm, independent of pyengine: split, then merge the lowest-ranked pair until none is left."""
    import regex

    ids = []
    for word in regex.findall(GLM4_SPLIT, text):
        parts = [bytes([b]) for b in word.encode()]
        while len(parts) > 1:
            rank, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_glm4_tiktoken_vocab(tmp_path):
    import base64

    from checkpoints import CORPUS
    from pyengine_convert.vocab import GLM4_SPECIAL

    ranks = train_byte_bpe(CORPUS, 300)
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    specials = {len(ranks) + k: t for k, t in enumerate(GLM4_SPECIAL)}
    n_vocab = len(ranks) + 64
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": GLM4_TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in specials.items()}}))
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 2, "padded_vocab_size": n_vocab,
              "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16, "num_attention_heads": 4,
              "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 1024, "rope_ratio": 500,
              "layernorm_epsilon": 1.5625e-07, "add_qkv_bias": True, "eos_token_id": [len(ranks), len(ranks) + 7]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "vocab.gguf"
    convert(tmp_path, out, vocab_only=True)
    tok = pyengine.Tokenizer.from_gguf(out)
    assert tok.model == "gpt2" and tok.pre == "chatglm-bpe" and tok.bos_id is None
    for text in (CORPUS[:400], "Hello  world!\n\n  12345 don't 我想 🚀", " leading space and trailing  "):
        want = tiktoken_encode(ranks, text)
        assert tok.encode(text, add_special_tokens=False) == want, text
        # THUDM's GLM-4 tokenizer puts [gMASK] <sop> first
        assert tok.encode(text) == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")] + want
        assert tok.decode(want) == text
    prompt = pyengine.ChatTemplate.for_tokenizer(tok).render([{"role": "user", "content": "hi"}])
    assert prompt == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    assert tok.encode(prompt)[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    assert tok.eos_id == len(ranks) and tok.is_eog(tok.token_to_id("<|user|>"))


def test_chatglm1_chat_template(glm1):
    llm = pyengine.LLM(glm1["gguf"], n_ctx=64)
    template = llm.chat_template
    assert template.name is None  # the converter wrote ChatGLM-6B's format into the file
    prompt = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}])
    assert prompt == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答：[gMASK]<sop>"
    ids = llm.tokenizer.encode(prompt)
    assert ids[-2:] == [glm1["config"]["gmask_token_id"], glm1["config"]["bos_token_id"]]


# --- tokenizers against the sentencepiece library plus THUDM's rules --------------------------------------------

def thudm_glm1_ids(sp, n_image: int, text: str) -> list[int]:
    """ChatGLM-6B's tokenizer as the issue describes THUDM's: newline -> <n>, tab -> <|tab|>, each run of
    2-80 spaces -> <|blank_N|> (longest first), SentencePiece, ids after the image tokens."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return [n_image + i for i in sp.encode(text)]


def thudm_glm1_text(sp, n_image: int, ids: list[int]) -> str:
    """The reverse: SentencePiece decode, then <n>, <|tab|> and <|blank_N|> back to whitespace."""
    text = sp.decode([i - n_image for i in ids]).replace("<n>", "\n").replace("<|tab|>", "\t")
    for n in range(2, 81):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


@pytest.mark.parametrize("n_image,remove_ws", [(20000, False), (0, True)])
def test_chatglm1_tokenizer_matches_sentencepiece(tmp_path, n_image, remove_ws):
    """ice_text.model's normalizer settings are not known here: both of SentencePiece's are checked."""
    import sentencepiece as spm

    make_chatglm1(tmp_path, n_image=n_image, remove_extra_whitespaces=remove_ws)
    convert(tmp_path, tmp_path / "vocab.gguf", vocab_only=True)
    tok = pyengine.Tokenizer.from_gguf(tmp_path / "vocab.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ice_text.model"))
    config = json.loads((tmp_path / "config.json").read_text())
    gmask, sop = config["gmask_token_id"], config["bos_token_id"]
    assert tok.token_to_id("<n>") == n_image + sp.PieceToId("<n>")
    for text in ZH_EN:
        want = thudm_glm1_ids(sp, n_image, text)
        assert tok.encode(text, add_special_tokens=False) == want, text
        assert tok.encode(text) == want + [gmask, sop], text  # THUDM appends [gMASK] <sop>
        decoded = thudm_glm1_text(sp, n_image, want)
        assert decoded == text or remove_ws
        assert tok.decode(want) == decoded, text
        detok = tok.detokenizer()
        assert "".join(detok.add(i) for i in want) + detok.flush() == decoded
    # special tokens in the text are matched whole; each stretch between them is tokenized on its own
    text = "问：你好\n答：[gMASK]<sop>好的"
    assert tok.encode(text, add_special_tokens=False) == (
        thudm_glm1_ids(sp, n_image, "问：你好\n答：") + [gmask, sop] + thudm_glm1_ids(sp, n_image, "好的"))
    # the chat prompt THUDM's chat() builds, then tokenizes (appending [gMASK] <sop>)
    llm_prompt = pyengine.ChatTemplate.for_tokenizer(tok).render(
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！\n有什么可以帮你？"},
         {"role": "user", "content": "写一个  函数"}])
    thudm_prompt = "[Round 0]\n问：你好\n答：你好！\n有什么可以帮你？\n[Round 1]\n问：写一个  函数\n答："
    assert llm_prompt == thudm_prompt + "[gMASK]<sop>"
    assert tok.encode(llm_prompt, add_special_tokens=False) == thudm_glm1_ids(sp, n_image, thudm_prompt) + [gmask, sop]


def make_chatglm_vocab_folder(out_dir, name: str) -> int:
    """A ChatGLM2/3 tokenizer folder (SentencePiece tokenizer.model trained on Chinese + English, THUDM
    config.json naming the checkpoint). Returns the SentencePiece size."""
    from checkpoints import CORPUS

    out_dir.mkdir(parents=True)
    n_sp = make_sentencepiece_tokenizer(out_dir, vocab_size=700, corpus=CORPUS + "\n".join(ZH_EN))
    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    del tok_config["chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = {"_name_or_path": f"THUDM/{name}", "architectures": ["ChatGLMModel"], "model_type": "chatglm",
              "num_layers": 1, "padded_vocab_size": n_sp + 16, "hidden_size": 64, "ffn_hidden_size": 96,
              "kv_channels": 16, "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2,
              "seq_length": 256, "layernorm_epsilon": 1e-5, "add_qkv_bias": True, "eos_token_id": 2}
    (out_dir / "config.json").write_text(json.dumps(config))
    return n_sp


def test_chatglm3_tokenizer_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    n_sp = make_chatglm_vocab_folder(tmp_path / "chatglm3-6b", "chatglm3-6b")
    convert(tmp_path / "chatglm3-6b", tmp_path / "vocab.gguf", vocab_only=True)
    tok = pyengine.Tokenizer.from_gguf(tmp_path / "vocab.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "chatglm3-6b" / "tokenizer.model"))
    # THUDM's ChatGLM3 tokenizer: the SentencePiece ids, then its tokens appended in this order
    special = {t: n_sp + k for k, t in enumerate(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>",
                                                  "<|user|>", "<|assistant|>", "<|observation|>"])}
    assert {t: tok.token_to_id(t) for t in special} == special
    for text in ZH_EN:
        assert tok.encode(text) == [special["[gMASK]"], special["sop"]] + sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    # THUDM's build_chat_input: [gMASK] sop, then per message <|role|> + encode("\n") + encode(content)
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好 world"},
                {"role": "assistant", "content": "Hello！有什么事？"}, {"role": "user", "content": "写代码\n  缩进"}]
    want = [special["[gMASK]"], special["sop"]]
    for m in messages:
        want += [special[f"<|{m['role']}|>"]] + sp.encode("\n") + sp.encode(m["content"])
    want.append(special["<|assistant|>"])
    template = pyengine.ChatTemplate.for_tokenizer(tok)
    assert template.name is None  # the converter wrote the ChatGLM3 format into the file
    assert tok.encode(template.render(messages), add_special_tokens=False) == want
    assert tok.is_eog(special["<|user|>"]) and tok.is_eog(special["<|observation|>"]) and tok.is_eog(2)


def test_chatglm2_tokenizer_and_prompt(tmp_path):
    import sentencepiece as spm

    n_sp = make_chatglm_vocab_folder(tmp_path / "chatglm2-6b", "chatglm2-6b")
    convert(tmp_path / "chatglm2-6b", tmp_path / "vocab.gguf", vocab_only=True)
    tok = pyengine.Tokenizer.from_gguf(tmp_path / "vocab.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "chatglm2-6b" / "tokenizer.model"))
    gmask, sop = n_sp + 1, n_sp + 3
    assert (tok.token_to_id("[gMASK]"), tok.token_to_id("sop"), tok.token_to_id("<|user|>")) == (gmask, sop, None)
    # THUDM's ChatGLM2 chat(): build_prompt, then the tokenizer puts [gMASK] sop first
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋！"},
                {"role": "user", "content": "晚上睡不着应该怎么办"}]
    thudm = "[Round 1]\n\n问：你好\n\n答：你好👋！\n\n[Round 2]\n\n问：晚上睡不着应该怎么办\n\n答："
    prompt = pyengine.ChatTemplate.for_tokenizer(tok).render(messages)
    assert prompt == "[gMASK]sop" + thudm
    assert tok.encode(prompt, add_special_tokens=False) == [gmask, sop] + sp.encode(thudm)
    assert tok.encode(thudm) == [gmask, sop] + sp.encode(thudm)
    assert tok.is_eog(2)


# --- GLM-4 "-hf" checkpoints: transformers' own GlmForCausalLM and tokenizer.json ------------------------------

def test_glm_hf_folder_matches_transformers(tmp_path):
    from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM

    from checkpoints import make_bpe_tokenizer
    from pyengine_convert.vocab import GLM4_SPECIAL

    hf = tmp_path / "glm-4-9b-chat-hf"
    n_vocab = make_bpe_tokenizer(hf, style="glm4", vocab_size=400, chat_template=GLM4_TEMPLATE)
    config = GlmConfig(vocab_size=n_vocab, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=N_LAYER,
                       num_attention_heads=N_HEAD, num_key_value_heads=N_KV, head_dim=HEAD_DIM, attention_bias=True,
                       rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * ROPE_RATIO,
                                        "partial_rotary_factor": 0.5})
    config.pad_token_id = 0
    torch.manual_seed(3)
    model = GlmForCausalLM(config).eval()
    _randomize(model, 3)
    model.save_pretrained(hf)
    out = tmp_path / "glm.gguf"
    convert(hf, out, qtype="f32")

    hf_tok = AutoTokenizer.from_pretrained(hf)
    llm = pyengine.LLM(out, n_ctx=128, kv_type="f32")
    tok = llm.tokenizer
    assert tok.pre == "chatglm-bpe" and tok.bos_id is None
    for text in ZH_EN:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text  # [gMASK] <sop> first, as HF's post-processor
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "写一首诗"}]
    prompt = llm.chat_template.render(messages)
    assert prompt == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[:2] == [tok.token_to_id(t) for t in GLM4_SPECIAL[2:5:2]]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llm.logits(ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_chatglm2_llama_cpp_agrees(glm2):
    """llama.cpp (llama-cpp-python, where installed) loads the converted `chatglm` file and computes
    the same logits as transformers."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = glm2["ids"]
    llm = llama_cpp.Llama(str(glm2_gguf(glm2, "f32")), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)], dtype=np.float64)
    ref = glm2["ref"]
    # llama.cpp keeps the KV cache in F16
    assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    text = "hello world 你好[gMASK]"  # no space runs or ends: llama.cpp ignores remove_extra_whitespaces
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == pyengine.Tokenizer.from_gguf(
        glm2_gguf(glm2, "f32")).encode(text, add_special_tokens=False)


def test_chatglm1_chat_session_reuses_cache_correctly(glm1):
    """Turn 2 moves [gMASK]<sop> to the end of a longer bidirectional prefix: the cached prefix is stale
    and must be evaluated again; the reply equals a fresh evaluation of the whole conversation."""
    llm = pyengine.LLM(glm1["gguf"], n_ctx=128, kv_type="f32")
    session = llm.chat_session(temperature=0, max_new_tokens=6)
    first = session.send("你好", stream=False).text
    second = session.send("写一个函数", stream=False).text
    fresh = pyengine.LLM(glm1["gguf"], n_ctx=128, kv_type="f32")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "写一个函数"}]
    assert fresh.chat(messages, temperature=0, max_new_tokens=6) == second
