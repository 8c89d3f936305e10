"""The Q8_0 KV cache (kv_type="q8_0", llama.cpp's `-ctk q8_0 -ctv q8_0`) against transformers.

The reference is transformers with a cache that does to every key and value it stores what llama.cpp
does to them: rotate each head by the orthonormal Walsh-Hadamard matrix (keys in blocks of the largest
power of two >= 64 dividing head_dim, values in blocks of 64; none when head_dim is not a multiple of
64; llama-kv-cache.cpp's attention rotation), round through the `gguf` package's Q8_0 (blocks of 32
along head_dim, one fp16 scale each), rotate back. The only differences left are float summation order
and the rare value that sits on a rounding boundary. llama.cpp's llama files hold the rotary pairs of
each head interleaved (the converter's Q/K permutation), so the reference rotates and blocks keys in
that order; Qwen2 files keep transformers' order.
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from transformers import DynamicCache

import pyengine
from checkpoints import load_hf_model, make_llama, make_qwen2
from pyengine import _C
from pyengine_convert import convert

PATH_ORDER = ["portable", "avx2", "avx512", "amx"]
CPU_PATHS = PATH_ORDER[: PATH_ORDER.index(_C.best_cpu_path()) + 1]

# head_dim 64 with GQA (rotations of 64), 128 (keys rotated in blocks of 128, values of 64), 96 with MQA
# (no rotation; three blocks of 32 and a partial vector chain).
MODELS = {
    "llama_gqa_hd64": (lambda d: make_llama(d, hidden=256, n_heads=4, n_kv_heads=2, max_position=512), True),
    "llama_mha_hd128": (lambda d: make_llama(d, hidden=256, n_heads=2, n_kv_heads=2, max_position=512), True),
    "qwen2_mqa_hd96": (lambda d: make_qwen2(d, hidden=192, n_heads=2, n_kv_heads=1, tied=True, max_position=512),
                       False),
}
N_TOKENS = 150  # three cache pages of 64, the last one partly filled


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order n (a power of two), orthonormal."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotation_sizes(hd: int) -> tuple[int, int]:
    """llama.cpp's (keys, values) rotation block sizes; 0: not rotated."""
    if hd % 64:
        return 0, 0
    k = 64
    while hd % (2 * k) == 0:
        k *= 2
    return k, 64


def q8_round_trip(a: np.ndarray, rot: int) -> np.ndarray:
    """a's last axis rotated in blocks of `rot`, rounded through gguf's Q8_0, rotated back."""
    shape = a.shape
    if rot:
        h = hadamard(rot)
        a = (a.reshape(-1, rot) @ h.T).reshape(shape)
    r = dequantize(quantize(a.reshape(-1, shape[-1]).astype(np.float32), GGMLQuantizationType.Q8_0),
                   GGMLQuantizationType.Q8_0).reshape(shape)
    return (r.reshape(-1, rot) @ h).reshape(shape) if rot else r


