"""Tiny random-weight Hugging Face checkpoints for tests, built with transformers and saved with
save_pretrained next to a real (tiny, trained on a few paragraphs) tokenizer.

    from checkpoints import make_llama, make_qwen2
    model_dir = make_llama(tmp_path / "llama", tied=True, n_kv_heads=2)

Weights are random but not degenerate: norm weights and biases are randomized too, so a forward pass
that ignores them, or mixes up Q/K layouts, differs visibly from transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CORPUS = """\
The quick brown fox jumps over the lazy dog. A converter turns a checkpoint into a single file.
Llamas live in the Andes; they are related to camels and alpacas. Numbers: 1 12 123 1234 12345 3.14.
Hello, world! How are you today? I'm fine, thanks. We'll see what they've done and what you'd like.
Quantization stores each block of thirty-two weights with one scale: int8 or four-bit codes.
def forward(x):\n    return rmsnorm(x) * weight  # tabs\tand   spaces\n\n
Ünïcödé text, 日本語のテキスト, русский текст, emojis 🦙🚀 and symbols <>[]{}()=+-*/%&|^~.
"""

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                   "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

# The pre-tokenizer regexes of Llama 3 and Qwen2 (from their tokenizer.json files).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# glm-4-9b-chat's added tokens, in id order
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]


def make_bpe_tokenizer(out_dir: Path, style: str = "llama3", vocab_size: int = 320,
                       chat_template: str | None = None) -> int:
    """Train a byte-level BPE tokenizer in the style of Llama 3 ("llama3"), Qwen2 ("qwen2"),
    SmolLM ("smollm") or GPT-2 ("gpt2") and save it with transformers. Returns the number of tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style in ("llama3", "qwen2", "glm4"):  # GLM-4's pattern is Llama 3's
        regex = QWEN2_REGEX if style == "qwen2" else LLAMA3_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
    elif style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    elif style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        raise ValueError(style)
    tok.decoder = decoders.ByteLevel()
    specials = {"llama3": LLAMA3_SPECIALS, "qwen2": QWEN2_SPECIALS, "glm4": GLM4_SPECIALS}.get(style, ["<|endoftext|>"])
    if style == "smollm":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.add_special_tokens(specials)  # after training, so they get the last ids as in the real models
    kwargs: dict[str, Any] = {}
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", bos)])])
        kwargs = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        chat_template = chat_template or LLAMA3_TEMPLATE
    elif style == "glm4":  # glm-4-9b-chat-hf: [gMASK]<sop> before every text
        ids = {t: tok.token_to_id(t) for t in ("[gMASK]", "<sop>")}
        tok.post_processor = processors.TemplateProcessing(single="[gMASK] <sop> $A", special_tokens=list(ids.items()))
        kwargs = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    elif style == "qwen2":
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
        chat_template = chat_template or CHATML_TEMPLATE
    elif style == "smollm":
        kwargs = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
        chat_template = chat_template or CHATML_TEMPLATE
    else:
        kwargs = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


