"""The arithmetic of the CUDA attention kernels (csrc/cuda/attention_math.cuh), run on the host in the
kernels' order (whole-page splits, a page-sized tile at a time, splits merged in order), against
numpy softmax attention. Needs no GPU."""
import numpy as np
import pytest

from pyengine import _C

PAGE = 64


def reference(q, k, v, scale, key_begin=0, key_end=None, alibi=None):
    """softmax(scale * q k^T) v per head in float64; head h reads KV head h // (n_head // n_kv_head).
    alibi: per-head slopes; key j's score gets slope * (j - (key_end - 1))."""
    n_head, n_kv = q.shape[0], k.shape[0]
    key_end = k.shape[1] if key_end is None else key_end
    out = np.zeros(q.shape, dtype=np.float64)
    for h in range(n_head):
        g = h // (n_head // n_kv)
        kk = k[g, key_begin:key_end].astype(np.float64)
        vv = v[g, key_begin:key_end].astype(np.float64)
        if kk.shape[0] == 0:
            continue
        s = scale * (kk @ q[h].astype(np.float64))
        if alibi is not None:
            s = s + alibi[h] * (np.arange(key_begin, key_end) - (key_end - 1))
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vv
    return out


def make(rng, n_head, n_kv, hd, T, spread=1.0):
    q = rng.standard_normal((n_head, hd)).astype(np.float32) * spread
    k = rng.standard_normal((n_kv, T, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, T, hd)).astype(np.float32)
    return q, k, v


def check(out, ref, v):
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5 * max(1.0, float(np.abs(v).max())))


SHAPES = [  # n_head, n_kv_head, head_dim, T
    (4, 4, 8, 1),
    (8, 2, 16, 37),
    (6, 3, 32, 200),
    (4, 1, 64, 129),
    (12, 4, 128, 300),
    (2, 1, 256, 65),
    (16, 1, 32, 64),
]


@pytest.mark.parametrize("n_head,n_kv,hd,T", SHAPES)
@pytest.mark.parametrize("n_split", range(1, 8))
def test_matches_softmax_attention(n_head, n_kv, hd, T, n_split):
    rng = np.random.default_rng(n_head * 1000 + hd * 10 + T + n_split)
    q, k, v = make(rng, n_head, n_kv, hd, T)
    scale = 1.0 / np.sqrt(hd)
    out = _C.cuda_host_attention(q, k, v, scale, n_split)
    check(out, reference(q, k, v, scale), v)


