"""llama.cpp's importance-matrix files, read and written so that they interchange with llama-imatrix
and llama-quantize.

GGUF format (llama-imatrix's default since 2025): general.type = "imatrix", imatrix.datasets (strings),
imatrix.chunk_count, imatrix.chunk_size (u32), and per weight matrix two F32 tensors:
  <weight name>.in_sum2  ggml shape [n_cols, n_mat]: sum over tokens of x_j^2 per input column
  <weight name>.counts   ggml shape [1, n_mat]:      how many tokens were summed
The importance llama-quantize uses is in_sum2 / counts (tools/quantize/quantize.cpp load_imatrix). A 3-D
tensor of experts has n_mat = n_expert: one row of sums and one count per expert (the tokens routed to
it); an expert no token reached gets importance 1 for every column, as in llama-quantize.

Legacy .dat format (read only): int32 n_entries, then per entry int32 name length, name, int32 ncall,
int32 n_values, float32 values (sum/count * ncall; experts' vectors one after the other); then int32
chunk count and the dataset name.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConversionError


@dataclass
class ImatrixData:
    # weight name -> float64 (n_cols,) sums of x^2, or (n_expert, n_cols) for a 3-D tensor of experts
    sums: dict[str, np.ndarray]
    # weight name -> tokens summed, or int64 (n_expert,) tokens routed to each expert
    counts: dict[str, int | np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self) -> dict[str, np.ndarray]:
        """Per-column mean squared activation of each weight's input (what the quantizers take): (n_cols,),
        or (n_expert, n_cols) with ones for an expert that saw no token (llama-quantize's choice)."""
        out = {}
        for k, v in self.sums.items():
            c = np.asarray(self.counts[k], dtype=np.float64)
            if v.ndim == 1:
                out[k] = (v / max(float(c.reshape(-1)[0]), 1.0)).astype(np.float32)
            else:
                c = c.reshape(-1, 1)
                out[k] = np.where(c > 0, v / np.maximum(c, 1.0), 1.0).astype(np.float32)
        return out


def load_imatrix(path: str | os.PathLike) -> ImatrixData:
    """Read a GGUF or legacy .dat imatrix. Raises ConversionError naming the file on bad input."""
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"imatrix file not found: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(p)
    return _load_legacy(p)


def _load_gguf(p: Path) -> ImatrixData:
    from gguf import GGMLQuantizationType, GGUFReader

    try:
        r = GGUFReader(p)
    except Exception as e:  # noqa: BLE001 - gguf-py raises assorted errors on corrupt files
        raise ConversionError(f"cannot read imatrix {p}: {e}") from None
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    data = ImatrixData({}, {}, list(fields.get("imatrix.datasets") or []),
                       int(fields.get("imatrix.chunk_count") or 0), int(fields.get("imatrix.chunk_size") or 0))
    tensors = {t.name: t for t in r.tensors}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = tensors.get(base + ".counts")
        if c is None:
            raise ConversionError(f"imatrix {p}: {name} has no {base}.counts")
        if t.tensor_type != GGMLQuantizationType.F32 or c.tensor_type != GGMLQuantizationType.F32:
            raise ConversionError(f"imatrix {p}: {base} sums and counts must be F32")
        sums = np.asarray(t.data, dtype=np.float64).reshape(-1, int(t.shape[0]))
        counts = np.asarray(c.data, dtype=np.float64).reshape(-1)
        if sums.shape[0] != counts.size:
            raise ConversionError(f"imatrix {p}: {base} has {sums.shape[0]} matrices but {counts.size} counts")
        if sums.shape[0] == 1:
            data.sums[base], data.counts[base] = sums[0], int(round(counts[0]))
        else:                                    # experts: one vector and one count each
            data.sums[base], data.counts[base] = sums, np.rint(counts).astype(np.int64)
    if not data.sums:
        raise ConversionError(f"imatrix {p}: no .in_sum2 tensors")
    return data


def _load_legacy(p: Path) -> ImatrixData:
    raw = p.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ConversionError(f"imatrix {p}: truncated (not a GGUF or legacy .dat imatrix)")
        vals = struct.unpack_from(fmt, raw, pos)
        pos += size
        return vals

    (n,) = take("<i")
    if n <= 0 or n > 1_000_000:
        raise ConversionError(f"imatrix {p}: not a GGUF or legacy .dat imatrix ({n} entries)")
    data = ImatrixData({}, {})
    for _ in range(n):
        (length,) = take("<i")
        if length <= 0 or length > 4096:
            raise ConversionError(f"imatrix {p}: bad entry name length {length}")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", "replace")
        ncall, nval = take("<ii")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        if values.size != nval:
            raise ConversionError(f"imatrix {p}: truncated data for {name}")
        pos += 4 * nval
        # stored as mean * ncall: keep sums over `ncall` "tokens" so that sums / counts is the mean
        data.sums[name] = values
        data.counts[name] = max(ncall, 1)
    if pos + 4 <= len(raw):
        (data.chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if 0 < length <= len(raw) - pos:
                data.datasets = [raw[pos:pos + length].decode("utf-8", "replace")]
    return data


def save_imatrix(path: str | os.PathLike, data: ImatrixData) -> None:
    """Write `data` in llama-imatrix's GGUF format."""
    from gguf import GGUFWriter

    p = Path(path)
    tmp = p.with_name(f".{p.name}.part")
    w = GGUFWriter(tmp, "")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix's files name no architecture
    try:
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", data.datasets or [""])
        w.add_uint32("imatrix.chunk_count", data.chunk_count)
        w.add_uint32("imatrix.chunk_size", data.chunk_size)
        for name in sorted(data.sums):
            sums = np.asarray(data.sums[name], dtype=np.float32)
            w.add_tensor(f"{name}.in_sum2", sums.reshape(-1, sums.shape[-1]))
            w.add_tensor(f"{name}.counts", np.asarray(data.counts[name], dtype=np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, p)
    except OSError as e:
        raise ConversionError(f"cannot write {p}: {e}") from None
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
