"""THUDM's pre-quantized ChatGLM checkpoints (config.json `quantization_bit` 4 or 8), read as float.

THUDM's quantization.py stores each quantized weight as int8 with one float16 scale per output row
(`<name>.weight_scale` = max |w| of the row / 127 or / 7); at 4 bits two values share a byte, the
even column in the high nibble and the odd one in the low nibble, both signed (the
int4WeightCompression kernel of cpm_kernels). Dequantizing gives back exactly the weights THUDM's
model computes with, which the converter then quantizes like any float checkpoint.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .errors import ConversionError
from .source import Checkpoint, SourceTensor

SCALE_SUFFIX = "_scale"   # weight "x.weight" has its scales in "x.weight_scale"


def dequantize(q: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes (`bits` 8) or packed signed nibbles (`bits` 4) times the per-row scale, as float32."""
    q = q.astype(np.int8)
    if bits == 4:
        codes = np.empty((q.shape[0], 2 * q.shape[1]), np.int8)
        codes[:, 0::2] = q >> 4                          # arithmetic shift keeps the sign
        codes[:, 1::2] = np.left_shift(q, 4) >> 4        # low nibble, sign-extended
        q = codes
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


class DequantizedCheckpoint:
    """A Checkpoint whose THUDM-quantized weights read as float32 of their full shape; the
    `.weight_scale` tensors are consumed and hidden."""

    def __init__(self, ckpt: Checkpoint, bits: int):
        if bits not in (4, 8):
            raise ConversionError(f"{ckpt.model_dir / 'config.json'}: quantization_bit={bits} is not one of "
                                  "THUDM's formats (4 or 8)")
        self.ckpt, self.bits, self.model_dir = ckpt, bits, ckpt.model_dir
        self.tensors: dict[str, SourceTensor] = {}
        self._scales: dict[str, str] = {}
        for name, t in ckpt.tensors.items():
            if name.endswith(".weight" + SCALE_SUFFIX):
                if name.removesuffix(SCALE_SUFFIX) not in ckpt.tensors:
                    raise ConversionError(f"tensor {name} in {t.file.name} scales no weight "
                                          f"({name.removesuffix(SCALE_SUFFIX)} is missing)")
                continue
            scale = ckpt.tensors.get(name + SCALE_SUFFIX)
            if scale is None:
                if t.dtype == "I8":
                    raise ConversionError(f"int8 tensor {name} in {t.file.name} has no {name + SCALE_SUFFIX}")
                self.tensors[name] = t
                continue
            if t.dtype != "I8" or len(t.shape) != 2 or scale.shape != (t.shape[0],):
                raise ConversionError(f"tensor {name} ({t.dtype}, shape {list(t.shape)}) with scales of shape "
                                      f"{list(scale.shape)} in {t.file.name} is not a THUDM {bits}-bit weight")
            self._scales[name] = scale.name
            cols = t.shape[1] * (8 // bits)
            self.tensors[name] = replace(t, shape=(t.shape[0], cols))
        if not self._scales:
            raise ConversionError(f"{self.model_dir / 'config.json'} says quantization_bit={bits} but no tensor "
                                  "has a weight_scale")

    def load(self, name: str) -> np.ndarray:
        if name in self._scales:
            return dequantize(self.ckpt.load(name), self.ckpt.load(self._scales[name]), self.bits)
        return self.ckpt.load(name)

    def close(self) -> None:
        self.ckpt.close()