@pytest.mark.parametrize("n_split", [1, 2, 3, 7])
def test_one_key_at_a_time_matches_the_tiles(n_split):
    rng = np.random.default_rng(7)
    q, k, v = make(rng, 8, 2, 16, 150)
    scale = 0.25
    tiles = _C.cuda_host_attention(q, k, v, scale, n_split)
    per_key = _C.cuda_host_attention(q, k, v, scale, n_split, per_score=True)
    check(per_key, reference(q, k, v, scale), v)
    np.testing.assert_allclose(tiles, per_key, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key_begin,key_end", [(0, 1), (70, 200), (63, 65), (64, 128), (100, 101), (0, 199), (5, 64)])
@pytest.mark.parametrize("n_split", [1, 2, 4, 7])
def test_key_ranges(key_begin, key_end, n_split):
    rng = np.random.default_rng(key_begin * 7 + key_end + n_split)
    q, k, v = make(rng, 4, 2, 32, 200)
    out = _C.cuda_host_attention(q, k, v, 0.2, n_split, key_begin, key_end)
    check(out, reference(q, k, v, 0.2, key_begin, key_end), v)


@pytest.mark.parametrize("n_split", range(1, 8))
def test_one_key_and_more_splits_than_pages(n_split):
    """T = 1: every split but the first is empty (m = -inf, l = 0); the result is that key's value."""
    rng = np.random.default_rng(n_split)
    q, k, v = make(rng, 4, 2, 16, 1)
    out = _C.cuda_host_attention(q, k, v, 0.25, n_split)
    np.testing.assert_allclose(out, np.repeat(v[:, 0], 2, axis=0), rtol=1e-6)


@pytest.mark.parametrize("n_split", [1, 3, 7])
def test_empty_range_gives_zeros(n_split):
    rng = np.random.default_rng(1)
    q, k, v = make(rng, 4, 2, 16, 100)
    out = _C.cuda_host_attention(q, k, v, 0.25, n_split, 40, 40)
    assert np.array_equal(out, np.zeros_like(out))


@pytest.mark.parametrize("n_split", [1, 2, 5, 7])
@pytest.mark.parametrize("lo,hi", [(-80.0, 80.0), (-80.0, -60.0), (60.0, 80.0)])
def test_large_score_range(n_split, lo, hi):
    """Scores in [lo, hi] after scaling: exp would overflow or vanish without the running max."""
    rng = np.random.default_rng(3)
    hd, T = 32, 300
    q = np.zeros((4, hd), dtype=np.float32)
    q[:, 0] = 2.0
    k = rng.standard_normal((2, T, hd)).astype(np.float32)
    for g in range(2):
        k[g, :, 0] = rng.permutation(np.linspace(lo, hi, T, dtype=np.float32))
    v = rng.standard_normal((2, T, hd)).astype(np.float32)
    scale = 0.5
    out = _C.cuda_host_attention(q, k, v, scale, n_split)
    check(out, reference(q, k, v, scale), v)


def test_merge_empty_with_full():
    rng = np.random.default_rng(5)
    acc = rng.standard_normal(16).astype(np.float32)
    zeros = np.zeros(16, dtype=np.float32)
    for args in [(-np.inf, 0.0, zeros, 3.5, 2.0, acc), (3.5, 2.0, acc, -np.inf, 0.0, zeros)]:
        m, l, out, inv = _C.cuda_host_softmax_merge(*args)
        assert (m, l) == (3.5, 2.0)
        np.testing.assert_array_equal(out, acc)
        assert inv == 0.5
    m, l, out, inv = _C.cuda_host_softmax_merge(-np.inf, 0.0, zeros, -np.inf, 0.0, zeros)
    assert m == -np.inf and l == 0.0 and inv == 0.0
    assert np.array_equal(out, zeros)  # not NaN


def test_merge_of_halves_is_the_whole():
    rng = np.random.default_rng(6)
    s = rng.standard_normal(50) * 10
    v = rng.standard_normal((50, 8))

    def partial(ss, vv):
        m = ss.max()
        p = np.exp(ss - m)
        return m, p.sum(), (p @ vv).astype(np.float32)

    a, b = partial(s[:20], v[:20]), partial(s[20:], v[20:])
    m, l, acc, inv = _C.cuda_host_softmax_merge(*a, *b)
    assert m == np.float32(s.max())
    p = np.exp(s - s.max())
    np.testing.assert_allclose(l, p.sum(), rtol=1e-5)
    np.testing.assert_allclose(acc * inv, (p / p.sum()) @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key_begin,key_end", [(0, 1), (0, 64), (0, 65), (10, 500), (64, 128), (127, 129), (30, 30),
                                               (1000, 4097)])
@pytest.mark.parametrize("n_split", [1, 2, 3, 5, 7, 32])
def test_splits_partition_the_range_in_whole_pages(key_begin, key_end, n_split):
    ranges = [_C.cuda_host_split_range(key_begin, key_end, n_split, s) for s in range(n_split)]
    covered = []
    for lo, hi in ranges:
        assert lo <= hi
        if lo < hi:
            assert key_begin <= lo and hi <= key_end
            assert lo == key_begin or lo % PAGE == 0
            assert hi == key_end or hi % PAGE == 0
            covered.extend(range(lo, hi))
    assert covered == list(range(key_begin, key_end))  # in order, each key once


