"""top_logits on the GPU (csrc/cuda/top_logits.cu) against the CPU op: the same ids and values (both are
the exact k largest, ties lower index first), weight sums to float rounding, the same non-finite flags."""
import numpy as np
import pytest

from pyengine import _C
from test_top_logits import KINDS, rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_C.has_cuda and getattr(_C, "cuda_device_count", lambda: 0)() > 0),
                       reason="needs a CUDA build and a CUDA device"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 1000, 32_000, 151_936])
def test_gpu_equals_cpu(kind, n):
    ks = [1, 2, 40, 64, 256, 256]
    x = np.stack([rows(kind, n, seed) for seed in range(len(ks))])
    k = np.array([min(v, n) for v in ks], np.int32)
    inv_t = np.array([0.0, 1.0, 1 / 0.7, 2.0, 1.0, 0.0], np.float32)
    cpu = _C.top_logits(x, k, inv_t, 256, device="cpu")
    gpu = _C.top_logits(x, k, inv_t, 256, device="cuda")
    for r in range(len(ks)):
        np.testing.assert_array_equal(gpu[0][r, : k[r]], cpu[0][r, : k[r]])
        np.testing.assert_array_equal(gpu[1][r, : k[r]], cpu[1][r, : k[r]])
    np.testing.assert_allclose(gpu[2][:, 0], cpu[2][:, 0], rtol=2e-5)
    assert (gpu[2][:, 1] == 0).all()


def test_gpu_flags_non_finite_rows():
    x = rows("normal", 50_000, 0)[None].repeat(4, axis=0)
    x[1, 17], x[2, 49_999], x[3, 0] = np.nan, np.inf, -np.inf
    _, _, stats = _C.top_logits(x, np.full(4, 40, np.int32), np.ones(4, np.float32), 64, device="cuda")
    assert stats[:, 1].tolist() == [0, 1, 1, 1]


def test_gpu_many_rows_and_narrow_k_max():
    x = np.stack([rows("normal", 49_152, seed) for seed in range(20)])
    k = (np.arange(20) % 8 + 1).astype(np.int32)
    inv_t = np.linspace(0, 3, 20).astype(np.float32)
    cpu = _C.top_logits(x, k, inv_t, 8, device="cpu")
    gpu = _C.top_logits(x, k, inv_t, 8, device="cuda")
    for r in range(20):
        np.testing.assert_array_equal(gpu[0][r, : k[r]], cpu[0][r, : k[r]])
        assert (gpu[0][r, k[r]:] == -1).all()
    np.testing.assert_allclose(gpu[2], cpu[2], rtol=2e-5)
