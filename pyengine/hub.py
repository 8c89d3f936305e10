"""Models by name, as `ollama pull/list/rm`: GGUF files from a Hugging Face-style hub, kept in the models
directory that `-m NAME` searches (`$PYENGINE_MODELS`, default `~/.cache/pyengine/models`).

Downloads go through `huggingface_hub.hf_hub_download` (progress bar, retries that resume an interrupted
transfer with a Range request, the hub's token for gated repos, and `HF_ENDPOINT` for mirrors) into the
models directory itself, so a pulled file is `-m <file name>`. After a download the file is checked against
the hub's ETag: the sha256 of an LFS file, the git blob sha1 of a small one. `huggingface_hub` is an
optional dependency, imported only here.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .default_model import ModelNotFoundError, models_dir

__all__ = ["HubError", "LocalModel", "parse_ref", "parse_hf_url", "list_gguf_files", "choose_file", "pull",
           "resolve_hf_url", "local_models", "find_local_model", "remove_model"]

HF_URL_PREFIX = "hf://"
PREFERRED_QUANT = "Q4_K_M"  # what llama.cpp's `-hf REPO` and ollama pick by default
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.gguf$")  # split files: pyengine reads single-file GGUFs only
INSTALL_HINT = "pip install huggingface_hub"


class HubError(ModelNotFoundError):
    """A model could not be fetched from the hub; the message is one line naming the repo or file."""


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
    except ImportError:
        raise HubError(f"huggingface_hub is not installed: {INSTALL_HINT}") from None
    return huggingface_hub


def _endpoint() -> str:
    return _hub().constants.ENDPOINT


# --- names ---------------------------------------------------------------------------------------------

def parse_ref(ref: str) -> tuple[str, str | None]:
    """`REPO[:FILE]` -> (repo, file or None). FILE may also be a quant tag (`owner/name:Q8_0`)."""
    repo, _, file = ref.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"not a repository name: {ref!r} (expected OWNER/NAME[:FILE])")
    return repo, (file or None)


def parse_hf_url(url: str) -> tuple[str, str | None]:
    """`hf://OWNER/NAME/FILE.gguf` (FILE may have folders; omitted: choose one) -> (repo, file or None)."""
    parts = url[len(HF_URL_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise HubError(f"not a hub model URL: {url!r} (expected hf://OWNER/NAME/FILE.gguf)")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


@contextlib.contextmanager
def _hub_errors(repo: str, file: str | None = None, revision: str = "main") -> Iterator[None]:
    """Turn huggingface_hub's multi-paragraph exceptions into one-line `HubError`s."""
    hub = _hub()
    errors = hub.errors
    entry_not_found = getattr(errors, "RemoteEntryNotFoundError", None) or errors.EntryNotFoundError
    try:
        yield
    except errors.GatedRepoError:
        raise HubError(f"repository {repo} on {_endpoint()} is gated: accept its terms on the hub, then log in "
                       f"(hf auth login, or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"repository {repo} not found on {_endpoint()} (or it is private: log in with "
                       f"hf auth login, or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in repository {repo}") from None
    except entry_not_found:
        raise HubError(f"file {file} not found in repository {repo} (revision {revision})") from None
    except errors.LocalEntryNotFoundError:  # hf_hub_download's wording for "the hub could not be reached"
        raise HubError(f"cannot reach {_endpoint()} to download {repo}/{file} (offline? HF_ENDPOINT?)") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{repo}: {str(e).strip().splitlines()[0]}") from None
    except OSError as e:  # connection refused, DNS, disk full
        raise HubError(f"{repo}: {e.__class__.__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}") from None
    except Exception as e:  # httpx's transport errors are not OSErrors
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise HubError(f"cannot reach {_endpoint()} for {repo}: {e}") from None
        raise


# --- choosing a file -----------------------------------------------------------------------------------

def list_gguf_files(repo: str, revision: str = "main") -> list[tuple[str, int]]:
    """The repository's .gguf files as (path, size in bytes), in the hub's order."""
    hub = _hub()
    with _hub_errors(repo, revision=revision):
        tree = hub.HfApi().list_repo_tree(repo, revision=revision, recursive=True)
        return [(f.path, int(f.size or 0)) for f in tree
                if getattr(f, "size", None) is not None and f.path.lower().endswith(".gguf")]


def choose_file(repo: str, files: list[tuple[str, int]], tag: str | None = None) -> str:
    """The file `pull REPO` or `pull REPO:TAG` means.

    Without a tag: the Q4_K_M file if there is one (llama.cpp's and ollama's default), else the smallest.
    With a tag (a quant type such as Q8_0, or any part of a name): the smallest file whose name contains it.
    Split files (`-00001-of-00003.gguf`) and vision projectors (`mmproj`) are never chosen.
    """
    usable = [(p, s) for p, s in files if not _SHARD.search(p) and "mmproj" not in p.lower()]
    if not usable:
        listed = ", ".join(p for p, _ in files) or "none"
        raise HubError(f"repository {repo} has no single-file GGUF model to pull (its .gguf files: {listed})")
    want = tag or PREFERRED_QUANT
    matching = [(p, s) for p, s in usable if want.lower() in Path(p).name.lower()]
    if tag and not matching:
        names = ", ".join(Path(p).name for p, _ in usable)
        raise HubError(f"no .gguf file in repository {repo} matches {tag!r}; name one of: {names}")
    return min(matching or usable, key=lambda f: f[1])[0]


# --- downloading ---------------------------------------------------------------------------------------

def _file_digest(path: Path, etag: str) -> str | None:
    """The digest of `path` in the ETag's kind (sha256 for LFS files, git blob sha1), None if unknown kind."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        h = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        return None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pull(repo: str, file: str | None = None, revision: str = "main", dest: Path | None = None) -> Path:
    """Download `file` of hub repository `repo` into the models directory (or `dest`) and return its path.

    `file` None or not ending in .gguf: list the repo's GGUF files and pick one (`choose_file`). An
    up-to-date file already there is not downloaded again.
    """
    hub = _hub()
    dest = Path(dest or models_dir())
    if file is None or not file.lower().endswith(".gguf"):
        file = choose_file(repo, list_gguf_files(repo, revision), file)
    target = dest.joinpath(*file.split("/"))
    before = target.stat().st_mtime_ns if target.is_file() else None
    with _hub_errors(repo, file, revision):
        meta = hub.get_hf_file_metadata(hub.hf_hub_url(repo, file, revision=revision))
        dest.mkdir(parents=True, exist_ok=True)
        path = Path(hub.hf_hub_download(repo, file, revision=revision, local_dir=dest))
    if meta.etag and (before is None or path.stat().st_mtime_ns != before):
        digest = _file_digest(path, meta.etag)
        if digest is not None and digest != meta.etag:
            path.unlink(missing_ok=True)
            raise HubError(f"checksum mismatch for {repo}/{file}: got {digest}, the hub says {meta.etag} "
                           f"(the file was removed; pull again)")
    return path


def resolve_hf_url(url: str) -> Path:
    """`-m hf://OWNER/NAME/FILE.gguf`: the file in the models directory, downloaded first if missing."""
    repo, file = parse_hf_url(url)
    if file is not None and file.lower().endswith(".gguf"):
        local = models_dir().joinpath(*file.split("/"))
        if local.is_file():
            return local
    return pull(repo, file)


# --- the models directory ------------------------------------------------------------------------------

@dataclass
class LocalModel:
    """A GGUF file in the models directory, as `pyengine list` shows it."""
    name: str          # what `-m` and `pyengine rm` take: the path in the models directory without .gguf
    path: Path
    size: int
    arch: str          # general.architecture, "?" if unreadable
    quant: str         # general.file_type's name (Q4_K_M, ...), else the most common weight type
    modified: datetime


def _describe(path: Path) -> tuple[str, str]:
    from . import _C
    from .gguf import file_type_name

    try:
        f = _C.GGUFFile(str(path))
        # One key each (GGUFFile.get), not the whole metadata: a vocabulary is ~100k Python objects per file.
        return str(f.get("general.architecture", "?")), file_type_name(f.get("general.file_type"), f.tensors)
    except Exception:  # a partial or foreign file still gets listed
        return "?", "not a valid GGUF"


def local_models(folder: Path | None = None) -> list[LocalModel]:
    """The .gguf files under the models directory (hidden folders, such as the download cache, skipped)."""
    folder = Path(folder or models_dir())
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*.gguf")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        st = path.stat()
        arch, quant = _describe(path)
        name = rel.as_posix()
        found.append(LocalModel(name=name[:-5] if name.lower().endswith(".gguf") else name, path=path,
                                size=st.st_size, arch=arch, quant=quant,
                                modified=datetime.fromtimestamp(st.st_mtime)))
    return found


def find_local_model(name: str, folder: Path | None = None) -> Path:
    """The file that `pyengine rm NAME` removes: NAME or NAME.gguf in the models directory (an absolute
    path must lie there). Anything outside the models directory is refused with `ValueError`; a missing
    name raises `ModelNotFoundError`."""
    base = Path(folder or models_dir())
    root = base.resolve()
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [base / given, base / f"{given}.gguf"]
    for candidate in candidates:
        parent = candidate.parent.resolve()  # symlinked folders count where they point
        if parent != root and root not in parent.parents:
            raise ValueError(f"{name} is not in the models directory {base}; pyengine rm removes only models there")
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"no model {name!r} in {base} (pyengine list shows them)")


def remove_model(path: Path, folder: Path | None = None) -> None:
    """Delete a model file and what hf_hub_download kept about it; empty folders it leaves are removed."""
    base = Path(folder or models_dir())
    path.unlink()
    rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
    meta = base / ".cache" / "huggingface" / "download" / rel
    for extra in (meta.with_name(meta.name + ".metadata"), meta.with_name(meta.name + ".lock")):
        extra.unlink(missing_ok=True)
    parent = path.parent
    while parent != base and base in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def format_size(n: int) -> str:
    """Decimal units, as ollama and the hub show sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
