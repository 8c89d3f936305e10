"""Hardening against a model file that changes under a loaded model, non-finite numbers, resource
limits and misaligned files (issue 14). Each malformed input must give a Python exception that
names the file, tensor, key or layer, never a signal that kills the process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import pyengine
from pyengine import _C

from test_gguf import write_tiny_llama

TESTS = Path(__file__).resolve().parent


def run_script(body: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `body` in a fresh interpreter (a fatal signal there must not take pytest with it)."""
    code = "import sys; sys.path.insert(0, %r)\n" % str(TESTS) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def assert_clean_exit(r: subprocess.CompletedProcess) -> None:
    assert r.returncode >= 0, f"killed by signal {-r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"


# --- 1. the file changes on disk after it was loaded ---------------------------------------------

def test_truncate_after_open_raises_naming_the_file(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    r = run_script("""
        import os, pyengine
        path = sys.argv[1]
        eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
        eng.eval([1, 2, 3])
        os.truncate(path, os.path.getsize(path) // 2)
        for what, call in [("eval", lambda: eng.eval([4])), ("metadata", lambda: eng.metadata),
                           ("tensor_bytes", lambda: eng._model.file.tensor_bytes("output_norm.weight"))]:
            try:
                call()
                print(what, "no error")
            except pyengine.ModelFormatError as e:
                assert path in str(e) and "changed on disk" in str(e), str(e)
                print(what, "raised")
        print("n_past", eng.n_past)
    """, str(path))
    assert_clean_exit(r)
    assert r.stdout.split("\n")[:4] == ["eval raised", "metadata raised", "tensor_bytes raised", "n_past 3"]


def test_fault_inside_the_mapping_is_caught(tmp_path):
    """A read of the mapping after the file shrank, with no check before it (as when the file is
    truncated during a forward pass): the SIGBUS guard completes the read, the next call raises."""
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    r = run_script("""
        import ctypes, os, pyengine
        path = sys.argv[1]
        eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
        eng.eval([1, 2, 3])
        size = os.path.getsize(path)
        # Our mapping of the file, from /proc/self/maps.
        start = end = None
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith(os.path.realpath(path)):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                start, end = lo, hi
        assert start is not None
        os.truncate(path, 4096)
        byte = ctypes.string_at(start + size - 1, 1)   # past the new end: SIGBUS without the guard
        print("read", byte)
        try:
            eng.eval([4])
        except pyengine.ModelFormatError as e:
            assert path in str(e) and "changed on disk" in str(e), str(e)
            print("eval raised")
        # A fault outside any model mapping still kills the process (the guard only takes its own).
    """, str(path))
    assert_clean_exit(r)
    assert "read b'\\x00'" in r.stdout and "eval raised" in r.stdout


def test_fault_elsewhere_still_kills(tmp_path):
    """The guard forwards faults outside model mappings: a truncated mmap of another file dies of SIGBUS."""
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 65536)
    r = run_script("""
        import mmap, os, pyengine
        eng = pyengine.Engine(sys.argv[1], n_ctx=16, n_threads=1)
        f = open(sys.argv[2], "rb")
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        os.truncate(sys.argv[2], 0)
        print(m[60000])
    """, str(path), str(other))
    # Killed by SIGBUS; or, under ASan (README "Sanitizer and fuzz runs"), the handler that was there
    # before ours, ASan's, reports the foreign fault: it was forwarded either way, not swallowed.
    asan_report = "AddressSanitizer" in r.stderr and "BUS" in r.stderr and "mmap" in r.stderr
    assert r.returncode == -7 or asan_report, (r.returncode, r.stderr)


