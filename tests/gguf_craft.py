"""Writes GGUF files byte by byte, including ones the gguf package refuses to write: tensors that
share data (overlapping offsets), any alignment, any metadata value. For the hardening tests and the
fuzzer's seed corpus."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Sequence

# GGUF metadata value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(t: int, v: Any) -> bytes:
    if t == STR:
        return _str(v)
    if t == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(_value(et, x) for x in items)
    return struct.pack(_FMT[t], v)


def gguf_bytes(kv: Sequence[tuple[str, int, Any]], tensors: Sequence[tuple[str, Sequence[int], int, int]],
               data: bytes, alignment: int = 32) -> bytes:
    """kv: (key, type, value) (arrays: (ARR, (elem_type, items))); tensors: (name, ggml shape ne,
    ggml type id, offset in the data section); data: the data section."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, t, v in kv:
        out += _str(key) + struct.pack("<I", t) + _value(t, v)
    for name, ne, ttype, offset in tensors:
        out += _str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % alignment)
    return bytes(out + data)


def llama_kv(n_embd: int, n_layer: int, n_ff: int, n_head: int, n_head_kv: int | None = None,
             extra: Sequence[tuple[str, int, Any]] = ()) -> list[tuple[str, int, Any]]:
    kv = [("general.architecture", STR, "llama"), ("llama.context_length", U32, 128),
          ("llama.embedding_length", U32, n_embd), ("llama.block_count", U32, n_layer),
          ("llama.feed_forward_length", U32, n_ff), ("llama.attention.head_count", U32, n_head),
          ("llama.attention.head_count_kv", U32, n_head_kv or n_head),
          ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5)]
    keys = {k for k, _, _ in extra}
    return [x for x in kv if x[0] not in keys] + list(extra)


def shared_llama(path: Path, n_embd: int, n_layer: int, n_ff: int, n_head: int, n_vocab: int,
                 extra_kv: Sequence[tuple[str, int, Any]] = (), values: float = 0.02) -> Path:
    """A llama GGUF whose layers all point at the same F32 tensors (one copy in the file), so a small
    file can declare many layers; the token embedding is [n_vocab, n_embd] F32, tied to the output."""
    import numpy as np

    rng = np.random.default_rng(0)
    blobs: list[tuple[str, tuple[int, ...]]] = [("token_embd", (n_embd, n_vocab)), ("norm", (n_embd,)),
                                                ("sq", (n_embd, n_embd)), ("up", (n_embd, n_ff)), ("down", (n_ff, n_embd))]
    data, off = bytearray(), {}
    for name, ne in blobs:
        arr = np.ones(ne[::-1], np.float32) if name == "norm" else rng.standard_normal(ne[::-1]).astype(np.float32) * values
        off[name] = len(data)
        data += arr.tobytes()
        data += b"\0" * (-len(data) % 32)
    F32T = 0
    tensors = [("token_embd.weight", (n_embd, n_vocab), F32T, off["token_embd"]),
               ("output_norm.weight", (n_embd,), F32T, off["norm"])]
    for i in range(n_layer):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (n_embd,), F32T, off["norm"]),
                    (b + "ffn_norm.weight", (n_embd,), F32T, off["norm"])]
        tensors += [(b + n, (n_embd, n_embd), F32T, off["sq"]) for n in ("attn_q.weight", "attn_k.weight",
                                                                          "attn_v.weight", "attn_output.weight")]
        tensors += [(b + "ffn_gate.weight", (n_embd, n_ff), F32T, off["up"]),
                    (b + "ffn_up.weight", (n_embd, n_ff), F32T, off["up"]),
                    (b + "ffn_down.weight", (n_ff, n_embd), F32T, off["down"])]
    path.write_bytes(gguf_bytes(llama_kv(n_embd, n_layer, n_ff, n_head, extra=extra_kv), tensors, bytes(data)))
    return path


def rewrite(src: Path, dst: Path, tensors: dict[str, Any] | None = None, drop_keys: Sequence[str] = (),
            extra_keys: dict[str, float] | None = None) -> None:
    """A copy of a GGUF file through gguf-py with some tensors replaced (name -> float32 numpy array in
    numpy order, or None to drop it), some keys dropped and some float32 keys set."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    tensors = tensors or {}
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in drop_keys or key in (extra_keys or {}) or key == "general.architecture":
            continue
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), kind, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), kind)
    for key, value in (extra_keys or {}).items():
        w.add_float32(key, value)
    for t in r.tensors:
        if t.name not in tensors:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(int(d) for d in reversed(t.shape)),
                         raw_dtype=t.tensor_type)
        elif tensors[t.name] is not None:
            w.add_tensor(t.name, np.asarray(tensors[t.name], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
