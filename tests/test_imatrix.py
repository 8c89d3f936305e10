"""`pyengine imatrix`: the engine's per-column input statistics of every linear layer against transformers
(forward hooks on the same chunks) and against llama.cpp's llama-imatrix on the same file and text; the
file it writes feeds `pyengine quantize --imatrix`."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyengine
from checkpoints import load_hf_model, make_llama, make_qwen2
from pyengine_convert import convert
from pyengine_convert.imatrix_cmd import collect
from pyengine_convert.imatrix_file import load_imatrix

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 6
N_CTX = 32

# transformers module name -> GGUF tensor name, per block
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf_dir = (make_llama if request.param == "llama" else make_qwen2)(d / "hf")
    path = d / "f32.gguf"
    convert(hf_dir, path, qtype="f32")
    return hf_dir, path


def torch_sums(hf_dir: Path, path: Path) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Sums of x^2 per input column of every block linear layer, from transformers' forward hooks, over the
    chunks llama-imatrix makes: the text with BOS, cut every N_CTX tokens, each chunk's first token BOS."""
    hf = load_hf_model(hf_dir)
    llm = pyengine.Engine(path, n_ctx=N_CTX)
    tok = llm.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=True)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def add(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return add

    handles = []
    for name, module in hf.named_modules():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m and m.group(2) in HF_TO_GGUF:
            handles.append(module.register_forward_hook(hook(f"blk.{m.group(1)}.{HF_TO_GGUF[m.group(2)]}.weight")))
    n_chunks = len(ids) // N_CTX
    with torch.no_grad():
        for i in range(n_chunks):
            chunk = list(ids[i * N_CTX:(i + 1) * N_CTX])
            if tok.add_bos:
                chunk[0] = tok.bos_id
            hf(torch.tensor([chunk]))
    for h in handles:
        h.remove()
    return sums, counts, n_chunks


def test_engine_statistics_equal_transformers(model):
    hf_dir, path = model
    sums, counts, n_chunks = torch_sums(hf_dir, path)
    data = collect(path, TEXT, n_ctx=N_CTX, progress=False, dataset="text.txt", kv_type="f32")
    assert data.chunk_count == n_chunks >= 3 and data.chunk_size == N_CTX and data.datasets == ["text.txt"]
    assert set(data.sums) == set(sums)  # every block matmul, no LM head (llama-imatrix's default)
    for name in sums:
        assert data.counts[name] == counts[name] == n_chunks * N_CTX
        np.testing.assert_allclose(data.sums[name], sums[name], rtol=1e-4, err_msg=name)


def test_collection_is_off_by_default_and_restarts(model):
    _, path = model
    llm = pyengine.Engine(path, n_ctx=N_CTX)
    llm.eval(list(range(1, 9)))
    assert llm.input_stats() == {}
    llm.collect_input_stats(True)
    llm.reset()
    llm.eval(list(range(1, 9)))
    first = llm.input_stats()
    assert first and all(rows == 8 for _, rows in first.values())
    llm.collect_input_stats(True)  # starts from zero
    assert llm.input_stats() == {}
    llm.collect_input_stats(False)
    llm.eval([3])
    assert llm.input_stats() == {}


def test_imatrix_command_feeds_quantize(model, tmp_path):
    hf_dir, path = model
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "imatrix.gguf"
    r = subprocess.run([sys.executable, "-m", "pyengine", "imatrix", "-m", str(path), "-f", str(text), "-o", str(out),
                        "-c", str(N_CTX), "--chunks", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    data = load_imatrix(out)  # read back through the gguf package
    assert data.chunk_count == 2 and data.chunk_size == N_CTX and data.datasets == ["calib.txt"]
    assert all(c == 2 * N_CTX for c in data.counts.values())
    q = tmp_path / "q4_k_m.gguf"
    r = subprocess.run([sys.executable, "-m", "pyengine", "quantize", str(path), str(q), "q4_k_m", "--imatrix", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert pyengine.LLM(q, n_ctx=64).generate("It is a truth", max_new_tokens=4, temperature=0) is not None

    bad = subprocess.run([sys.executable, "-m", "pyengine", "imatrix", "-m", str(path), "-f", str(tmp_path / "none.txt")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and "none.txt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def llama_imatrix_and_ours(path: Path, tmp_path: Path, also: tuple[str, ...] = ()):
    """llama-imatrix's file and `collect`'s data for the same GGUF and TEXT (skips when the llama.cpp tools
    named, llama-imatrix and `also`, are not built)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llama_cpp_tools import bin_dir

    exe = bin_dir() / "llama-imatrix"
    if not all((bin_dir() / t).exists() for t in ("llama-imatrix", *also)):
        pytest.skip(f"{', '.join(('llama-imatrix', *also))} not built (python benchmarks/llama_cpp_tools.py --build)")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    theirs_path = tmp_path / "theirs.gguf"
    r = subprocess.run([str(exe), "-m", str(path), "-f", str(text), "-o", str(theirs_path), "-c", str(N_CTX), "-b",
                        str(N_CTX), "-t", "2", "--no-ppl"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and theirs_path.exists(), r.stderr[-2000:]
    theirs = load_imatrix(theirs_path)
    ours = collect(path, TEXT, n_ctx=N_CTX, progress=False)  # an F16 KV cache, as llama-imatrix's
    assert theirs.chunk_count == ours.chunk_count
    assert set(theirs.sums) == set(ours.sums)
    return theirs, ours


def test_equals_llama_imatrix(model, tmp_path):
    """llama.cpp's llama-imatrix on the same F32 file and text gives the same sums, matrix for matrix."""
    _, path = model
    theirs, ours = llama_imatrix_and_ours(path, tmp_path)
    for name in ours.sums:
        assert theirs.counts[name] == ours.counts[name], name
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=1e-3, err_msg=name)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    from checkpoints import make_qwen3moe

    from safetensors.numpy import load_file, save_file

    d = tmp_path_factory.mktemp("qwen3moe")
    hf_dir = make_qwen3moe(d / "hf", n_layers=2)
    # a router 8x as sharp: a random tiny model has near-ties between experts that rounding anywhere
    # (llama.cpp's kernels or ours) may flip; wide margins let both engines route every token alike
    (st,) = hf_dir.glob("*.safetensors")
    w = load_file(st)
    save_file({k: v * 8 if k.endswith("mlp.gate.weight") else v for k, v in w.items()}, st, metadata={"format": "pt"})
    path = d / "f32.gguf"
    convert(hf_dir, path, qtype="f32")
    return hf_dir, path


def test_experts_equal_llama_imatrix_and_feed_llama_quantize(moe_model, tmp_path):
    """A mixture of experts: one vector of sums and one token count per expert for the ffn_*_exps tensors,
    equal to llama-imatrix's on the same file and text; `pyengine quantize --imatrix` with that file gives
    llama-quantize's bytes (each expert quantized with its own importance)."""
    from gguf import GGUFReader

    from pyengine_convert.imatrix_file import save_imatrix
    from pyengine_convert.requantize import requantize

    _, path = moe_model
    theirs, ours = llama_imatrix_and_ours(path, tmp_path, also=("llama-quantize",))
    from llama_cpp_tools import bin_dir

    quantize = bin_dir() / "llama-quantize"
    experts = [n for n in ours.sums if "_exps." in n]
    assert len(experts) == 2 * 3  # gate, up, down of both layers
    n_tokens = ours.chunk_count * N_CTX
    for name in ours.sums:
        if name not in experts:
            assert theirs.counts[name] == ours.counts[name] == n_tokens, name
            rtol = 1e-3 if name.startswith("blk.0.") else 5e-2
            np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=rtol, err_msg=name)
            continue
        a, b = ours.sums[name], theirs.sums[name]
        assert a.shape == b.shape == (8, a.shape[1]) and ours.counts[name].shape == (8,), name
        assert ours.counts[name].sum() == theirs.counts[name].sum() == 2 * n_tokens, name  # top-2
        # a random tiny model has near-ties between its 2nd and 3rd expert, which the two engines' rounding
        # (their F16 KV caches, kernels) may break differently for a token or two
        assert np.abs(ours.counts[name] - theirs.counts[name]).max() <= 2, (name, ours.counts[name], theirs.counts[name])
        rel = np.abs(a - b).sum(axis=1) / b.sum(axis=1)
        assert rel.max() < 3e-2, (name, rel)
        # each expert's vector is nearest its own in the other file: none swapped, none averaged
        dist = np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
        assert (dist.argmin(axis=1) == np.arange(8)).all(), name

    im = tmp_path / "ours.imatrix"
    save_imatrix(im, ours)
    back = GGUFReader(im)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in back.tensors}
    assert shapes["blk.0.ffn_down_exps.weight.in_sum2"] == (32, 8) and shapes["blk.0.ffn_down_exps.weight.counts"] == (1, 8)
    for qtype, llama_name in (("q4_k_m", "Q4_K_M"), ("q4_0", "Q4_0")):
        a, b = tmp_path / f"ours-{qtype}.gguf", tmp_path / f"theirs-{qtype}.gguf"
        requantize(path, a, qtype, imatrix=im)
        subprocess.run([str(quantize), "--imatrix", str(im), str(path), str(b), llama_name, "2"], check=True,
                       capture_output=True, timeout=300)
        ta = {t.name: (t.tensor_type, t.data.tobytes()) for t in GGUFReader(a).tensors}
        tb = {t.name: (t.tensor_type, t.data.tobytes()) for t in GGUFReader(b).tensors}
        assert [n for n in ta if ta[n] != tb[n]] == [], qtype
        # the experts' own vectors matter: a shared (averaged) vector gives other blocks
        shared = {k: (v.mean(axis=0) if v.ndim == 2 else v) for k, v in ours.importance().items()}
        c = tmp_path / f"shared-{qtype}.gguf"
        requantize(path, c, qtype, imatrix=shared)
        tc = {t.name: t.data.tobytes() for t in GGUFReader(c).tensors}
        assert any(tc[n] != ta[n][1] for n in experts), qtype
