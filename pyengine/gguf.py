"""Reading GGUF files through the engine's bounds-checked C++ reader."""
from __future__ import annotations

import os
from typing import Any

from ._C import GGUFFile

__all__ = ["GGUFFile", "read_metadata"]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return a GGUF file's metadata as a dict.

    Values are str, int, float or bool; arrays of strings are ``list[str]`` and numeric arrays
    numpy arrays. Raises ``pyengine.ModelFormatError`` for a malformed file.
    """
    return GGUFFile(os.fspath(path)).metadata