def make_sentencepiece_tokenizer(out_dir: Path, vocab_size: int = 480, corpus: str = CORPUS) -> int:
    """Train a Llama-2-style SentencePiece BPE model (byte fallback, <unk> <s> </s>) and save
    tokenizer.model and tokenizer_config.json. Returns the number of tokens."""
    import io

    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines() * 4), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, minloglevel=2,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "legacy": False, "chat_template": LLAMA2_TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": sp.IdToPiece(i), "special": True, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False} for i in range(3)},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return sp.vocab_size()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 1:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def hub_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixture-of-experts weights as checkpoints on the Hub hold them (and transformers' save_pretrained
    writes them): one matrix per expert (mlp.experts.{e}.gate_proj.weight, ...), not transformers 5's
    stacked parameters (mlp.experts.gate_up_proj [n_expert, 2 x n_ff, d], mlp.experts.down_proj)."""
    out = {}
    for name, t in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            base = name[:-len("gate_up_proj")]
            for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate.contiguous(), up.contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            base = name[:-len("down_proj")]
            for e, down in enumerate(t):
                out[f"{base}{e}.down_proj.weight"] = down.contiguous()
        else:
            out[name] = t
    return out


def save_weights(model: torch.nn.Module, out_dir: Path, fmt: str = "safetensors", n_shards: int = 1) -> None:
    """Save the state dict as model.safetensors / pytorch_model.bin, or in `n_shards` shards with
    the HF index file, without the tied duplicate of lm_head."""
    from safetensors.torch import save_file

    state = hub_layout({k: v.contiguous() for k, v in model.state_dict().items()})
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = list(state)
    ext = ".safetensors" if fmt == "safetensors" else ".bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"

    def write(path: Path, part: dict[str, torch.Tensor]) -> None:
        if fmt == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, str(path))

    if n_shards == 1:
        write(out_dir / f"{stem}{ext}", state)
        return
    weight_map = {}
    per = -(-len(names) // n_shards)
    for s in range(n_shards):
        fname = f"{stem}-{s + 1:05d}-of-{n_shards:05d}{ext}"
        part = {k: state[k] for k in names[s * per:(s + 1) * per]}
        write(out_dir / fname, part)
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out_dir / f"{stem}{ext}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _make(arch: str, out_dir: Path, *, tied: bool, n_kv_heads: int, hidden: int, n_layers: int, n_heads: int,
          ff: int, vocab_size: int | None, tokenizer: str, dtype: torch.dtype, fmt: str, n_shards: int,
          seed: int, generation: dict[str, Any] | None, max_position: int, **config_kwargs: Any) -> Path:
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        n_tokens = make_sentencepiece_tokenizer(out_dir)
    else:
        n_tokens = make_bpe_tokenizer(out_dir, style=tokenizer)
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "qwen3moe": transformers.Qwen3MoeConfig,
                  "phi3": transformers.Phi3Config, "gemma2": transformers.Gemma2Config,
                  "gemma3": transformers.Gemma3TextConfig}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
                 "qwen3moe": transformers.Qwen3MoeForCausalLM,
                 "phi3": transformers.Phi3ForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
                 "gemma3": transformers.Gemma3ForCausalLM}[arch]
    config = config_cls(
        vocab_size=vocab_size or n_tokens, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_position,
        tie_word_embeddings=tied, **config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomize(model, seed)
    with torch.no_grad():  # MoE routers: decisive routing (well separated top-k), as trained ones are
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(8.0)
    if tied:
        model.tie_weights()
    model.to(dtype)
    model.config.architectures = [model_cls.__name__]
    model.config.save_pretrained(out_dir)
    save_weights(model, out_dir, fmt=fmt, n_shards=n_shards)
    if generation is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir


# Defaults of every tiny model; each maker below overrides some and may add config.json keys, which
# _make passes on to the transformers config.
_TINY = dict(tied=False, n_kv_heads=2, hidden=64, n_layers=2, n_heads=4, ff=128, vocab_size=None, tokenizer="llama3",
             dtype=torch.float32, fmt="safetensors", n_shards=1, seed=0, generation=None, max_position=256)


def _maker(arch: str, doc: str, **defaults: Any):
    def make(out_dir: Path, **kwargs: Any) -> Path:
        return _make(arch, out_dir, **{**_TINY, **defaults, **kwargs})

    make.__name__ = make.__qualname__ = f"make_{arch}"
    make.__doc__ = doc
    return make


make_llama = _maker("llama", """A tiny LlamaForCausalLM. tokenizer: "llama3", "smollm", "gpt2" (byte-level BPE) or "spm"
    (Llama 2 SentencePiece). fmt: "safetensors" or "bin". Other keyword arguments go to LlamaConfig
    (e.g. rope_scaling=..., rope_theta=..., head_dim=..., attention_bias=True).""")
make_mistral = _maker("mistral", "A tiny MistralForCausalLM with a SentencePiece tokenizer (converted as GGUF arch `llama`).",
                      tokenizer="spm")
make_qwen2 = _maker("qwen2", "A tiny Qwen2ForCausalLM (q/k/v biases, tied embeddings by default like Qwen2.5-0.5B).",
                    tied=True, tokenizer="qwen2")
make_qwen3 = _maker("qwen3", """A tiny Qwen3ForCausalLM (q/k RMSNorm per head, no q/k/v bias; head_dim 32 != hidden / heads,
    as in the real models where head_dim is set explicitly).""", tied=True, tokenizer="qwen2", head_dim=32)
make_qwen3moe = _maker("qwen3moe", """A tiny Qwen3MoeForCausalLM: Qwen3's attention (head_dim 32), 8 experts of 32, top-2 with
    renormalised weights, every block sparse unless mlp_only_layers / decoder_sparse_step say otherwise
    (dense blocks have intermediate_size `ff`).""", tied=True, tokenizer="qwen2", head_dim=32, num_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
                       norm_topk_prob=True)
make_phi3 = _maker("phi3", "A tiny Phi3ForCausalLM (fused qkv_proj and gate_up_proj).", tokenizer="spm", pad_token_id=0)
make_gemma2 = _maker("gemma2", """A tiny Gemma2ForCausalLM: head_dim 16 (= query_pre_attn_scalar), a sliding window of 8 on
    even layers, and soft-caps small enough to matter at this scale (attention 2, logits 3).""",
                     tied=True, tokenizer="spm", n_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0)
make_gemma3 = _maker("gemma3", """A tiny Gemma3ForCausalLM (text): 7 layers (the sixth global, the rest windowed by 8),
    head_dim 16, q/k norms, RoPE bases 10000 (windowed) and 1e6 (global).""",
                     tied=True, tokenizer="spm", n_layers=7, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                     pad_token_id=0)


def load_hf_model(model_dir: Path) -> torch.nn.Module:
    """The transformers model of a checkpoint made here, in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# --- Baichuan (remote code on the hub; transformers has no class for it) -----------------------------------

