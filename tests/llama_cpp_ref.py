"""llama.cpp as a reference for model tests: its converter (convert_hf_to_gguf.py from the llama.cpp
source that benchmarks/llama_cpp_tools.py unpacks, run with that source's own gguf-py) and its
llama-perplexity. Each helper skips the calling test, saying why, when the sources or tools are absent.

    from llama_cpp_ref import llama_cpp_convert, llama_perplexity
    theirs = llama_cpp_convert(hf_dir, tmp_path / "llama.gguf")       # their file of the same folder
    ppl = llama_perplexity(our_file, text_path, n_ctx=64, n_chunks=3)  # their final perplexity
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = Path(os.environ.get(
    "PYENGINE_LLAMA_CPP_SRC",
    Path.home() / ".cache/pyengine/llama.cpp-0.3.36/src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
TEXT = ROOT.parent / "shared" / "data" / "pride_and_prejudice.txt"
# keys that name the file (llama.cpp guesses name, organization, size label from the folder and config)
NAMING_KEYS = ("general.name", "general.organization", "general.size_label", "general.basename",
               "general.finetune", "general.version")

_DRIVER = """
import runpy, sys
sys.path[:0] = [{src!r}, {src!r} + "/gguf-py"]
import conversion.base as base
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    # a tiny test tokenizer has no known hash
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return {vocab_pre!r}
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
{patch}
sys.argv = ["convert_hf_to_gguf.py", {model!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
runpy.run_path({src!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""


# llama.cpp 0.3.36's conversion/baichuan.py sends every tensor but W_pack back into its own modify_tensors
# with the mapped name, which recurses until Python gives up: no Baichuan converts. The fix (upstream's
# intent: the base class maps the other tensors) leaves its W_pack split and permutation as they are.
BAICHUAN_RECURSION_FIX = """
import conversion.baichuan as baichuan
_w_pack = baichuan.BaichuanModel.modify_tensors
def _modify_tensors(self, data_torch, name, bid):
    if bid is not None and name == f"model.layers.{bid}.self_attn.W_pack.weight":
        yield from _w_pack(self, data_torch, name, bid)
    else:
        yield from base.TextModel.modify_tensors(self, data_torch, name, bid)
baichuan.BaichuanModel.modify_tensors = _modify_tensors
"""


def llama_cpp_convert(model_dir: Path, out: Path, patch: str = "", outtype: str = "f32",
                      vocab_pre: str = "default") -> Path:
    """llama.cpp's conversion of an HF folder to `outtype` (skips the test without llama.cpp's source);
    `patch`: Python run before the converter (a fix of it); `vocab_pre`: the pre-tokenizer name for a
    tokenizer whose hash llama.cpp does not know (a tiny test tokenizer; "qwen2" for a Qwen-style one)."""
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's source is not at {LLAMA_CPP} (python benchmarks/llama_cpp_tools.py --build, "
                    "or set PYENGINE_LLAMA_CPP_SRC)")
    code = _DRIVER.format(src=str(LLAMA_CPP), model=str(model_dir), out=str(out), patch=patch, outtype=outtype,
                          vocab_pre=vocab_pre)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own gguf-py, not the installed one
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def llama_perplexity(model: Path, text: Path = TEXT, n_ctx: int = 64, n_chunks: int = 3,
                     n_batch: int | None = None, extra: tuple[str, ...] = ()) -> float:
    """llama-perplexity's final estimate over the first n_chunks chunks of n_ctx tokens of `text`
    (skips the test when the tool or the text is missing)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llama_cpp_tools import bin_dir

    exe = bin_dir() / "llama-perplexity"
    if not exe.exists():
        pytest.skip("llama.cpp's tools are not built (python benchmarks/llama_cpp_tools.py --build)")
    if not text.exists():
        pytest.skip(f"{text} is missing (../shared/data)")
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(n_ctx), "--chunks", str(n_chunks), "-t", "2"]
    if n_batch is not None:
        cmd += ["-b", str(n_batch)]
    # llama.cpp logs through a worker thread that the process may not let finish before exiting
    # (common/log.cpp: "logs may be lost if not flushed before the program exits"), so the last lines,
    # the results among them, are sometimes missing: read every place they go, and rerun when lost.
    import tempfile

    out = ""
    for _ in range(6):
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "log.txt"
            r = subprocess.run(cmd + list(extra) + ["--log-file", str(log)], capture_output=True, text=True,
                               timeout=600)
            out = r.stdout + r.stderr + (log.read_text(errors="replace") if log.exists() else "")
        assert r.returncode == 0, f"rc {r.returncode}: " + out[-3000:]
        computing = re.search(r"calculating perplexity over (\d+) chunks", out)
        assert computing is None or int(computing.group(1)) == n_chunks, out[-3000:]
        final = re.search(r"Final estimate: PPL = ([\d.]+)", out)
        if final:
            return float(final.group(1))
        last = re.search(rf"\[{n_chunks}\]([\d.]+),", out)
        if last:
            return float(last.group(1))
    raise AssertionError("llama-perplexity printed no result in 6 runs: " + out[-3000:])


def llama_kl_base(model: Path, out: Path, text: Path = TEXT, n_ctx: int = 64, n_chunks: int = 3,
                  n_batch: int | None = None) -> Path:
    """llama-perplexity's --kl-divergence-base file of `model` on `text` (its tokens and per-position
    log-probabilities, coded to 2.4e-4 nats), for pyengine.quality.kl_divergence: a comparison position by
    position, far finer than the final perplexity."""
    llama_perplexity(model, text, n_ctx=n_ctx, n_chunks=n_chunks, n_batch=n_batch,
                     extra=("--kl-divergence-base", str(out)))
    assert out.is_file() and out.stat().st_size > 0
    return out


def check_llama_cpp_reads(path: Path, tmp: Path, n_ctx: int = 64, n_chunks: int = 3, n_batch: int | None = None,
                          other: Path | None = None) -> float:
    """llama-perplexity on our file `path` gives pyengine's perplexity (to 1e-4), and its log-probabilities
    position by position (mean KL below 1e-5, the same top token at 99% of positions); `other`, a variant
    of the file that changes what is under test, must not (mean KL above 5e-5, which shows the comparison
    can see the difference). Returns llama.cpp's perplexity."""
    import pyengine
    from pyengine.quality import kl_divergence

    theirs = llama_perplexity(path, n_ctx=n_ctx, n_chunks=n_chunks, n_batch=n_batch)
    mine = pyengine.LLM(path, n_ctx=n_ctx).perplexity(TEXT.read_text(), n_ctx=n_ctx, n_chunks=n_chunks).ppl
    assert mine == pytest.approx(theirs, rel=1e-4)
    base = llama_kl_base(path, tmp / f"{path.stem}.kl", n_ctx=n_ctx, n_chunks=n_chunks, n_batch=n_batch)
    same = kl_divergence(pyengine.LLM(path, n_ctx=n_ctx), base)
    assert same.kld < 1e-5 and same.same_top >= 0.99, (same.kld, same.same_top)
    if other is not None:
        assert kl_divergence(pyengine.LLM(other, n_ctx=n_ctx), base).kld > 5e-5
    return theirs


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors by name) of a GGUF file, as gguf-py reads it."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def compare_gguf(ours: Path, theirs: Path, skip_prefixes: tuple[str, ...] = (),
                 allowed_extra: tuple[str, ...] = ()) -> None:
    """Every tensor llama.cpp writes, we write with the same type, shape and bits, and nothing else;
    every metadata key (but the naming ones and those starting with `skip_prefixes`) has the same value
    in both files, and we write no key they do not, except `allowed_extra`."""
    md_a, t_a = read_gguf(ours)
    md_b, t_b = read_gguf(theirs)
    for key in sorted(set(md_a) | set(md_b)):
        if key.startswith(skip_prefixes):
            continue
        if key in NAMING_KEYS or (key in allowed_extra and key not in md_b):
            continue
        assert (key in md_a) == (key in md_b), (f"{key}: ours {md_a.get(key, '<absent>')!r}, "
                                                f"llama.cpp's {md_b.get(key, '<absent>')!r}")
        if key in md_a:
            a, b = md_a[key], md_b[key]
            if isinstance(a, float) or isinstance(b, float):
                assert np.float32(a) == np.float32(b), f"{key}: ours {a} != llama.cpp's {b}"
            else:
                assert a == b, f"{key}: ours {str(a)[:200]} != llama.cpp's {str(b)[:200]}"
    assert set(t_a) == set(t_b), (sorted(set(t_a) - set(t_b)), sorted(set(t_b) - set(t_a)))
    for name, t in t_b.items():
        assert t_a[name].tensor_type == t.tensor_type, name
        assert list(t_a[name].shape) == list(t.shape), name
        np.testing.assert_array_equal(np.asarray(t_a[name].data), np.asarray(t.data), err_msg=name)
