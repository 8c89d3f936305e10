"""Architectures as data: what the converter needs to know about each supported HF model class.

An architecture is an `ArchSpec`: the GGUF architecture name, the HF->GGUF tensor-name map, which
config.json keys hold each hyper-parameter, whether Q/K rows are permuted, and the expected shape of
every tensor. Adding a llama-like model is a new `ArchSpec(...)` in `ARCHITECTURES`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ConversionError

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
    n_rot: int = 0                    # rotated dims per head; 0: all of head_dim
    residual_scale: float = 0.0       # ChatGLM-6B's alpha; 0: none
    # architecture-specific values a spec's fix_hparams reads (BERT: n_token_types, labels)
    extra: dict[str, Any] = field(default_factory=dict)


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
class StackMap:
    """One stack of transformer blocks (a decoder; an encoder and a decoder for T5-style models): where
    its block tensors sit in the checkpoint and in the GGUF, with llama.cpp's prefixes ("blk"; T5's
    "enc.blk" / "dec.blk")."""
    hf_prefix: str                              # e.g. "model.layers.{bid}."
    tensors: dict[str, str]                     # HF name inside a block -> GGUF name inside a block
    gguf_prefix: str = "blk"
    n_layer: str = "n_layer"                    # the HParams field that counts its blocks
    # (hp, block) -> GGUF names inside that block it must have (weights); None: the architecture's rule
    required: Callable[[HParams, int], tuple[str, ...]] | None = None


@dataclass(frozen=True)
class ExpertMap:
    """The experts of a mixture-of-experts block as llama.cpp stores them: the matrices of one kind, one per
    expert (HF `{prefix}{xid}.{kind}.weight`, e.g. mlp.experts.3.gate_proj.weight), stacked into one 3-D
    tensor [n_expert, rows, cols] per block (ffn_gate_exps, ...), as convert_hf_to_gguf.py's Qwen2MoeModel
    does. Checkpoints saved stacked already (transformers 5's in-memory layout: mlp.experts.down_proj
    [n_expert, rows, cols], and `fused` kinds such as mlp.experts.gate_up_proj [n_expert, 2 x rows, cols],
    gate rows first) are taken too."""
    prefix: str                                 # inside a block, e.g. "mlp.experts."
    kinds: dict[str, str]                       # HF kind -> GGUF name inside a block ("gate_proj" -> "ffn_gate_exps")
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # "gate_up_proj" -> ("gate_proj", "up_proj")
    n_expert: str = "n_expert"                  # the HParams.extra entry that counts the experts


@dataclass(frozen=True)
class ArchSpec:
    """Everything architecture-specific the converter needs."""
    name: str                                   # GGUF general.architecture
    hf_architectures: tuple[str, ...]           # config.json "architectures" entries handled
    global_tensors: dict[str, str] = field(default_factory=lambda: dict(LLAMA_GLOBAL_TENSORS))
    stacks: tuple[StackMap, ...] = (StackMap("model.layers.{bid}.", LLAMA_BLOCK_TENSORS),)
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
    # which config.json files this spec takes, for architectures whose name several specs share
    matches: Callable[[dict[str, Any]], bool] = lambda config: True
    # config.json -> architecture-specific changes to the generic hyper-parameters (raise ConversionError
    # for a variant the engine cannot run)
    fix_hparams: Callable[[dict[str, Any], HParams], None] = lambda config, hp: None
    # GGUF tensor name without block prefix (e.g. "attn_qkv", "output_norm") -> rewrite of its rows, applied
    # to weights and biases
    row_transforms: dict[str, Callable[[np.ndarray, HParams], np.ndarray]] = field(default_factory=dict)
    norm: str = "rms"                           # "rms" or "layer": which epsilon key is written
    add_bos: bool | None = None                 # overrides the tokenizer's add_bos_token
    # HF tensor name -> the name the maps above use (a model-class prefix dropped, old LayerNorm
    # gamma/beta renamed), or None for a tensor the GGUF leaves out (an MLM head, a pooler)
    rename: Callable[[str, dict[str, Any]], str | None] = lambda name, config: name
    # GGUF tensors every file must have besides the blocks' (None: token_embd, output_norm, and output
    # unless tied)
    required_globals: Callable[[HParams], tuple[str, ...]] | None = None
    # 2-D tensors written as F32 whatever the qtype (llama.cpp keeps position and token-type tables float)
    float_tensors: tuple[str, ...] = ()
    # writes the architecture's hyper-parameter keys (None: the llama-like decoder's, write_hparams)
    write_hparams: Callable[..., None] | None = None
    decoder: bool = True                        # False: an encoder (no causal LM to calibrate on)
    # GGUF block tensor names (e.g. "attn_qkv") whose weights the checkpoint stores transposed, [in, out]
    # (GPT-2's Conv1D); the converter writes them [out, in] as every other weight
    transposed: tuple[str, ...] = ()
    # mixture-of-experts blocks: how per-expert tensors become one 3-D tensor per kind and block
    experts: ExpertMap | None = None
    # (hp, block) -> GGUF names inside that block it must have (weights); None: every name of the stack's
    # map. For models whose blocks differ (some FFNs dense, some mixtures of experts).
    block_required: Callable[[HParams, int], tuple[str, ...]] | None = None
    # F32 tensors computed from config.json, GGUF name -> values (Phi-3's LongRoPE factors)
    extra_tensors: Callable[[HParams], dict[str, np.ndarray]] = lambda hp: {}
    # GGUF block tensor name of a fused checkpoint tensor -> the GGUF tensors written instead, which take
    # its rows in order (Baichuan's W_pack: attn_q, attn_k, attn_v); `shapes` gives every part's rows
    split_rows: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # GGUF global tensor name -> how many of its leading rows are left out (BART's position tables, whose
    # first 2 rows no position reaches: the file's row p is position p)
    skip_rows: dict[str, int] = field(default_factory=dict)
    # GGUF names of one-row 2-D checkpoint tensors written 1-D (BART's final_logits_bias [1, n_vocab])
    one_d: tuple[str, ...] = ()
    # config.json model_type values whose folders this spec converts when their "architectures" names a class
    # of its own (ChatLM-mini-Chinese's TextToTextModel: T5's weights under another class name)
    model_types: tuple[str, ...] = ()


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



# --- THUDM ChatGLM ---------------------------------------------------------------------------------------
# THUDM's remote-code checkpoints, all `model_type: chatglm` and `ChatGLMModel`; the config tells the
# generations apart (ChatGLM2+ has multi_query_group_num / padded_vocab_size, ChatGLM-6B position_encoding_2d).

def chatglm_shapes(hp: HParams, gate_up_rows: int) -> dict[str, tuple[int, ...]]:
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes = {
        "token_embd.weight": (hp.n_vocab, hp.n_embd),
        "output.weight": (hp.n_vocab, hp.n_embd),
        "blk.{bid}.attn_qkv.weight": (q + 2 * kv, hp.n_embd),
        "blk.{bid}.attn_qkv.bias": (q + 2 * kv,),
        "blk.{bid}.attn_output.weight": (hp.n_embd, q),
        "blk.{bid}.attn_output.bias": (hp.n_embd,),
        "blk.{bid}.ffn_up.weight": (gate_up_rows * hp.n_ff, hp.n_embd),
        "blk.{bid}.ffn_up.bias": (gate_up_rows * hp.n_ff,),
        "blk.{bid}.ffn_down.weight": (hp.n_embd, hp.n_ff),
        "blk.{bid}.ffn_down.bias": (hp.n_embd,),
    }
    for norm in ("output_norm", "blk.{bid}.attn_norm", "blk.{bid}.ffn_norm"):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (hp.n_embd,)
    return shapes


def _chatglm_fix(config: dict[str, Any], hp: HParams) -> None:
    """ChatGLM2/3 and GLM-4 as llama.cpp's convert_hf_to_gguf.py ChatGLMModel describes them."""
    for key, want in (("rmsnorm", True), ("post_layer_norm", True), ("apply_residual_connection_post_layernorm", False)):
        if config.get(key, want) != want:
            raise ConversionError(f"config.json {key}={config[key]} is a ChatGLM variant the engine does not run")
    if not config.get("multi_query_attention", True):
        hp.n_head_kv = hp.n_head
    hp.head_dim_explicit = hp.head_dim != hp.n_embd // hp.n_head
    hp.n_rot = hp.head_dim // 2                        # RoPE on the first half of each head
    hp.rope_theta = 10000.0 * float(config.get("rope_ratio", 1.0))


