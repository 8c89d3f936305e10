"""CUDA attention and KV store (csrc/cuda/attention.cu, kv_cache.cu) against the CPU backend and numpy,
through a real paged KVCache: F16 and F32 caches, grouped-query heads, sequences of different
lengths with interleaved pages, decode rows, causal prefill rows, bidirectional prefix rows."""
import numpy as np
import pytest

from pyengine import _C

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_C.has_cuda and getattr(_C, "cuda_device_count", lambda: 0)() > 0),
                       reason="needs a CUDA build and a CUDA device"),
]


def reference(q, n_head, n_kv, k_list, v_list, seq, kb, ke, scale, f16):
    hd = q.shape[1] // n_head
    group = n_head // n_kv
    out = np.zeros(q.shape, dtype=np.float64)
    for r in range(q.shape[0]):
        k, v = k_list[seq[r]], v_list[seq[r]]
        if f16:
            k, v = k.astype(np.float16), v.astype(np.float16)
        k = k[kb[r]:ke[r]].astype(np.float64).reshape(-1, n_kv, hd)
        v = v[kb[r]:ke[r]].astype(np.float64).reshape(-1, n_kv, hd)
        if k.shape[0] == 0:
            continue
        for h in range(n_head):
            s = scale * (k[:, h // group] @ q[r, h * hd:(h + 1) * hd].astype(np.float64))
            p = np.exp(s - s.max())
            out[r, h * hd:(h + 1) * hd] = (p / p.sum()) @ v[:, h // group]
    return out


def make_case(rng, n_head, n_kv, hd, lens, kind):
    """Rows of one batch: 'decode' (one row per sequence, all keys), 'prefill' (every position of every
    sequence, causal), 'prefix' (ChatGLM: rows inside the prefix see all of it, later rows are causal),
    'ranges' (arbitrary [key_begin, key_end))."""
    k_list = [rng.standard_normal((n, n_kv * hd)).astype(np.float32) for n in lens]
    v_list = [rng.standard_normal((n, n_kv * hd)).astype(np.float32) for n in lens]
    seq, kb, ke = [], [], []
    for s, n in enumerate(lens):
        if kind == "decode":
            rows = [(0, n)]
        elif kind == "prefill":
            rows = [(0, p + 1) for p in range(n)]
        elif kind == "prefix":
            prefix = max(1, n // 3)
            rows = [(0, prefix) if p < prefix else (0, p + 1) for p in range(n)]
        else:
            a = rng.integers(0, n, 6)
            b = rng.integers(0, n, 6)
            rows = [(int(min(x, y)), int(max(x, y)) + 1) for x, y in zip(a, b)]
        for b0, e0 in rows:
            seq.append(s)
            kb.append(b0)
            ke.append(e0)
    q = rng.standard_normal((len(seq), n_head * hd)).astype(np.float32)
    return q, k_list, v_list, np.array(seq, np.int32), np.array(kb, np.int32), np.array(ke, np.int32)


HEADS = [(4, 4, 8), (8, 2, 16), (6, 3, 32), (32, 8, 128), (14, 2, 64), (16, 1, 256), (24, 2, 64)]


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
@pytest.mark.parametrize("n_head,n_kv,hd", HEADS)
@pytest.mark.parametrize("kind,lens", [("decode", [1, 63, 64, 65, 300, 1000]), ("decode", [4000]),
                                        ("prefill", [70, 130]), ("prefix", [100, 5]), ("ranges", [1, 200, 700])])
def test_cuda_attention_matches_cpu_and_numpy(kv_type, n_head, n_kv, hd, kind, lens):
    rng = np.random.default_rng(n_head * 100 + hd + len(lens))
    q, k_list, v_list, seq, kb, ke = make_case(rng, n_head, n_kv, hd, lens, kind)
    scale = 1.0 / np.sqrt(hd)
    args = (kv_type, q, n_head, n_kv, k_list, v_list, seq, kb, ke, scale)
    gpu = _C.cuda_attention_test("cuda", *args)
    cpu = _C.cuda_attention_test("cpu", *args)
    ref = reference(q, n_head, n_kv, k_list, v_list, seq, kb, ke, scale, kv_type == "f16")
    assert np.all(np.isfinite(gpu))
    np.testing.assert_allclose(gpu, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_empty_rows_give_zeros(kv_type):
    rng = np.random.default_rng(2)
    n_head, n_kv, hd = 8, 2, 64
    q, k_list, v_list, seq, kb, ke = make_case(rng, n_head, n_kv, hd, [10, 300], "decode")
    # Rows that see nothing: an empty range, a range past the sequence, a sequence outside the cache.
    q = np.concatenate([q, rng.standard_normal((3, n_head * hd)).astype(np.float32)])
    seq = np.concatenate([seq, np.array([1, 0, 99], np.int32)])
    kb = np.concatenate([kb, np.array([40, 20, 0], np.int32)])
    ke = np.concatenate([ke, np.array([40, 30, 5], np.int32)])
    out = _C.cuda_attention_test("cuda", kv_type, q, n_head, n_kv, k_list, v_list, seq, kb, ke, 0.125)
    assert np.array_equal(out[2:], np.zeros_like(out[2:]))
    ref = reference(q[:2], n_head, n_kv, k_list, v_list, seq[:2], kb[:2], ke[:2], 0.125, kv_type == "f16")
    np.testing.assert_allclose(out[:2], ref, rtol=1e-3, atol=1e-4)


def test_store_skips_slots_outside_the_cache():
    rng = np.random.default_rng(4)
    q, k_list, v_list, seq, kb, ke = make_case(rng, 4, 2, 32, [64, 90], "prefill")
    args = ("f32", q, 4, 2, k_list, v_list, seq, kb, ke, 0.2)
    plain = _C.cuda_attention_test("cuda", *args)
    skipped = _C.cuda_attention_test("cuda", *args, bad_slots=True)
    assert np.array_equal(plain, skipped)


def test_head_dim_over_256_is_refused():
    rng = np.random.default_rng(5)
    q, k_list, v_list, seq, kb, ke = make_case(rng, 2, 1, 288, [3], "decode")
    with pytest.raises(_C.UnsupportedModelError, match="head_dim 288"):
        _C.cuda_attention_test("cuda", "f16", q, 2, 1, k_list, v_list, seq, kb, ke, 0.1)


@pytest.mark.parametrize("n_head,n_kv,hd", [(6, 6, 16), (8, 2, 32), (40, 40, 128)])
@pytest.mark.parametrize("kind,lens", [("decode", [1, 65, 1000]), ("prefill", [70, 130]), ("ranges", [1, 200, 700])])
def test_cuda_alibi_matches_cpu_and_numpy(n_head, n_kv, hd, kind, lens):
    """ALiBi slopes (Baichuan-13B's, non-power-of-two head counts too): bias slope * (j - (key_end - 1))."""
    rng = np.random.default_rng(n_head * 10 + hd + len(lens))
    q, k_list, v_list, seq, kb, ke = make_case(rng, n_head, n_kv, hd, lens, kind)
    slopes = _C.alibi_slopes(n_head, 8.0)
    scale = 1.0 / np.sqrt(hd)
    args = ("f32", q, n_head, n_kv, k_list, v_list, seq, kb, ke, scale)
    gpu = _C.cuda_attention_test("cuda", *args, alibi=slopes)
    cpu = _C.cuda_attention_test("cpu", *args, alibi=slopes)
    group = n_head // n_kv
    ref = np.zeros(q.shape)
    for r in range(q.shape[0]):
        k = k_list[seq[r]][kb[r]:ke[r]].astype(np.float64).reshape(-1, n_kv, hd)
        v = v_list[seq[r]][kb[r]:ke[r]].astype(np.float64).reshape(-1, n_kv, hd)
        for h in range(n_head):
            s = scale * (k[:, h // group] @ q[r, h * hd:(h + 1) * hd]) + slopes[h] * (np.arange(kb[r], ke[r]) - (ke[r] - 1))
            p = np.exp(s - s.max())
            ref[r, h * hd:(h + 1) * hd] = (p / p.sum()) @ v[:, h // group]
    np.testing.assert_allclose(gpu, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
