"""Activation statistics for weighted quantization: per-input-channel mean squared activations of every
linear layer, from running the unquantized HF model on a calibration text.

Why mean squares: a linear layer's output error from a weight error dW is dW @ x; its expected square,
with input channels treated as uncorrelated, is sum_j dW_ij^2 E[x_j^2]. Weighting each weight's squared
quantization error by E[x_j^2] of its input channel therefore targets the output error, not the weight
error. This is llama.cpp's importance matrix (tools/imatrix: sum of x^2 per column over the calibration
tokens) and the statistic AWQ's scaling is built on.

The model runs in torch (transformers), float32, on CPU, in chunks of `n_ctx` tokens with forward hooks
on every `torch.nn.Linear`. Keys are the HF weight names ("model.layers.0.mlp.up_proj.weight").
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ConversionError
from .progress import Progress


def collect_imatrix(model_dir: str | os.PathLike, text: str, n_ctx: int = 512,
                    max_tokens: int = 16384, progress: bool = False) -> dict[str, np.ndarray]:
    """Mean squared input activation per column (float32 (in_features,)) of each linear layer's weight,
    over at most ``max_tokens`` tokens of ``text`` evaluated in chunks of ``n_ctx``; ``progress``: a bar
    over the chunks on stderr."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConversionError(f"--calibration needs torch and transformers: {e}") from None
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    if ids.numel() < 2:
        raise ConversionError("calibration text is empty (fewer than 2 tokens)")

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def accumulate(module, inputs, output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_hook(hook(f"{name}.weight"))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    starts = range(0, ids.numel(), n_ctx)
    bar = Progress(int(ids.numel()), len(starts), enabled=progress, unit="tokens", scale=1)
    try:
        with torch.no_grad():
            for start in starts:
                chunk = ids[start:start + n_ctx]
                if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
                    chunk = torch.cat([torch.tensor([tok.bos_token_id]), chunk[:-1]])
                model(chunk[None])
                bar.update("calibration", int(chunk.numel()))
        bar.close()
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def load_calibration_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"calibration file not found: {p}")
    return p.read_text(encoding="utf-8", errors="replace")