def make_baichuan(out_dir: Path, *, version: int = 1, alibi: bool = False, n_layers: int = 2, hidden: int = 64,
                  n_heads: int = 4, ff: int = 128, seed: int = 0) -> Path:
    """A tiny Baichuan checkpoint folder as the hub's are: config.json with architectures
    ["BaichuanForCausalLM"] and model_type "baichuan", q/k/v fused as self_attn.W_pack, a SentencePiece
    tokenizer. 7B-style (alibi=False: RoPE, max_position_embeddings) or 13B-style (alibi=True: ALiBi,
    model_max_length only); version 2 adds Baichuan 2's z_loss_weight key (its lm_head is a NormHead).
    The weights come from a random LlamaForCausalLM (see baichuan_reference)."""
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_tokens = make_sentencepiece_tokenizer(out_dir)
    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "BaichuanTokenizer"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    config = transformers.LlamaConfig(vocab_size=n_tokens, hidden_size=hidden, intermediate_size=ff,
                                      num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                      num_key_value_heads=n_heads, max_position_embeddings=256, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    _randomize(model, seed)
    state = {}
    for name, p in model.state_dict().items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name or "rotary_emb" in name:
            continue
        if ".self_attn.q_proj." in name:
            prefix = name.split(".self_attn.")[0]
            name = f"{prefix}.self_attn.W_pack.weight"
            p = torch.cat([model.state_dict()[f"{prefix}.self_attn.{x}_proj.weight"] for x in "qkv"])
        state[name] = p.contiguous()
    from safetensors.torch import save_file

    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg: dict[str, Any] = {
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": ff, "model_max_length": 256, "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": n_tokens,
    }
    if not alibi:
        cfg["max_position_embeddings"] = 256
    if version == 2:
        cfg["z_loss_weight"] = 0
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


T5_CORPUS = CORPUS + """\
Der schnelle braune Fuchs springt über den faulen Hund. Übersetzung ist schwer.
Le renard brun rapide saute par-dessus le chien paresseux. Ça va très bien, merci.
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca?
translate English to German: The house is wonderful. summarize: a long text about llamas.
"""


def make_t5_tokenizer(out_dir: Path, vocab_size: int = 400) -> int:
    """Train a T5-style SentencePiece unigram model (<pad> </s> <unk>, NFKC precompiled character map,
    no BOS) as spiece.model, and save transformers' T5 tokenizer files next to it. Returns its size."""
    import io

    import sentencepiece as spm
    from transformers import T5TokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(T5_CORPUS.splitlines() * 4), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
        bos_id=-1, minloglevel=2)
    (out_dir / "spiece.model").write_bytes(model.getvalue())
    T5TokenizerFast.from_pretrained(out_dir, extra_ids=0).save_pretrained(out_dir)
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()


