"""ggml's own quantizers (ggml-quants.c from the llama.cpp sources that benchmarks/llama_cpp_tools.py
unpacks), compiled into a small shared library and called through ctypes: the independent reference
for pyengine's C++ quantizers (gguf-py dequantizes K-quants but has no K-quant quantizer).

Compiled once into ~/.cache/pyengine/ with the system C compiler, without -march (no FMA contraction,
as pyengine's own build). `library()` returns None when the sources or a compiler are missing.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_tools  # noqa: E402

# (type id, block size, type size) of the types quantize_* is called for
_SIZES = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
          14: (256, 210)}
_NAMES = {2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 10: "q2_K", 11: "q3_K", 12: "q4_K", 13: "q5_K", 14: "q6_K"}

_SHIM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { fprintf(stderr, "ggml_abort %s:%d\n", file, line); abort(); }
static const int64_t BLCK[40] = {[2]=32,[3]=32,[6]=32,[7]=32,[8]=32,[10]=256,[11]=256,[12]=256,[13]=256,[14]=256};
static const size_t TSIZE[40] = {[2]=18,[3]=20,[6]=22,[7]=24,[8]=34,[10]=84,[11]=110,[12]=144,[13]=176,[14]=210};
size_t ggml_type_size(int type) { return TSIZE[type]; }
size_t ggml_row_size(int type, int64_t ne) { return TSIZE[type] * ne / BLCK[type]; }
const char * ggml_type_name(int type) { return "?"; }
"""

_lib = None


def source_dir() -> Path | None:
    src = llama_cpp_tools.cache_dir() / "src"
    for p in sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp")) if src.is_dir() else []:
        if (p / "ggml" / "src" / "ggml-quants.c").is_file():
            return p
    return None


def library() -> ctypes.CDLL | None:
    global _lib
    if _lib is not None:
        return _lib
    root = source_dir()
    cc = shutil.which("cc") or shutil.which("gcc")
    if root is None or cc is None:
        return None
    out = llama_cpp_tools.cache_dir() / "ggml-quants-ref.so"
    if not out.is_file():
        shim = out.with_suffix(".shim.c")
        shim.write_text(_SHIM)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), f"-I{root}/ggml/include", f"-I{root}/ggml/src",
                        str(root / "ggml/src/ggml-quants.c"), str(shim), "-lm"], check=True, capture_output=True)
        os.replace(tmp, out)
    _lib = ctypes.CDLL(str(out))
    return _lib


def quantize(x: np.ndarray, type_id: int, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml's quantize_<type>(x rows, importance) as uint8 (rows, row bytes)."""
    lib = library()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    block, size = _SIZES[type_id]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    fn = getattr(lib, f"quantize_{_NAMES[type_id]}")
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    fn(x.ctypes.data, out.ctypes.data, rows, cols, None if imp is None else imp.ctypes.data)
    return out
