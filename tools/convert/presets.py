"""Quantization presets (llama.cpp's file types) and the per-tensor type each gives.

A preset such as Q4_K_M is not one type: llama.cpp gives some tensors more bits (attn_v and ffn_down
in the first, last and every third layer, the output matrix) and falls back to a 32-element type when
a row is not a multiple of 256. `tensor_type` reproduces `llama_tensor_get_type` of llama.cpp's
src/llama-quant.cpp (the version vendored by llama-cpp-python 0.3.36) for the architectures pyengine
reads (no Falcon special cases; for mixture-of-experts models, the experts' *_exps tensors count as their
kind and the 8-expert rules apply), so that a file from `pyengine convert --qtype q4_k_m` or `pyengine
quantize` has the same tensor types as llama-quantize's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType
F = LlamaFileType


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: LlamaFileType
    base: GGMLQuantizationType    # the type of every tensor the rules do not change


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("f32", F.ALL_F32, Q.F32),
    Preset("f16", F.MOSTLY_F16, Q.F16),
    Preset("bf16", F.MOSTLY_BF16, Q.BF16),
    Preset("q8_0", F.MOSTLY_Q8_0, Q.Q8_0),
    Preset("q4_0", F.MOSTLY_Q4_0, Q.Q4_0),
    Preset("q4_1", F.MOSTLY_Q4_1, Q.Q4_1),
    Preset("q5_0", F.MOSTLY_Q5_0, Q.Q5_0),
    Preset("q5_1", F.MOSTLY_Q5_1, Q.Q5_1),
    Preset("q2_k", F.MOSTLY_Q2_K, Q.Q2_K),
    Preset("q3_k_m", F.MOSTLY_Q3_K_M, Q.Q3_K),
    Preset("q4_k_s", F.MOSTLY_Q4_K_S, Q.Q4_K),
    Preset("q4_k_m", F.MOSTLY_Q4_K_M, Q.Q4_K),
    Preset("q5_k_s", F.MOSTLY_Q5_K_S, Q.Q5_K),
    Preset("q5_k_m", F.MOSTLY_Q5_K_M, Q.Q5_K),
    Preset("q6_k", F.MOSTLY_Q6_K, Q.Q6_K),
]}
K_PRESETS = ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)

# llama.cpp's tensor_type_fallback: the 32-element type for a 256-element one whose rows do not fit
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

# tensors llama.cpp never quantizes (tensor_allows_quantization), for the architectures pyengine reads
_KEEP = ("_norm.weight", "ffn_gate_inp.weight", "pos_embd.weight", "token_types.weight", "attn_rel_b.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelInfo:
    """What the rules look at beyond a tensor's name and shape."""
    n_layer: int
    n_gqa: int = 1                 # n_head / n_head_kv
    tied: bool = True              # no output.weight: token_embd is the output matrix too
    has_imatrix: bool = False
    n_expert: int = 0              # {arch}.expert_count (mixture-of-experts models)


def block_size(t: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[t][0]


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp quantizes this tensor at all (2-D+, a weight, not a norm...)."""
    return len(shape) >= 2 and name.endswith("weight") and not any(k in name for k in _KEEP)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mixed_type(preset: Preset, name: str, cols: int, model: ModelInfo) -> GGMLQuantizationType:
    """llama_tensor_get_type_impl: the preset's type for one quantizable tensor, before the fallback."""
    p, t = preset.name, preset.base
    cat = _category(name)
    m = _BLOCK.search(name)
    layer = int(m.group(1)) if m else 0
    n = model.n_layer
    if cat == "output" or (model.tied and cat == "token_embd"):
        if cols % block_size(t) != 0:
            return Q.Q8_0
        return t if t == Q.Q8_0 else Q.Q6_K
    if cat == "token_embd":
        return t
    if cat == "attn_v":
        if model.n_expert == 8:  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            return Q.Q8_0
        if p == "q2_k":
            return Q.Q4_K if model.n_gqa >= 4 else Q.Q3_K
        if p == "q3_k_m":
            return Q.Q5_K if layer < 2 else Q.Q4_K
        if p in ("q4_k_m", "q5_k_m") and _more_bits(layer, n):
            return Q.Q6_K
        if p == "q4_k_s" and layer < 4:
            return Q.Q5_K
        return t
    if cat == "attn_k":
        return Q.Q8_0 if model.n_expert == 8 else t
    if cat == "ffn_down":
        if p == "q2_k":
            return Q.Q3_K
        if p == "q3_k_m":
            return Q.Q5_K if layer < n // 16 else Q.Q4_K
        if p in ("q4_k_m", "q5_k_m"):
            return Q.Q6_K if _more_bits(layer, n) else t
        if p == "q4_k_s":
            return Q.Q5_K if layer < n // 8 else t
        if p in ("q4_0", "q5_0") and model.has_imatrix and layer < n // 8:
            return Q.Q4_1 if p == "q4_0" else Q.Q5_1
        return t
    if cat == "attn_output":
        if model.n_expert == 8:
            return Q.Q5_K if p in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m") else t
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K}.get(p, t)
    return t


def fallback(t: GGMLQuantizationType, cols: int) -> GGMLQuantizationType:
    """tensor_type_fallback: a type whose blocks fit rows of `cols` elements (F16 when none does)."""
    if cols % block_size(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % block_size(t) == 0 else Q.F16


def tensor_type(preset: Preset, name: str, shape: tuple[int, ...], model: ModelInfo) -> GGMLQuantizationType | None:
    """The type llama-quantize gives tensor `name` of numpy shape `shape` (columns last) under `preset`;
    None for tensors llama.cpp leaves as they are (norms, biases: the caller keeps their type)."""
    if not allows_quantization(name, shape):
        return None
    if preset.base in FLOAT_TYPES:
        return preset.base
    return fallback(mixed_type(preset, name, shape[-1], model), shape[-1])


def find_preset(name: str) -> Preset | None:
    return PRESETS.get(name.lower())
