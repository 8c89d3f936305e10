"""Architectures as data: what the converter needs to know about each supported HF model class.

An architecture is an `ArchSpec`: the GGUF architecture name, the HF->GGUF tensor-name map, which
config.json keys hold each hyper-parameter, whether Q/K rows are permuted, and the expected shape of
every tensor. Adding a llama-like model is a new `ArchSpec(...)` in `ARCHITECTURES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

# llama.cpp's names (gguf-py TENSOR_NAMES) for the tensors of a llama-like decoder.
LLAMA_GLOBAL_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
LLAMA_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# config.json keys for each hyper-parameter, first found wins.
LLAMA_HPARAM_KEYS = {
    "n_vocab": ("vocab_size",),
    "n_embd": ("hidden_size",),
    "n_layer": ("num_hidden_layers",),
    "n_head": ("num_attention_heads",),
    "n_head_kv": ("num_key_value_heads",),
    "n_ff": ("intermediate_size",),
    "n_ctx": ("max_position_embeddings",),
    "head_dim": ("head_dim",),
    "norm_eps": ("rms_norm_eps",),
    "rope_theta": ("rope_theta",),
    "tied": ("tie_word_embeddings",),
}


@dataclass
class HParams:
    """The hyper-parameters a llama-like decoder is described by, read from config.json."""
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int
    head_dim: int
    head_dim_explicit: bool
    norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any]
    tied: bool


def llama_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Expected numpy (HF) shape of each GGUF base name, `{bid}` standing for the block index."""
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    return {
        "token_embd.weight": (hp.n_vocab, hp.n_embd),
        "output_norm.weight": (hp.n_embd,),
        "output.weight": (hp.n_vocab, hp.n_embd),
        "blk.{bid}.attn_norm.weight": (hp.n_embd,),
        "blk.{bid}.attn_q.weight": (q, hp.n_embd),
        "blk.{bid}.attn_k.weight": (kv, hp.n_embd),
        "blk.{bid}.attn_v.weight": (kv, hp.n_embd),
        "blk.{bid}.attn_output.weight": (hp.n_embd, q),
        "blk.{bid}.attn_q.bias": (q,),
        "blk.{bid}.attn_k.bias": (kv,),
        "blk.{bid}.attn_v.bias": (kv,),
        "blk.{bid}.attn_output.bias": (hp.n_embd,),
        "blk.{bid}.ffn_norm.weight": (hp.n_embd,),
        "blk.{bid}.ffn_gate.weight": (hp.n_ff, hp.n_embd),
        "blk.{bid}.ffn_up.weight": (hp.n_ff, hp.n_embd),
        "blk.{bid}.ffn_down.weight": (hp.n_embd, hp.n_ff),
        "blk.{bid}.ffn_gate.bias": (hp.n_ff,),
        "blk.{bid}.ffn_up.bias": (hp.n_ff,),
        "blk.{bid}.ffn_down.bias": (hp.n_embd,),
    }


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of each head from HF's half-split RoPE pairs (i, i + d/2) to adjacent pairs
    (2i, 2i + 1), the layout llama.cpp's `llama` architecture (and our engine) rotates. Same as
    llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`; works for weights and biases."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific the converter needs."""
    name: str                                   # GGUF general.architecture
    hf_architectures: tuple[str, ...]           # config.json "architectures" entries handled
    global_tensors: dict[str, str] = field(default_factory=lambda: dict(LLAMA_GLOBAL_TENSORS))
    block_tensors: dict[str, str] = field(default_factory=lambda: dict(LLAMA_BLOCK_TENSORS))
    block_prefix: str = "model.layers.{bid}."
    hparam_keys: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(LLAMA_HPARAM_KEYS))
    # Q/K rows permuted from HF half-split RoPE to adjacent-pair RoPE (llama.cpp `llama`).
    permute_qk: bool = False
    # biases the architecture always has (e.g. Qwen2's q/k/v); other biases are optional.
    required_biases: tuple[str, ...] = ()
    shapes: Callable[[HParams], dict[str, tuple[int, ...]]] = llama_shapes
    # tokenizer files tried in order: "spm" (tokenizer.model), "bpe" (byte-level BPE tokenizer.json)
    tokenizers: tuple[str, ...] = ("spm", "bpe")
    # HF tensors that carry nothing the engine needs.
    ignored_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)


LLAMA = ArchSpec(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    permute_qk=True,
)

QWEN2 = ArchSpec(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    required_biases=("attn_q", "attn_k", "attn_v"),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA, QWEN2)


def supported_architectures() -> list[str]:
    return sorted(a for spec in ARCHITECTURES for a in spec.hf_architectures)


def find_arch(hf_arch: str) -> ArchSpec | None:
    for spec in ARCHITECTURES:
        if hf_arch in spec.hf_architectures:
            return spec
    return None
