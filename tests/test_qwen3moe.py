"""Qwen3-MoE (llama.cpp's `qwen3moe`): tiny random Qwen3MoeForCausalLM models (8 experts of 32, top-2; all
blocks sparse, or some dense through mlp_only_layers / decoder_sparse_step; norm_topk_prob true and false)
against transformers: F32 logits to 1e-4 (full forward and token by token), Q8_0/Q4_0 within the bounds
the other model tests use, a batch of sequences equal to each alone. The converter's file against
llama.cpp's convert_hf_to_gguf.py (same keys and tensors, bit for bit), llama.cpp's llama-perplexity on our
file against our perplexity, requantization against llama-quantize, the MoE op on every weight type
against a composition of the engine's own matmul, and bad input.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_qwen3moe
from llama_cpp_ref import TEXT, llama_cpp_convert, llama_perplexity
from pyengine import _C
from pyengine_convert import ConversionError, convert
from test_model import kl_div

Q = gguf.GGMLQuantizationType

# every block sparse; a dense block among sparse ones (mlp_only_layers); every other block dense
# (decoder_sparse_step 2) with the chosen experts' weights not renormalised (norm_topk_prob false)
VARIANTS = {
    "sparse": dict(n_layers=2),
    "mixed": dict(n_layers=3, mlp_only_layers=[1]),
    "step2_unnormed": dict(n_layers=4, decoder_sparse_step=2, norm_topk_prob=False, num_experts_per_tok=3, seed=3),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def moe(tmp_path_factory, request):
    d = tmp_path_factory.mktemp(f"qwen3moe-{request.param}")
    hf_dir = make_qwen3moe(d / "hf", **VARIANTS[request.param])
    files = {}
    for q in ("f32", "q8_0", "q4_0"):
        files[q] = d / f"{q}.gguf"
        convert(hf_dir, files[q], qtype=q, output_qtype=None if q == "f32" else q)
    return dict(name=request.param, dir=d, hf_dir=hf_dir, model=load_hf_model(hf_dir), files=files,
                config=json.loads((hf_dir / "config.json").read_text()))


def reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def tol(ref):
    return dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_file(moe):
    r = gguf.GGUFReader(str(moe["files"]["q8_0"]))
    cfg = moe["config"]
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "qwen3moe"
    assert field("qwen3moe.expert_count") == 8 and field("qwen3moe.expert_used_count") == cfg["num_experts_per_tok"]
    assert field("qwen3moe.expert_feed_forward_length") == 32 and field("qwen3moe.feed_forward_length") == 128
    assert ("qwen3moe.expert_weights_norm" in r.fields) == (not cfg["norm_topk_prob"])
    t = {x.name: x for x in r.tensors}
    dense = [i for i in range(cfg["num_hidden_layers"])
             if i in cfg["mlp_only_layers"] or (i + 1) % cfg["decoder_sparse_step"] != 0]
    for i in range(cfg["num_hidden_layers"]):
        if i in dense:
            assert {f"blk.{i}.ffn_{k}.weight" for k in ("gate", "up", "down")} <= set(t)
            assert f"blk.{i}.ffn_gate_inp.weight" not in t
            continue
        assert t[f"blk.{i}.ffn_gate_inp.weight"].tensor_type == Q.F32          # routers stay F32
        assert [int(x) for x in t[f"blk.{i}.ffn_gate_exps.weight"].shape] == [64, 32, 8]
        assert [int(x) for x in t[f"blk.{i}.ffn_down_exps.weight"].shape] == [32, 64, 8]
        assert t[f"blk.{i}.ffn_up_exps.weight"].tensor_type == Q.Q8_0
        assert f"blk.{i}.ffn_gate.weight" not in t


def test_logits_match_transformers(moe):
    ids = np.random.default_rng(5).integers(3, 250, size=33).tolist()
    ref = reference(moe["model"], ids)
    llm = pyengine.LLM(moe["files"]["f32"], n_ctx=64, kv_type="f32")
    assert llm.config["n_expert"] == 8
    np.testing.assert_allclose(llm.logits(ids), ref, **tol(ref))
    llm.reset()
    steps = [llm.eval(ids[:4])] + [llm.eval([t]) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(steps), ref[3:], **tol(ref))


def test_quantized_close(moe):
    """Bounds of test_qwen3 (Q8_0) and test_chatglm (Q4_0): a rounded router may pick another expert for a
    few rows, which these bounds leave room for."""
    ids = np.random.default_rng(5).integers(3, 250, size=33).tolist()
    ref = reference(moe["model"], ids)
    q8 = pyengine.LLM(moe["files"]["q8_0"], n_ctx=64).logits(ids)
    np.testing.assert_allclose(q8, ref, atol=5e-2 * np.abs(ref).max())
    q4 = pyengine.LLM(moe["files"]["q4_0"], n_ctx=64).logits(ids)
    rel_rms = float(np.sqrt(np.mean((q4 - ref) ** 2)) / ref.std())
    assert rel_rms < 0.4 and kl_div(ref, q4) < 2e-2, (rel_rms, kl_div(ref, q4))


def test_batch_equals_each_alone(moe):
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 250, size=n).tolist() for n in (2, 17, 9)]
    eng = pyengine.Engine(moe["files"]["f32"], n_ctx=64, n_seq_max=3, kv_type="f32")
    out = eng.decode([t for p in prompts for t in p], [i for i, p in enumerate(prompts) for _ in p])
    at = np.cumsum([0] + [len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ref = reference(moe["model"], p)
        np.testing.assert_allclose(out[at[i]:at[i + 1]], ref, **tol(ref))
    # one decode step for all three: one row per sequence through the same experts' weights
    nxt = [5, 77, 123]
    step = eng.decode(nxt, [0, 1, 2])
    for i, p in enumerate(prompts):
        ref = reference(moe["model"], p + [nxt[i]])[-1]
        np.testing.assert_allclose(step[i], ref, **tol(ref))


def test_greedy_generation_matches_transformers(moe):
    ids = np.random.default_rng(7).integers(3, 250, size=12).tolist()
    model = moe["model"]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
    llm = pyengine.LLM(moe["files"]["f32"], n_ctx=64, kv_type="f32")
    g = llm.generate(ids, stream=True, temperature=0, max_new_tokens=8, ignore_eos=True)
    g.wait()
    assert g.token_ids == want


# --- the MoE op against the engine's own matmul -----------------------------------------------------------

OP_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def moe_by_matmul(router, gate, up, down, qtype, n_expert, n_ff, d, k, norm, x, device="cpu"):
    """The op's definition, composed of numpy routing and the engine's matmul (tested per type in
    test_kernels) on each expert's own bytes, one row at a time."""
    logits = x.astype(np.float64) @ router.T.astype(np.float64)
    out = np.zeros_like(x, dtype=np.float64)
    g_rows, d_rows = gate.shape[0] // n_expert, down.shape[0] // n_expert
    for r in range(x.shape[0]):
        p = np.exp(logits[r] - logits[r].max())
        p /= p.sum()
        best = np.argsort(-p, kind="stable")[:k]
        w = p[best] / (p[best].sum() if norm else 1.0)
        for e, we in zip(best, w):
            xr = x[r:r + 1]
            g = _C.matmul(gate[e * g_rows:(e + 1) * g_rows].ravel(), int(qtype), n_ff, d, xr, device=device)
            u = _C.matmul(up[e * g_rows:(e + 1) * g_rows].ravel(), int(qtype), n_ff, d, xr, device=device)
            h = (g / (1 + np.exp(-g))) * u
            out[r] += we * _C.matmul(down[e * d_rows:(e + 1) * d_rows].ravel(), int(qtype), d, n_ff,
                                     h.astype(np.float32), device=device)[0]
    return out