def q8_round_trip_interleaved(a: np.ndarray, rot: int) -> np.ndarray:
    """q8_round_trip over llama.cpp's order of a head's dimensions: pair i of transformers' halves
    (i, i + hd/2) at 2i, 2i + 1."""
    hd = a.shape[-1]
    inter = a.reshape(*a.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(a.shape)
    return q8_round_trip(inter, rot).reshape(*a.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(a.shape)


def q8_cache_class(interleaved_keys: bool, head_dim: int):
    round_keys = q8_round_trip_interleaved if interleaved_keys else q8_round_trip
    rot_k, rot_v = rotation_sizes(head_dim)

    class Q8Cache(DynamicCache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            k = torch.from_numpy(np.ascontiguousarray(round_keys(k.detach().double().numpy(), rot_k), np.float32))
            v = torch.from_numpy(np.ascontiguousarray(q8_round_trip(v.detach().double().numpy(), rot_v), np.float32))
            return super().update(k, v, layer_idx, *args, **kwargs)

    return Q8Cache


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make, interleaved = MODELS[request.param]
    hf = load_hf_model(make(d / "hf"))
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, N_TOKENS).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
        cache_class = q8_cache_class(interleaved, hf.config.hidden_size // hf.config.num_attention_heads)
        try:
            cache = cache_class(config=hf.config)
        except TypeError:  # transformers 4.x: no config argument
            cache = cache_class()
        ref_q8 = hf(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0].numpy()
    gguf_path = d / "f32.gguf"
    convert(d / "hf", gguf_path, qtype="f32")
    return dict(path=gguf_path, ids=ids, ref=ref, ref_q8=ref_q8)


@pytest.mark.parametrize("cpu", CPU_PATHS)
def test_matches_transformers_with_a_q8_cache(model, cpu):
    before = _C.cpu_path()
    _C.set_cpu_path(cpu)
    try:
        got = pyengine.LLM(model["path"], n_ctx=256, kv_type="q8_0").logits(model["ids"])
    finally:
        _C.set_cpu_path(before)
    scale = np.abs(model["ref"]).max()
    err_q8, err_plain = np.abs(got - model["ref_q8"]) / scale, np.abs(got - model["ref"]) / scale
    # Measured (Xeon, every path), largest / mean: 6e-4 / 1e-4 (hd64) to the Q8 reference, 7e-3 / 1.3e-3 to
    # the unrounded one. A key or value on a rounding boundary can round the other way in the two (the
    # rotations' sums run in other orders), which the largest error shows; the mean shows the rest agrees.
    assert err_q8.max() < 2e-3, err_q8.max()
    assert err_q8.mean() < 0.15 * err_plain.mean(), (err_q8.mean(), err_plain.mean())


def test_decoding_equals_prefill(model):
    """Token by token as in one prompt. The projections' float sums run in another order for one row
    than for a block of rows, so a key or value that sits on a rounding boundary of its block can round
    to the neighbouring int8 (one step, 1/127 of the block's largest): the bound allows that (measured:
    at most one logit in a few hundred off, by ~1e-4 x the largest); nearly all must agree as with f32."""
    ids = model["ids"]
    llm = pyengine.LLM(model["path"], n_ctx=256, n_batch=32, kv_type="q8_0")
    full = llm.logits(ids)
    llm.reset()
    llm.eval(ids[:100])
    scale = np.abs(full).max()
    steps = np.stack([llm.eval([t]) for t in ids[100:]])
    np.testing.assert_allclose(steps, full[100:], rtol=0, atol=2e-3 * scale)
    assert np.mean(np.abs(steps - full[100:]) <= 1e-4 * scale) > 0.99


def test_batched_sequences_equal_each_alone(model):
    """Three sequences of different lengths decoded together give each one's logits alone (up to the
    float weights' summation order, which depends on the rows in a pass)."""
    ids = model["ids"]
    prompts = [ids[:70], ids[5:40], ids[20:150]]
    eng = pyengine.Engine(model["path"], n_ctx=256, n_seq_max=3, kv_type="q8_0")
    tokens = np.concatenate(prompts).astype(np.int32)
    seqs = np.concatenate([np.full(len(p), s, np.int32) for s, p in enumerate(prompts)])
    last = np.cumsum([len(p) for p in prompts]) - 1
    want = np.zeros(len(tokens), bool)
    want[last] = True
    together = eng.decode(tokens, seqs, logits=want)
    for s, p in enumerate(prompts):
        alone = pyengine.Engine(model["path"], n_ctx=256, kv_type="q8_0").logits(p)[-1]
        np.testing.assert_allclose(together[s], alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())


def test_memory_is_34_of_64_bytes_per_f16_pair(model):
    eng = pyengine.Engine(model["path"], n_ctx=1024, n_seq_max=2)
    f16 = eng.memory_plan(kv_type="f16")["kv_cache"]
    q8 = eng.memory_plan(kv_type="q8_0")["kv_cache"]
    assert q8 * 64 == f16 * 34  # 32 int8 + an fp16 scale vs 32 fp16


def test_nonfinite_key_weight_is_reported(model, tmp_path):
    """An infinite key makes its block's scale NaN (no int8 conversion of inf): the layer check names layer 0."""
    path = tmp_path / "inf.gguf"
    path.write_bytes(model["path"].read_bytes())
    t = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_k.weight")
    with open(path, "r+b") as f:
        f.seek(int(t.data_offset) + 4 * 5)
        f.write(np.float32(np.inf).tobytes())
    eng = pyengine.Engine(path, n_ctx=64, kv_type="q8_0")
    before = _C.cpu_path()
    try:
        for cpu in CPU_PATHS:
            _C.set_cpu_path(cpu)
            with pytest.raises(pyengine.NumericalError, match="layer 0 "):
                eng.reset() or eng.logits(model["ids"][:8])
    finally:
        _C.set_cpu_path(before)


def test_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="kv_type must be 'f16', 'f32' or 'q8_0', not 'q4_0'"):
        pyengine.Engine(model["path"], n_ctx=64, kv_type="q4_0")
    # The default tiny model's heads are 16 wide: no whole block of 32.
    small = tmp_path / "hd16.gguf"
    convert(make_llama(tmp_path / "hf16"), small, qtype="f32")
    with pytest.raises(pyengine.EngineError, match="multiple of 32; this model's is 16"):
        pyengine.Engine(small, n_ctx=64, kv_type="q8_0")
    m = _C.Model(str(model["path"]))
    for n in (2, -1):  # the GPU's attention reads f16 or f32 caches
        with pytest.raises(pyengine.EngineError, match="q8_0 KV cache runs on the CPU only"):
            _C.plan_offload(m, n, 256, 1, 512, "q8_0", 1 << 40)
    assert _C.plan_offload(m, 0, 256, 1, 512, "q8_0", 1 << 40)["n_gpu_layers"] == 0


def test_cli_and_server_take_kv_type(model):
    import json
    import subprocess
    import sys

    from pyengine.server import build_server

    out = subprocess.run([sys.executable, "-m", "pyengine", "bench", "-m", str(model["path"]), "-p", "8", "-n", "4",
                          "-r", "1", "--kv-type", "q8_0", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["kv_type"] == "q8_0"
    _, scheduler = build_server(model["path"], n_ctx=128, parallel=2, kv_type="q8_0")
    try:
        plan = scheduler.engine.memory_plan()
        assert plan["kv_cache"] * 64 == scheduler.engine.memory_plan(kv_type="f16")["kv_cache"] * 34
    finally:
        scheduler.close()