def _chatglm1_fix(config: dict[str, Any], hp: HParams) -> None:
    if not config.get("position_encoding_2d", True):
        from .errors import ConversionError
        raise ConversionError("config.json position_encoding_2d=false: only ChatGLM-6B's 2-D RoPE is supported")
    hp.n_rot = hp.head_dim // 2                        # two rotary halves: position, block position
    hp.residual_scale = (2.0 * hp.n_layer) ** 0.5      # GLMBlock's alpha
    hp.tied = bool(config.get("tie_word_embeddings", True))  # transformers' default, which ChatGLM-6B keeps


def _chatglm1_qkv(w: np.ndarray, hp: HParams) -> np.ndarray:
    """ChatGLM-6B interleaves q, k, v per head ([head][q|k|v][head_dim] rows); the engine wants [q; k; v]."""
    return w.reshape(hp.n_head, 3, hp.head_dim, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


CHATGLM = ArchSpec(
    name="chatglm",
    hf_architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    global_tensors={"transformer.embedding.word_embeddings": "token_embd",
                    "transformer.encoder.final_layernorm": "output_norm",
                    "transformer.output_layer": "output"},
    stacks=(StackMap("transformer.encoder.layers.{bid}.",
                     {"input_layernorm": "attn_norm",
                      "self_attention.query_key_value": "attn_qkv",
                      "self_attention.dense": "attn_output",
                      "post_attention_layernorm": "ffn_norm",
                      "mlp.dense_h_to_4h": "ffn_up",          # [gate; up]
                      "mlp.dense_4h_to_h": "ffn_down"}),),
    hparam_keys={"n_vocab": ("padded_vocab_size", "vocab_size"), "n_embd": ("hidden_size",),
                 "n_layer": ("num_layers",), "n_head": ("num_attention_heads",),
                 "n_head_kv": ("multi_query_group_num",), "n_ff": ("ffn_hidden_size",), "n_ctx": ("seq_length",),
                 "head_dim": ("kv_channels",), "norm_eps": ("layernorm_epsilon",), "rope_theta": (),
                 "tied": ("tie_word_embeddings",)},
    shapes=lambda hp: chatglm_shapes(hp, 2),
    tokenizers=("chatglm", "glm4-bpe"),
    ignored_suffixes=(".rotary_pos_emb.inv_freq",),
    matches=lambda config: "position_encoding_2d" not in config,
    fix_hparams=_chatglm_fix,
    add_bos=False,
)

# Not a llama.cpp architecture: pyengine's own, in llama.cpp's naming style (see csrc/model/config.cpp).
# Extra metadata: chatglm1.residual_scale (alpha), tokenizer.ggml.mask_token_id ([gMASK]).
CHATGLM1 = ArchSpec(
    name="chatglm1",
    hf_architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    global_tensors={"transformer.word_embeddings": "token_embd",
                    "transformer.final_layernorm": "output_norm",
                    "lm_head": "output"},
    stacks=(StackMap("transformer.layers.{bid}.",
                     {"input_layernorm": "attn_norm",
                      "attention.query_key_value": "attn_qkv",
                      "attention.dense": "attn_output",
                      "post_attention_layernorm": "ffn_norm",
                      "mlp.dense_h_to_4h": "ffn_up",
                      "mlp.dense_4h_to_h": "ffn_down"}),),
    hparam_keys={"n_vocab": ("vocab_size",), "n_embd": ("hidden_size",), "n_layer": ("num_layers",),
                 "n_head": ("num_attention_heads",), "n_head_kv": (), "n_ff": ("inner_hidden_size",),
                 "n_ctx": ("max_sequence_length",), "head_dim": (), "norm_eps": ("layernorm_epsilon",),
                 "rope_theta": (), "tied": ()},
    shapes=lambda hp: chatglm_shapes(hp, 1),
    tokenizers=("chatglm1",),
    ignored_suffixes=(".rotary_emb.inv_freq",),
    matches=lambda config: "position_encoding_2d" in config,
    fix_hparams=_chatglm1_fix,
    row_transforms={"attn_qkv": _chatglm1_qkv},
    norm="layer",
)



def _glm_hf_fix(config: dict[str, Any], hp: HParams) -> None:
    """transformers' GlmForCausalLM (GLM-4 "-hf" checkpoints): ChatGLM2/3's math in llama-style names."""
    rope = config.get("rope_parameters") or {}
    factor = float(config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5)))
    hp.n_rot = int(hp.head_dim * factor)
    hp.head_dim_explicit = hp.head_dim != hp.n_embd // hp.n_head


def _glm_hf_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    shapes = llama_shapes(hp)
    shapes["blk.{bid}.ffn_up.weight"] = (2 * hp.n_ff, hp.n_embd)  # [gate; up]
    return shapes


# The same GGUF as CHATGLM (llama.cpp converts GlmForCausalLM to `chatglm` too), with Q/K/V unfused.
GLM_HF = ArchSpec(
    name="chatglm",
    hf_architectures=("GlmForCausalLM",),
    stacks=(StackMap("model.layers.{bid}.",
                     {**{k: v for k, v in LLAMA_BLOCK_TENSORS.items() if k not in ("mlp.gate_proj", "mlp.up_proj")},
                      "mlp.gate_up_proj": "ffn_up"}),),
    shapes=_glm_hf_shapes,
    tokenizers=("glm4-bpe",),
    fix_hparams=_glm_hf_fix,
    add_bos=False,
)


# --- BERT (encoder-only) ---------------------------------------------------------------------------------
# llama.cpp's `bert` architecture (conversion/bert.py BertModel and gguf-py's tensor map): post-LayerNorm
# blocks, word + position + token-type embeddings. The GGUF keys are written by bert.py.

def _bert_fix(config: dict[str, Any], hp: HParams) -> None:
    hp.norm_eps = float(config.get("layer_norm_eps", 1e-12))
    hp.extra["n_token_types"] = int(config.get("type_vocab_size", 1))
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"config.json position_embedding_type={config['position_embedding_type']!r}: "
                              "only absolute positions are supported")
    if config.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):
        raise ConversionError(f"config.json hidden_act={config['hidden_act']!r}: only gelu is supported")
    if is_bert_classifier(config):
        labels = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}
        hp.extra["labels"] = [v for _, v in sorted((int(k), v) for k, v in labels.items())]


