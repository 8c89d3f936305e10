"""HF checkpoint folder -> GGUF v3, streaming one tensor at a time.

The conversion is planned before anything is written: every source tensor is mapped to its GGUF name,
checked against the shape config.json implies and given its output type. The GGUF header (metadata and
tensor infos) is then written, and each tensor is read, merged with the LoRA adapter, permuted, quantized
and appended in turn, so peak memory is about one tensor (in float32) however large the model. The file is
written under a temporary name next to OUT and renamed at the end: a failure leaves no OUT.

THUDM's pre-quantized ChatGLM folders (config.json quantization_bit) are read through thudm_quant.py,
which turns their int8/int4 weights back into float before anything else sees them.

Metadata beyond llama.cpp's keys:
  general.sampling.{temp,top_k,top_p,min_p,penalty_repeat}  from generation_config.json (llama.cpp's keys);
      temp is 0 (greedy) when generation_config.json says do_sample=false.
  pyengine.generation.eos_token_ids  all ids generation_config.json lists as eos_token_id (uint32 array);
      generation should stop on any of them.
  pyengine.generation.forced_bos_token_id / forced_eos_token_id  transformers' forced first token and forced
      last token at the length limit (BART, mBART), from generation_config.json, else config.json.
  pyengine.generation.min_length / min_new_tokens  transformers' minimum lengths (end ids suppressed until then;
      min_length counts the prompt or the decoder start), from the same place, when > 0 (BART-large-cnn: 56).
  chatglm1.residual_scale  ChatGLM-6B's alpha = sqrt(2 * num_layers); chatglm1 also writes
      tokenizer.ggml.mask_token_id ([gMASK], whose index is the position id of generated tokens).
  BERT: pyengine.embedding.normalize (bert.py) and pyengine.tokenizer.bert.{clean_text,
      handle_chinese_chars,max_input_chars_per_word} (vocab.py load_wordpiece).
  chatglm.prefix_length and tensors blk.N.prefix_k / blk.N.prefix_v  a P-Tuning v2 prefix (--ptuning;
      ptuning.py), which llama.cpp does not read.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, RopeScalingType

from . import quants
from .presets import K_PRESETS, PRESETS, ModelInfo, Preset, fallback, mixed_type, tensor_type
from .arch import (ArchSpec, HParams, StackMap, find_arch, generation_settings, permute_rope_rows,
                   supported_architectures)
from .errors import ConversionError
from .lora import LoraAdapter
from .progress import Progress
from .source import INTEGER_DTYPES, Checkpoint, _read_json
from .thudm_quant import DequantizedCheckpoint
from .vocab import load_vocab, write_vocab

Q = GGMLQuantizationType
# Single types: every tensor but token_embd/output (and 1-D ones) gets this type.
QTYPES: dict[str, GGMLQuantizationType] = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1,
    "q5_0": Q.Q5_0, "q5_1": Q.Q5_1,
}
# --output-qtype may also name one K type.
OUTPUT_QTYPES: dict[str, GGMLQuantizationType] = {
    **QTYPES, "q2_k": Q.Q2_K, "q3_k": Q.Q3_K, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K,
}
# --qtype: a single type above or one of llama.cpp's K-quant presets (presets.py: per-tensor type mix).
QTYPE_CHOICES = (*QTYPES, *K_PRESETS)
FILE_TYPES = {
    Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1,
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


@dataclass
class ConversionReport:
    """What `convert` wrote."""
    out_path: Path
    arch: str                       # GGUF architecture
    hf_arch: str
    qtype: str
    output_qtype: str
    n_tensors: int
    n_params: int
    file_size: int
    bits_per_weight: float          # file size * 8 / parameters, as llama.cpp reports BPW
    seconds: float
    mb_per_s: float                 # source (checkpoint) bytes processed per second
    tensor_types: dict[str, int] = field(default_factory=dict)
    lora_modules: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        return (f"wrote {self.out_path}: {self.file_size / 1e6:.1f} MB, {self.n_tensors} tensors ({types}), "
                f"{self.n_params / 1e6:.1f}M params, {self.bits_per_weight:.2f} bits/weight, "
                f"{self.seconds:.1f} s ({self.mb_per_s:.1f} MB/s)")


@dataclass
class PlannedTensor:
    name: str                        # GGUF name
    shape: tuple[int, ...]           # numpy order (rows, cols)
    qtype: GGMLQuantizationType
    source_bytes: int
    produce: Callable[[], np.ndarray]


def parse_qtype(name: str, what: str = "qtype", table: dict[str, GGMLQuantizationType] = QTYPES) -> GGMLQuantizationType:
    try:
        return table[name.lower()]
    except (KeyError, AttributeError):
        raise ConversionError(f"unknown {what} {name!r} (choose from {', '.join(table)})") from None


# --- hyper-parameters ---------------------------------------------------------------------------------

def _find(config: dict[str, Any], keys: tuple[str, ...], what: str, default: Any = None) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    if default is None:
        raise ConversionError(f"config.json has no {what} (looked for {', '.join(keys)})")
    return default


def read_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling parameters) from either transformers 5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` keys. The scaling dict is empty for plain RoPE."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = "longrope" if rope_type == "su" else rope_type   # Phi-3's first name for it, as transformers reads it
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(f"unsupported rope scaling type {rope_type!r} in config.json "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), {}
    params["rope_type"] = rope_type
    return float(theta), params


def read_hparams(config: dict[str, Any], spec: ArchSpec) -> HParams:
    keys = spec.hparam_keys
    n_embd = int(_find(config, keys["n_embd"], "hidden size"))
    n_head = int(_find(config, keys["n_head"], "attention head count"))
    head_dim_cfg = _find(config, keys["head_dim"], "head_dim", default=0)
    rope_theta, rope_scaling = read_rope(config)
    hp = HParams(
        n_vocab=int(_find(config, keys["n_vocab"], "vocab size")),
        n_embd=n_embd,
        n_layer=int(_find(config, keys["n_layer"], "layer count")),
        n_head=n_head,
        n_head_kv=int(_find(config, keys["n_head_kv"], "kv head count", default=n_head)),
        n_ff=int(_find(config, keys["n_ff"], "feed-forward size")),
        n_ctx=int(_find(config, keys["n_ctx"], "context length", default=2048)),
        head_dim=int(head_dim_cfg or n_embd // n_head),
        head_dim_explicit=bool(head_dim_cfg),
        norm_eps=float(_find(config, keys["norm_eps"], "norm epsilon", default=1e-5)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tied=bool(_find(config, keys["tied"], "tie_word_embeddings", default=False)),
    )
    spec.fix_hparams(config, hp)
    if hp.rope_scaling.get("rope_type") == "longrope":   # an architecture that takes it consumes it in fix_hparams
        raise ConversionError(f"config.json: rope scaling type 'longrope' is not supported for {spec.name} (only Phi-3)")
    if hp.n_head % hp.n_head_kv:
        raise ConversionError(f"config.json: num_attention_heads {hp.n_head} is not a multiple of "
                              f"num_key_value_heads {hp.n_head_kv}")
    return hp


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 RoPE scaling; llama.cpp stores them as `rope_freqs.weight`
    (same formula as convert_hf_to_gguf.py LlamaModel.generate_extra_tensors and HF
    _compute_llama3_parameters)."""
    p = hp.rope_scaling
    dim = hp.head_dim
    freqs = 1.0 / (np.float32(hp.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = p.get("factor", 8.0)
    low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.astype(np.float32):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# --- tensor plan --------------------------------------------------------------------------------------

class NameMap:
    """HF tensor name <-> GGUF tensor name for one architecture, over all its stacks."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        number = re.escape("{bid}")
        self.hf_res = [re.compile(re.escape(st.hf_prefix).replace(number, r"(\d+)") + r"(.+)") for st in spec.stacks]
        self.gguf_res = [re.compile(re.escape(st.gguf_prefix) + r"\.(\d+)\.(.+)") for st in spec.stacks]
        self.block_order = [{g: i for i, g in enumerate(st.tensors.values())} for st in spec.stacks]
        self.expert_res: list[tuple[re.Pattern, re.Pattern]] = []
        if spec.experts is not None:
            em = spec.experts
            kinds = "|".join(re.escape(k) for k in (*em.kinds, *em.fused))
            for st, order in zip(spec.stacks, self.block_order):
                experts = re.escape(st.hf_prefix).replace(number, r"(\d+)") + re.escape(em.prefix)
                # one expert's matrix (block, expert, kind), or a block's experts stacked (block, kind)
                self.expert_res.append((re.compile(experts + rf"(\d+)\.({kinds})\.weight"),
                                        re.compile(experts + rf"({kinds})(?:\.weight)?")))
                order.update({g: len(order) + i for i, g in enumerate(em.kinds.values())})

    def to_gguf(self, hf_name: str) -> tuple[str, int | None, StackMap | None] | None:
        """(GGUF name, block index, stack) of an HF tensor name; None if the architecture has no such tensor."""
        base, _, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            return None
        if base in self.spec.global_tensors:
            return f"{self.spec.global_tensors[base]}.{suffix}", None, None
        for stack, rx in zip(self.spec.stacks, self.hf_res):
            m = rx.fullmatch(base)
            if m and m.group(2) in stack.tensors:
                bid = int(m.group(1))
                return f"{stack.gguf_prefix}.{bid}.{stack.tensors[m.group(2)]}.{suffix}", bid, stack
        return None

    def expert(self, hf_name: str) -> tuple[int, int, int | None, str] | None:
        """(stack index, block index, expert index or None when stacked, HF kind) of an expert tensor."""
        for k, (one, stacked) in enumerate(self.expert_res):
            if m := one.fullmatch(hf_name):
                return k, int(m.group(1)), int(m.group(2)), m.group(3)
            if m := stacked.fullmatch(hf_name):
                return k, int(m.group(1)), None, m.group(2)
        return None

    def block(self, gguf_name: str) -> tuple[int, int, str] | None:
        """(stack index, block index, name inside the block) of a GGUF block tensor name."""
        for k, rx in enumerate(self.gguf_res):
            m = rx.fullmatch(gguf_name)
            if m:
                return k, int(m.group(1)), m.group(2)
        return None

    def to_hf(self, gguf_name: str) -> str:
        base, _, suffix = gguf_name.rpartition(".")
        for hf, g in self.spec.global_tensors.items():
            if g == base:
                return f"{hf}.{suffix}"
        k, bid, local = self.block(base)
        stack = self.spec.stacks[k]
        hf = next(h for h, g in stack.tensors.items() if g == local)
        return stack.hf_prefix.format(bid=bid) + f"{hf}.{suffix}"

    def sort_key(self, gguf_name: str) -> tuple:
        blk = self.block(gguf_name)
        if blk is not None:
            k, bid, local = blk
            name, _, suffix = local.rpartition(".")
            return (1 + k, bid, self.block_order[k].get(name, 99), suffix)
        return (0 if gguf_name.startswith("token_embd.") else 1 + len(self.spec.stacks), 0, 0, gguf_name)

    def shape_key(self, gguf_name: str) -> str:
        """The name as `ArchSpec.shapes` spells it: the block index as `{bid}`."""
        blk = self.block(gguf_name)
        if blk is None:
            return gguf_name
        k, _, local = blk
        return f"{self.spec.stacks[k].gguf_prefix}.{{bid}}.{local}"


def _stored_transposed(spec: ArchSpec, gguf_name: str, shape: tuple[int, ...]) -> bool:
    """Whether the checkpoint stores this 2-D weight as [in, out] (GPT-2's Conv1D), not [out, in]."""
    local = gguf_name.rpartition(".")[0].rpartition(".")[2]
    return len(shape) == 2 and gguf_name.endswith(".weight") and local in spec.transposed


def plan_tensors(spec: ArchSpec, hp: HParams, ckpt: Checkpoint, main: GGMLQuantizationType,
                 output: GGMLQuantizationType, lora: LoraAdapter | None, warnings: list[str],
                 quant_method: str = "rtn", imatrix: dict[str, np.ndarray] | None = None,
                 config: dict[str, Any] | None = None, preset: Preset | None = None,
                 output_override: bool = False) -> list[PlannedTensor]:
    names = NameMap(spec)
    shapes = spec.shapes(hp)
    found: dict[str, str] = {}                    # GGUF name -> HF name
    experts: dict[str, dict[int | None, tuple[str, str]]] = {}   # GGUF *_exps name -> {expert: (HF name, kind)}
    for hf_name, t in ckpt.tensors.items():
        if spec.ignored_suffixes and hf_name.endswith(spec.ignored_suffixes):
            continue
        name = spec.rename(hf_name, config)
        if name is None:
            continue
        if t.dtype in INTEGER_DTYPES:
            raise ConversionError(f"unsupported dtype {t.dtype} of tensor {hf_name} in {t.file.name} "
                                  "(supported: F32, F16, BF16)")
        if (hit := names.expert(name)) is not None:
            _add_expert(spec, hp, names, hit, hf_name, experts)
            continue
        mapped = names.to_gguf(name)
        if mapped is None:
            raise ConversionError(f"unexpected tensor {hf_name} in {t.file.name}: not part of a "
                                  f"{spec.hf_architectures[0]} checkpoint")
        gguf_name, bid, stack = mapped
        if stack is not None and bid >= getattr(hp, stack.n_layer):
            raise ConversionError(f"tensor {hf_name} is in block {bid} but config.json has "
                                  f"{getattr(hp, stack.n_layer)} blocks")
        if gguf_name == "output.weight" and hp.tied:
            continue                              # tied: the engine reuses token_embd
        if stack is not None and spec.block_required is not None:
            local = gguf_name[len(f"{stack.gguf_prefix}.{bid}."):].rpartition(".")[0]
            if local not in spec.block_required(hp, bid):
                raise ConversionError(f"unexpected tensor {hf_name} in {t.file.name}: block {bid} of this "
                                      f"{spec.hf_architectures[0]} has no {local} (see its config.json)")
        want = shapes.get(names.shape_key(gguf_name))
        if want is not None and _stored_transposed(spec, gguf_name, t.shape):
            want = tuple(want[::-1])
        if want is not None and t.shape != want:
            raise ConversionError(f"tensor {hf_name} has shape {list(t.shape)} but config.json implies {list(want)}")
        if gguf_name in found:
            raise ConversionError(f"tensors {found[gguf_name]} and {hf_name} both map to {gguf_name}")
        found[gguf_name] = hf_name

    if spec.required_globals is not None:
        required = list(spec.required_globals(hp))
    else:
        required = ["token_embd.weight", "output_norm.weight"] + ([] if hp.tied else ["output.weight"])
    stacked = _stack_experts(spec, hp, experts, ckpt)   # GGUF name -> its parts, checked
    for gguf_name, parts in stacked.items():
        found[gguf_name] = parts[0][0]
    for stack in spec.stacks:
        for bid in range(getattr(hp, stack.n_layer)):
            local = (stack.required(hp, bid) if stack.required else spec.block_required(hp, bid)
                     if spec.block_required else stack.tensors.values())
            required += [f"{stack.gguf_prefix}.{bid}.{g}.weight" for g in local]
            required += [f"{stack.gguf_prefix}.{bid}.{g}.bias" for g in spec.required_biases]
    for name in required:
        if name not in found:
            k, bid, local = names.block(name) or (0, 0, "")
            em = spec.experts
            kind = next((h for h, g in em.kinds.items() if local == f"{g}.weight"), None) if em else None
            if kind is not None:  # a kind of expert matrix, of no expert
                raise ConversionError(f"missing tensors {spec.stacks[k].hf_prefix.format(bid=bid)}{em.prefix}"
                                      f"{{0..{hp.extra[em.n_expert] - 1}}}.{kind}.weight in {ckpt.model_dir}")
            raise ConversionError(f"missing tensor {names.to_hf(name)} in {ckpt.model_dir}")

    # A fused checkpoint tensor written as several GGUF tensors (Baichuan's W_pack as attn_q/k/v): each part
    # takes its rows, in order, by the sizes `shapes` gives the parts.
    part_rows: dict[str, tuple[int, int]] = {}
    for gguf_name in list(found):
        blk = names.block(gguf_name)
        base, _, suffix = blk[2].rpartition(".") if blk else ("", "", "")
        if base not in spec.split_rows:
            continue
        k, bid, _ = blk
        hf_name, r0 = found.pop(gguf_name), 0
        for part in spec.split_rows[base]:
            n = shapes[f"{spec.stacks[k].gguf_prefix}.{{bid}}.{part}.{suffix}"][0]
            name = f"{spec.stacks[k].gguf_prefix}.{bid}.{part}.{suffix}"
            found[name], part_rows[name] = hf_name, (r0, r0 + n)
            r0 += n
    for gguf_name, skip in spec.skip_rows.items():
        if gguf_name in found:
            part_rows[gguf_name] = (skip, ckpt.tensors[found[gguf_name]].shape[0])

    if lora is not None:
        if spec.transposed:
            raise ConversionError(f"LoRA adapters are not supported for {spec.name} (its Conv1D weights are "
                                  "stored transposed)")
        lora.check(ckpt, set(found.values()) | {h for parts in stacked.values() for h, _ in parts})
    if imatrix is not None and stacked:
        warnings.append("expert tensors (*_exps) are quantized without the imatrix (it has no per-expert "
                        "statistics)")

    plan = []
    info = ModelInfo(n_layer=hp.n_layer, n_gqa=hp.n_head // hp.n_head_kv, tied="output.weight" not in found,
                     has_imatrix=imatrix is not None, n_expert=hp.extra.get("n_expert", 0))
    fallbacks: dict[str, int] = {}
    for gguf_name in sorted(found, key=names.sort_key):
        hf_name = found[gguf_name]
        src = ckpt.tensors[hf_name]
        transpose = _stored_transposed(spec, gguf_name, src.shape)
        shape = tuple(src.shape[::-1]) if transpose else tuple(src.shape)
        parts = stacked.get(gguf_name)
        if parts is not None:
            shape = shapes[names.shape_key(gguf_name)]
        rows = part_rows.get(gguf_name)
        if rows is not None:
            shape = (rows[1] - rows[0],) + shape[1:]
        flatten = gguf_name in spec.one_d
        if flatten:
            shape = (int(np.prod(shape)),)
        is_output = gguf_name in ("token_embd.weight", "output.weight")
        if len(shape) == 1 or gguf_name in spec.float_tensors or gguf_name.endswith(".ffn_gate_inp.weight"):
            qtype = Q.F32                         # llama.cpp keeps MoE routers (ffn_gate_inp) F32 too
        elif preset is not None and not (is_output and output_override):
            qtype = tensor_type(preset, gguf_name, shape, info) or Q.F16
            wanted = mixed_type(preset, gguf_name, shape[-1], info)
            if qtype != wanted:
                key = f"{wanted.name}->{qtype.name}"
                fallbacks[key] = fallbacks.get(key, 0) + 1
        elif is_output:
            qtype = fallback(output, shape[-1]) if preset is not None else output
        else:
            qtype = main
        if quants.is_quantized(qtype) and not quants.can_quantize(shape, qtype):
            warnings.append(f"{gguf_name}: {shape[-1]} columns is not a multiple of the {qtype.name} block "
                            f"size, stored as F16")
            qtype = Q.F16
        base = gguf_name.rpartition(".")[0]
        n_rot_heads = hp.n_head if base.endswith("attn_q") else hp.n_head_kv if base.endswith("attn_k") else 0
        permute = n_rot_heads if spec.permute_qk else 0
        transform = spec.row_transforms.get(base.rpartition(".")[2])

        def produce(hf_name=hf_name, qtype=qtype, permute=permute, transform=transform,
                    transpose=transpose, parts=parts, rows=rows, flatten=flatten) -> np.ndarray:
            if parts is not None:  # experts: stacked, each merged with its LoRA; no imatrix
                x = _load_experts(ckpt, parts, lora)
                return quants.quantize(x, qtype, quant_method, None)
            x = ckpt.load(hf_name)
            if transpose:
                x = np.ascontiguousarray(x.T)
            if lora is not None:
                x = lora.merge(hf_name, x)
            if rows is not None:
                x = np.ascontiguousarray(x[rows[0]:rows[1]])
            if flatten:
                x = x.reshape(-1)
            if permute:
                x = permute_rope_rows(x, permute)
            if transform is not None:
                x = transform(x, hp)
            # the permutation moves rows (output channels) only: the per-column importance still applies
            importance = imatrix.get(hf_name) if imatrix and not transpose else None
            return quants.quantize(x, qtype, quant_method, importance)

        if parts is not None:
            source_bytes = sum(ckpt.tensors[h].nbytes for h, _ in parts)
        else:
            source_bytes = src.nbytes if rows is None else src.nbytes * (rows[1] - rows[0]) // src.shape[0]
        plan.append(PlannedTensor(gguf_name, shape, qtype, source_bytes, produce))

    if fallbacks:
        what = ", ".join(f"{n} {k}" for k, n in sorted(fallbacks.items()))
        warnings.append(f"rows not a multiple of 256: tensors fell back to 32-element types as llama.cpp does ({what})")
    if hp.rope_scaling.get("rope_type") == "llama3":
        factors = llama3_rope_factors(hp)
        plan.append(PlannedTensor("rope_freqs.weight", factors.shape, Q.F32, 0, lambda: factors))
    for name, values in spec.extra_tensors(hp).items():
        plan.append(PlannedTensor(name, values.shape, Q.F32, 0, lambda values=values: values))
    return plan


def _add_expert(spec: ArchSpec, hp: HParams, names: NameMap, hit: tuple[int, int, int | None, str], hf_name: str,
                experts: dict[str, dict[int | None, tuple[str, str]]]) -> None:
    """Files one expert tensor (or a block's stacked ones) under the GGUF *_exps name(s) it goes into."""
    k, bid, xid, kind = hit
    stack, em = spec.stacks[k], spec.experts
    n_layer, n_expert = getattr(hp, stack.n_layer), hp.extra[em.n_expert]
    if bid >= n_layer:
        raise ConversionError(f"tensor {hf_name} is in block {bid} but config.json has {n_layer} blocks")
    if spec.block_required is not None and em.kinds[(em.fused.get(kind) or (kind,))[0]] not in spec.block_required(hp, bid):
        raise ConversionError(f"unexpected tensor {hf_name}: block {bid} is a dense block (config.json "
                              "mlp_only_layers / decoder_sparse_step), it has no experts")
    if xid is not None and xid >= n_expert:
        raise ConversionError(f"tensor {hf_name} is expert {xid} but config.json has {n_expert} experts")
    for part in em.fused.get(kind) or (kind,):
        gguf_name = f"{stack.gguf_prefix}.{bid}.{em.kinds[part]}.weight"
        have = experts.setdefault(gguf_name, {})
        if xid in have or (have and (xid is None) != (None in have)):
            other = have.get(xid, next(iter(have.values())))[0]
            raise ConversionError(f"tensors {other} and {hf_name} both hold experts of {gguf_name}")
        have[xid] = (hf_name, kind)


def _stack_experts(spec: ArchSpec, hp: HParams, experts: dict[str, dict[int | None, tuple[str, str]]],
                   ckpt: Checkpoint) -> dict[str, list[tuple[str, slice | None]]]:
    """For each *_exps tensor, where its rows come from: one (HF name, None) per expert, in expert order, or
    one (HF name, rows of dim 1) when the checkpoint stacks them already; shapes checked against config.json."""
    if spec.experts is None:
        return {}
    shapes, names, em = spec.shapes(hp), NameMap(spec), spec.experts
    out: dict[str, list[tuple[str, slice | None]]] = {}
    for gguf_name, have in experts.items():
        want = shapes[names.shape_key(gguf_name)]          # (n_expert, rows, cols)
        if None in have:
            hf_name, kind = have[None]
            parts = em.fused.get(kind) or (kind,)
            part = next(i for i, p in enumerate(parts) if gguf_name.endswith(f".{em.kinds[p]}.weight"))
            full = (want[0], want[1] * len(parts), want[2])
            if ckpt.tensors[hf_name].shape != full:
                raise ConversionError(f"tensor {hf_name} has shape {list(ckpt.tensors[hf_name].shape)} but "
                                      f"config.json implies {list(full)}")
            out[gguf_name] = [(hf_name, slice(part * want[1], (part + 1) * want[1]))]
            continue
        for xid in range(want[0]):
            if xid not in have:
                example = next(iter(have.values()))[0]
                missing = re.sub(r"\.\d+\.([^.]+\.weight)$", rf".{xid}.\1", example)
                raise ConversionError(f"missing tensor {missing} in {ckpt.model_dir} ({want[0]} experts)")
            hf_name = have[xid][0]
            if ckpt.tensors[hf_name].shape != want[1:]:
                raise ConversionError(f"tensor {hf_name} has shape {list(ckpt.tensors[hf_name].shape)} but "
                                      f"config.json implies {list(want[1:])}")
        out[gguf_name] = [(have[xid][0], None) for xid in range(want[0])]
    return out


def _load_experts(ckpt: Checkpoint, parts: list[tuple[str, slice | None]], lora: LoraAdapter | None) -> np.ndarray:
    if len(parts) == 1 and parts[0][1] is not None:
        hf_name, rows = parts[0]
        return np.ascontiguousarray(ckpt.load(hf_name)[:, rows])
    mats = []
    for hf_name, _ in parts:
        x = ckpt.load(hf_name)
        mats.append(lora.merge(hf_name, x) if lora is not None else x)
    return np.stack(mats)


# --- metadata -----------------------------------------------------------------------------------------

def write_hparams(w: GGUFWriter, hp: HParams, spec: ArchSpec) -> None:
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    if spec.norm == "layer":
        w.add_layer_norm_eps(hp.norm_eps)
    else:
        w.add_layer_norm_rms_eps(hp.norm_eps)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_rope_dimension_count(hp.n_rot or hp.head_dim)
    if hp.residual_scale:
        w.add_float32(f"{spec.name}.residual_scale", hp.residual_scale)
    if hp.head_dim_explicit:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    p = hp.rope_scaling
    if p.get("rope_type") == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(p["factor"])
    elif p.get("rope_type") == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(p["factor"])
        w.add_rope_scaling_orig_ctx_len(p.get("original_max_position_embeddings", hp.n_ctx))
        if p.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(p["extrapolation_factor"])
        if p.get("attention_factor", p.get("attn_factor")) is not None:
            w.add_rope_scaling_yarn_attn_factor(p.get("attention_factor", p.get("attn_factor")))
        if p.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(p["beta_fast"])
        if p.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(p["beta_slow"])
    # llama3: no keys, the scaling is the rope_freqs.weight tensor (as llama.cpp does)


def write_generation_config(w: GGUFWriter, gen: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
    """`gen`: generation_config.json ({} without one); `settings`: what transformers' generate starts from
    (arch.generation_settings: that file, else config.json), for the forced tokens."""
    for key in ("forced_bos_token_id", "forced_eos_token_id"):
        value = (settings or gen).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            w.add_uint32(f"pyengine.generation.{key}", value)
    for key in ("min_length", "min_new_tokens"):  # 0 / None are transformers' defaults: nothing to store
        value = (settings or gen).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            w.add_uint32(f"pyengine.generation.{key}", value)
    if gen.get("do_sample") is False:
        w.add_sampling_temp(0.0)
    elif isinstance(gen.get("temperature"), (int, float)):
        w.add_sampling_temp(float(gen["temperature"]))
    if isinstance(gen.get("top_k"), int):
        w.add_sampling_top_k(gen["top_k"])
    if isinstance(gen.get("top_p"), (int, float)):
        w.add_sampling_top_p(float(gen["top_p"]))
    if isinstance(gen.get("min_p"), (int, float)):
        w.add_sampling_min_p(float(gen["min_p"]))
    if isinstance(gen.get("repetition_penalty"), (int, float)):
        w.add_sampling_penalty_repeat(float(gen["repetition_penalty"]))
    eos = gen.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    if isinstance(eos, list) and eos and all(isinstance(i, int) for i in eos):
        w.add_array("pyengine.generation.eos_token_ids", eos)


# --- entry point --------------------------------------------------------------------------------------

def convert(model_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "q4_0",
            lora: str | os.PathLike | None = None, output_qtype: str | None = None,
            vocab_only: bool = False, *, progress: bool = False, quant_method: str | None = None,
            calibration: str | os.PathLike | None = None,
            ptuning: str | os.PathLike | None = None) -> ConversionReport:
    """Convert an HF checkpoint folder to a GGUF file.

    qtype: type of the 2-D weights (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1), or one of llama.cpp's
        K-quant presets (q2_k, q3_k_m, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k) that choose a type per tensor
        as llama-quantize does (presets.py); 1-D tensors are always F32.
    output_qtype: type of token_embd and output (default q8_0 for q4_*/q5_* files, the preset's choice
        for K presets, else `qtype`).
    lora: a PEFT LoRA adapter folder, merged into the weights before quantization.
    vocab_only: write the metadata and tokenizer only.
    progress: draw a progress bar on stderr.
    quant_method: "rtn" (ggml's reference rounding, byte-equal to gguf.quants, llama-quantize's choice
        without an imatrix) or "search" (per-block error-minimising scale search, Q4_0/Q4_1 only; see
        quants.py). Default: "search" with a calibration text and a single type, else "rtn".
    calibration: a text file; the model is run on it (torch) to weight the quantizers' squared error by
        each input channel's mean squared activation (imatrix.py): the numpy search for q4_0/q4_1, ggml's
        importance-weighted quantizers (llama-quantize --imatrix) for K presets.
    ptuning: a THUDM P-Tuning v2 checkpoint of a ChatGLM2/3 / GLM-4 model (its folder, or the
        pytorch_model.bin / model.safetensors holding transformer.prefix_encoder.*): the prefix
        encoder is run here and its past keys and values stored per layer (ptuning.py); every sequence
        then starts from them.
    Raises ConversionError (and leaves no file at out_path) on bad input.
    """
    start = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not isinstance(qtype, str) or (qtype.lower() not in QTYPES and qtype.lower() not in K_PRESETS):
        raise ConversionError(f"unknown qtype {qtype!r} (choose from {', '.join(QTYPE_CHOICES)})")
    preset = PRESETS[qtype.lower()] if qtype.lower() in K_PRESETS else None
    main_type = preset.base if preset is not None else parse_qtype(qtype)
    if quant_method is None:
        quant_method = "search" if calibration is not None and preset is None else "rtn"
    if quant_method not in quants.QUANT_METHODS:
        raise ConversionError(f"unknown quantization method {quant_method!r} "
                              f"(choose from {', '.join(quants.QUANT_METHODS)})")
    if calibration is not None and quant_method != "search" and preset is None:
        raise ConversionError("a calibration text only weights the scale search: use quant_method='search'")
    out_type = (parse_qtype(output_qtype, "output qtype", OUTPUT_QTYPES) if output_qtype is not None
                else Q.Q8_0 if main_type in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1) else main_type)
    if not model_dir.is_dir():
        raise ConversionError(f"model folder not found: {model_dir}")
    if out_path.is_dir():
        raise ConversionError(f"output path is a folder: {out_path}")
    if not out_path.parent.resolve().is_dir():
        raise ConversionError(f"output folder does not exist: {out_path.parent}")

    config = _read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        raise ConversionError(f"cannot read {model_dir / 'config.json'}: not a JSON object")
    hf_arch = (config.get("architectures") or ["<none>"])[0]
    spec = find_arch(hf_arch, config)
    if spec is None:
        raise ConversionError(f"unsupported architecture {hf_arch} in {model_dir / 'config.json'} "
                              f"(supported: {', '.join(supported_architectures())})")
    if calibration is not None and not spec.decoder:
        raise ConversionError(f"{model_dir}: a calibration text is run through a causal LM; an encoder "
                              f"({hf_arch}) cannot be calibrated")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ConversionError(f"{model_dir / 'config.json'}: already-quantized checkpoints ({method}) are not "
                              "supported; convert the unquantized model")
    hp = read_hparams(config, spec)
    vocab = load_vocab(model_dir, hp.n_vocab, config, spec.tokenizers)
    if spec.add_bos is not None:
        vocab.add_bos = spec.add_bos
    gen_path = model_dir / "generation_config.json"
    gen_config = _read_json(gen_path) if gen_path.is_file() else {}

    warnings: list[str] = []
    ckpt = adapter = None
    plan: list[PlannedTensor] = []
    if not vocab_only:
        ckpt = Checkpoint(model_dir)
        if config.get("quantization_bit"):
            ckpt = DequantizedCheckpoint(ckpt, config["quantization_bit"])
        elif any(t.dtype == "I8" for t in ckpt.tensors.values()):
            name = next(n for n, t in ckpt.tensors.items() if t.dtype == "I8")
            raise ConversionError(f"tensor {name} is int8 but {model_dir / 'config.json'} names no quantization "
                                  "(only THUDM's quantization_bit checkpoints may hold int8 weights)")
        if lora is not None:
            adapter = LoraAdapter(Path(lora), spec)
        imatrix = None
        if calibration is not None and (preset is not None or quants.SEARCH_QUANTIZERS.keys() & {main_type, out_type}):
            from .imatrix import collect_imatrix, load_calibration_text

            imatrix = collect_imatrix(model_dir, load_calibration_text(calibration), progress=progress)
            if adapter is not None:
                warnings.append("calibration statistics come from the model without the LoRA adapter")
        plan = plan_tensors(spec, hp, ckpt, main_type, out_type, adapter, warnings, quant_method, imatrix, config,
                            preset=preset, output_override=output_qtype is not None)
    prefix = None
    if ptuning is not None:
        if spec.name != "chatglm" or spec.stacks[0].hf_prefix != "transformer.encoder.layers.{bid}.":
            raise ConversionError(f"--ptuning: P-Tuning v2 prefixes are for THUDM's ChatGLM2/3 and GLM-4 "
                                  f"checkpoints (ChatGLMModel), not {hf_arch}")
        if vocab_only:
            raise ConversionError("--ptuning with --vocab-only: a vocabulary file has no layers to hold a prefix")
        from .ptuning import load_prefix

        prefix = load_prefix(ptuning, hp)
        for layer in range(hp.n_layer):
            for kind, part in (("k", 0), ("v", 1)):
                data = np.ascontiguousarray(prefix[:, layer, part])
                plan.append(PlannedTensor(f"blk.{layer}.prefix_{kind}", data.shape, Q.F32, 0,
                                          lambda data=data: data))
    # Mistral's sliding window: each token attends to the last `window` positions (itself included), as
    # transformers does; stored under gguf-py's {arch}.attention.sliding_window, which the engine honours.
    window = config.get("sliding_window")
    if not (isinstance(window, int) and 0 < window < hp.n_ctx and config.get("use_sliding_window", True)):
        window = None

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
        os.close(fd)
    except OSError as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from None
    tmp = Path(tmp_name)
    bar = Progress(sum(t.source_bytes for t in plan), len(plan), enabled=progress and bool(plan))
    w = GGUFWriter(tmp, spec.name)
    try:
        w.add_type("model")
        w.add_name(model_dir.resolve().name)
        w.add_file_type(preset.file_type if preset is not None else FILE_TYPES[main_type])
        w.add_quantization_version(GGML_QUANT_VERSION)
        if spec.write_hparams is not None:
            spec.write_hparams(w, hp, spec, model_dir, config, warnings)
        else:
            write_hparams(w, hp, spec)
        if window is not None:
            w.add_sliding_window(window)
        if prefix is not None:
            w.add_uint32(f"{spec.name}.prefix_length", prefix.shape[0])
        write_generation_config(w, gen_config, generation_settings(model_dir, config))
        write_vocab(w, vocab)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), quants.nbytes(t.qtype, t.shape), raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            w.write_tensor_data(t.produce())
            bar.update(t.name, t.source_bytes)
        w.close()
        bar.close()
        os.replace(tmp, out_path)
    except OSError as e:
        raise ConversionError(f"cannot write {out_path}: {e}") from None
    finally:
        w.close()
        if ckpt is not None:
            ckpt.close()
        tmp.unlink(missing_ok=True)

    seconds = time.perf_counter() - start
    n_params = int(sum(np.prod(t.shape) for t in plan))
    size = out_path.stat().st_size
    types: dict[str, int] = {}
    for t in plan:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    return ConversionReport(
        out_path=out_path, arch=spec.name, hf_arch=hf_arch, qtype=preset.name.upper() if preset else main_type.name, output_qtype=out_type.name,
        n_tensors=len(plan), n_params=n_params, file_size=size,
        bits_per_weight=size * 8 / n_params if n_params else 0.0, seconds=seconds,
        mb_per_s=sum(t.source_bytes for t in plan) / 1e6 / max(seconds, 1e-9), tensor_types=types,
        lora_modules=adapter.n_modules if adapter else 0, warnings=warnings)
