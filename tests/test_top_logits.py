"""top_logits (ops/top_logits.h): the k largest logits of each row, for sampling where the logits are.
The CPU op and the host mirror of the GPU kernel's radix selection (cuda/top_logits_math.cuh) against
numpy's stable descending sort; the weight sums against numpy in float64. The GPU kernel itself is
checked against the CPU op in tests/gpu/test_gpu_top_logits.py."""
from __future__ import annotations

import numpy as np
import pytest

from pyengine import _C


def reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-x.astype(np.float64), kind="stable")[:k]  # -0.0 and 0.0 tie, as in a float sort
    return order.astype(np.int32), x[order]


def rows(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return (rng.standard_normal(n) * 3).astype(np.float32)
    if kind == "wide":  # values spread over many binades, both signs
        return (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
    if kind == "ties":  # a few distinct values: most of the k largest are ties
        return rng.integers(-3, 4, n).astype(np.float32)
    if kind == "flat":  # every value equal: ties all the way, more than the kernel can sort at once
        return np.full(n, 1.25, np.float32)
    if kind == "zeros":  # +0.0 and -0.0 are equal values
        x = np.zeros(n, np.float32)
        x[rng.random(n) < 0.5] = -0.0
        x[rng.integers(0, n, 3)] = -1.0
        return x
    if kind == "peaked":  # one clear winner, the rest far below (a confident model)
        x = (rng.standard_normal(n) - 30).astype(np.float32)
        x[rng.integers(0, n)] = 12.0
        return x
    if kind == "outlier":  # a few within 8 of the maximum, many within 12: the CPU op's second cut
        x = (rng.standard_normal(n) * 1.5).astype(np.float32)
        x[rng.integers(0, n)] = x.max() + 6
        return x
    if kind == "rising":  # each later element larger: the CPU op's cut rises at every chunk it scans
        return (np.linspace(-20, 20, n) + rng.standard_normal(n) * 0.01).astype(np.float32)
    raise ValueError(kind)


KINDS = ["normal", "wide", "ties", "flat", "zeros", "peaked", "outlier", "rising"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 300, 49_152, 151_936])
def test_cpu_op_equals_stable_sort(kind, n):
    x = np.stack([rows(kind, n, seed) for seed in range(3)])
    ks = np.array([1, min(n, 40), min(n, 256)], np.int32)
    inv_t = np.array([0.0, 1.0, 1 / 0.7], np.float32)
    ids, values, stats = _C.top_logits(x, ks, inv_t, 256)
    for r in range(3):
        want_ids, want_values = reference(x[r], ks[r])
        np.testing.assert_array_equal(ids[r, : ks[r]], want_ids)
        np.testing.assert_array_equal(values[r, : ks[r]], want_values)
        assert (ids[r, ks[r]:] == -1).all()  # entries past k are left alone
        assert stats[r, 1] == 0
        top = x[r].astype(np.float64).max()
        want_sum = np.exp((x[r].astype(np.float64) - top) * np.float64(inv_t[r])).sum() if inv_t[r] > 0 else 0.0
        np.testing.assert_allclose(stats[r, 0], want_sum, rtol=1e-5)


def test_cpu_op_flags_non_finite_rows():
    x = rows("normal", 1000, 0)[None].repeat(4, axis=0)
    x[1, 17], x[2, 999], x[3, 0] = np.nan, np.inf, -np.inf
    _, _, stats = _C.top_logits(x, np.full(4, 5, np.int32), np.ones(4, np.float32), 8)
    assert stats[:, 1].tolist() == [0, 1, 1, 1]


def test_op_arguments_are_checked():
    x = rows("normal", 10, 0)[None]
    for k, k_max, inv_t in [(0, 4, 1.0), (5, 4, 1.0), (11, 256, 1.0), (1, 257, 1.0), (1, 4, -1.0), (1, 4, np.nan)]:
        with pytest.raises(ValueError, match="top_logits"):
            _C.top_logits(x, np.array([k], np.int32), np.array([inv_t], np.float32), k_max)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 300, 49_152])
@pytest.mark.parametrize("k", [1, 2, 40, 256])
@pytest.mark.parametrize("candidates", [2048, 256])
def test_gpu_radix_selection_on_the_host(kind, n, k, candidates):
    """The kernel's rounds, early gather and tie fallback (reported, so the cases are known to run)."""
    k = min(k, n)
    x = rows(kind, n, 5)
    ids, values, rounds, tie_fallback = _C.cuda_host_top_logits(x, k, candidates)
    want_ids, want_values = reference(x, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)
    assert 1 <= rounds <= 4
    if kind == "flat" and n > candidates:
        assert rounds == 4 and tie_fallback  # every key equal: only the whole key separates them


def test_gpu_radix_selection_takes_few_rounds_on_logits():
    """A model's logits: the top byte of the keys splits them coarsely, the second finishes the job."""
    x = rows("normal", 151_936, 1)
    _, _, rounds, tie_fallback = _C.cuda_host_top_logits(x, 40)
    assert rounds <= 2 and not tie_fallback
