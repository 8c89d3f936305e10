"""K-quant presets in `pyengine convert --qtype q4_k_m ...` and `pyengine quantize` (GGUF -> GGUF), checked
against llama.cpp's llama-quantize on the same F16 file (same tensor types and same bytes) when its
binary is built (benchmarks/llama_cpp_tools.py), and against hand-written expectations of the rules."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from checkpoints import make_llama
import pyengine
from pyengine_convert import ConversionError, convert
from pyengine_convert.imatrix_file import ImatrixData, load_imatrix, save_imatrix
from pyengine_convert.presets import K_PRESETS, PRESETS, ModelInfo, tensor_type
from pyengine_convert.requantize import main as quantize_main
from pyengine_convert.requantize import requantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_tools  # noqa: E402

LLAMA_QUANTIZE = llama_cpp_tools.bin_dir() / "llama-quantize"
needs_llama = pytest.mark.skipif(not LLAMA_QUANTIZE.is_file(), reason="llama-quantize not built")
LLAMA_NAMES = {"q2_k": "Q2_K", "q3_k_m": "Q3_K_M", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S",
               "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q4_0": "Q4_0", "q8_0": "Q8_0", "q5_1": "Q5_1"}


def types(path: Path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


def raw(path: Path) -> dict[str, bytes]:
    return {t.name: np.asarray(t.data).view(np.uint8).tobytes() for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kq")
    # 8 layers of 256-wide rows: every K type fits; n_kv_heads=1 gives GQA 4
    k8 = make_llama(d / "k8", hidden=256, ff=512, n_layers=8, n_heads=4, n_kv_heads=1, tied=False)
    narrow = make_llama(d / "narrow", hidden=64, ff=128, n_layers=2, tied=True)
    convert(k8, d / "k8-f16.gguf", qtype="f16")
    convert(narrow, d / "narrow-f16.gguf", qtype="f16")
    return {"k8": k8, "narrow": narrow, "k8_f16": d / "k8-f16.gguf", "narrow_f16": d / "narrow-f16.gguf", "dir": d}


def test_q4_k_m_rules_by_hand():
    p, m = PRESETS["q4_k_m"], ModelInfo(n_layer=8, n_gqa=4, tied=False)
    more = {0, 3, 6, 7}  # i < n/8, i >= 7n/8, (i - n/8) % 3 == 2
    for i in range(8):
        want = Q.Q6_K if i in more else Q.Q4_K
        assert tensor_type(p, f"blk.{i}.attn_v.weight", (64, 256), m) == want
        assert tensor_type(p, f"blk.{i}.ffn_down.weight", (256, 512), m) == want
        assert tensor_type(p, f"blk.{i}.attn_q.weight", (256, 256), m) == Q.Q4_K
    assert tensor_type(p, "output.weight", (320, 256), m) == Q.Q6_K
    assert tensor_type(p, "token_embd.weight", (320, 256), m) == Q.Q4_K
    assert tensor_type(p, "blk.0.attn_norm.weight", (256,), m) is None
    # rows of 576 (SmolLM2): Q4_K -> Q5_0, Q6_K -> Q8_0, and a tied embedding is the output (Q8_0)
    assert tensor_type(p, "blk.1.attn_q.weight", (576, 576), m) == Q.Q5_0
    assert tensor_type(p, "blk.0.attn_v.weight", (192, 576), m) == Q.Q8_0
    assert tensor_type(p, "token_embd.weight", (100, 576), ModelInfo(8, tied=True)) == Q.Q8_0
    assert tensor_type(PRESETS["q2_k"], "blk.3.ffn_down.weight", (256, 512), m) == Q.Q3_K
    assert tensor_type(PRESETS["q2_k"], "blk.3.attn_v.weight", (64, 256), m) == Q.Q4_K        # GQA >= 4
    assert tensor_type(PRESETS["q3_k_m"], "blk.1.attn_v.weight", (64, 256), m) == Q.Q5_K
    assert tensor_type(PRESETS["q3_k_m"], "blk.2.attn_output.weight", (256, 256), m) == Q.Q4_K
    assert tensor_type(PRESETS["q2_k"], "blk.2.attn_q.weight", (64, 80), m) == Q.F16            # nothing fits


@pytest.mark.parametrize("qtype", K_PRESETS)
def test_convert_k_preset_loads_and_predicts(models, qtype):
    out = models["dir"] / f"k8-{qtype}.gguf"
    report = convert(models["k8"], out, qtype=qtype)
    assert report.qtype == qtype.upper() and not report.warnings
    ts = types(out)
    m = ModelInfo(n_layer=8, n_gqa=4, tied=False)
    for t in GGUFReader(out).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        assert ts[t.name] == (tensor_type(PRESETS[qtype], t.name, shape, m) or Q.F32), t.name
    assert int(GGUFReader(out).fields["general.file_type"].contents()) == int(PRESETS[qtype].file_type)
    # the engine runs it, and its perplexity stays near the F16 file's (random weights: a loose bound
    # that a mis-packed tensor, giving noise, would break)
    text = "the quick brown fox jumps over the lazy dog " * 12
    ref = pyengine.LLM(str(models["k8_f16"]), n_ctx=64).perplexity(text, n_ctx=64).ppl
    got = pyengine.LLM(str(out), n_ctx=64).perplexity(text, n_ctx=64).ppl
    assert np.isfinite(got) and abs(np.log(got / ref)) < (0.5 if qtype == "q2_k" else 0.2), (got, ref)


def test_convert_narrow_rows_fall_back(models):
    out = models["dir"] / "narrow-q4_k_m.gguf"
    report = convert(models["narrow"], out, qtype="q4_k_m")
    ts = types(out)
    assert ts["blk.0.attn_q.weight"] == Q.Q5_0 and ts["blk.1.attn_v.weight"] == Q.Q8_0  # last layer: Q6_K wanted
    assert ts["token_embd.weight"] == Q.Q8_0
    assert any("fell back" in w for w in report.warnings)
    pyengine.LLM(str(out), n_ctx=32)


@needs_llama
@pytest.mark.parametrize("qtype", list(LLAMA_NAMES))
@pytest.mark.parametrize("model", ["k8_f16", "narrow_f16"])
def test_quantize_equals_llama_quantize(models, qtype, model, tmp_path):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    requantize(models[model], ours, qtype)
    subprocess.run([str(LLAMA_QUANTIZE), str(models[model]), str(theirs), LLAMA_NAMES[qtype], "2"], check=True,
                   capture_output=True)
    assert types(ours) == types(theirs)
    a, b = raw(ours), raw(theirs)
    assert [n for n in a if a[n] != b[n]] == []
    fa = {k: f.contents() for k, f in GGUFReader(ours).fields.items() if not k.startswith("GGUF.")}
    fb = {k: f.contents() for k, f in GGUFReader(theirs).fields.items() if not k.startswith("GGUF.")}
    assert fa == fb


@needs_llama
def test_quantize_with_imatrix_equals_llama_quantize(models, tmp_path):
    rng = np.random.default_rng(0)
    r = GGUFReader(models["k8_f16"])
    data = ImatrixData({}, {}, ["test.txt"], 4, 64)
    for t in r.tensors:
        if len(t.shape) == 2 and t.name.startswith("blk."):
            data.sums[t.name] = rng.uniform(0, 50, int(t.shape[0]))
            data.counts[t.name] = 256
    im = tmp_path / "imatrix.gguf"
    save_imatrix(im, data)
    back = load_imatrix(im)
    assert back.datasets == ["test.txt"] and back.chunk_count == 4 and set(back.sums) == set(data.sums)
    for qtype in ("q4_k_m", "q3_k_m", "q4_0"):
        ours, theirs = tmp_path / f"o-{qtype}.gguf", tmp_path / f"t-{qtype}.gguf"
        requantize(models["k8_f16"], ours, qtype, imatrix=im)
        subprocess.run([str(LLAMA_QUANTIZE), "--imatrix", str(im), str(models["k8_f16"]), str(theirs),
                        LLAMA_NAMES[qtype], "2"], check=True, capture_output=True)
        assert types(ours) == types(theirs), qtype
        a, b = raw(ours), raw(theirs)
        assert [n for n in a if a[n] != b[n]] == [], qtype
        plain = tmp_path / f"p-{qtype}.gguf"
        requantize(models["k8_f16"], plain, qtype)
        assert raw(plain) != a  # the imatrix changed the blocks


def test_quantize_refuses_quantized_source(models, tmp_path, capsys):
    q = tmp_path / "q8.gguf"
    requantize(models["k8_f16"], q, "q8_0")
    with pytest.raises(ConversionError, match=r"q8.gguf is already quantized \(Q8_0.*--allow-requantize"):
        requantize(q, tmp_path / "x.gguf", "q4_k_m")
    assert not (tmp_path / "x.gguf").exists()
    report = requantize(q, tmp_path / "x.gguf", "q4_k_m", allow_requantize=True)
    assert any("requantizing from Q8_0" in w for w in report.warnings)
    pyengine.LLM(str(tmp_path / "x.gguf"), n_ctx=32)
    assert quantize_main([str(q), str(tmp_path / "y.gguf"), "q4_k_m", "-q"]) == 1
    assert "already quantized" in capsys.readouterr().err


def test_quantize_keeps_metadata_and_tokenizer(models, tmp_path):
    out = tmp_path / "m.gguf"
    requantize(models["k8_f16"], out, "q5_k_m")
    src = {k: f.contents() for k, f in GGUFReader(models["k8_f16"]).fields.items() if not k.startswith("GGUF.")}
    dst = {k: f.contents() for k, f in GGUFReader(out).fields.items() if not k.startswith("GGUF.")}
    assert dst.pop("general.file_type") == int(PRESETS["q5_k_m"].file_type)
    src.pop("general.file_type")
    assert dst == src
    a = pyengine.LLM(str(models["k8_f16"]), n_ctx=32)
    b = pyengine.LLM(str(out), n_ctx=32)
    assert a.tokenizer.encode("hello world") == b.tokenizer.encode("hello world")


def test_quantize_errors_name_the_file(tmp_path):
    with pytest.raises(ConversionError, match="input file not found: .*nope.gguf"):
        requantize(tmp_path / "nope.gguf", tmp_path / "o.gguf", "q4_k_m")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match="cannot read .*bad.gguf as GGUF"):
        requantize(bad, tmp_path / "o.gguf", "q4_k_m")
    with pytest.raises(ConversionError, match="unknown type 'q9_k'"):
        requantize(bad, tmp_path / "o.gguf", "q9_k")
    with pytest.raises(ConversionError, match="imatrix file not found"):
        load_imatrix(tmp_path / "none.imatrix")
    with pytest.raises(ConversionError, match="bad.gguf: .*not a GGUF or legacy"):
        load_imatrix(bad)


def test_quantize_progress_only_when_asked(models, tmp_path, capsys):
    """The library is silent by default; with progress=True (the CLI without -q) a log that is not a
    terminal gets a line per tenth of the work, the last one naming every tensor done."""
    requantize(models["k8_f16"], tmp_path / "a.gguf", "q4_k_m")
    assert capsys.readouterr().err == ""
    n = len(GGUFReader(models["k8_f16"]).tensors)
    requantize(models["k8_f16"], tmp_path / "b.gguf", "q4_k_m", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 12 and "\r" not in "".join(lines)
    assert lines[-1].lstrip().startswith(f"{n}/{n} [{'#' * 30}]")