def is_bert_classifier(config: dict[str, Any]) -> bool:
    return "BertForSequenceClassification" in (config.get("architectures") or [])


def _bert_rename(name: str, config: dict[str, Any]) -> str | None:
    """As llama.cpp's BertModel.filter_tensors, except that a classifier keeps BERT's pooler (see BERT)."""
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[:-len(".gamma")] + ".weight"
    elif name.endswith(".beta"):
        name = name[:-len(".beta")] + ".bias"
    if name == "embeddings.position_ids" or name.startswith(("cls.predictions.", "cls.seq_relationship.")):
        return None
    if name.startswith("pooler.") and not is_bert_classifier(config):
        return None
    return name


def _bert_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    e = hp.n_embd
    shapes = {
        "token_embd.weight": (hp.n_vocab, e),
        "token_types.weight": (hp.extra.get("n_token_types", 1), e),
        "position_embd.weight": (hp.n_ctx, e),
        "blk.{bid}.ffn_up.weight": (hp.n_ff, e),
        "blk.{bid}.ffn_up.bias": (hp.n_ff,),
        "blk.{bid}.ffn_down.weight": (e, hp.n_ff),
        "cls.weight": (e, e),
        "cls.output.weight": (len(hp.extra.get("labels", ())), e),
        "cls.output.bias": (len(hp.extra.get("labels", ())),),
    }
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        shapes[f"blk.{{bid}}.{name}.weight"] = (e, e)
    one_d = ["token_embd_norm.weight", "token_embd_norm.bias", "cls.bias", "blk.{bid}.ffn_down.bias"]
    one_d += [f"blk.{{bid}}.{n}.bias" for n in ("attn_q", "attn_k", "attn_v", "attn_output")]
    one_d += [f"blk.{{bid}}.{n}.{s}" for n in ("attn_output_norm", "layer_output_norm") for s in ("weight", "bias")]
    for name in one_d:
        shapes[name] = (e,)
    return shapes


def _bert_required(hp: HParams) -> tuple[str, ...]:
    names = ("token_embd.weight", "token_types.weight", "position_embd.weight", "token_embd_norm.weight",
             "token_embd_norm.bias")
    if "labels" in hp.extra:
        names += ("cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias")
    return names


def _write_bert_hparams(*args: Any, **kwargs: Any) -> None:
    from .bert import write_bert_hparams

    write_bert_hparams(*args, **kwargs)


# BertForSequenceClassification: llama.cpp's converter drops BERT's pooler (dense + tanh on [CLS]) and writes
# the classifier alone, which gives other scores than transformers. We write the pooler as `cls` and the
# classifier as `cls.output`: llama.cpp's rank pooling computes exactly cls_out(tanh(cls(h[CLS]))).
BERT = ArchSpec(
    name="bert",
    hf_architectures=("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
    global_tensors={"embeddings.word_embeddings": "token_embd",
                    "embeddings.token_type_embeddings": "token_types",
                    "embeddings.position_embeddings": "position_embd",
                    "embeddings.LayerNorm": "token_embd_norm",
                    "pooler.dense": "cls",
                    "classifier": "cls.output"},
    stacks=(StackMap("encoder.layer.{bid}.",
                     {"attention.self.query": "attn_q",
                      "attention.self.key": "attn_k",
                      "attention.self.value": "attn_v",
                      "attention.output.dense": "attn_output",
                      "attention.output.LayerNorm": "attn_output_norm",
                      "intermediate.dense": "ffn_up",
                      "output.dense": "ffn_down",
                      "output.LayerNorm": "layer_output_norm"}),),
    hparam_keys={"n_vocab": ("vocab_size",), "n_embd": ("hidden_size",), "n_layer": ("num_hidden_layers",),
                 "n_head": ("num_attention_heads",), "n_head_kv": (), "n_ff": ("intermediate_size",),
                 "n_ctx": ("max_position_embeddings",), "head_dim": (), "norm_eps": ("layer_norm_eps",),
                 "rope_theta": (), "tied": ()},
    required_biases=("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
                     "layer_output_norm"),
    shapes=_bert_shapes,
    tokenizers=("wordpiece",),
    ignored_suffixes=(),
    fix_hparams=_bert_fix,
    norm="layer",
    rename=_bert_rename,
    required_globals=_bert_required,
    float_tensors=("position_embd.weight", "token_types.weight"),
    write_hparams=_write_bert_hparams,
    decoder=False,
)

# Qwen3 (dense): llama.cpp's `qwen3`, Qwen2's layout without q/k/v biases plus a per-head RMSNorm of q
# and k (q_norm / k_norm, [head_dim]) before RoPE; head_dim is explicit (128 with hidden 1024 in Qwen3-0.6B).
def _qwen3_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    shapes = llama_shapes(hp)
    shapes["blk.{bid}.attn_q_norm.weight"] = shapes["blk.{bid}.attn_k_norm.weight"] = (hp.head_dim,)
    return shapes


QWEN3 = ArchSpec(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    stacks=(StackMap("model.layers.{bid}.", {**LLAMA_BLOCK_TENSORS, "self_attn.q_norm": "attn_q_norm",
                                             "self_attn.k_norm": "attn_k_norm"}),),
    shapes=_qwen3_shapes,
)

# --- Qwen3 MoE -----------------------------------------------------------------------------------------
# llama.cpp's `qwen3moe`: Qwen3's attention (per-head q/k RMSNorm), and in each block a router (mlp.gate ->
# ffn_gate_inp, [n_expert, n_embd], kept F32 as llama.cpp keeps it) over num_experts SwiGLU experts of
# moe_intermediate_size, stacked per kind into ffn_{gate,up,down}_exps. Keys as llama.cpp's converter writes
# them: {arch}.expert_count, expert_used_count, expert_feed_forward_length. Two things llama.cpp's qwen3moe
# has no key or tensor for, which pyengine writes and reads: norm_topk_prob=false (llama.cpp always
# renormalises the chosen experts' weights) as {arch}.expert_weights_norm = false, and dense blocks
# (mlp_only_layers, decoder_sparse_step > 1) as llama-style ffn_gate/ffn_up/ffn_down of intermediate_size.

MOE_KINDS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def _qwen3moe_fix(config: dict[str, Any], hp: HParams) -> None:
    def number(keys: tuple[str, ...], what: str) -> int:
        for k in keys:
            if config.get(k) is not None:
                v = config[k]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConversionError(f"config.json {k}={v!r}: {what} must be a positive integer")
                return v
        raise ConversionError(f"config.json has no {what} (looked for {', '.join(keys)})")

    if hp.rope_scaling:
        raise ConversionError(f"config.json rope scaling {hp.rope_scaling.get('rope_type')!r} on Qwen3-MoE is not "
                              "supported yet")
    n_expert = number(("num_local_experts", "num_experts"), "expert count")
    used = number(("num_experts_per_tok",), "number of experts per token")
    if used > n_expert:
        raise ConversionError(f"config.json num_experts_per_tok={used} is more than the {n_expert} experts")
    step = number(("decoder_sparse_step",), "decoder_sparse_step") if "decoder_sparse_step" in config else 1
    only = config.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise ConversionError(f"config.json mlp_only_layers={only!r}: expected a list of layer indices")
    hp.extra.update(n_expert=n_expert, n_expert_used=used,
                    n_ff_exp=number(("moe_intermediate_size",), "moe_intermediate_size"),
                    norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                    dense=tuple(i for i in range(hp.n_layer) if i in only or (i + 1) % step != 0))


def _qwen3moe_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    shapes = _qwen3_shapes(hp)
    e, f, d = hp.extra["n_expert"], hp.extra["n_ff_exp"], hp.n_embd
    shapes.update({"blk.{bid}.ffn_gate_inp.weight": (e, d), "blk.{bid}.ffn_gate_exps.weight": (e, f, d),
                   "blk.{bid}.ffn_up_exps.weight": (e, f, d), "blk.{bid}.ffn_down_exps.weight": (e, d, f)})
    return shapes


def _qwen3moe_block(hp: HParams, bid: int) -> tuple[str, ...]:
    attn = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "ffn_norm")
    if bid in hp.extra["dense"]:
        return attn + ("ffn_gate", "ffn_up", "ffn_down")
    return attn + ("ffn_gate_inp", *MOE_KINDS.values())