def quantized(x, qtype):
    from pyengine_convert import quants

    data = quants.quantize(x.astype(np.float32), qtype)
    return np.ascontiguousarray(data).view(np.uint8).reshape(x.shape[0], -1)


def random_experts(qtype, n_rows: int):
    """A router, 6 experts of 256 (gate, up, down) quantized to `qtype`, and n_rows inputs of 256; top-3."""
    n_expert, n_ff, d, k = 6, 256, 256, 3
    rng = np.random.default_rng(int(qtype))
    router = rng.standard_normal((n_expert, d)).astype(np.float32) * 0.3
    gate = quantized(rng.standard_normal((n_expert * n_ff, d)) * 0.05, qtype)
    up = quantized(rng.standard_normal((n_expert * n_ff, d)) * 0.05, qtype)
    down = quantized(rng.standard_normal((n_expert * d, n_ff)) * 0.05, qtype)
    x = rng.standard_normal((n_rows, d)).astype(np.float32)
    return (n_expert, n_ff, d, k), (router, gate, up, down), x


@pytest.mark.parametrize("qtype", OP_TYPES, ids=lambda t: t.name)
def test_moe_op_every_type(qtype):
    (n_expert, n_ff, d, k), (router, gate, up, down), x = random_experts(qtype, 23)
    for norm in (True, False):
        got = _C.moe_ffn(router, gate, up, down, int(qtype), n_ff, k, norm, x, n_threads=2)
        want = moe_by_matmul(router, gate, up, down, qtype, n_expert, n_ff, d, k, norm, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_moe_op_f32_against_numpy():
    """The op in plain numpy (F32 weights): softmax, top-k, renormalised weights, SwiGLU experts."""
    n_expert, n_ff, d, k = 5, 32, 64, 2
    rng = np.random.default_rng(1)
    router = rng.standard_normal((n_expert, d)).astype(np.float32)
    gate, up = (rng.standard_normal((n_expert, n_ff, d)).astype(np.float32) * 0.1 for _ in range(2))
    down = rng.standard_normal((n_expert, d, n_ff)).astype(np.float32) * 0.1
    x = rng.standard_normal((40, d)).astype(np.float32)
    got = _C.moe_ffn(router, gate.view(np.uint8), up.view(np.uint8), down.view(np.uint8), int(Q.F32), n_ff, k, True, x)
    logits = x.astype(np.float64) @ router.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.zeros((40, d))
    for r in range(40):
        best = np.argsort(-p[r])[:k]
        for e in best:
            h = x[r] @ gate[e].T.astype(np.float64)
            h = h / (1 + np.exp(-h)) * (x[r] @ up[e].T.astype(np.float64))
            want[r] += p[r, e] / p[r, best].sum() * (down[e].astype(np.float64) @ h)
    assert len({tuple(np.argsort(-p[r])[:k]) for r in range(40)}) > 5  # many different expert pairs
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --- llama.cpp ----------------------------------------------------------------------------------------------

# keys our converter writes for every BPE vocabulary and llama.cpp's leaves to its defaults at load
OUR_TOKENIZER_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.eot_token_id")


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "f16"])
def test_converter_equals_llama_cpp(moe, qtype, tmp_path):
    from test_convert_bert import OWN_KEYS, compare_with_llama_cpp

    if moe["name"] != "sparse":
        pytest.skip("llama.cpp's qwen3moe has neither dense blocks nor expert_weights_norm")
    # the tiny Qwen-style test tokenizer named "qwen2", as llama.cpp names the real one by its hash
    theirs = llama_cpp_convert(moe["hf_dir"], tmp_path / "llama.gguf", outtype=qtype, vocab_pre="qwen2")
    ours = moe["files"].get(qtype) if qtype != "q8_0" else None
    if ours is None:
        ours = tmp_path / "ours.gguf"
        convert(moe["hf_dir"], ours, qtype=qtype, output_qtype=qtype)
    compare_with_llama_cpp(ours, theirs, allowed_extra=OWN_KEYS + OUR_TOKENIZER_KEYS)