def make_t5(out_dir: Path, *, gated: bool = False, tied: bool = True, n_layers: int = 2, n_dec_layers: int = 2,
            d_model: int = 64, n_heads: int = 4, d_kv: int = 16, d_ff: int = 96, n_buckets: int = 32,
            seed: int = 0, mt5: bool = False) -> Path:
    """A tiny random T5ForConditionalGeneration: T5 v1.0 (ReLU FFN, tied embeddings) by default, T5 v1.1
    (gated-GELU FFN, untied lm_head) with gated=True, tied=False; an MT5ForConditionalGeneration with mt5."""
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    n_tokens = make_t5_tokenizer(out_dir)
    Config, Model = (MT5Config, MT5ForConditionalGeneration) if mt5 else (T5Config, T5ForConditionalGeneration)
    config = Config(vocab_size=n_tokens, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=n_layers,
                      num_decoder_layers=n_dec_layers, num_heads=n_heads, relative_attention_num_buckets=n_buckets,
                      feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=tied,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    torch.manual_seed(seed)
    model = Model(config).eval()
    _randomize(model, seed)
    with torch.no_grad():  # larger position biases, so that a wrong bucket shows; larger embeddings
        for name, p in model.named_parameters():
            if name.endswith("relative_attention_bias.weight"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
        # next-token distributions peaked enough that beams rarely tie, not so much that one token has it all
        # (a tied head sees the embeddings times d_model^-0.5)
        model.shared.weight.mul_(4 if tied else 1.5)
    model.save_pretrained(out_dir)  # drops the tied copies of shared.weight
    if not tied:
        # As T5 v1.1 / flan-T5 checkpoints on the Hub: tie_word_embeddings false and an lm_head.weight of
        # their own. (transformers 5 ties lm_head to shared whatever the config says, and only drops the
        # d_model^-0.5 output scale: the head written here is shared's values, which it loads as such.)
        from safetensors.torch import load_file, save_file

        state = load_file(str(out_dir / "model.safetensors"))
        state["lm_head.weight"] = state["shared.weight"].clone()
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


# --- BART / mBART (encoder-decoder) ---------------------------------------------------------------------

BART_CORPUS = T5_CORPUS + """\
我想在苹果公司工作。今天天气很好，我们去公园散步吧。中文文本测试，机器翻译。
Ceci est une phrase en français. Это предложение на русском языке. Dies ist ein deutscher Satz.
"""


def make_bart_tokenizer(out_dir: Path, vocab_size: int = 420, tokenizer_json: bool = True) -> int:
    """Train BART's kind of tokenizer (byte-level BPE with GPT-2's regex, <s> <pad> </s> <unk> first and
    <mask> last) and save it as transformers' BartTokenizer does (tokenizer.json), or with tokenizer_json=False as the
    older Hub folders hold it (vocab.json + merges.txt). Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BartTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([BART_CORPUS] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<mask>"] = len(vocab)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    if tokenizer_json:
        BartTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]).save_pretrained(out_dir)
    else:
        (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (out_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BartTokenizer"}))
    return len(vocab)


def make_mbart_tokenizer(out_dir: Path, vocab_size: int = 400, tokenizer_json: bool = True, mbart50: bool = False,
                         src_lang: str | None = None, tgt_lang: str | None = None) -> int:
    """Train mBART's kind of vocabulary (a SentencePiece unigram model with <unk> <s> </s> first, as fairseq's
    sentencepiece.bpe.model) and save it with transformers' MBartTokenizer (fairseq's ids, language codes,
    <mask>; tokenizer.json), or with tokenizer_json=False the SentencePiece model alone. mbart50: with
    MBart50Tokenizer (mBART-50's 52 language codes, `src_lang X </s>`) and its src_lang / tgt_lang. Returns the
    tokenizer's size."""
    import io

    import sentencepiece as spm
    from transformers import MBart50Tokenizer, MBartTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(BART_CORPUS.splitlines() * 4), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    (out_dir / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    cls = MBart50Tokenizer if mbart50 else MBartTokenizer
    langs = {k: v for k, v in (("src_lang", src_lang), ("tgt_lang", tgt_lang)) if v}
    tok = cls.from_pretrained(out_dir, **langs)
    if tokenizer_json:
        tok.save_pretrained(out_dir)
    else:
        (out_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls.__name__, **langs}))
    return len(tok)