def _write_qwen3moe_hparams(w: Any, hp: HParams, spec: ArchSpec, *_: Any) -> None:
    """The keys convert_hf_to_gguf.py writes for Qwen3MoeForCausalLM (TextModel + Qwen2MoeModel), no more,
    so that the file equals llama.cpp's; plus expert_weights_norm when norm_topk_prob is false."""
    w.add_block_count(hp.n_layer)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.norm_eps)
    w.add_expert_count(hp.extra["n_expert"])
    w.add_expert_used_count(hp.extra["n_expert_used"])
    if hp.head_dim_explicit:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_expert_feed_forward_length(hp.extra["n_ff_exp"])
    if not hp.extra["norm_topk_prob"]:
        w.add_expert_weights_norm(False)


QWEN3MOE = ArchSpec(
    name="qwen3moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    stacks=(StackMap("model.layers.{bid}.", {**QWEN3.stacks[0].tensors, "mlp.gate": "ffn_gate_inp"}),),
    shapes=_qwen3moe_shapes,
    fix_hparams=_qwen3moe_fix,
    write_hparams=_write_qwen3moe_hparams,
    experts=ExpertMap("mlp.experts.", MOE_KINDS, fused={"gate_up_proj": ("gate_proj", "up_proj")}),
    block_required=_qwen3moe_block,
)

# --- GPT-2 ---------------------------------------------------------------------------------------------
# llama.cpp's `gpt2`: learned absolute positions, pre-LayerNorm blocks with biases, tanh GELU, fused
# c_attn as attn_qkv; transformers keeps the block weights as Conv1D ([in, out]), written transposed.

def _gpt2_fix(config: dict[str, Any], hp: HParams) -> None:
    hp.n_ff = int(config.get("n_inner") or 4 * hp.n_embd)
    hp.tied = bool(config.get("tie_word_embeddings", True))
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"config.json activation_function={act!r}: only the tanh GELU (gelu_new) is supported")


def _gpt2_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    e, f = hp.n_embd, hp.n_ff
    shapes = {"token_embd.weight": (hp.n_vocab, e), "position_embd.weight": (hp.n_ctx, e),
              "output.weight": (hp.n_vocab, e),
              "blk.{bid}.attn_qkv.weight": (3 * e, e), "blk.{bid}.attn_qkv.bias": (3 * e,),
              "blk.{bid}.attn_output.weight": (e, e), "blk.{bid}.ffn_up.weight": (f, e),
              "blk.{bid}.ffn_up.bias": (f,), "blk.{bid}.ffn_down.weight": (e, f)}
    for name in ("output_norm", "blk.{bid}.attn_norm", "blk.{bid}.ffn_norm"):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (e,)
    shapes["blk.{bid}.attn_output.bias"] = shapes["blk.{bid}.ffn_down.bias"] = (e,)
    return shapes


def _write_gpt2_hparams(w: Any, hp: HParams, spec: ArchSpec, *_: Any) -> None:
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(hp.n_layer)
    w.add_head_count(hp.n_head)
    w.add_layer_norm_eps(hp.norm_eps)


GPT2 = ArchSpec(
    name="gpt2",
    hf_architectures=("GPT2LMHeadModel",),
    global_tensors={"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
                    "transformer.ln_f": "output_norm", "lm_head": "output"},
    stacks=(StackMap("transformer.h.{bid}.", {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv",
                                              "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                                              "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}),),
    hparam_keys={"n_vocab": ("vocab_size",), "n_embd": ("n_embd",), "n_layer": ("n_layer",), "n_head": ("n_head",),
                 "n_head_kv": (), "n_ff": ("n_inner", "n_embd"), "n_ctx": ("n_positions",), "head_dim": (),
                 "norm_eps": ("layer_norm_epsilon",), "rope_theta": (), "tied": ()},
    required_biases=("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"),
    shapes=_gpt2_shapes,
    tokenizers=("bpe",),
    ignored_suffixes=(".attn.bias", ".attn.masked_bias"),
    fix_hparams=_gpt2_fix,
    norm="layer",
    required_globals=lambda hp: ("token_embd.weight", "position_embd.weight", "output_norm.weight",
                                 "output_norm.bias") + (() if hp.tied else ("output.weight",)),
    float_tensors=("position_embd.weight",),
    write_hparams=_write_gpt2_hparams,
    transposed=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
    add_bos=False,
)

# --- Phi-3 --------------------------------------------------------------------------------------------
# llama.cpp's `phi3`: fused qkv_proj as attn_qkv, fused gate_up_proj as a [gate; up] ffn_up, NeoX RoPE on
# the first partial_rotary_factor of each head. LongRoPE (the 128k variants) as llama.cpp's Phi3MiniModel
# stores it: the short and long per-pair frequency divisors as rope_factors_short/long.weight, the
# cos/sin magnitude as phi3.rope.scaling.attn_factor and the original context as
# phi3.rope.scaling.original_context_length (a reader takes the long factors for contexts beyond it).

def _phi3_fix(config: dict[str, Any], hp: HParams) -> None:
    params = hp.rope_scaling
    factor = float(config.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))
    hp.n_rot = int(hp.head_dim * factor) if factor != 1.0 else 0
    orig = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    hp.extra["n_ctx_orig"] = int(orig) if orig else None
    hp.extra["sliding_window"] = config.get("sliding_window")
    if params.get("rope_type") != "longrope":
        return
    if not orig:
        raise ConversionError("config.json: LongRoPE needs original_max_position_embeddings")
    n_pairs = (hp.n_rot or hp.head_dim) // 2
    factors = {}
    for key in ("long_factor", "short_factor"):
        v = params.get(key)
        ok = isinstance(v, list) and len(v) == n_pairs and all(
            isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in v)
        if not ok:
            got = f"{len(v)} values" if isinstance(v, list) else repr(v)
            raise ConversionError(f"config.json rope_scaling.{key} must be a list of {n_pairs} positive numbers (one per "
                                  f"rotated pair of dimensions), got {got}")
        factors[key] = np.array(v, dtype=np.float32)
    # transformers' _compute_longrope_parameters: an explicit attention_factor, else from the context growth
    # (llama.cpp's converter computes the same from max_position_embeddings / original)
    growth = float(params.get("factor") or hp.n_ctx / int(orig))
    attn = params.get("attention_factor")
    if attn is None:
        attn = 1.0 if growth <= 1.0 else math.sqrt(1 + math.log(growth) / math.log(int(orig)))
    hp.extra["longrope"] = {"rope_factors_long.weight": factors["long_factor"],
                            "rope_factors_short.weight": factors["short_factor"], "attn_factor": float(attn)}
    hp.rope_scaling = {}