def test_llama_cpp_perplexity_equals_ours(moe):
    """llama.cpp's llama-perplexity on our qwen3moe file gives pyengine's perplexity (same text, chunks)."""
    if moe["name"] != "sparse":
        pytest.skip("llama.cpp's qwen3moe has neither dense blocks nor expert_weights_norm")
    theirs = llama_perplexity(moe["files"]["f32"], n_ctx=64, n_chunks=3)
    mine = pyengine.LLM(moe["files"]["f32"]).perplexity(TEXT.read_text(), n_ctx=64, n_chunks=3).ppl
    assert mine == pytest.approx(theirs, rel=1e-4)


@pytest.mark.parametrize("preset", ["q4_k_m", "q2_k", "q3_k_m", "q4_k_s", "q6_k", "q4_0", "q8_0"])
def test_quantize_equals_llama_quantize(tmp_path_factory, preset):
    """8 experts, rows of 256: llama-quantize's rules for 8-expert models (attn_v and attn_k Q8_0,
    attn_output Q5_K) and the experts' types; `pyengine quantize` gives the same types and bytes, and
    `pyengine convert --qtype` the same types."""
    from test_quant_presets import LLAMA_NAMES, LLAMA_QUANTIZE, raw, types

    from pyengine_convert.requantize import requantize

    if not LLAMA_QUANTIZE.is_file():
        pytest.skip("llama-quantize not built")
    d = tmp_path_factory.getbasetemp() / "qwen3moe-k"
    if not (d / "f16.gguf").exists():
        make_qwen3moe(d / "hf", hidden=256, n_heads=4, n_kv_heads=1, head_dim=64, ff=512, moe_intermediate_size=256,
                      n_layers=4)
        convert(d / "hf", d / "f16.gguf", qtype="f16")
    ours, theirs = d / f"ours-{preset}.gguf", d / f"theirs-{preset}.gguf"
    requantize(d / "f16.gguf", ours, preset)
    subprocess.run([str(LLAMA_QUANTIZE), str(d / "f16.gguf"), str(theirs), LLAMA_NAMES[preset], "2"], check=True,
                   capture_output=True)
    want = types(theirs)
    assert types(ours) == want
    a, b = raw(ours), raw(theirs)
    assert [n for n in a if a[n] != b[n]] == []
    if preset.endswith(("_k", "_k_m", "_k_s")):
        assert want["blk.0.attn_v.weight"] == Q.Q8_0 and want["blk.1.attn_k.weight"] == Q.Q8_0
        converted = d / f"converted-{preset}.gguf"
        convert(d / "hf", converted, qtype=preset)
        assert types(converted) == want