EOS_BIAS = 3.0  # on final_logits_bias: texts that sometimes end before the length limit


def make_bart(out_dir: Path, *, mbart: bool = False, tokenizer_json: bool = True, n_layers: int = 2,
              n_dec_layers: int = 2, d_model: int = 64, n_heads: int = 4, ffn: int = 128, max_position: int = 64,
              scale_embedding: bool | None = None, forced_bos: str | None = None, block_gain: float = 1.0,
              seed: int = 0, mbart50: bool = False) -> Path:
    """A tiny random BartForConditionalGeneration (post-norm; forced BOS <s> as bart-large-cnn), or with mbart an
    MBartForConditionalGeneration (pre-norm, final norms, embeddings times sqrt(d_model), the decoder starting
    from </s> with the target language forced first as mBART-50: ro_RO). final_logits_bias is random too.
    block_gain multiplies the blocks' matrices: a random tied model with _randomize's weights mostly predicts
    the token it was given, so that beams tie; with larger blocks (3) its texts vary, but its logits move
    far more under quantization. mbart50: an mBART-50 model (MBart50Tokenizer with src_lang ro_RO and tgt_lang
    zh_CN, the target language forced first)."""
    from transformers import BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration

    out_dir = Path(out_dir)
    if mbart50:
        n_tokens = make_mbart_tokenizer(out_dir, tokenizer_json=tokenizer_json, mbart50=True, src_lang="ro_RO",
                                        tgt_lang="zh_CN")
    else:
        n_tokens = (make_mbart_tokenizer if mbart else make_bart_tokenizer)(out_dir, tokenizer_json=tokenizer_json)
    mbart = mbart or mbart50
    Config, Model = (MBartConfig, MBartForConditionalGeneration) if mbart else (BartConfig, BartForConditionalGeneration)
    forced_bos = forced_bos if forced_bos is not None else ("zh_CN" if mbart50 else "ro_RO" if mbart else "<s>")
    if mbart:
        from transformers import AutoTokenizer

        forced_bos_id = AutoTokenizer.from_pretrained(out_dir).convert_tokens_to_ids(forced_bos)
    else:
        forced_bos_id = 0
    config = Config(vocab_size=n_tokens, d_model=d_model, encoder_layers=n_layers, decoder_layers=n_dec_layers,
                    encoder_attention_heads=n_heads, decoder_attention_heads=n_heads, encoder_ffn_dim=ffn,
                    decoder_ffn_dim=ffn, max_position_embeddings=max_position, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, scale_embedding=mbart if scale_embedding is None else scale_embedding,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                    forced_eos_token_id=2)
    torch.manual_seed(seed)
    model = Model(config).eval()
    _randomize(model, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g) * 0.5)
        # next-token distributions peaked enough that beams rarely tie (the tied head reads the embeddings)
        model.model.shared.weight.mul_(2.5)
        model.final_logits_bias[0, config.eos_token_id] += EOS_BIAS
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                p.mul_(block_gain)
    model.config.architectures = [Model.__name__]
    model.generation_config.forced_bos_token_id = forced_bos_id  # BartConfig no longer takes it
    model.save_pretrained(out_dir)
    return out_dir
