"""P-Tuning v2 for ChatGLM2/3 (`pyengine convert --ptuning`): a tiny THUDM-layout ChatGLM3 model and a random
prefix encoder (with and without prefix_projection), against `chatglm2_reference` below, a float64 forward
pass written from THUDM's modeling_chatglm.py with pre_seq_len set:

* PrefixEncoder: embedding(arange(pre_seq_len)), with prefix_projection then trans = Linear, Tanh, Linear;
* ChatGLMModel.get_prompt: view(b, pre_seq_len, layers * 2, groups, kv_channels), permute([2, 1, 0, 3, 4]),
  split(2): per layer (key, value) as the past key values, which SelfAttention concatenates in front of the
  new (rotated) keys as they are, without RoPE;
* get_masks: ones over the past (the prefix) concatenated with the causal mask of the input;
* get_position_ids / prepare_inputs_for_generation: the input's positions are arange(seq_length), from 0
  however long the prefix.

The reference itself is first checked against transformers' GlmForCausalLM without a prefix (the same math).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import pyengine
from pyengine_convert import ConversionError, convert
from test_chatglm import HEAD_DIM, N_HEAD, N_KV, N_LAYER, ROPE_RATIO, make_chatglm2
from test_model import kl_div

KV_SIZE = 2 * N_LAYER * N_KV * HEAD_DIM  # PrefixEncoder's kv_size


def chatglm2_reference(sd, config, ids, encoder=None):
    """Logits of every position of `ids` (one sequence) in float64, from the THUDM state dict `sd` and
    config; `encoder`: the prefix encoder's tensors (names after `transformer.prefix_encoder.`) or None."""
    d = {k: v.double() for k, v in sd.items()}
    n, h = len(ids), config["hidden_size"]
    heads, groups, hd, n_layer = (config["num_attention_heads"], config["multi_query_group_num"],
                                  config["kv_channels"], config["num_layers"])
    eps = config["layernorm_epsilon"]

    past = None
    if encoder is not None:
        enc = {k: v.double() for k, v in encoder.items()}
        pre_seq_len = enc["embedding.weight"].shape[0]
        x = enc["embedding.weight"][torch.arange(pre_seq_len)][None]  # [b=1, pre_seq_len, kv_size]
        if "trans.0.weight" in enc:
            x = torch.tanh(x @ enc["trans.0.weight"].T + enc["trans.0.bias"]) @ enc["trans.2.weight"].T + enc["trans.2.bias"]
        past = x.view(1, pre_seq_len, n_layer * 2, groups, hd).permute([2, 1, 0, 3, 4]).split(2)  # [2, P, b, g, hd]
    n_past = past[0][0].shape[0] if past else 0

    # RotaryEmbedding(kv_channels // 2), base 10000 * rope_ratio, on adjacent pairs of the first half of a head
    rot = hd // 2
    theta = 1.0 / (10000 * config.get("rope_ratio", 1.0)) ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    position_ids = torch.arange(n, dtype=torch.float64)  # get_position_ids: from 0, past or not
    angle = position_ids[:, None] * theta[None]           # [n, rot / 2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rope(x):  # x [n, heads, hd]: apply_rotary_pos_emb
        xr, rest = x[..., :rot], x[..., rot:]
        x0, x1 = xr.reshape(n, -1, rot // 2, 2).unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(2)
        return torch.cat([out, rest], -1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    allowed = torch.cat([torch.ones(n, n_past), torch.ones(n, n).tril()], dim=1).bool()  # get_masks
    x = d["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(n_layer):
        p = f"transformer.encoder.layers.{i}."
        a = rms(x, d[p + "input_layernorm.weight"])
        qkv = a @ d[p + "self_attention.query_key_value.weight"].T + d[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * hd, groups * hd, groups * hd], dim=-1)
        q, k, v = rope(q.view(n, heads, hd)), rope(k.view(n, groups, hd)), v.view(n, groups, hd)
        if past:
            k = torch.cat([past[i][0][:, 0], k])               # the cache's keys as stored, then the new ones
            v = torch.cat([past[i][1][:, 0], v])
        k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, heads * hd)
        x = x + attn @ d[p + "self_attention.dense.weight"].T
        m = rms(x, d[p + "post_attention_layernorm.weight"])
        gate, up = (m @ d[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ d[p + "mlp.dense_4h_to_h.weight"].T
    x = rms(x, d["transformer.encoder.final_layernorm.weight"])
    return (x @ d["transformer.output_layer.weight"].T).numpy()


def make_encoder(pre_seq_len: int, projection: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random PrefixEncoder weights, large enough that the prefix moves the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    enc = {"embedding.weight": torch.randn(pre_seq_len, KV_SIZE, generator=g) * 1.5}
    if projection:
        hidden = 64
        enc.update({"trans.0.weight": torch.randn(hidden, KV_SIZE, generator=g) * 0.1,
                    "trans.0.bias": torch.randn(hidden, generator=g) * 0.1,
                    "trans.2.weight": torch.randn(KV_SIZE, hidden, generator=g) * 0.3,
                    "trans.2.bias": torch.randn(KV_SIZE, generator=g) * 0.1})
    return enc


def save_ptuning(out_dir, encoder, fmt="bin", config=None):
    """A checkpoint folder as THUDM's ptuning trainer saves it: the prefix encoder's tensors only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"transformer.prefix_encoder.{k}": v.contiguous() for k, v in encoder.items()}
    if fmt == "bin":
        torch.save(state, out_dir / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(out_dir / "model.safetensors"))
    if config is not None:
        (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("ptuning")
    model = make_chatglm2(d / "hf", seed=4)
    sd = load_file(str(d / "hf" / "model.safetensors"))
    config = json.loads((d / "hf" / "config.json").read_text())
    return dict(dir=d, hf_dir=d / "hf", model=model, sd=sd, config=config, n_vocab=config["padded_vocab_size"])


# pre_seq_len 60: the prefix and the tokens share the first cache page and spill into the second
VARIANTS = {"plain": dict(pre_seq_len=60, projection=False, fmt="bin"),
            "projection": dict(pre_seq_len=7, projection=True, fmt="safetensors")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tuned(glm, request):
    v = VARIANTS[request.param]
    encoder = make_encoder(v["pre_seq_len"], v["projection"], seed=11 + v["pre_seq_len"])
    ckpt = save_ptuning(glm["dir"] / f"ptuning-{request.param}", encoder, v["fmt"],
                        config={**glm["config"], "pre_seq_len": v["pre_seq_len"],
                                "prefix_projection": v["projection"]})
    # the folder (THUDM's ptuning_checkpoint) or the weights file itself
    source = ckpt if v["fmt"] == "bin" else ckpt / "model.safetensors"
    files = {}
    for qtype in ("f32", "q8_0"):
        files[qtype] = glm["dir"] / f"{request.param}-{qtype}.gguf"
        convert(glm["hf_dir"], files[qtype], qtype=qtype, output_qtype=qtype, ptuning=source)
    rng = np.random.default_rng(v["pre_seq_len"])
    prompts = [rng.integers(3, glm["n_vocab"], size=n).tolist() for n in (30, 11)]
    refs = [chatglm2_reference(glm["sd"], glm["config"], p, encoder) for p in prompts]
    return dict(**v, name=request.param, encoder=encoder, files=files, prompts=prompts, refs=refs)


def tol(ref):
    return dict(rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_reference_matches_transformers_without_prefix(glm):
    """The reference's ChatGLM math is transformers' GlmForCausalLM's (no prefix: nothing to differ)."""
    ids = np.random.default_rng(0).integers(3, glm["n_vocab"], size=25).tolist()
    with torch.no_grad():
        hf = glm["model"](torch.tensor([ids])).logits[0].double().numpy()
    ref = chatglm2_reference(glm["sd"], glm["config"], ids)
    np.testing.assert_allclose(ref, hf, rtol=1e-5, atol=1e-5 * np.abs(hf).max())


def test_f32_logits_match_reference(glm, tuned):
    llm = pyengine.LLM(tuned["files"]["f32"], n_ctx=64, kv_type="f32")
    assert llm.config["prefix_length"] == tuned["pre_seq_len"]
    for ids, ref in zip(tuned["prompts"], tuned["refs"]):
        got = llm.logits(ids)
        np.testing.assert_allclose(got, ref, **tol(ref))
        assert llm.seq_len(0) == len(ids) and llm.n_past == len(ids)  # the prefix is not counted
    # the prefix matters: without it the logits are far from these
    plain = chatglm2_reference(glm["sd"], glm["config"], tuned["prompts"][0])
    assert np.abs(plain - tuned["refs"][0]).max() > 100 * 1e-4 * np.abs(tuned["refs"][0]).max()


def test_token_by_token_equals_full_forward(tuned):
    ids, ref = tuned["prompts"][0], tuned["refs"][0]
    llm = pyengine.LLM(tuned["files"]["f32"], n_ctx=64, n_batch=4, kv_type="f32")
    full = llm.logits(ids)
    llm.reset()
    steps = [llm.eval(ids[:3])] + [llm.eval([t]) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(steps), full[2:], **tol(ref))
    np.testing.assert_allclose(np.stack(steps), ref[2:], **tol(ref))


def test_batch_copy_truncate(tuned):
    """Two sequences in one batch equal each alone; a fork (seq_copy) and truncations keep the prefix."""
    (a, b), (ref_a, ref_b) = tuned["prompts"], tuned["refs"]
    eng = pyengine.Engine(tuned["files"]["f32"], n_ctx=64, n_seq_max=3, n_batch=16, kv_type="f32")
    rows = [(t, 0) for t in a[:20]] + [(t, 1) for t in b]
    out = eng.decode([t for t, _ in rows], [s for _, s in rows])
    np.testing.assert_allclose(out[:20], ref_a[:20], **tol(ref_a))
    np.testing.assert_allclose(out[20:], ref_b, **tol(ref_b))
    eng.seq_copy(0, 2)                                   # shares the pages of the prefix and a[:20]
    np.testing.assert_allclose(eng.decode(a[20:], [2] * 10), ref_a[20:], **tol(ref_a))
    np.testing.assert_allclose(eng.eval(a[20:], all_logits=True, seq=0), ref_a[20:], **tol(ref_a))
    eng.seq_truncate(0, 5)
    assert eng.seq_len(0) == 5
    np.testing.assert_allclose(eng.eval(a[5:], all_logits=True, seq=0), ref_a[5:], **tol(ref_a))
    eng.seq_truncate(1, 0)                               # empty, but the prefix is still the start
    assert eng.seq_len(1) == 0
    np.testing.assert_allclose(eng.eval(b, all_logits=True, seq=1), ref_b, **tol(ref_b))
    with pytest.raises(pyengine.EngineError, match="cannot truncate sequence 1 to 12 tokens: it holds 11"):
        eng.seq_truncate(1, 12)
    eng.reset()
    np.testing.assert_allclose(eng.eval(b, all_logits=True, seq=1), ref_b, **tol(ref_b))


def test_context_length_counts_tokens(tuned):
    llm = pyengine.LLM(tuned["files"]["f32"], n_ctx=16, kv_type="f32")
    assert llm.n_ctx == 16
    llm.eval(tuned["prompts"][0][:16])
    with pytest.raises(pyengine.ContextLengthError):
        llm.eval([5])
    # room for the prefix besides n_ctx tokens: pages of 64 positions, K and V, F16
    pages = -(-(16 + tuned["pre_seq_len"]) // 64)
    assert llm.memory_plan(kv_type="f16")["kv_cache"] == N_LAYER * pages * 64 * 2 * N_KV * HEAD_DIM * 2


def test_greedy_generation_matches_reference(glm, tuned):
    """Greedy decoding of both prompts, alone and as one batch, equals argmax decoding of the reference."""
    want = []
    for ids in tuned["prompts"]:
        seq = list(ids)
        for _ in range(6):
            seq.append(int(chatglm2_reference(glm["sd"], glm["config"], seq, tuned["encoder"])[-1].argmax()))
        want.append(seq[len(ids):])
    llm = pyengine.LLM(tuned["files"]["f32"], n_ctx=64, kv_type="f32")
    params = llm.sampling_params(temperature=0, max_new_tokens=6, ignore_eos=True)
    for ids, w in zip(tuned["prompts"], want):
        g = llm.generate(ids, stream=True, params=params)
        g.wait()
        assert g.token_ids == w
    gens = [pyengine.Generation(llm, llm.tokenizer, ids, params) for ids in tuned["prompts"]]
    for _ in pyengine.generate_batch(llm.new_context(n_ctx=64, n_seq_max=2, kv_type="f32"), gens):
        pass
    assert [g.token_ids for g in gens] == want


def test_quantized_close(tuned):
    ids, ref = tuned["prompts"][0], tuned["refs"][0]
    got = pyengine.LLM(tuned["files"]["q8_0"], n_ctx=64).logits(ids)
    rel_rms = float(np.sqrt(np.mean((got - ref) ** 2)) / ref.std())
    assert rel_rms < 0.04 and kl_div(ref, got) < 1e-3, (rel_rms, kl_div(ref, got))


def test_gguf_layout_and_no_prefix_file_unchanged(glm, tuned):
    """The prefix adds chatglm.prefix_length and blk.N.prefix_k/v (F32 [pre_seq_len, kv_dim]); everything
    else equals the file converted without it (which test_chatglm compares with llama.cpp)."""
    from gguf import GGUFReader

    plain_path = glm["dir"] / "no-prefix-f32.gguf"
    if not plain_path.exists():
        convert(glm["hf_dir"], plain_path, qtype="f32", output_qtype="f32")
    tuned_r, plain_r = GGUFReader(tuned["files"]["f32"]), GGUFReader(plain_path)
    assert tuned_r.fields["chatglm.prefix_length"].contents() == tuned["pre_seq_len"]
    extra = {f"blk.{i}.prefix_{kv}" for i in range(N_LAYER) for kv in "kv"}
    tensors = {t.name: t for t in tuned_r.tensors}
    assert set(tensors) == {t.name for t in plain_r.tensors} | extra
    for t in plain_r.tensors:
        np.testing.assert_array_equal(np.asarray(tensors[t.name].data), np.asarray(t.data))
    for name in extra:
        assert tensors[name].tensor_type.name == "F32"
        assert [int(x) for x in tensors[name].shape] == [N_KV * HEAD_DIM, tuned["pre_seq_len"]]
    keys = lambda r: {k: r.fields[k].contents() for k in r.fields if not k.startswith("GGUF.")}  # noqa: E731
    assert keys(tuned_r) == {**keys(plain_r), "chatglm.prefix_length": tuned["pre_seq_len"]}
    # layer 1's value rows are the encoder output's columns of (layer 1, value) as get_prompt splits them
    x = tuned["encoder"]["embedding.weight"].double()
    if tuned["projection"]:
        e = tuned["encoder"]
        x = torch.tanh(x @ e["trans.0.weight"].double().T + e["trans.0.bias"]) @ e["trans.2.weight"].double().T + e["trans.2.bias"]
    want = x.view(tuned["pre_seq_len"], N_LAYER * 2, N_KV * HEAD_DIM)[:, 3].numpy()
    np.testing.assert_allclose(np.asarray(tensors["blk.1.prefix_v"].data), want, rtol=1e-6, atol=1e-6)


# --- bad input ------------------------------------------------------------------------------------------

def test_converter_refuses_bad_checkpoints(glm, tmp_path):
    out = tmp_path / "x.gguf"

    def fails(encoder, match, fmt="bin", config=None, **extra):
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        save_ptuning(d, encoder, fmt, config)
        if extra:
            torch.save({**torch.load(d / "pytorch_model.bin"), **extra}, d / "pytorch_model.bin")
        with pytest.raises(ConversionError, match=match):
            convert(glm["hf_dir"], out, qtype="f32", ptuning=d)
        assert not out.exists()

    good = make_encoder(4, True, 0)
    fails({"embedding.weight": torch.zeros(4, KV_SIZE + 2)},
          rf"transformer.prefix_encoder.embedding.weight has shape \[4, {KV_SIZE + 2}\].*\[pre_seq_len, {KV_SIZE}\]")
    fails({"embedding.weight": torch.zeros(KV_SIZE)}, "embedding.weight has shape")
    fails({k: v for k, v in good.items() if k != "trans.2.bias"}, "needs transformer.prefix_encoder.trans.2.bias")
    fails({**good, "trans.2.weight": torch.zeros(KV_SIZE, 63)}, r"trans.2.weight has shape \[128, 63\]")
    fails({"trans.0.weight": good["trans.0.weight"]}, "no tensor transformer.prefix_encoder.embedding.weight")
    fails(make_encoder(4, False, 0), "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight is not part of a P-Tuning",
          **{"transformer.encoder.layers.0.mlp.dense_4h_to_h.weight": torch.zeros(2, 2)})
    fails(make_encoder(4, False, 0), "pre_seq_len 5 but", config={"pre_seq_len": 5})
    fails(make_encoder(4, False, 0), "prefix_projection=True", config={"pre_seq_len": 4, "prefix_projection": True})
    fails({"embedding.weight": torch.full((4, KV_SIZE), float("nan"))}, "NaN")
    with pytest.raises(ConversionError, match="P-Tuning checkpoint not found"):
        convert(glm["hf_dir"], out, ptuning=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no P-Tuning weights in"):
        convert(glm["hf_dir"], out, ptuning=tmp_path / "empty")


def test_converter_refuses_other_architectures(tmp_path):
    from checkpoints import make_qwen3

    d = save_ptuning(tmp_path / "pt", make_encoder(4, False, 0))
    with pytest.raises(ConversionError, match="P-Tuning v2 prefixes are for THUDM's ChatGLM2/3.*not Qwen3ForCausalLM"):
        convert(make_qwen3(tmp_path / "qwen3"), tmp_path / "x.gguf", ptuning=d)


def rewrite(src, dst, drop=(), change=None, keys=None):
    """A copy of GGUF `src` with tensors dropped or replaced (name -> numpy array) and keys set."""
    from gguf import GGUFReader, GGUFWriter, GGUFValueType

    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or (keys and k in keys):
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), f.types[0], sub_type=sub)
    for k, v in (keys or {}).items():
        if v is not None:
            w.add_uint32(k, v)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = (change or {}).get(t.name)
        if data is None:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(int(x) for x in reversed(t.shape)),
                         raw_dtype=t.tensor_type)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_engine_refuses_bad_prefix(glm, tuned, tmp_path):
    src, p = tuned["files"]["f32"], tuned["pre_seq_len"]
    cases = [
        (dict(change={"blk.1.prefix_v": np.zeros((p + 1, N_KV * HEAD_DIM), np.float32)}),
         pyengine.ModelFormatError, rf"tensor 'blk.1.prefix_v' has shape \[{N_KV * HEAD_DIM}, {p + 1}\], expected "
                                    rf"\[{N_KV * HEAD_DIM}, {p}\]"),
        (dict(change={"blk.0.prefix_k": np.zeros((p, N_KV * HEAD_DIM - 1), np.float32)}),
         pyengine.ModelFormatError, r"tensor 'blk.0.prefix_k' has shape"),
        (dict(drop={"blk.1.prefix_k"}), pyengine.ModelFormatError, "missing tensor 'blk.1.prefix_k'"),
        (dict(keys={"chatglm.prefix_length": None}), pyengine.ModelFormatError,
         r"tensors 'blk.0.prefix_k/v' \(a P-Tuning v2 prefix\) without metadata key 'chatglm.prefix_length'"),
        (dict(keys={"chatglm.prefix_length": 1 << 20}), pyengine.ModelFormatError, "chatglm.prefix_length 1048576 is out of range"),
    ]
    for i, (edit, exc, match) in enumerate(cases):
        bad = rewrite(src, tmp_path / f"bad{i}.gguf", **edit)
        with pytest.raises(exc, match=match):
            pyengine.LLM(bad, n_ctx=32)


def test_cli_flag(glm, tmp_path, capsys):
    from pyengine_convert import main

    ckpt = save_ptuning(tmp_path / "pt", make_encoder(3, False, 1))
    assert main([str(glm["hf_dir"]), "-o", str(tmp_path / "a.gguf"), "--qtype", "f32", "-q", "--ptuning", str(ckpt)]) == 0
    assert pyengine.Engine(tmp_path / "a.gguf", n_ctx=8).config["prefix_length"] == 3
    assert main([str(glm["hf_dir"]), "-o", str(tmp_path / "b.gguf"), "-q", "--ptuning", str(tmp_path)]) == 1
    assert "no P-Tuning weights in" in capsys.readouterr().err
