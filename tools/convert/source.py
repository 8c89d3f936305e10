"""Reading HF checkpoints one tensor at a time: safetensors (single or sharded) and pytorch_model.bin
(single or sharded, loaded with torch.load(weights_only=True, mmap=True), never a plain unpickle).

safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and
each tensor is memory-mapped on demand, so reading a tensor costs its size and nothing stays resident.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError

# dtypes a source tensor may have, and their element size
# I8: THUDM's quantized weights; I32/I64: buffers such as BERT's embeddings.position_ids, which the
# architectures leave out (a weight of an integer type is refused by the converter's plan)
SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "I32": 4, "I64": 8}
INTEGER_DTYPES = ("I32", "I64")


@dataclass
class SourceTensor:
    """One tensor of the checkpoint, not yet read."""
    name: str
    shape: tuple[int, ...]
    dtype: str            # "F32", "F16", "BF16", "F64", "I8", "I32" or "I64"
    file: Path
    offset: int = 0       # safetensors: absolute byte offset of the data in `file`

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * SAFETENSORS_DTYPES[self.dtype]


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    wide = bits.astype(np.uint32)
    wide <<= np.uint32(16)          # in place: one float32-sized buffer, not two
    return wide.view(np.float32)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"missing file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def _safetensors_header(path: Path) -> dict[str, SourceTensor]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"cannot read {path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ConversionError(f"cannot read {path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ConversionError(f"missing file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    base = 8 + n
    tensors: dict[str, SourceTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"unsupported dtype {dtype} of tensor {name} in {path.name} "
                                  f"(supported: F32, F16, BF16)")
        begin, end = info["data_offsets"]
        t = SourceTensor(name, tuple(int(d) for d in info["shape"]), dtype, path, base + begin)
        if end - begin != t.nbytes or base + end > size:
            raise ConversionError(f"cannot read {path}: tensor {name} has a bad data range (file truncated?)")
        tensors[name] = t
    return tensors


_TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
                 "torch.int8": "I8", "torch.int32": "I32", "torch.int64": "I64"}


def _torch_load(path: Path) -> tuple[dict[str, Any], bool]:
    """(state dict, whether it is memory-mapped)."""
    import torch

    mmapped = True
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files from torch < 1.6 (not zip) cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            mmapped = False
    except FileNotFoundError:
        raise ConversionError(f"missing file: {path}") from None
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise ConversionError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConversionError(f"cannot read {path}: expected a dict of tensors")
    return state, mmapped


class Checkpoint:
    """The tensors of an HF model folder, indexed by name and read lazily."""

    def __init__(self, model_dir: Path, files: list[Path] | None = None):
        """All weights of `model_dir`, or only `files` (then no index file is consulted)."""
        self.model_dir = model_dir
        if files is None:
            self.files, self._index_name, self._weight_map = self._find_weight_files(model_dir)
        else:
            self.files, self._index_name, self._weight_map = files, "", None
        self.tensors: dict[str, SourceTensor] = {}
        self._torch_state: dict[Path, dict[str, Any]] = {}     # legacy .bin files only
        for file in self.files:
            if file.suffix == ".safetensors":
                found = _safetensors_header(file)
            else:
                found = self._index_torch_file(file)
            for name, t in found.items():
                if name in self.tensors:
                    raise ConversionError(f"tensor {name} appears in both {self.tensors[name].file.name} and {file.name}")
                self.tensors[name] = t
        self._check_index()

    @staticmethod
    def _find_weight_files(d: Path) -> tuple[list[Path], str, dict[str, str] | None]:
        for index_name, single, pattern in (
            ("model.safetensors.index.json", "model.safetensors", "model*.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
        ):
            index = d / index_name
            if index.is_file():
                weight_map = _read_json(index).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ConversionError(f"cannot read {index}: no 'weight_map'")
                files = [d / f for f in sorted(set(weight_map.values()))]
                for f in files:
                    if not f.is_file():
                        raise ConversionError(f"missing file: {f} (listed in {index_name})")
                return files, index_name, weight_map
            if (d / single).is_file():
                return [d / single], single, None
            shards = sorted(p for p in d.glob(pattern) if p.is_file())
            if shards:
                return shards, pattern, None
        raise ConversionError(f"no weights in {d}: expected model.safetensors, model-*.safetensors with "
                              "model.safetensors.index.json, or pytorch_model*.bin")

    def _check_index(self) -> None:
        for name, fname in (self._weight_map or {}).items():
            t = self.tensors.get(name)
            if t is None or t.file.name != fname:
                raise ConversionError(f"tensor {name} listed in {self._index_name} is missing from {fname}")

    def _index_torch_file(self, file: Path) -> dict[str, SourceTensor]:
        import torch

        state, mmapped = _torch_load(file)
        if not mmapped:
            self._torch_state[file] = state
        found = {}
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            dtype = _TORCH_DTYPES.get(str(t.dtype))
            if dtype is None:
                raise ConversionError(f"unsupported dtype {t.dtype} of tensor {name} in {file.name} "
                                      f"(supported: float32, float16, bfloat16, and THUDM's int8)")
            found[name] = SourceTensor(name, tuple(t.shape), dtype, file)
        return found

    def load(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array (C order)."""
        try:
            return self._load(self.tensors[name])
        except OSError as e:
            raise ConversionError(f"cannot read tensor {name} from {self.tensors[name].file}: {e}") from None

    def _load(self, t: SourceTensor) -> np.ndarray:
        name = t.name
        if t.file.suffix == ".safetensors":
            storage = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I8": "i1", "I32": "<i4",
                       "I64": "<i8"}[t.dtype]
            if t.nbytes == 0:
                return np.zeros(t.shape, np.float32)
            raw = np.memmap(t.file, dtype=storage, mode="r", offset=t.offset, shape=t.shape)
            out = bf16_bits_to_f32(raw) if t.dtype == "BF16" else np.array(raw, dtype=np.float32)
            del raw
            return out
        # A memory-mapped .bin is opened again for each tensor (about 10 ms) and closed after it, so that
        # the pages read do not pile up in memory; a legacy (not mmap-able) file stays loaded.
        state = self._torch_state.get(t.file) or _torch_load(t.file)[0]
        tensor = state[name]
        import torch

        return torch.empty(tuple(tensor.shape), dtype=torch.float32).copy_(tensor).numpy()

    def close(self) -> None:
        self._torch_state.clear()
