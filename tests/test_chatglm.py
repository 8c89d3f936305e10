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


def test_thudm_prequantized_refused(tmp_path, glm2):
    d = tmp_path / "int4"
    d.mkdir()
    config = json.loads((glm2["hf_dir"] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    with pytest.raises(ConversionError, match="quantization_bit=4"):
        convert(d, tmp_path / "x.gguf")


# --- ChatGLM-6B (v1) against a torch reference of THUDM's math ----------------------------------------------

V1_HIDDEN, V1_LAYERS, V1_HEADS, V1_FF = 64, 2, 4, 256
V1_SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]


def make_chatglm1(out_dir, seed=0):
    """A tiny ChatGLM-6B folder (ice_text.model, THUDM config and tensor names); returns the state dict."""
    import io

    import sentencepiece as spm
    from safetensors.torch import save_file

    from checkpoints import CORPUS

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=buf, vocab_size=400, model_type="bpe",
        character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=1,
        user_defined_symbols=V1_SPECIAL, minloglevel=2)
    (out_dir / "ice_text.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n_vocab = 20000 + sp.vocab_size()
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
    ids = {t: 20000 + sp.PieceToId(t) for t in V1_SPECIAL}
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": n_vocab, "hidden_size": h,
              "num_layers": V1_LAYERS, "num_attention_heads": V1_HEADS, "inner_hidden_size": V1_FF,
              "max_sequence_length": 256, "layernorm_epsilon": 1e-5, "position_encoding_2d": True,
              "bos_token_id": ids["<sop>"], "eos_token_id": ids["<eop>"], "mask_token_id": ids["[MASK]"],
              "gmask_token_id": ids["[gMASK]"], "pad_token_id": 20001, "torch_dtype": "float32"}
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
        assert tok.encode(text) == tiktoken_encode(ranks, text), text
        assert tok.decode(tok.encode(text)) == text
    prompt = pyengine.ChatTemplate.for_tokenizer(tok).render([{"role": "user", "content": "hi"}])
    assert prompt == "[gMASK]<sop><|user|>\nhi<|assistant|>"
    assert tok.encode(prompt)[:2] == [tok.token_to_id("[gMASK]"), tok.token_to_id("<sop>")]
    assert tok.eos_id == len(ranks) and tok.is_eog(tok.token_to_id("<|user|>"))


def test_chatglm1_chat_template(glm1):
    llm = pyengine.LLM(glm1["gguf"], n_ctx=64)
    template = llm.chat_template
    assert template.name == "chatglm1"
    prompt = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}])
    assert prompt == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答：[gMASK]<sop>"
    ids = llm.tokenizer.encode(prompt)
    assert ids[-2:] == [glm1["config"]["gmask_token_id"], glm1["config"]["bos_token_id"]]