def test_modified_in_place_raises(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
    eng.eval([1, 2])
    time.sleep(0.05)  # mtime has the kernel clock's granularity (a few ms)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x7f\x7f\x7f\x7f")
    with pytest.raises(pyengine.ModelFormatError, match="modified in place"):
        eng.eval([3])
    assert eng.n_past == 2


def test_replaced_by_rename_keeps_working(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
    before = eng.logits([1, 2, 3])
    new = tmp_path / "new.gguf"
    new.write_bytes(b"GGUF" + b"\0" * 100)
    os.replace(new, path)
    assert np.array_equal(eng.logits([1, 2, 3]), before)


def test_no_mmap_reads_a_private_copy(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    mapped = pyengine.Engine(path, n_ctx=16, n_threads=1).logits([1, 2, 3])
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1, use_mmap=False)
    assert np.array_equal(eng.logits([1, 2, 3]), mapped)
    os.truncate(path, 100)
    assert np.array_equal(eng.logits([1, 2, 3]), mapped)
    assert eng.metadata["llama.embedding_length"] == 32
    # The file is not mapped: /proc/self/maps does not name it.
    assert str(os.path.realpath(path)) not in Path("/proc/self/maps").read_text()


def test_cli_no_mmap_flag():
    from pyengine.commands.chat import add_model_args
    import argparse

    ap = argparse.ArgumentParser()
    add_model_args(ap)
    assert ap.parse_args([]).use_mmap is True
    assert ap.parse_args(["--no-mmap"]).use_mmap is False


# --- 2. non-finite numbers -------------------------------------------------------------------------

PATH_ORDER = ["portable", "avx2", "avx512", "amx"]
CPU_PATHS = PATH_ORDER[: PATH_ORDER.index(_C.best_cpu_path()) + 1]


@pytest.fixture
def all_paths():
    """Runs the body once per CPU path: yields a function that calls f on each and returns the results."""
    before = _C.cpu_path()

    def each(f):
        out = {}
        for p in CPU_PATHS:
            _C.set_cpu_path(p)
            out[p] = f()
        return out

    yield each
    _C.set_cpu_path(before)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q2_K"])
def test_nonfinite_activations_in_quantized_matmul(qtype, all_paths):
    """Rows of x holding a NaN or Inf give NaN output rows on every path; other rows are unaffected
    and equal the all-finite result (no integer conversion of NaN, no signed overflow)."""
    import gguf
    from test_kernels import make_weights

    qt = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    rows, cols = 40, 256
    raw = make_weights(qt, rows, cols, rng)
    x = rng.standard_normal((6, cols)).astype(np.float32)
    bad = x.copy()
    bad[1, 5] = np.nan
    bad[3, 200] = np.inf
    bad[4, 31] = -np.inf
    clean = all_paths(lambda: _C.matmul(raw, int(qt), rows, cols, x))
    got = all_paths(lambda: _C.matmul(raw, int(qt), rows, cols, bad))
    for p in CPU_PATHS:
        assert np.isnan(got[p][[1, 3, 4]]).all(), p
        assert np.array_equal(got[p][[0, 2, 5]], clean[p][[0, 2, 5]]), p


def write_quantized_llama(path, qtype="Q8_0", **patch):
    """write_tiny_llama's model with its 2-D weights quantized to `qtype` (gguf-py's quantizer)."""
    import gguf

    src = gguf.GGUFReader(str(write_tiny_llama(Path(str(path) + ".f32"))))
    w = gguf.GGUFWriter(str(path), "llama")
    for f in src.fields.values():
        if f.name.startswith("llama.") and f.types[0] == gguf.GGUFValueType.UINT32:
            w.add_uint32(f.name, int(f.parts[-1][0]))
        elif f.name.startswith("llama."):
            w.add_float32(f.name, float(f.parts[-1][0]))
    for k, v in patch.items():
        w.add_float32(k, v)
    qt = gguf.GGMLQuantizationType[qtype]
    for t in src.tensors:
        data = np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if data.ndim == 2:
            q = gguf.quants.quantize(data, qt)
            w.add_tensor(t.name, q, raw_dtype=qt)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def poke(path, tensor, offset, value: bytes):
    """Overwrite bytes of a tensor's data in a GGUF file."""
    import gguf

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    with open(path, "r+b") as f:
        f.seek(int(t.data_offset) + offset)
        f.write(value)


@pytest.mark.parametrize("scale", [b"\x00\x7e", b"\x00\x7c"], ids=["nan", "inf"])
def test_nonfinite_weight_scale_names_the_layer_on_every_path(tmp_path, scale, all_paths):
    path = write_quantized_llama(tmp_path / "q8.gguf")
    good = pyengine.Engine(path, n_ctx=16, n_threads=1)
    ref = all_paths(lambda: good.logits([1, 2, 3]))
    for p in CPU_PATHS:  # the paths agree on the intact model
        np.testing.assert_allclose(ref[p], ref["portable"], rtol=1e-4, atol=1e-4)
    del good
    poke(path, "blk.0.ffn_down.weight", 0, scale)  # the first Q8_0 block's fp16 scale
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)

    def run():
        try:
            eng.logits([1, 2, 3])
        except pyengine.NumericalError as e:
            return str(e)
        return "no error"

    msgs = all_paths(run)
    for p, m in msgs.items():
        assert "layer 0 " in m and "blk.0." in m and str(path) in m, (p, m)
    assert len(set(msgs.values())) == 1
    assert eng.n_past == 0


def test_nonfinite_norm_weight_and_embedding(tmp_path, all_paths):
    path = write_tiny_llama(tmp_path / "t.gguf")
    import gguf

    poke(path, "blk.0.attn_norm.weight", 4 * 3, np.float32(np.inf).tobytes())
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
    for p, m in all_paths(lambda: pytest.raises(pyengine.NumericalError, eng.logits, [1, 2]).value).items():
        assert "layer 0 " in str(m), (p, m)
    # A NaN in one token's embedding row (untied output): only that token fails, naming the embeddings.
    path2 = write_tiny_llama(tmp_path / "t2.gguf", shapes={"output.weight": (48, 32)})
    poke(path2, "token_embd.weight", 4 * 32 * 7, np.float32(np.nan).tobytes())
    eng2 = pyengine.Engine(path2, n_ctx=16, n_threads=1)
    assert np.isfinite(eng2.logits([1, 2, 3])).all()
    with pytest.raises(pyengine.NumericalError, match="token_embd"):
        eng2.eval([7])
    assert eng2.n_past == 3  # the failed eval was rolled back
    del gguf


def test_nonfinite_key_weight_is_reported(tmp_path, all_paths):
    """An infinite key weight makes attention scores infinite: softmax must not turn them into finite
    weights (the portable path once did, through undefined behaviour): the layer check names layer 0."""
    path = write_tiny_llama(tmp_path / "t.gguf")
    poke(path, "blk.0.attn_k.weight", 4 * 5, np.float32(np.inf).tobytes())
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
    for p, m in all_paths(lambda: pytest.raises(pyengine.NumericalError, eng.logits, [1, 2, 3]).value).items():
        assert "layer 0 " in str(m), (p, m)


def test_generation_raises_instead_of_sampling_nan(tmp_path):
    path = write_tiny_llama(tmp_path / "t.gguf")
    poke(path, "output_norm.weight", 0, np.float32(np.nan).tobytes())
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
    with pytest.raises(pyengine.NumericalError, match="output layer"):
        eng.eval([1, 2])
    with pytest.raises(pyengine.NumericalError, match="output norm"):
        eng.decode([1, 2], [0, 0], embeddings=True)


@pytest.mark.parametrize("key,value", [
    ("llama.attention.layer_norm_rms_epsilon", 0.0), ("llama.attention.layer_norm_rms_epsilon", -1e-5),
    ("llama.attention.layer_norm_rms_epsilon", float("nan")), ("llama.attention.layer_norm_rms_epsilon", 1e-50),
    ("llama.rope.freq_base", 0.0), ("llama.rope.freq_base", float("inf")), ("llama.rope.freq_base", -10000.0),
    ("llama.rope.freq_base", 1e300), ("llama.rope.scale_linear", 0.0), ("llama.rope.scale_linear", float("nan")),
])
def test_nonsense_float_hyperparameters_are_refused(tmp_path, key, value):
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    if key != "llama.attention.layer_norm_rms_epsilon":
        w.add_layer_norm_rms_eps(1e-5)
    w.add_float64(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(pyengine.ModelFormatError, match=key.replace(".", r"\.")):
        _C.Model(str(path))


# --- 3. resource limits ------------------------------------------------------------------------------

from gguf_craft import F64, U32, U64, shared_llama  # noqa: E402


def kv_bytes(n_layer, n_ctx, n_seq, n_head_kv, head_dim, elem=2):
    """The KV cache as kv_cache.h lays it out: pages of 64 positions, K and V, per layer."""
    return n_layer * (-(-n_ctx // 64)) * n_seq * 64 * 2 * n_head_kv * head_dim * elem


def test_amplification_file_is_refused_with_the_figure(tmp_path):
    """About 1 MB of file declaring 1024 layers (all sharing one copy of their tensors) and a vocabulary
    of 4,000: the memory it would take is computed before allocating, and refused above max_memory."""
    path = shared_llama(tmp_path / "amp.gguf", n_embd=32, n_layer=1024, n_ff=32, n_head=1, n_vocab=4000,
                        extra_kv=[("llama.context_length", U32, 1 << 24)])
    assert path.stat().st_size < 1.2e6
    model = _C.Model(str(path))
    plan = _C.host_memory_plan(model, n_ctx=32, n_seq_max=1, n_batch=512)
    assert plan["kv_cache"] == kv_bytes(1024, 32, 1, 1, 32) == 8 << 20
    assert plan["logits"] == 32 * 4000 * 4  # rows of a pass: min(n_batch, n_ctx * n_seq_max)
    assert plan["weights"] == path.stat().st_size
    assert plan["total"] == plan["weights"] + plan["kv_cache"] + plan["scratch"] + plan["logits"]
    gib = f"{plan['total'] / 2**30:.2f} GiB"
    with pytest.raises(pyengine.MemoryLimitError, match=f"need {gib} .*KV cache 0.01 GiB.*max_memory is 0.01 GiB") as e:
        pyengine.Engine(path, n_ctx=32, n_threads=1, max_memory=8 << 20)
    assert str(path) in str(e.value)
    # n_ctx=0 takes the file's context_length (16M): 2 TiB of KV cache, far above the machine.
    with pytest.raises(pyengine.MemoryLimitError,
                       match="KV cache 2048.00 GiB for n_ctx=16777216 x 1 sequences of 1024 layers.*this machine has"):
        pyengine.Engine(path, n_ctx=0, n_threads=1)
    # Within the limit it loads and runs.
    eng = pyengine.Engine(path, n_ctx=32, n_threads=1, max_memory=1 << 30)
    assert np.isfinite(eng.eval([1, 2])).all()


def test_scratch_does_not_grow_with_n_batch_beyond_the_context(tmp_path):
    path = shared_llama(tmp_path / "v.gguf", n_embd=32, n_layer=1, n_ff=32, n_head=1, n_vocab=8000)
    model = _C.Model(str(path))
    small = _C.host_memory_plan(model, n_ctx=16, n_seq_max=2, n_batch=32)
    huge = _C.host_memory_plan(model, n_ctx=16, n_seq_max=2, n_batch=1 << 20)
    assert small["scratch"] == huge["scratch"] and small["logits"] == huge["logits"] == 32 * 8000 * 4
    assert _C.host_memory_plan(model, n_ctx=16, n_seq_max=2, n_batch=8)["logits"] == 8 * 8000 * 4


@pytest.mark.parametrize("key,type_,value,match", [
    ("llama.feed_forward_length", U64, 1 << 62, "feed_forward_length"),
    ("llama.feed_forward_length", U64, (1 << 22) + 32, "feed_forward_length"),
    ("llama.rope.dimension_count", U64, (1 << 32) + 16, r"rope\.dimension_count 4294967312"),
    ("llama.context_length", U64, 0, "context_length"),
    ("llama.attention.layer_norm_rms_epsilon", F64, float("inf"), "layer_norm_rms_epsilon"),
])
def test_hyperparameters_feeding_allocations_are_bounded(tmp_path, key, type_, value, match):
    path = shared_llama(tmp_path / "h.gguf", n_embd=32, n_layer=1, n_ff=32, n_head=1, n_vocab=64,
                        extra_kv=[(key, type_, value)])
    with pytest.raises(pyengine.ModelFormatError, match=match) as e:
        _C.Model(str(path))
    assert str(path) in str(e.value)


def test_context_arguments_are_bounded(tmp_path):
    path = shared_llama(tmp_path / "c.gguf", n_embd=32, n_layer=1, n_ff=32, n_head=1, n_vocab=64)
    with pytest.raises(pyengine.EngineError, match="n_seq_max"):
        pyengine.Engine(path, n_ctx=16, n_threads=1, n_seq_max=-1)
    with pytest.raises(pyengine.EngineError, match="n_ctx"):
        pyengine.Engine(path, n_ctx=1 << 40, n_threads=1)
    with pytest.raises(ValueError, match="max_memory"):
        pyengine.Engine(path, n_ctx=16, n_threads=1, max_memory=0)


# --- 4. misaligned tensor data ----------------------------------------------------------------------

def recraft(src: Path, dst: Path, alignment: int, shift: int) -> Path:
    """`src` rewritten by gguf_craft with general.alignment = `alignment` and every tensor's data
    `shift` bytes past an `alignment` boundary (odd addresses for alignment 1, shift 1)."""
    import gguf

    from gguf_craft import ARR, F32 as GF32, STR, U32 as GU32, gguf_bytes

    r = gguf.GGUFReader(str(src))
    kv = [("general.alignment", GU32, alignment)]
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.alignment":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.STRING:
            kv.append((f.name, STR, bytes(f.parts[-1]).decode()))
        elif t == gguf.GGUFValueType.UINT32:
            kv.append((f.name, GU32, int(f.parts[-1][0])))
        elif t == gguf.GGUFValueType.FLOAT32:
            kv.append((f.name, GF32, float(f.parts[-1][0])))
    data, tensors = bytearray(), []
    for t in r.tensors:
        data += b"\0" * ((-len(data) % max(alignment, 32)) + shift)
        tensors.append((t.name, [int(x) for x in t.shape], int(t.tensor_type), len(data)))
        data += np.asarray(t.data).tobytes()
    dst.write_bytes(gguf_bytes(kv, tensors, bytes(data), alignment=alignment))
    del ARR
    return dst


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_misaligned_file_loads_correctly(tmp_path, qtype, all_paths):
    """general.alignment = 1 with odd offsets: the engine must not read F32/F16 values or block
    scales at odd addresses (it copies such tensors to aligned memory); the logits equal those of the
    same tensors aligned."""
    import gguf

    if qtype == "F16":
        import gguf as g
        src = tmp_path / "f16.gguf"
        r = g.GGUFReader(str(write_tiny_llama(tmp_path / "f32.gguf")))
        w = g.GGUFWriter(str(src), "llama")
        for f in r.fields.values():
            if f.name.startswith("llama.") and f.types[0] == g.GGUFValueType.UINT32:
                w.add_uint32(f.name, int(f.parts[-1][0]))
            elif f.name.startswith("llama."):
                w.add_float32(f.name, float(f.parts[-1][0]))
        for t in r.tensors:
            w.add_tensor(t.name, np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)]).astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    else:
        src = write_quantized_llama(tmp_path / "q.gguf", qtype)
    aligned = recraft(src, tmp_path / "aligned.gguf", 32, 0)
    odd = recraft(src, tmp_path / "odd.gguf", 1, 1)
    f = _C.GGUFFile(str(odd))
    assert f.alignment == 1
    header = gguf.GGUFReader(str(odd))
    assert all(int(t.data_offset) % 2 == 1 for t in header.tensors)
    for t in header.tensors:  # the bytes read back are the file's
        assert np.array_equal(f.tensor_bytes(t.name), np.asarray(t.data).view(np.uint8).ravel())
    ref = all_paths(lambda: pyengine.Engine(aligned, n_ctx=16, n_threads=1).logits([1, 2, 3, 4]))
    got = all_paths(lambda: pyengine.Engine(odd, n_ctx=16, n_threads=1).logits([1, 2, 3, 4]))
    for p in CPU_PATHS:
        assert np.array_equal(got[p], ref[p]), p


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_tiny_activations_quantize_to_zero_on_every_path(qtype, all_paths):
    """max|x| below 3.7e-37 made 127 / max|x| infinite (then Inf converted to int8: found by the
    fuzzer, tests/fuzz/regressions/subnormal-activation-amax.gguf): such a block counts as zeros."""
    import gguf
    from test_kernels import make_weights

    qt = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    raw = make_weights(qt, 24, 256, rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    tiny = x.copy()
    tiny[0, 32:64] = 1e-38
    tiny[1, :32] = np.float32(1e-44)  # subnormal
    zeroed = x.copy()
    zeroed[0, 32:64] = 0
    zeroed[1, :32] = 0
    got = all_paths(lambda: _C.matmul(raw, int(qt), 24, 256, tiny))
    ref = all_paths(lambda: _C.matmul(raw, int(qt), 24, 256, zeroed))
    for p in CPU_PATHS:
        assert np.array_equal(got[p], ref[p]), p


def test_fuzzer_regressions_load_cleanly():
    """Every input the fuzzer found a bug with loads and runs to a clean answer (here without
    sanitizers; tests/fuzz/run.sh replays them under ASan and UBSan)."""
    for f in sorted((TESTS / "fuzz" / "regressions").iterdir()):
        try:
            model = _C.Model(str(f))
            ctx = _C.Context(model, _C.Executor(1), 8, 2, 4, max_memory=256 << 20)
            ctx.decode(np.array([1, 8 % model.config["n_vocab"], 1], np.int32), np.array([0, 1, 0], np.int32))
        except pyengine.EngineError:
            pass
        except (pyengine.ModelFormatError, pyengine.UnsupportedModelError):
            pass


@pytest.mark.parametrize("factor", [1e-42, 1e30], ids=["denormal", "huge"])
def test_q8_0_cache_takes_extreme_keys(tmp_path, factor, all_paths):
    """Keys scaled into denormals (a block's scale then has no finite inverse) or past fp16's range (its
    fp16 scale is inf) go through the q8_0 cache's int8 rounding without undefined behaviour (the
    sanitized CI run checks that): finite logits, or a NumericalError naming the layer."""
    import gguf

    from checkpoints import make_llama
    from pyengine_convert import convert

    path = tmp_path / "m.gguf"
    convert(make_llama(tmp_path / "hf", hidden=128, n_heads=2, n_kv_heads=1), path, qtype="f32")
    k = next(t for t in gguf.GGUFReader(str(path), "r+").tensors if t.name == "blk.0.attn_k.weight")
    k.data[...] = (k.data.astype(np.float64) * factor).astype(np.float32)
    k.data.flush()
    eng = pyengine.Engine(path, n_ctx=32, n_threads=1, kv_type="q8_0")

    def run():
        eng.reset()
        try:
            return eng.logits([1, 2, 3, 4, 5])
        except pyengine.NumericalError as e:
            assert "layer 0 " in str(e)
            return None

    for p, out in all_paths(run).items():
        assert out is None or np.isfinite(out).all(), p
