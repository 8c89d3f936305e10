"""Qwen3-MoE on the GPU (not run where these were written: no GPU there): the MoE op (host routing, each
expert's matmul on the GPU, moe_combine's CUDA kernel) against the CPU op for every weight type, and a
tiny model whole and split against transformers.

Tolerances as test_gpu_model.py / test_gpu_matmul.py reason them: the GPU multiplies prefill rows (more
than 8) on tensor cores with fp16 inputs, and does not quantise activations to 8 bits as the CPU does for
quantized weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from pyengine import _C
from test_qwen3moe import OP_TYPES, random_experts

pytestmark = pytest.mark.gpu
ALL = 99


@pytest.mark.parametrize("qtype", OP_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 5, 40])
def test_moe_op_on_gpu_matches_cpu(qtype, n_rows):
    (_, n_ff, _, k), (router, gate, up, down), x = random_experts(qtype, n_rows)
    for norm in (True, False):
        cpu = _C.moe_ffn(router, gate, up, down, int(qtype), n_ff, k, norm, x)
        gpu = _C.moe_ffn(router, gate, up, down, int(qtype), n_ff, k, norm, x, device="cuda")
        frac = 5e-3 if qtype.name in ("F32", "F16", "BF16") else 3e-2
        np.testing.assert_allclose(gpu, cpu, rtol=frac, atol=frac * np.abs(cpu).max())


def test_qwen3moe_on_gpu(tmp_path):
    from checkpoints import load_hf_model, make_qwen3moe
    from pyengine_convert import convert

    hf_dir = make_qwen3moe(tmp_path / "hf", n_layers=3, mlp_only_layers=[1])
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    model = load_hf_model(hf_dir)
    ids = np.random.default_rng(1).integers(3, 200, size=30).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    for ngl in (1, 2, ALL):
        llm = pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32", n_gpu_layers=ngl)
        prefill = llm.eval(ids[:-4], all_logits=True)
        steps = [llm.eval([t]) for t in ids[-4:]]
        got = np.concatenate([prefill, np.stack(steps)])
        np.testing.assert_allclose(got, ref, rtol=5e-3, atol=5e-3 * np.abs(ref).max(), err_msg=f"n_gpu_layers={ngl}")