def test_half_bits_to_float_matches_numpy():
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = _C.cuda_host_half_bits_to_float(bits)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_float_to_half_bits_matches_numpy():
    rng = np.random.default_rng(8)
    halves = np.arange(0x7c00, dtype=np.uint16).view(np.float16).astype(np.float64)  # every finite half >= 0
    midpoints = (halves[:-1] + halves[1:]) / 2  # exact in float32; ties round to even
    x = np.concatenate([
        (rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000)).astype(np.float32),
        halves.astype(np.float32),
        -halves.astype(np.float32),
        midpoints.astype(np.float32),
        -midpoints.astype(np.float32),
        np.array([65504, 65519.99, 65520, 1e6, -1e6, 2.0**-25, 2.0**-24, 1.5 * 2.0**-25, 2.0**-26, 0.0, -0.0,
                  np.inf, -np.inf], dtype=np.float32),
    ])
    assert x.dtype == np.float32  # a float64 input would be rounded twice
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(_C.cuda_host_float_to_half_bits(x), expected)
    nan_bits = _C.cuda_host_float_to_half_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(nan_bits.view(np.float16)[0])


# --- ALiBi ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head,n_kv,hd,T", [(4, 4, 8, 37), (6, 3, 32, 200), (12, 4, 128, 300), (5, 5, 16, 129)])
@pytest.mark.parametrize("n_split", [1, 2, 5])
@pytest.mark.parametrize("windowed", [False, True])
def test_alibi_matches_softmax_attention(n_head, n_kv, hd, T, n_split, windowed):
    """The kernels' ALiBi bias (attention_math.cuh alibi_bias) over page tiles and splits."""
    key_begin = T // 2 if windowed else 0
    rng = np.random.default_rng(n_head * 100 + T + n_split)
    q, k, v = make(rng, n_head, n_kv, hd, T)
    slopes = _C.alibi_slopes(n_head, 8.0)
    out = _C.cuda_host_attention(q, k, v, 0.2, n_split, key_begin, T, alibi=slopes)
    ref = reference(q, k, v, 0.2, key_begin, T, alibi=slopes)
    check(out, ref, v)
    assert np.abs(ref - reference(q, k, v, 0.2, key_begin, T)).max() > 1e-2   # the bias matters here


def op_reference(q, n_head, n_kv, k_list, v_list, seq, kb, ke, scale, alibi):
    hd = q.shape[1] // n_head
    out = np.zeros(q.shape)
    for r in range(q.shape[0]):
        k = k_list[seq[r]].reshape(-1, n_kv, hd).transpose(1, 0, 2)
        v = v_list[seq[r]].reshape(-1, n_kv, hd).transpose(1, 0, 2)
        out[r] = reference(q[r].reshape(n_head, hd), k, v, scale, kb[r], ke[r], alibi).reshape(-1)
    return out


@pytest.mark.parametrize("n_head,n_kv,hd", [(6, 6, 16), (8, 2, 32), (12, 3, 64)])
def test_alibi_in_the_cpu_op(n_head, n_kv, hd):
    """The CPU attention op with ALiBi slopes over a paged cache: prefill rows of two sequences across
    pages, and a windowed range."""
    rng = np.random.default_rng(n_head + hd)
    lens = [150, 70]
    k_list = [rng.standard_normal((n, n_kv * hd)).astype(np.float32) for n in lens]
    v_list = [rng.standard_normal((n, n_kv * hd)).astype(np.float32) for n in lens]
    rows = [(s, 0, p + 1) for s, n in enumerate(lens) for p in range(n)] + [(0, 100, 150)]
    seq, kb, ke = (np.array(x, np.int32) for x in zip(*rows))
    q = rng.standard_normal((len(rows), n_head * hd)).astype(np.float32)
    slopes = _C.alibi_slopes(n_head, 8.0)
    scale = 1.0 / np.sqrt(hd)
    out = _C.cuda_attention_test("cpu", "f32", q, n_head, n_kv, k_list, v_list, seq, kb, ke, scale, alibi=slopes)
    np.testing.assert_allclose(out, op_reference(q, n_head, n_kv, k_list, v_list, seq, kb, ke, scale, slopes),
                               rtol=1e-4, atol=2e-5)