def _phi3_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes = llama_shapes(hp)
    shapes["blk.{bid}.attn_qkv.weight"] = (q + 2 * kv, hp.n_embd)
    shapes["blk.{bid}.ffn_up.weight"] = (2 * hp.n_ff, hp.n_embd)
    return shapes


def _write_phi3_hparams(w: Any, hp: HParams, spec: ArchSpec, *_: Any) -> None:
    from .convert import write_hparams

    write_hparams(w, hp, spec)
    if hp.extra["n_ctx_orig"]:
        w.add_rope_scaling_orig_ctx_len(hp.extra["n_ctx_orig"])
    if "longrope" in hp.extra:
        w.add_rope_scaling_attn_factors(hp.extra["longrope"]["attn_factor"])
    if hp.extra["sliding_window"] is None:
        w.add_sliding_window(0)   # as llama.cpp's converter: 0 tells Phi-3 without a window apart


def _phi3_extra_tensors(hp: HParams) -> dict[str, np.ndarray]:
    return {k: v for k, v in hp.extra.get("longrope", {}).items() if k.endswith(".weight")}


PHI3 = ArchSpec(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    stacks=(StackMap("model.layers.{bid}.", {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv",
                                             "self_attn.o_proj": "attn_output",
                                             "post_attention_layernorm": "ffn_norm",
                                             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}),),
    shapes=_phi3_shapes,
    fix_hparams=_phi3_fix,
    write_hparams=_write_phi3_hparams,
    extra_tensors=_phi3_extra_tensors,
)

# --- Gemma 2 -------------------------------------------------------------------------------------------
# llama.cpp's `gemma2`: Gemma's RMSNorm multiplies by (1 + w), so the converter adds 1 to every norm
# weight (as llama.cpp's); norms after attention and the FFN (post_attention_norm / post_ffw_norm);
# soft-capping and the sliding window (on even layers) as GGUF keys; tied embeddings.

def _gemma2_fix(config: dict[str, Any], hp: HParams) -> None:
    hp.tied = True
    hp.extra["query_pre_attn_scalar"] = float(config.get("query_pre_attn_scalar") or hp.head_dim)
    act = config.get("hidden_activation", config.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ConversionError(f"config.json hidden_activation={act!r}: only the tanh GELU is supported")
    hp.extra["softcap"] = (float(config.get("attn_logit_softcapping") or 0.0),
                           float(config.get("final_logit_softcapping") or 0.0))


def _gemma2_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    shapes = llama_shapes(hp)
    shapes["blk.{bid}.post_attention_norm.weight"] = shapes["blk.{bid}.post_ffw_norm.weight"] = (hp.n_embd,)
    return shapes


# The layer count by which llama.cpp recognises the 27B models, whose queries it scales by
# 1 / sqrt(n_embd // n_head) instead of 1 / sqrt(head_dim) (src/models/gemma2.cpp, gemma3.cpp).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _write_gemma2_hparams(w: Any, hp: HParams, spec: ArchSpec, *_: Any) -> None:
    from .convert import write_hparams

    write_hparams(w, hp, spec)
    # transformers scales queries by query_pre_attn_scalar ** -0.5. A reader infers the scalar from the
    # layer count (llama.cpp's rule, which the engine follows for files without the key); only where that
    # guess is wrong do we write {arch}.attention.scale, which pyengine honours. llama.cpp defines the key
    # but its gemma2/gemma3 graphs never read it: it runs such a file with its own rule's scale, so its
    # outputs differ from transformers' (as they would for its own conversion of the same folder).
    inferred = hp.n_embd // hp.n_head if hp.n_layer == GEMMA_27B_LAYERS[spec.name] else hp.head_dim
    if hp.extra["query_pre_attn_scalar"] != inferred:
        w.add_float32(f"{spec.name}.attention.scale", hp.extra["query_pre_attn_scalar"] ** -0.5)
    attn, final = hp.extra["softcap"]
    if attn:
        w.add_attn_logit_softcapping(attn)
    if final:
        w.add_final_logit_softcapping(final)


def _plus_one(x: np.ndarray, hp: HParams) -> np.ndarray:
    return x + np.float32(1.0)


GEMMA2 = ArchSpec(
    name="gemma2",
    hf_architectures=("Gemma2ForCausalLM",),
    stacks=(StackMap("model.layers.{bid}.", {**LLAMA_BLOCK_TENSORS, "post_attention_layernorm": "post_attention_norm",
                                             "pre_feedforward_layernorm": "ffn_norm",
                                             "post_feedforward_layernorm": "post_ffw_norm"}),),
    shapes=_gemma2_shapes,
    fix_hparams=_gemma2_fix,
    write_hparams=_write_gemma2_hparams,
    row_transforms={n: _plus_one for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm",
                                           "output_norm")},
)

# --- Gemma 3 (text) ------------------------------------------------------------------------------------
# llama.cpp's `gemma3`: Gemma 2's layout plus per-head q/k norms ((1 + w) too), no soft-capping, five
# windowed layers to one global (checked against config.json layer_types, and written as
# gemma3.attention.sliding_window_pattern), the windowed layers' RoPE base as gemma3.rope.freq_base_swa.

def _gemma3_fix(config: dict[str, Any], hp: HParams) -> None:
    _gemma2_fix(config, hp)
    types = config.get("layer_types") or []
    pattern = next((i + 1 for i, t in enumerate(types) if t == "full_attention"), 0)
    want = ["full_attention" if pattern and i % pattern == pattern - 1 else "sliding_attention"
            for i in range(len(types))]
    if types and types != want:
        raise ConversionError("config.json layer_types is not a repeating pattern of windowed layers and one "
                              "global layer: not supported")
    hp.extra["swa_pattern"] = pattern
    params = config.get("rope_parameters") or {}
    local = (params.get("sliding_attention") or {}).get("rope_theta", config.get("rope_local_base_freq", 10000.0))
    hp.extra["rope_local_base"] = float(local)


def _write_gemma3_hparams(w: Any, hp: HParams, spec: ArchSpec, *_: Any) -> None:
    _write_gemma2_hparams(w, hp, spec)
    if hp.extra["swa_pattern"]:
        w.add_uint32(f"{spec.name}.attention.sliding_window_pattern", hp.extra["swa_pattern"])
    w.add_float32(f"{spec.name}.rope.freq_base_swa", hp.extra["rope_local_base"])


def _gemma3_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    shapes = _gemma2_shapes(hp)
    shapes["blk.{bid}.attn_q_norm.weight"] = shapes["blk.{bid}.attn_k_norm.weight"] = (hp.head_dim,)
    return shapes


