"""Reading GGUF files through the engine's bounds-checked C++ reader."""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ._C import GGUFFile

__all__ = ["GGUFFile", "read_metadata", "file_type_name"]

# llama.cpp's llama_ftype, the value of general.file_type (llama.h)
FILE_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0",
}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return a GGUF file's metadata as a dict.

    Values are str, int, float or bool; arrays of strings are ``list[str]`` and numeric arrays
    numpy arrays. Raises ``pyengine.ModelFormatError`` for a malformed file.
    """
    return GGUFFile(os.fspath(path)).metadata


def file_type_name(ft: int | None, tensors: list[dict] | None = None) -> str:
    """The file's quantization as llama.cpp names it (``Q4_K_M``...), from its ``general.file_type`` value
    ``ft``; files without that key (None) get the type holding most of the tensor bytes (from
    ``GGUFFile.tensors``), else "?"."""
    if ft is not None:
        return FILE_TYPE_NAMES.get(int(ft), str(ft))
    if tensors:
        by_type: Counter[str] = Counter()
        for t in tensors:
            by_type[t["type_name"]] += t["nbytes"]
        return by_type.most_common(1)[0][0].upper()
    return "?"
