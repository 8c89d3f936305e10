"""GGUF files read and written tensor by tensor, for `pyengine quantize`.

gguf-py's GGUFReader builds a numpy view per array element (about two seconds for a 49K-token
vocabulary) and its writer packs every string again; a requantizer needs neither. GGUFHeader parses the
header once with plain struct reads and keeps each metadata entry as the raw bytes it has in the file,
so entries are copied to the output unchanged; only the few values the caller asks for are decoded.
Tensor data is read by the caller in slabs (read_into) and written as it is produced (GGUFStreamWriter),
so neither file is ever held in memory.

Layout (GGUF v2/v3, little-endian): "GGUF", u32 version, u64 n_tensors, u64 n_kv; n_kv entries of
(string key, u32 value type, value); n_tensors infos of (string name, u32 n_dims, u64 dims[n_dims] with
the row length first, u32 ggml type, u64 offset from the data start); padding to general.alignment
(default 32); the data, each tensor at an aligned offset.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import ConversionError

V = GGUFValueType
_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_NUMPY = {V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
          V.FLOAT32: "<f4", V.BOOL: "?", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8"}
DEFAULT_ALIGNMENT = 32


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]            # as in the file: the row length first
    tensor_type: GGMLQuantizationType
    offset: int                      # absolute, in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order: the row length last."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))

    @property
    def cols(self) -> int:
        return self.dims[0]

    @property
    def rows(self) -> int:
        return self.n_elements // self.dims[0] if self.dims[0] else 0

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        return self.cols // block * size

    @property
    def n_bytes(self) -> int:
        return self.rows * self.row_bytes


class GGUFHeader:
    """The header of a GGUF file: metadata entries (raw bytes, decoded on request) and tensor infos."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, \
                    memoryview(m) as buf:
                self._parse(buf)
        except (OSError, ValueError, OverflowError, IndexError, struct.error, RecursionError) as e:  # a malformed header
            raise ConversionError(f"cannot read {self.path} as GGUF: {e}") from None

    def _parse(self, buf: memoryview) -> None:
        # the mapping is only read here: everything kept is copied out as bytes
        pos = 0
        size = len(buf)

        def take(fmt: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise ValueError(f"truncated at byte {pos}")
            vals = struct.unpack_from(fmt, buf, pos)
            pos += n
            return vals[0] if len(vals) == 1 else vals

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            if pos + n > size:
                raise ValueError(f"string of {n} bytes at byte {pos} runs past the end")
            s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def skip_value(vtype: int) -> None:
            nonlocal pos
            if vtype == V.STRING:
                n = take("<Q")
                pos += n
            elif vtype == V.ARRAY:
                sub, n = take("<I"), take("<Q")
                if sub == V.STRING:
                    for _ in range(n):
                        pos += struct.unpack_from("<Q", buf, pos)[0] + 8
                elif sub == V.ARRAY:
                    for _ in range(n):
                        skip_value(V.ARRAY)
                elif sub in _SCALAR:
                    pos += n * struct.calcsize(_SCALAR[V(sub)])
                else:
                    raise ValueError(f"unknown array element type {sub}")
            elif vtype in _SCALAR:
                pos += struct.calcsize(_SCALAR[V(vtype)])
            else:
                raise ValueError(f"unknown value type {vtype}")
            if pos > size:
                raise ValueError("metadata runs past the end of the file")

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        pos = 4
        self.version = take("<I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} (2 and 3 are read)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        self.kv_raw: dict[str, bytes] = {}
        self._kv_types: dict[str, int] = {}
        for _ in range(n_kv):
            start = pos
            key = string()
            vtype = take("<I")
            skip_value(vtype)
            self.kv_raw[key] = bytes(buf[start:pos])
            self._kv_types[key] = vtype
        self.alignment = int(self.value("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"general.alignment {self.alignment} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"tensor {name}: {n_dims} dimensions")
            dims = tuple(int(take("<Q")) for _ in range(n_dims))
            ttype, offset = take("<I"), take("<Q")
            try:
                qt = GGMLQuantizationType(ttype)
            except ValueError:
                raise ValueError(f"tensor {name}: unknown ggml type {ttype}") from None
            infos.append((name, dims, qt, offset))
        self.data_start = -(-pos // self.alignment) * self.alignment
        self.tensors = [TensorInfo(n, d, t, self.data_start + o) for n, d, t, o in infos]
        for t in self.tensors:
            if t.cols % GGML_QUANT_SIZES[t.tensor_type][0]:
                raise ValueError(f"tensor {t.name}: rows of {t.cols} are not whole {t.tensor_type.name} blocks")
            if t.offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name}: data runs past the end of the file")

    def value(self, key: str, default=None):
        """A metadata value: int/float/bool/str, or a list for arrays."""
        raw = self.kv_raw.get(key)
        if raw is None:
            return default
        klen = struct.unpack_from("<Q", raw, 0)[0]
        pos = 8 + klen + 4
        return _decode(raw, pos, self._kv_types[key])[0]


def _decode(raw: bytes, pos: int, vtype: int):
    if vtype == V.STRING:
        n = struct.unpack_from("<Q", raw, pos)[0]
        return raw[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n
    if vtype == V.ARRAY:
        sub, n = struct.unpack_from("<IQ", raw, pos)
        pos += 12
        if sub in _NUMPY:
            a = np.frombuffer(raw, dtype=_NUMPY[V(sub)], count=n, offset=pos)
            return a.tolist(), pos + a.nbytes
        out = []
        for _ in range(n):
            v, pos = _decode(raw, pos, sub)
            out.append(v)
        return out, pos
    fmt = _SCALAR[V(vtype)]
    return struct.unpack_from(fmt, raw, pos)[0], pos + struct.calcsize(fmt)


def kv_entry(key: str, vtype: GGUFValueType, value) -> bytes:
    """One metadata entry's bytes for a scalar or string value."""
    k = key.encode()
    head = struct.pack("<Q", len(k)) + k + struct.pack("<I", int(vtype))
    if vtype == V.STRING:
        v = str(value).encode()
        return head + struct.pack("<Q", len(v)) + v
    return head + struct.pack(_SCALAR[vtype], value)


def read_into(fd: int, offset: int, out: memoryview) -> None:
    """Fill `out` from the file at `offset` (pread loops: one call returns at most 2 GiB)."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n


class GGUFStreamWriter:
    """Writes a GGUF v3 file whose header is known up front; tensor data then arrives in order, in pieces."""

    def __init__(self, f, kv_entries: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, int]],
                 alignment: int = DEFAULT_ALIGNMENT):
        """tensors: (name, dims with the row length first, ggml type, n_bytes) in file order."""
        self.f = f
        self.alignment = alignment
        parts = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv_entries)), *kv_entries]
        self.sizes = []
        offset = 0
        for name, dims, ttype, n_bytes in tensors:
            k = name.encode()
            parts.append(struct.pack("<Q", len(k)) + k + struct.pack("<I", len(dims))
                         + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", int(ttype), offset))
            self.sizes.append(n_bytes)
            offset += -(-n_bytes // alignment) * alignment
        header = b"".join(parts)
        f.write(header + bytes(-len(header) % alignment))
        self._tensor = -1
        self._left = 0

    def begin_tensor(self) -> None:
        if self._left:
            raise ValueError(f"tensor {self._tensor}: {self._left} bytes still to write")
        if self._tensor >= 0:
            self.f.write(bytes(-self.sizes[self._tensor] % self.alignment))
        self._tensor += 1
        self._left = self.sizes[self._tensor]

    def write(self, data) -> None:
        n = memoryview(data).nbytes
        if n > self._left:
            raise ValueError(f"tensor {self._tensor}: {n} bytes written where {self._left} are left")
        self.f.write(data)
        self._left -= n

    def finish(self) -> None:
        if self._left or self._tensor != len(self.sizes) - 1:
            raise ValueError("not every tensor was written")
        if self.sizes:
            self.f.write(bytes(-self.sizes[-1] % self.alignment))