GEMMA3 = ArchSpec(
    name="gemma3",
    hf_architectures=("Gemma3ForCausalLM",),
    stacks=(StackMap("model.layers.{bid}.", {**GEMMA2.stacks[0].tensors, "self_attn.q_norm": "attn_q_norm",
                                             "self_attn.k_norm": "attn_k_norm"}),),
    shapes=_gemma3_shapes,
    fix_hparams=_gemma3_fix,
    write_hparams=_write_gemma3_hparams,
    row_transforms={**GEMMA2.row_transforms, "attn_q_norm": _plus_one, "attn_k_norm": _plus_one},
)

# --- Baichuan -------------------------------------------------------------------------------------------
# llama.cpp's `baichuan` (conversion/baichuan.py BaichuanModel): Baichuan and Baichuan 2 are llama with the
# q/k/v projections fused as W_pack, which is written as attn_q/attn_k/attn_v, q and k permuted for
# adjacent-pair RoPE as for llama. The 7B models rotate with RoPE; the 13B models have no RoPE but ALiBi
# (Baichuan's _get_interleave slopes, max bias 8), which the published code picks by model file and whose
# configs tell apart by the context key (7B: max_position_embeddings; 13B: model_max_length only).
# llama.cpp reads neither: it takes ALiBi (bias 8) for 40 layers, RoPE for 32 and neither otherwise. Where
# that rule would miss, we write baichuan.attention.max_alibi_bias (0: RoPE), which pyengine honours and
# llama.cpp ignores. Baichuan 2 (its config has z_loss_weight) normalises each lm_head row to unit length
# before use (NormHead; transformers' eval forward normalises the weight in place on the first call);
# llama.cpp's converter writes the rows as stored, so its files give other logits than transformers, while
# ours hold the normalised rows, which llama.cpp reads like any output.weight.
BAICHUAN_MAX_ALIBI_BIAS = 8.0


def _baichuan_fix(config: dict[str, Any], hp: HParams) -> None:
    alibi = "max_position_embeddings" not in config
    hp.extra["max_alibi_bias"] = BAICHUAN_MAX_ALIBI_BIAS if alibi else 0.0
    hp.extra["norm_head"] = "z_loss_weight" in config
    if hp.n_head_kv != hp.n_head:
        raise ConversionError(f"config.json: Baichuan's W_pack holds as many key/value heads as query heads "
                              f"({hp.n_head}), not {hp.n_head_kv}")


def _baichuan_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    shapes = llama_shapes(hp)
    shapes["blk.{bid}.attn_qkv.weight"] = (3 * hp.n_head * hp.head_dim, hp.n_embd)
    return shapes


def _write_baichuan_hparams(w: Any, hp: HParams, spec: ArchSpec, *_: Any) -> None:
    from .convert import write_hparams

    write_hparams(w, hp, spec)
    w.add_tensor_data_layout("Meta AI original pth")   # as llama.cpp's converter: q/k permuted as for llama
    by_layers = {32: 0.0, 40: BAICHUAN_MAX_ALIBI_BIAS}.get(hp.n_layer)   # llama.cpp's rule (src/models/baichuan.cpp)
    if hp.extra["max_alibi_bias"] != by_layers:
        w.add_float32(f"{spec.name}.attention.max_alibi_bias", hp.extra["max_alibi_bias"])


