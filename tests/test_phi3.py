"""Phi-3: a tiny random Phi3ForCausalLM (fused qkv_proj and gate_up_proj, GQA), full and partial
rotary, converted to llama.cpp's `phi3`, against transformers: F32 logits to 1e-4 (full forward,
token by token, batched); LongRoPE configs are refused with a clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_phi3
from pyengine_convert import ConversionError, convert


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_logits_match_transformers(tmp_path, partial):
    hf_dir = make_phi3(tmp_path / "hf", partial_rotary_factor=partial)
    model = load_hf_model(hf_dir)
    convert(hf_dir, tmp_path / "f32.gguf", qtype="f32")
    ids = np.random.default_rng(7).integers(3, 200, size=30).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    llm = pyengine.LLM(tmp_path / "f32.gguf", n_ctx=64, kv_type="f32")
    np.testing.assert_allclose(llm.logits(ids), ref, **tol)
    llm.reset()
    steps = [llm.eval(ids[:4])] + [llm.eval([t]) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(steps), ref[3:], **tol)
    eng = pyengine.Engine(tmp_path / "f32.gguf", n_ctx=64, n_seq_max=2, kv_type="f32")
    out = eng.decode(ids[:7] + ids, [0] * 7 + [1] * len(ids))
    np.testing.assert_allclose(out[7:], ref, **tol)


def test_longrope_is_refused(tmp_path):
    hf_dir = make_phi3(tmp_path / "hf", n_layers=1)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="longrope"):
        convert(hf_dir, tmp_path / "x.gguf", qtype="f32")
