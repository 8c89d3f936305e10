"""Merging a PEFT LoRA adapter into the base weights before quantization.

For each adapted module W' = W + s * B @ A, with s = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA
(`use_rslora`), as peft's `merge_and_unload()` does; embeddings use (B @ A)^T. Full tensors the adapter
saves (`modules_to_save`, `base_layer` copies of targeted embeddings, trained biases) replace the base ones.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arch import ArchSpec
from .errors import ConversionError
from .source import Checkpoint, _read_json

PREFIX = "base_model.model."


@dataclass
class LoraModule:
    a: str                 # adapter tensor names
    b: str
    embedding: bool
    scale: float = 0.0


class LoraAdapter:
    def __init__(self, adapter_dir: Path, spec: ArchSpec):
        self.dir = adapter_dir
        if not adapter_dir.is_dir():
            raise ConversionError(f"LoRA adapter folder not found: {adapter_dir}")
        cfg: dict[str, Any] = _read_json(adapter_dir / "adapter_config.json")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ConversionError(f"{adapter_dir / 'adapter_config.json'}: peft_type {cfg.get('peft_type')} is "
                                  "not supported (only LORA)")
        for key in ("use_dora", "lora_bias", "layer_replication", "target_parameters"):
            if cfg.get(key):
                raise ConversionError(f"{adapter_dir / 'adapter_config.json'}: {key} is not supported")
        self.alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
        self.rslora = bool(cfg.get("use_rslora", False))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}

        files = [p for p in (adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin") if p.is_file()]
        if not files:
            raise ConversionError(f"no adapter weights in {adapter_dir}: expected adapter_model.safetensors "
                                  "or adapter_model.bin")
        self.weights = Checkpoint(adapter_dir, files[:1])
        self.modules: dict[str, LoraModule] = {}      # base tensor name -> low-rank pair
        self.replaced: dict[str, str] = {}            # base tensor name -> adapter tensor name
        self._parse_names()
        self.n_modules = len(self.modules)

    def _alpha_for(self, module: str) -> float:
        for pattern, alpha in self.alpha_pattern.items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return float(alpha)
        return self.alpha

    def _parse_names(self) -> None:
        pairs: dict[str, dict[str, str]] = {}
        for name in self.weights.tensors:
            short = name[len(PREFIX):] if name.startswith(PREFIX) else name
            if m := re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", short):
                pairs.setdefault(m.group(1), {})[m.group(2)] = name
            elif m := re.fullmatch(r"(.+)\.lora_embedding_([AB])(?:\.[^.]+)?", short):
                pairs.setdefault(m.group(1), {})["emb" + m.group(2)] = name
            elif m := re.fullmatch(r"(.+)\.(?:base_layer|modules_to_save\.[^.]+)\.(weight|bias)", short):
                self.replaced[f"{m.group(1)}.{m.group(2)}"] = name
            elif "lora_magnitude_vector" in short:
                raise ConversionError(f"LoRA adapter {self.dir} is DoRA ({short}); not supported")
            elif short.endswith((".weight", ".bias")):
                self.replaced[short] = name
            else:
                raise ConversionError(f"LoRA adapter {self.dir}: unknown tensor {name}")
        for module, p in pairs.items():
            if {"A", "B"} <= p.keys():
                lm = LoraModule(p["A"], p["B"], embedding=False)
            elif {"embA", "embB"} <= p.keys():
                lm = LoraModule(p["embA"], p["embB"], embedding=True)
            else:
                raise ConversionError(f"LoRA adapter {self.dir}: {module} has only one of lora_A/lora_B")
            r = self.weights.tensors[lm.a].shape[0]
            alpha = self._alpha_for(module)
            lm.scale = alpha / math.sqrt(r) if self.rslora else alpha / r
            self.modules[f"{module}.weight"] = lm

    def check(self, base: Checkpoint, used: set[str]) -> None:
        """Every adapted or replaced tensor must exist in the base model with a matching shape."""
        for name, lm in self.modules.items():
            if name not in used:
                raise ConversionError(f"LoRA adapter does not fit: it adapts {name}, which the base model "
                                      f"in {base.model_dir} does not have")
            a, b = self.weights.tensors[lm.a].shape, self.weights.tensors[lm.b].shape
            w = base.tensors[name].shape
            if lm.embedding:
                fits = len(a) == 2 and len(b) == 2 and a[0] == b[1] and (a[1], b[0]) == w
            else:
                got = (b[0], a[1]) if not self.fan_in_fan_out else (a[1], b[0])
                fits = len(a) == 2 and len(b) == 2 and a[0] == b[1] and got == w
            if not fits:
                raise ConversionError(f"LoRA adapter does not fit: {name} is {list(w)} in the base model but "
                                      f"lora_A is {list(a)} and lora_B is {list(b)}")
        for name, src in self.replaced.items():
            if name not in used:
                raise ConversionError(f"LoRA adapter does not fit: it replaces {name}, which the base model "
                                      f"in {base.model_dir} does not have")
            if self.weights.tensors[src].shape != base.tensors[name].shape:
                raise ConversionError(f"LoRA adapter does not fit: {name} is {list(base.tensors[name].shape)} in "
                                      f"the base model but {list(self.weights.tensors[src].shape)} in the adapter")

    def merge(self, name: str, w: np.ndarray) -> np.ndarray:
        """The base tensor `name` (float32) with the adapter applied."""
        if name in self.replaced:
            w = self.weights.load(self.replaced[name])
        lm = self.modules.get(name)
        if lm is None:
            return w
        a, b = self.weights.load(lm.a), self.weights.load(lm.b)
        delta = b @ a
        if lm.embedding or self.fan_in_fan_out:
            delta = delta.T
        w += np.float32(lm.scale) * delta
        return w