def _normalize_rows(w: np.ndarray, hp: HParams) -> np.ndarray:
    if not hp.extra["norm_head"]:
        return w
    # torch.nn.functional.normalize: x / max(||x||, 1e-12), in float32 as transformers runs it
    norms = np.sqrt(np.sum(w.astype(np.float32) ** 2, axis=1, keepdims=True))
    return (w / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


BAICHUAN = ArchSpec(
    name="baichuan",
    hf_architectures=("BaichuanForCausalLM", "BaiChuanForCausalLM"),
    stacks=(StackMap("model.layers.{bid}.", {"input_layernorm": "attn_norm", "self_attn.W_pack": "attn_qkv",
                                             "self_attn.o_proj": "attn_output",
                                             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                                             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}),),
    hparam_keys={**LLAMA_HPARAM_KEYS, "n_ctx": ("max_position_embeddings", "model_max_length")},
    permute_qk=True,
    shapes=_baichuan_shapes,
    tokenizers=("spm",),
    fix_hparams=_baichuan_fix,
    write_hparams=_write_baichuan_hparams,
    row_transforms={"output": _normalize_rows},
    split_rows={"attn_qkv": ("attn_q", "attn_k", "attn_v")},
)

# --- T5 (encoder-decoder) --------------------------------------------------------------------------------
# llama.cpp's `t5` (conversion/t5.py T5Model and gguf-py's tensor map): an encoder stack "enc.blk.N." and a
# decoder stack "dec.blk.N." with cross-attention, T5LayerNorm (RMS, no bias), the relative position bias
# table of each stack in its block 0 only (attn_rel_b), a ReLU FFN (wi -> ffn_up; T5 v1.0) or a tanh-GELU
# gated one (wi_0 -> ffn_gate, wi_1 -> ffn_up; v1.1, flan-T5, mT5), and the SentencePiece unigram
# vocabulary of spiece.model (tokenizer.ggml.model "t5").
T5_MAX_DISTANCE = 128   # llama.cpp's llama_relative_position_bucket hard-codes it


def _t5_fix(config: dict[str, Any], hp: HParams) -> None:
    hp.n_ctx = int(config.get("n_positions") or 512)   # llama.cpp's default
    hp.tied = bool(config.get("tie_word_embeddings", True))   # T5Config's default
    if config.get("scale_decoder_outputs") is False:
        # transformers 5's T5 v1.1 without the output scale: the engine knows it by an lm_head of its own
        hp.tied = False
    hp.head_dim_explicit = True
    hp.extra["n_dec_layer"] = int(config.get("num_decoder_layers") or hp.n_layer)
    hp.n_dec_layer = hp.extra["n_dec_layer"]  # type: ignore[attr-defined]  # the decoder StackMap's count
    hp.extra["has_dec_layer_key"] = config.get("num_decoder_layers") is not None
    hp.extra["n_rel_buckets"] = int(config.get("relative_attention_num_buckets", 32))
    hp.extra["decoder_start_token_id"] = int(config.get("decoder_start_token_id", 0) or 0)
    proj = config.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ConversionError(f"config.json feed_forward_proj={proj!r}: only 'relu' (T5) and 'gated-gelu' "
                              "(T5 v1.1, flan-T5, mT5: tanh GELU) are supported")
    hp.extra["gated"] = proj == "gated-gelu"
    max_distance = int(config.get("relative_attention_max_distance", T5_MAX_DISTANCE))
    if max_distance != T5_MAX_DISTANCE:
        raise ConversionError(f"config.json relative_attention_max_distance={max_distance}: only "
                              f"{T5_MAX_DISTANCE} is supported (as in llama.cpp)")
    if hp.extra["n_rel_buckets"] < 4 or hp.extra["n_rel_buckets"] % 2:
        raise ConversionError(f"config.json relative_attention_num_buckets={hp.extra['n_rel_buckets']} must be "
                              "even and at least 4")


def _t5_rename(name: str, config: dict[str, Any]) -> str | None:
    # llama.cpp takes the first of shared / encoder.embed_tokens / decoder.embed_tokens as token_embd;
    # transformers saves shared.weight and drops the tied copies
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return None
    return name


T5_BLOCK_TENSORS = {"layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.q": "attn_q",
                    "layer.0.SelfAttention.k": "attn_k", "layer.0.SelfAttention.v": "attn_v",
                    "layer.0.SelfAttention.o": "attn_o",
                    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b"}
T5_FFN_TENSORS = {"layer_norm": "ffn_norm", "DenseReluDense.wi": "ffn_up", "DenseReluDense.wi_0": "ffn_gate",
                  "DenseReluDense.wi_1": "ffn_up", "DenseReluDense.wo": "ffn_down"}
T5_CROSS_TENSORS = {"layer.1.layer_norm": "cross_attn_norm", "layer.1.EncDecAttention.q": "cross_attn_q",
                    "layer.1.EncDecAttention.k": "cross_attn_k", "layer.1.EncDecAttention.v": "cross_attn_v",
                    "layer.1.EncDecAttention.o": "cross_attn_o"}


def _t5_block(cross: bool) -> Callable[[HParams, int], tuple[str, ...]]:
    def required(hp: HParams, bid: int) -> tuple[str, ...]:
        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_o", "ffn_norm", "ffn_up", "ffn_down")
        names += ("ffn_gate",) if hp.extra["gated"] else ()
        names += ("attn_rel_b",) if bid == 0 else ()
        names += tuple(T5_CROSS_TENSORS.values()) if cross else ()
        return names
    return required


def _t5_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    e, f, q = hp.n_embd, hp.n_ff, hp.n_head * hp.head_dim
    shapes = {"token_embd.weight": (hp.n_vocab, e), "output.weight": (hp.n_vocab, e),
              "enc.output_norm.weight": (e,), "dec.output_norm.weight": (e,)}
    for s in ("enc", "dec"):
        b = f"{s}.blk.{{bid}}."
        shapes.update({b + "attn_norm.weight": (e,), b + "ffn_norm.weight": (e,), b + "attn_q.weight": (q, e),
                       b + "attn_k.weight": (q, e), b + "attn_v.weight": (q, e), b + "attn_o.weight": (e, q),
                       b + "attn_rel_b.weight": (hp.extra["n_rel_buckets"], hp.n_head),
                       b + "ffn_gate.weight": (f, e), b + "ffn_up.weight": (f, e), b + "ffn_down.weight": (e, f)})
    b = "dec.blk.{bid}."
    shapes.update({b + "cross_attn_norm.weight": (e,), b + "cross_attn_q.weight": (q, e),
                   b + "cross_attn_k.weight": (q, e), b + "cross_attn_v.weight": (q, e),
                   b + "cross_attn_o.weight": (e, q)})
    return shapes


def _write_t5_hparams(w: Any, hp: HParams, spec: ArchSpec, *_: Any) -> None:
    """The keys and order of llama.cpp's T5Model.set_gguf_parameters."""
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(hp.n_layer)
    if hp.extra["has_dec_layer_key"]:
        w.add_decoder_block_count(hp.extra["n_dec_layer"])
    w.add_head_count(hp.n_head)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_layer_norm_eps(hp.norm_eps)
    w.add_relative_attn_buckets_count(hp.extra["n_rel_buckets"])
    w.add_layer_norm_rms_eps(hp.norm_eps)
    w.add_decoder_start_token_id(hp.extra["decoder_start_token_id"])


T5 = ArchSpec(
    name="t5",
    hf_architectures=("T5ForConditionalGeneration", "MT5ForConditionalGeneration", "T5WithLMHeadModel"),
    global_tensors={"shared": "token_embd", "lm_head": "output", "encoder.final_layer_norm": "enc.output_norm",
                    "decoder.final_layer_norm": "dec.output_norm"},
    stacks=(StackMap("encoder.block.{bid}.",
                     {**T5_BLOCK_TENSORS, **{f"layer.1.{k}": v for k, v in T5_FFN_TENSORS.items()}},
                     gguf_prefix="enc.blk", required=_t5_block(False)),
            StackMap("decoder.block.{bid}.",
                     {**T5_BLOCK_TENSORS, **T5_CROSS_TENSORS, **{f"layer.2.{k}": v for k, v in T5_FFN_TENSORS.items()}},
                     gguf_prefix="dec.blk", n_layer="n_dec_layer", required=_t5_block(True))),
    hparam_keys={"n_vocab": ("vocab_size",), "n_embd": ("d_model",), "n_layer": ("num_layers",),
                 "n_head": ("num_heads",), "n_head_kv": (), "n_ff": ("d_ff",), "n_ctx": ("n_positions",),
                 "head_dim": ("d_kv",), "norm_eps": ("layer_norm_epsilon",), "rope_theta": (),
                 "tied": ("tie_word_embeddings",)},
    shapes=_t5_shapes,
    tokenizers=("t5",),
    ignored_suffixes=(),
    model_types=("t5", "mt5"),
    fix_hparams=_t5_fix,
    rename=_t5_rename,
    required_globals=lambda hp: ("token_embd.weight", "enc.output_norm.weight", "dec.output_norm.weight")
    + (() if hp.tied else ("output.weight",)),
    float_tensors=("enc.blk.0.attn_rel_b.weight", "dec.blk.0.attn_rel_b.weight"),
    write_hparams=_write_t5_hparams,
    decoder=False,
)

# --- BART / mBART (encoder-decoder) -----------------------------------------------------------------------
# pyengine's own `bart` and `mbart` GGUF architectures (llama.cpp has neither; the engine's config.cpp says
# what they are): T5's tensor names for the blocks, with biases, plus each stack's position table and
# embedding LayerNorm under its prefix (enc./dec.position_embd, enc./dec.token_embd_norm), mBART's final
# LayerNorms (enc./dec.output_norm) and final_logits_bias as output.bias. The position tables lose BART's
# first 2 rows (its positions are offset by 2), so that row p is position p as for BERT and GPT-2.
BART_POSITION_OFFSET = 2   # transformers' BartLearnedPositionalEmbedding.offset
BART_SELF_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.out_proj": "attn_o", "self_attn_layer_norm": "attn_norm",
                     "fc1": "ffn_up", "fc2": "ffn_down", "final_layer_norm": "ffn_norm"}
BART_CROSS_TENSORS = {"encoder_attn.q_proj": "cross_attn_q", "encoder_attn.k_proj": "cross_attn_k",
                      "encoder_attn.v_proj": "cross_attn_v", "encoder_attn.out_proj": "cross_attn_o",
                      "encoder_attn_layer_norm": "cross_attn_norm"}
BART_ACTIVATIONS = ("gelu",)   # transformers' ACT2FN["gelu"]: the exact (erf) GELU


def _bart_fix(config: dict[str, Any], hp: HParams) -> None:
    hp.norm_eps = 1e-5                     # nn.LayerNorm's default: BART's config has no key for it
    hp.tied = bool(config.get("tie_word_embeddings", True))
    hp.head_dim_explicit = False
    for enc_key, dec_key in (("encoder_attention_heads", "decoder_attention_heads"),
                             ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config.get(dec_key, config.get(enc_key)) != config.get(enc_key):
            raise ConversionError(f"config.json {enc_key}={config.get(enc_key)} and {dec_key}={config.get(dec_key)}: "
                                  "an encoder and a decoder of different widths are not supported")
    act = config.get("activation_function", "gelu")
    if act not in BART_ACTIVATIONS:
        raise ConversionError(f"config.json activation_function={act!r}: only {', '.join(BART_ACTIVATIONS)} "
                              "(the exact GELU) is supported")
    if hp.n_embd % hp.n_head:
        raise ConversionError(f"config.json d_model={hp.n_embd} is not a multiple of encoder_attention_heads={hp.n_head}")
    hp.extra["n_dec_layer"] = int(config.get("decoder_layers") or hp.n_layer)
    hp.n_dec_layer = hp.extra["n_dec_layer"]  # type: ignore[attr-defined]  # the decoder StackMap's count
    hp.extra["embedding_scale"] = math.sqrt(hp.n_embd) if config.get("scale_embedding") else 1.0


def _bart_rename(name: str, config: dict[str, Any]) -> str | None:
    name = name.removeprefix("model.")
    # the embedding is `shared`; checkpoints may hold its tied copies too
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return None
    if name == "final_logits_bias":
        return "final_logits.bias"
    return name


def _bart_block(cross: bool) -> Callable[[HParams, int], tuple[str, ...]]:
    def required(hp: HParams, bid: int) -> tuple[str, ...]:
        return tuple(BART_SELF_TENSORS.values()) + (tuple(BART_CROSS_TENSORS.values()) if cross else ())
    return required


def _bart_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    e, f = hp.n_embd, hp.n_ff
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (hp.n_vocab, e), "output.weight": (hp.n_vocab, e),
                                          "output.bias": (1, hp.n_vocab)}
    for s in ("enc", "dec"):
        shapes[f"{s}.position_embd.weight"] = (hp.n_ctx + BART_POSITION_OFFSET, e)
        for norm in ("token_embd_norm", "output_norm"):
            shapes[f"{s}.{norm}.weight"] = shapes[f"{s}.{norm}.bias"] = (e,)
        b = f"{s}.blk.{{bid}}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_o", "cross_attn_q", "cross_attn_k", "cross_attn_v",
                     "cross_attn_o"):
            shapes[b + name + ".weight"], shapes[b + name + ".bias"] = (e, e), (e,)
        for name in ("attn_norm", "ffn_norm", "cross_attn_norm"):
            shapes[b + name + ".weight"] = shapes[b + name + ".bias"] = (e,)
        shapes.update({b + "ffn_up.weight": (f, e), b + "ffn_up.bias": (f,), b + "ffn_down.weight": (e, f),
                       b + "ffn_down.bias": (e,)})
    return shapes


