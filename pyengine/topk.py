"""torch.topk's order on the CPU, ties included, in numpy: transformers' beam search ranks candidates
with torch.topk, and equal scores (forced tokens, banned n-grams, equal logits) must give equal picks.

torch.topk (aten/src/ATen/native/TopKImpl.h) runs libstdc++'s std::partial_sort when k * 64 <= n, else
std::nth_element then std::sort of the first k - 1, with the comparator "NaN first, then greater". Neither
is stable, and their tie order comes from the heap and partition steps, so those steps are reproduced here
as libstdc++ writes them (bits/stl_heap.h, bits/stl_algo.h) on (value, index) pairs. The partial sort of a
beam step (k = 2 x beams of beams x vocab scores) touches only the few elements that enter its heap, which
numpy finds; the nth_element path runs only on small arrays (n < 64 k).
"""
from __future__ import annotations

import numpy as np

__all__ = ["topk"]


def _gt(a: float, b: float) -> bool:
    """torch's comparator for largest=True: NaN before everything, then greater first."""
    return (a != a and b == b) or a > b


def _adjust_heap(h: list, hole: int, n: int, value: tuple) -> None:
    top = hole
    child = hole
    while child < (n - 1) // 2:
        child = 2 * (child + 1)
        if _gt(h[child][0], h[child - 1][0]):
            child -= 1
        h[hole] = h[child]
        hole = child
    if n & 1 == 0 and child == (n - 2) // 2:
        child = 2 * (child + 1)
        h[hole] = h[child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and _gt(h[parent][0], value[0]):
        h[hole] = h[parent]
        hole = parent
        parent = (hole - 1) // 2
    h[hole] = value


def _make_heap(h):
    n = len(h)
    if n < 2:
        return
    for parent in range((n - 2) // 2, -1, -1):
        _adjust_heap(h, parent, n, h[parent])


def _sort_heap(h):
    for last in range(len(h) - 1, 0, -1):
        value = h[last]
        h[last] = h[0]
        _adjust_heap(h, 0, last, value)


def _insertion_sort(a, lo, hi):
    for i in range(lo + 1, hi):
        val = a[i]
        if _gt(val[0], a[lo][0]):
            a[lo + 1:i + 1] = a[lo:i]
            a[lo] = val
        else:
            j = i
            while _gt(val[0], a[j - 1][0]):
                a[j] = a[j - 1]
                j -= 1
            a[j] = val


def _unguarded_insertion_sort(a, lo, hi):
    for i in range(lo, hi):
        val = a[i]
        j = i
        while _gt(val[0], a[j - 1][0]):
            a[j] = a[j - 1]
            j -= 1
        a[j] = val


def _move_median_to_first(a: list, result: int, x: int, y: int, z: int) -> None:
    A, B, C = a[x][0], a[y][0], a[z][0]
    if _gt(A, B):
        m = y if _gt(B, C) else z if _gt(A, C) else x
    else:
        m = x if _gt(A, C) else z if _gt(B, C) else y
    a[result], a[m] = a[m], a[result]


def _partition_pivot(a, first, last):
    mid = first + (last - first) // 2
    _move_median_to_first(a, first, first + 1, mid, last - 1)
    pivot = a[first][0]
    lo, hi = first + 1, last
    while True:
        while _gt(a[lo][0], pivot):
            lo += 1
        hi -= 1
        while _gt(pivot, a[hi][0]):
            hi -= 1
        if not lo < hi:
            return lo
        a[lo], a[hi] = a[hi], a[lo]
        lo += 1


def _heap_select_list(a, first, middle, last):
    h = a[first:middle]
    _make_heap(h)
    for i in range(middle, last):
        if _gt(a[i][0], h[0][0]):
            value = a[i]
            a[i] = h[0]
            _adjust_heap(h, 0, len(h), value)
    a[first:middle] = h


def _lg(n):
    return n.bit_length() - 1


def _nth_element(a, nth):
    first, last = 0, len(a)
    if first == last or nth == last:
        return
    depth = _lg(last - first) * 2
    while last - first > 3:
        if depth == 0:
            _heap_select_list(a, first, nth + 1, last)
            a[first], a[nth] = a[nth], a[first]
            return
        depth -= 1
        cut = _partition_pivot(a, first, last)
        if cut <= nth:
            first = cut
        else:
            last = cut
    _insertion_sort(a, first, last)


def _introsort_loop(a, first, last, depth):
    while last - first > 16:
        if depth == 0:
            h = a[first:last]
            _make_heap(h)
            _sort_heap(h)
            a[first:last] = h
            return
        depth -= 1
        cut = _partition_pivot(a, first, last)
        _introsort_loop(a, cut, last, depth)
        last = cut


def _std_sort(a, first, last):
    if first == last:
        return
    _introsort_loop(a, first, last, _lg(last - first) * 2)
    if last - first > 16:
        _insertion_sort(a, first, first + 16)
        _unguarded_insertion_sort(a, first + 16, last)
    else:
        _insertion_sort(a, first, last)


def topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of the 1-D array `x`, largest first, in torch.topk's order on the
    CPU, ties and NaN (largest) included: what transformers' beam search picks from equal scores."""
    if not 1 <= k <= x.size:
        raise ValueError(f"topk: k = {k} for {x.size} values")
    if k * 64 <= x.size:  # torch's choice of algorithm (aten/src/ATen/native/TopKImpl.h)
        return _partial_sort_topk(x, k)
    a = [(v, i) for i, v in enumerate(x.tolist())]
    _nth_element(a, k - 1)
    _std_sort(a, 0, k - 1)
    return np.array([i for _, i in a[:k]], dtype=np.int64)


def _partial_sort_topk(x: np.ndarray, k: int) -> np.ndarray:
    # std::partial_sort = a heap of the first k, then each later element that beats the heap's top (the
    # k-th best so far, which only rises) replaces it, then a heap sort. Only the elements that beat the
    # top when they come change anything: numpy finds the few candidates in chunks that grow as the top rises.
    h = [(v, i) for i, v in enumerate(x[:k].tolist())]
    _make_heap(h)
    pos, chunk = k, 1024
    while pos < x.size:
        seg = x[pos:pos + chunk]
        top = h[0][0]
        if top == top:  # nothing beats a NaN top
            cand = np.flatnonzero((seg > top) | (seg != seg))
            for j, v in zip(cand.tolist(), seg[cand].tolist()):
                if _gt(v, h[0][0]):
                    _adjust_heap(h, 0, k, (v, pos + j))
        pos += chunk
        chunk *= 2
    _sort_heap(h)
    return np.array([i for _, i in h], dtype=np.int64)
