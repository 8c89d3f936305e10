"""References for Baichuan, which transformers does not ship (the hub's checkpoints run remote code):

- 7B (RoPE): transformers' LlamaForCausalLM with the W_pack rows split into q_proj / k_proj / v_proj
  (Baichuan-7B's attention is Llama's: rotate-half RoPE, base 10000, then softmax(q k^T / sqrt(d)) v).
- 13B (ALiBi): a torch forward written from Baichuan-13B's published modeling_baichuan.py: no RoPE, and
  the attention scores get the mask of _gen_alibi_mask, slope_h * (key position) plus -inf above the
  diagonal, with the slopes of _get_interleave.
- Baichuan 2's NormHead: the lm_head rows divided by their L2 norm (F.normalize) before use.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def get_interleave(n: int) -> list[float]:
    """ALiBi slopes as Baichuan's (and BLOOM's) _get_interleave: for a power of two n, the geometric
    sequence 2^(-8/n), 2^(-16/n), ...; otherwise those of the largest power of two below n, then every
    other slope of twice that power, until there are n."""
    def power_of_2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + get_interleave(2 * closest)[0::2][:n - closest]


def _state(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config, {k: v.float() for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}


def _lm_head(config: dict, state: dict[str, torch.Tensor], norm_head: bool | None) -> torch.Tensor:
    w = state["lm_head.weight"]
    if norm_head if norm_head is not None else "z_loss_weight" in config:
        w = torch.nn.functional.normalize(w)
    return w


def llama_reference(model_dir: Path, norm_head: bool | None = None) -> torch.nn.Module:
    """transformers' LlamaForCausalLM holding a 7B-style Baichuan checkpoint (W_pack split), lm_head
    normalised for Baichuan 2 (norm_head None: as the config says)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config, state = _state(model_dir)
    n_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config["intermediate_size"],
        num_hidden_layers=n_layers, num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_attention_heads"], rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config.get("max_position_embeddings", 4096), rope_theta=10000.0,
        tie_word_embeddings=False)).eval()
    sd = {}
    for name, t in state.items():
        if ".W_pack." in name:
            prefix = name.split(".self_attn.")[0]
            for part, rows in zip("qkv", t.split(hidden)):
                sd[f"{prefix}.self_attn.{part}_proj.weight"] = rows
        else:
            sd[name] = t
    sd["lm_head.weight"] = _lm_head(config, state, norm_head)
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return llama


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def alibi_reference(model_dir: Path, ids: list[int], alibi: bool = True, norm_head: bool | None = None) -> torch.Tensor:
    """Logits [len(ids), vocab] of Baichuan-13B's forward (float32); alibi=False drops the ALiBi bias
    (to show that it matters)."""
    config, sd = _state(model_dir)
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    hd, eps, n = hidden // n_head, config["rms_norm_eps"], len(ids)
    mask = torch.triu(torch.full((n, n), float("-inf")), 1)[None]          # [1, n, n]
    if alibi:
        slopes = torch.tensor(get_interleave(n_head))
        mask = mask + slopes[:, None, None] * torch.arange(n, dtype=torch.float32)[None, None, :]  # [h, n, n]
    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    with torch.no_grad():
        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = _rms_norm(x, sd[p + "input_layernorm.weight"], eps)
            q, k, v = (h @ sd[p + "self_attn.W_pack.weight"].T).split(hidden, dim=-1)
            q, k, v = (t.view(n, n_head, hd).transpose(0, 1) for t in (q, k, v))   # [h, n, hd]
            scores = q @ k.transpose(1, 2) / math.sqrt(hd) + mask
            scores = torch.max(scores, torch.tensor(torch.finfo(scores.dtype).min))
            attn = torch.softmax(scores, dim=-1) @ v                                 # [h, n, hd]
            x = x + attn.transpose(0, 1).reshape(n, hidden) @ sd[p + "self_attn.o_proj.weight"].T
            h = _rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
            gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
        x = _rms_norm(x, sd["model.norm.weight"], eps)
        return x @ _lm_head(config, sd, norm_head).T