def _bart_globals(pre_norm: bool) -> Callable[[HParams], tuple[str, ...]]:
    def required(hp: HParams) -> tuple[str, ...]:
        names = ["token_embd.weight"] + ([] if hp.tied else ["output.weight"])   # final_logits_bias: zeros if absent
        for s in ("enc", "dec"):
            names += [f"{s}.position_embd.weight", f"{s}.token_embd_norm.weight", f"{s}.token_embd_norm.bias"]
            names += [f"{s}.output_norm.weight", f"{s}.output_norm.bias"] if pre_norm else []
        return tuple(names)
    return required


def generation_settings(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The generation settings transformers' generate starts from: generation_config.json when the folder
    has one, else config.json (GenerationConfig.from_model_config)."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read {path}: {e}") from None
        if isinstance(gen, dict):
            return gen
    return config


def _write_bart_hparams(w: Any, hp: HParams, spec: ArchSpec, model_dir: Path, config: dict[str, Any],
                        warnings: list[str]) -> None:
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(hp.n_layer)
    w.add_decoder_block_count(hp.extra["n_dec_layer"])
    w.add_head_count(hp.n_head)
    w.add_layer_norm_eps(hp.norm_eps)
    w.add_embedding_scale(hp.extra["embedding_scale"])
    # transformers' _get_decoder_start_token_id: the generation config's decoder start, else its BOS
    gen = generation_settings(model_dir, config)
    start = next((v for v in (gen.get("decoder_start_token_id"), gen.get("bos_token_id")) if isinstance(v, int)), None)
    if start is None or not 0 <= start < hp.n_vocab:
        raise ConversionError(f"{model_dir}: no valid decoder_start_token_id or bos_token_id in its generation "
                              f"config (generation_config.json, else config.json): {start}")
    w.add_decoder_start_token_id(start)


BART = ArchSpec(
    name="bart",
    hf_architectures=("BartForConditionalGeneration",),
    global_tensors={"shared": "token_embd", "lm_head": "output", "final_logits": "output",
                    "encoder.embed_positions": "enc.position_embd", "decoder.embed_positions": "dec.position_embd",
                    "encoder.layernorm_embedding": "enc.token_embd_norm",
                    "decoder.layernorm_embedding": "dec.token_embd_norm",
                    "encoder.layer_norm": "enc.output_norm", "decoder.layer_norm": "dec.output_norm"},
    stacks=(StackMap("encoder.layers.{bid}.", BART_SELF_TENSORS, gguf_prefix="enc.blk", required=_bart_block(False)),
            StackMap("decoder.layers.{bid}.", {**BART_SELF_TENSORS, **BART_CROSS_TENSORS}, gguf_prefix="dec.blk",
                     n_layer="n_dec_layer", required=_bart_block(True))),
    hparam_keys={"n_vocab": ("vocab_size",), "n_embd": ("d_model",), "n_layer": ("encoder_layers",),
                 "n_head": ("encoder_attention_heads",), "n_head_kv": (), "n_ff": ("encoder_ffn_dim",),
                 "n_ctx": ("max_position_embeddings",), "head_dim": (), "norm_eps": (), "rope_theta": (),
                 "tied": ("tie_word_embeddings",)},
    required_biases=tuple(BART_SELF_TENSORS.values()),
    shapes=_bart_shapes,
    tokenizers=("hf-bpe",),
    ignored_suffixes=(),
    model_types=("bart",),
    fix_hparams=_bart_fix,
    norm="layer",
    rename=_bart_rename,
    required_globals=_bart_globals(pre_norm=False),
    float_tensors=("enc.position_embd.weight", "dec.position_embd.weight"),
    write_hparams=_write_bart_hparams,
    decoder=False,
    skip_rows={"enc.position_embd.weight": BART_POSITION_OFFSET, "dec.position_embd.weight": BART_POSITION_OFFSET},
    one_d=("output.bias",),
)
MBART = dataclasses.replace(BART, name="mbart", hf_architectures=("MBartForConditionalGeneration",),
                            tokenizers=("hf-unigram",), model_types=("mbart",),
                            required_globals=_bart_globals(pre_norm=True))

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA, QWEN2, QWEN3, QWEN3MOE, CHATGLM, CHATGLM1, GLM_HF, BERT, GPT2, PHI3,
                                       GEMMA2, GEMMA3, BAICHUAN, T5, BART, MBART)


def supported_architectures() -> list[str]:
    return sorted({a for spec in ARCHITECTURES for a in spec.hf_architectures})


def find_arch(hf_arch: str, config: dict[str, Any] | None = None) -> ArchSpec | None:
    """The spec of an HF model class; for a class no spec names, the spec of the config's model_type (a custom
    class around a known model's weights: ChatLM-mini-Chinese's TextToTextModel is a T5)."""
    config = config or {}
    for spec in ARCHITECTURES:
        if hf_arch in spec.hf_architectures and spec.matches(config):
            return spec
    if not any(hf_arch in spec.hf_architectures for spec in ARCHITECTURES):
        for spec in ARCHITECTURES:
            if config.get("model_type") in spec.model_types and spec.matches(config):
                return spec
    return None
