"""The GGUF reader and model loader reject malformed files with a clear exception, never a crash."""
import struct

import gguf
import numpy as np
import pytest

import pyengine
from pyengine import _C

ARCH = "llama"
N_EMBD, N_FF, N_HEAD, N_LAYER, N_VOCAB = 32, 64, 4, 1, 48


def write_tiny_llama(path, drop_tensor=None, drop_key=None, shapes=None, arch=ARCH):
    """A tiny random llama-architecture GGUF written directly with the gguf package."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "context_length": lambda: w.add_context_length(128),
        "embedding_length": lambda: w.add_embedding_length(N_EMBD),
        "block_count": lambda: w.add_block_count(N_LAYER),
        "feed_forward_length": lambda: w.add_feed_forward_length(N_FF),
        "attention.head_count": lambda: w.add_head_count(N_HEAD),
        "attention.layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(1e-5),
    }
    for k, add in keys.items():
        if k != drop_key:
            add()
    tensors = {"token_embd.weight": (N_VOCAB, N_EMBD), "output_norm.weight": (N_EMBD,)}
    for i in range(N_LAYER):
        b = f"blk.{i}."
        tensors.update({b + "attn_norm.weight": (N_EMBD,), b + "attn_q.weight": (N_EMBD, N_EMBD),
                        b + "attn_k.weight": (N_EMBD, N_EMBD), b + "attn_v.weight": (N_EMBD, N_EMBD),
                        b + "attn_output.weight": (N_EMBD, N_EMBD), b + "ffn_norm.weight": (N_EMBD,),
                        b + "ffn_gate.weight": (N_FF, N_EMBD), b + "ffn_up.weight": (N_FF, N_EMBD),
                        b + "ffn_down.weight": (N_EMBD, N_FF)})
    tensors.update(shapes or {})
    for name, shape in tensors.items():
        if name != drop_tensor:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_llama(tmp_path / "tiny.gguf")


def test_reads_what_gguf_package_wrote(tiny):
    f = _C.GGUFFile(str(tiny))
    ref = gguf.GGUFReader(str(tiny))
    assert f.version == 3
    assert f.metadata["general.architecture"] == ARCH
    assert f.metadata["llama.embedding_length"] == N_EMBD
    names = {t["name"]: t for t in f.tensors}
    for t in ref.tensors:
        assert names[t.name]["shape"] == tuple(int(x) for x in t.shape)
        assert np.array_equal(f.tensor_bytes(t.name), np.asarray(t.data).view(np.uint8).ravel())


def test_get_is_one_metadata_value(tmp_path):
    """GGUFFile.get(key) returns what the gguf package reads for every key, scalars, strings and arrays,
    and the default for a missing key."""
    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_uint32("t.u32", 7)
    w.add_int64("t.i64", -5)
    w.add_float32("t.f32", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "b c", ""])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = _C.GGUFFile(str(path))
    fields = gguf.GGUFReader(str(path)).fields
    for key, field in fields.items():
        if key.startswith("GGUF."):  # the reader's header pseudo-fields
            continue
        got, want = f.get(key), field.contents()
        if isinstance(got, np.ndarray):  # numeric arrays come as numpy arrays, the reader's as lists
            got = got.tolist()
        floats = isinstance(want, float) or (isinstance(want, list) and any(isinstance(x, float) for x in want))
        assert got == (pytest.approx(want) if floats else want), key  # ints, bools, strings exactly
    assert len([k for k in fields if not k.startswith("GGUF.")]) == 9
    assert f.get("no.such.key") is None and f.get("no.such.key", 3) == 3


def test_truncated_at_every_offset(tiny, tmp_path):
    data = tiny.read_bytes()
    bad = tmp_path / "bad.gguf"
    # Every byte of the header and metadata, then coarser steps through the tensor data.
    offsets = list(range(0, 2048)) + list(range(2048, len(data), 997))
    for n in offsets:
        bad.write_bytes(data[:n])
        with pytest.raises(pyengine.ModelFormatError):
            _C.GGUFFile(str(bad))


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _find_tensor_info(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name` in the tensor-info section."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


@pytest.mark.parametrize("case", ["n_tensors", "n_kv", "key_len", "n_dims", "dim_zero", "type_id",
                                  "offset_misaligned", "offset_past_end", "magic", "version"])
def test_corrupted_fields(tiny, tmp_path, case):
    data = tiny.read_bytes()
    ti = _find_tensor_info(data, "blk.0.attn_q.weight")
    expected = pyengine.ModelFormatError
    if case == "n_tensors":
        data = _patch(data, 8, "<Q", 1 << 60)
    elif case == "n_kv":
        data = _patch(data, 16, "<Q", 1 << 40)
    elif case == "key_len":
        data = _patch(data, 24, "<Q", 1 << 62)
    elif case == "n_dims":
        data = _patch(data, ti, "<I", 7)
    elif case == "dim_zero":
        data = _patch(data, ti + 4, "<Q", 0)
    elif case == "type_id":
        data = _patch(data, ti + 4 + 16, "<I", 99)
        expected = pyengine.UnsupportedModelError
    elif case == "offset_misaligned":
        data = _patch(data, ti + 4 + 16 + 4, "<Q", 3)
    elif case == "offset_past_end":
        data = _patch(data, ti + 4 + 16 + 4, "<Q", 1 << 40)
    elif case == "magic":
        data = b"GGML" + data[4:]
    elif case == "version":
        data = _patch(data, 4, "<I", 9)
        expected = pyengine.UnsupportedModelError
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(expected) as e:
        pyengine.LLM(bad)
    if case in ("n_dims", "dim_zero", "type_id", "offset_misaligned", "offset_past_end"):
        assert "blk.0.attn_q.weight" in str(e.value)


def test_random_corruption_never_crashes(tiny, tmp_path):
    data = tiny.read_bytes()
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.gguf"
    header_end = _find_tensor_info(data, "blk.0.ffn_down.weight") + 64
    for _ in range(300):
        b = bytearray(data)
        for pos in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
            b[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            _C.GGUFFile(str(bad))
        except (pyengine.ModelFormatError, pyengine.UnsupportedModelError):
            pass


def test_missing_tensor_is_named(tmp_path):
    p = write_tiny_llama(tmp_path / "t.gguf", drop_tensor="blk.0.ffn_up.weight")
    with pytest.raises(pyengine.ModelFormatError, match="blk.0.ffn_up.weight"):
        pyengine.LLM(p)


def test_missing_key_is_named(tmp_path):
    p = write_tiny_llama(tmp_path / "t.gguf", drop_key="embedding_length")
    with pytest.raises(pyengine.ModelFormatError, match="llama.embedding_length"):
        pyengine.LLM(p)


def test_shape_mismatch_is_named(tmp_path):
    p = write_tiny_llama(tmp_path / "t.gguf", shapes={"blk.0.attn_k.weight": (N_EMBD + 32, N_EMBD)})
    with pytest.raises(pyengine.ModelFormatError, match="blk.0.attn_k.weight"):
        pyengine.LLM(p)


def test_unsupported_architecture_lists_supported(tmp_path):
    p = write_tiny_llama(tmp_path / "t.gguf", arch="mamba")
    with pytest.raises(pyengine.UnsupportedModelError, match="mamba.*supported: .*llama"):
        pyengine.LLM(p)


def test_missing_file_and_not_gguf(tmp_path):
    with pytest.raises(FileNotFoundError):
        pyengine.LLM(tmp_path / "nope.gguf")
    txt = tmp_path / "x.gguf"
    txt.write_text("hello, I am not a model")
    with pytest.raises(pyengine.ModelFormatError, match="not a GGUF file"):
        pyengine.LLM(txt)
