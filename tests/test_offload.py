"""Partial GPU offload, the host side (no GPU needed): the memory plan for every n_gpu_layers value
and "auto" against a fake free-memory budget, checked against tensor sizes read with the `gguf`
package (independent of the engine's loader); the errors for a plan that does not fit, for a machine
without a GPU, and for bad -ngl values. The GPU side (every split point against the whole model on
the GPU) is tests/gpu/test_gpu_model.py.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import pyengine
from checkpoints import make_llama
from pyengine import _C
from pyengine_convert import convert
from test_cli import _one_line_error, pyengine_cmd

MARGIN = 256 << 20
N_LAYERS = 5


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    hf = make_llama(d / "hf", tied=False, n_kv_heads=2, n_layers=N_LAYERS)
    out = d / "q4_0.gguf"
    convert(hf, out, qtype="q4_0", output_qtype="q4_0")
    return out


def stored_bytes(t) -> int:
    """A tensor as the engine puts it on a GPU: 2-D weights as stored, 1-D parameters as F32."""
    return int(t.n_bytes) if len(t.shape) > 1 and t.shape[1] > 1 else int(t.n_elements) * 4


def round_256(n: int) -> int:
    return (n + 255) // 256 * 256


# Linears of a block that read the same input: on a GPU they are stacked (back to back, weights and biases
# each) when they share a type, so that each group is one matmul.
STACKS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def block_bytes(tensors: dict) -> int:
    """One block's device bytes: every stack and every other tensor 256-byte aligned."""
    total, stacked = 0, set()
    for names in STACKS:
        ws = [tensors.get(f"{n}.weight") for n in names]
        if any(w is None for w in ws) or len({(int(w.tensor_type), tuple(w.shape)[0]) for w in ws}) > 1:
            continue
        for part in ("weight", "bias"):
            group = [f"{n}.{part}" for n in names]
            if part == "bias" and not all(g in tensors for g in group):
                continue
            total += round_256(sum(stored_bytes(tensors[g]) for g in group))
            stacked.update(group)
    return total + sum(round_256(stored_bytes(t)) for name, t in tensors.items() if name not in stacked)


def expected_weights(path, n: int) -> int:
    r = gguf.GGUFReader(str(path))
    by_layer = {}
    head = 0
    for t in r.tensors:
        if t.name.startswith("blk."):
            layer, name = t.name.split(".", 2)[1:]
            by_layer.setdefault(int(layer), {})[name] = t
        elif t.name.startswith("output"):
            head += round_256(stored_bytes(t))
    total = sum(block_bytes(by_layer[l]) for l in range(N_LAYERS - n, N_LAYERS))
    return total + (head if n == N_LAYERS else 0)


def test_plan_for_every_layer_count(model_file):
    model = _C.Model(str(model_file))
    c = model.config
    free = 1 << 40
    for n in range(0, N_LAYERS + 3):
        p = _C.plan_offload(model, n, 1000, 3, 512, "f16", free)
        k = min(n, N_LAYERS)
        assert p["n_gpu_layers"] == k
        assert p["head"] == (k == N_LAYERS)
        assert p["weights"] == expected_weights(model_file, k), n
        pages = -(-1000 // 64) * 3  # 64-position pages per sequence, 3 sequences
        assert p["kv_cache"] == k * pages * 64 * 2 * c["n_head_kv"] * c["head_dim"] * 2
        assert p["total"] == p["weights"] + p["kv_cache"] + p["scratch"]
        assert (p["scratch"] > 0) == (k > 0)
    f32 = _C.plan_offload(model, 2, 1000, 3, 512, "f32", free)
    assert f32["kv_cache"] == 2 * _C.plan_offload(model, 2, 1000, 3, 512, "f16", free)["kv_cache"]


def test_auto_takes_the_most_that_fits(model_file):
    model = _C.Model(str(model_file))
    cost = [_C.plan_offload(model, n, 4096, 1, 512, "f16", 1 << 40)["total"] for n in range(N_LAYERS + 1)]
    assert all(a < b for a, b in zip(cost, cost[1:]))
    for n in range(N_LAYERS + 1):
        exact = cost[n] + MARGIN
        assert _C.plan_offload(model, -1, 4096, 1, 512, "f16", exact)["n_gpu_layers"] == n
        if n < N_LAYERS:
            assert _C.plan_offload(model, -1, 4096, 1, 512, "f16", cost[n + 1] + MARGIN - 1)["n_gpu_layers"] == n
    assert _C.plan_offload(model, -1, 4096, 1, 512, "f16", 0)["n_gpu_layers"] == 0


def test_too_many_layers_is_a_clear_error(model_file):
    model = _C.Model(str(model_file))
    cost = [_C.plan_offload(model, n, 4096, 1, 512, "f16", 1 << 40)["total"] for n in range(N_LAYERS + 1)]
    free = cost[2] + MARGIN + 1
    with pytest.raises(pyengine.DeviceMemoryError) as e:
        _C.plan_offload(model, 4, 4096, 1, 512, "f16", free)
    msg = str(e.value)
    assert "n_gpu_layers=4 needs" in msg and "pass n_gpu_layers=2 or fewer (-ngl 2)" in msg and "'auto'" in msg
    assert isinstance(e.value, pyengine.EngineError)
    with pytest.raises(pyengine.DeviceMemoryError, match="pass n_gpu_layers=0 "):
        _C.plan_offload(model, 1, 4096, 1, 512, "f16", 1 << 20)


@pytest.mark.skipif(_C.cuda_device_count() > 0, reason="checks the machine without a GPU")
def test_no_gpu(model_file):
    with pytest.raises(pyengine.EngineError, match=r"n_gpu_layers=2: .*(no CUDA backend|no CUDA GPU).*-ngl 0"):
        pyengine.LLM(model_file, n_ctx=64, n_gpu_layers=2)
    llm = pyengine.LLM(model_file, n_ctx=64, n_gpu_layers="auto")  # as many as fit: none
    assert llm.n_gpu_layers == 0 and llm.offload_plan is None
    ref = pyengine.LLM(model_file, n_ctx=64)
    np.testing.assert_array_equal(llm.eval([1, 2, 3]), ref.eval([1, 2, 3]))
    _one_line_error(pyengine_cmd("generate", "-m", str(model_file), "-p", "x", "-ngl", "3"), "n_gpu_layers=3")


@pytest.mark.parametrize("value", [-1, 1.5, "all", True])
def test_bad_n_gpu_layers(model_file, value):
    with pytest.raises(ValueError, match="n_gpu_layers must be"):
        pyengine.LLM(model_file, n_ctx=64, n_gpu_layers=value)


@pytest.mark.parametrize("cmd", [("chat",), ("generate", "-p", "x"), ("bench",), ("perplexity",), ("serve",)])
def test_ngl_flag_is_checked(cmd):
    r = pyengine_cmd(*cmd, "-ngl", "lots", input="")
    assert r.returncode == 2, r.stderr
    error = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "argument -ngl/--n-gpu-layers" in error[0], r.stderr


def test_context_made_before_offload_refuses_to_run(model_file):
    if _C.cuda_device_count() == 0:
        pytest.skip("needs a GPU to offload")
    model = _C.Model(str(model_file))
    ctx = _C.Context(model, _C.Executor(1), 64)
    model.offload(2)
    with pytest.raises(pyengine.EngineError, match="offloaded to the GPU after this context was created"):
        ctx.eval(np.array([1, 2], np.int32))