# --- bad input ------------------------------------------------------------------------------------------------

def test_converter_refuses_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_qwen3moe(tmp_path / "hf")
    sd = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    e3 = "model.layers.0.mlp.experts.3.up_proj.weight"

    def fails(match, state=None, **config_changes):
        d = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for f in src.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                (d / f.name).write_bytes(f.read_bytes())
        save_file(state if state is not None else sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**config, **config_changes}))
        with pytest.raises(ConversionError, match=match):
            convert(d, tmp_path / "x.gguf", qtype="f32")
        assert not (tmp_path / "x.gguf").exists()

    fails(rf"tensor {e3} has shape \[31, 64\] but config.json implies \[32, 64\]", {**sd, e3: sd[e3][:31]})
    fails("missing tensor model.layers.1.mlp.experts.5.gate_proj.weight",
          {k: v for k, v in sd.items() if k != "model.layers.1.mlp.experts.5.gate_proj.weight"})
    fails("model.layers.0.mlp.experts.8.up_proj.weight is expert 8 but config.json has 8 experts",
          {**sd, "model.layers.0.mlp.experts.8.up_proj.weight": sd[e3].clone()})
    fails("missing tensor model.layers.0.mlp.gate.weight", {k: v for k, v in sd.items() if k != "model.layers.0.mlp.gate.weight"})
    fails(r"missing tensors model.layers.0.mlp.experts.\{0..7\}.up_proj.weight",
          {k: v for k, v in sd.items() if not re.fullmatch(r"model.layers.0.mlp.experts.\d+.up_proj.weight", k)})
    fails("num_experts_per_tok=9 is more than the 8 experts", num_experts_per_tok=9)
    fails("rope scaling 'linear' on Qwen3-MoE is not supported yet",
          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    fails("num_experts_per_tok=0: number of experts per token must be a positive integer", num_experts_per_tok=0)
    fails(r"unexpected tensor model.layers.0.mlp.gate_proj.weight .*block 0 of this Qwen3MoeForCausalLM has no ffn_gate",
          {**sd, "model.layers.0.mlp.gate_proj.weight": torch.zeros(128, 64)})
    fails(r"unexpected tensor model.layers.1.mlp.experts.\d+.\w+_proj.weight: block 1 is a dense block",
          mlp_only_layers=[1])
    fails(r"tensor model.layers.0.mlp.experts.gate_up_proj has shape \[8, 63, 64\] but config.json implies \[8, 64, 64\]",
          {**{k: v for k, v in sd.items() if ".layers.0.mlp.experts." not in k},
           "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(8, 63, 64),
           "model.layers.0.mlp.experts.down_proj": torch.zeros(8, 64, 32)})


def test_stacked_checkpoint_equals_per_expert(tmp_path):
    """A checkpoint with transformers 5's stacked experts (gate_up_proj [n_expert, 2 x n_ff, d], down_proj)
    converts to the same file as the per-expert one."""
    from safetensors.torch import load_file, save_file

    src = make_qwen3moe(tmp_path / "hf")
    sd = load_file(str(src / "model.safetensors"))
    stacked = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in range(2):
        e = f"model.layers.{i}.mlp.experts."
        stacked[e + "gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{e}{x}.gate_proj.weight"], sd[f"{e}{x}.up_proj.weight"]]) for x in range(8)])
        stacked[e + "down_proj"] = torch.stack([sd[f"{e}{x}.down_proj.weight"] for x in range(8)])
    convert(src, tmp_path / "a.gguf", qtype="q8_0")
    save_file(stacked, str(src / "model.safetensors"))
    convert(src, tmp_path / "b.gguf", qtype="q8_0")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_engine_refuses_bad_files(tmp_path):
    from test_ptuning import rewrite

    src = tmp_path / "f32.gguf"
    convert(make_qwen3moe(tmp_path / "hf"), src, qtype="f32")
    cases = [
        (dict(change={"blk.0.ffn_up_exps.weight": np.zeros((8, 31, 64), np.float32)}), pyengine.ModelFormatError,
         r"tensor 'blk.0.ffn_up_exps.weight' has shape \[64, 31, 8\], expected \[64, 32, 8\] \(embedding_length, "
         r"expert_feed_forward_length, expert_count\)"),
        (dict(change={"blk.1.ffn_down_exps.weight": np.zeros((64 * 8, 32), np.float32)}), pyengine.ModelFormatError,
         r"tensor 'blk.1.ffn_down_exps.weight' has shape \[32, 512\], expected \[32, 64, 8\]"),
        (dict(change={"blk.0.ffn_gate_inp.weight": np.zeros((7, 64), np.float32)}), pyengine.ModelFormatError,
         r"tensor 'blk.0.ffn_gate_inp.weight' has shape \[64, 7\], expected \[64, 8\]"),
        (dict(drop={"blk.1.ffn_gate_inp.weight"}), pyengine.ModelFormatError, "missing tensor 'blk.1.ffn_gate_inp.weight'"),
        (dict(keys={"qwen3moe.expert_used_count": 9}), pyengine.ModelFormatError,
         r"qwen3moe.expert_used_count 9 must be in \[1, expert_count 8\]"),
        (dict(keys={"qwen3moe.expert_count": 0}), pyengine.ModelFormatError, r"qwen3moe.expert_count 0 is out of range"),
        (dict(keys={"qwen3moe.expert_count": None}), pyengine.ModelFormatError,
         "missing required metadata key 'qwen3moe.expert_count'"),
        (dict(keys={"qwen3moe.expert_gating_func": 2}), pyengine.UnsupportedModelError,
         r"qwen3moe.expert_gating_func 2 is not supported"),
    ]
    for i, (edit, exc, match) in enumerate(cases):
        bad = rewrite(src, tmp_path / f"bad{i}.gguf", **edit)
        with pytest.raises(exc, match=match):
            pyengine.LLM(bad, n_ctx=32)
    nan_router = np.full((8, 64), np.nan, np.float32)
    llm = pyengine.LLM(rewrite(src, tmp_path / "nan.gguf", change={"blk.1.ffn_gate_inp.weight": nan_router}), n_ctx=32)
    with pytest.raises(pyengine.NumericalError, match=r"router logits of blk.1 \(blk.1.ffn_gate_inp\)"):
        llm.logits([5, 6, 7])
    assert llm.n_past == 0  # the failed call left nothing behind
