"""Hardening against a model file that changes under a loaded model, non-finite numbers, resource
limits and misaligned files (issue 14). Each malformed input must give a Python exception that
names the file, tensor, key or layer, never a signal that kills the process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import pyengine
from pyengine import _C

from test_gguf import write_tiny_llama

TESTS = Path(__file__).resolve().parent


def run_script(body: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `body` in a fresh interpreter (a fatal signal there must not take pytest with it)."""
    code = "import sys; sys.path.insert(0, %r)\n" % str(TESTS) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def assert_clean_exit(r: subprocess.CompletedProcess) -> None:
    assert r.returncode >= 0, f"killed by signal {-r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"


# --- 1. the file changes on disk after it was loaded ---------------------------------------------

def test_truncate_after_open_raises_naming_the_file(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    r = run_script("""
        import os, pyengine
        path = sys.argv[1]
        eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
        eng.eval([1, 2, 3])
        os.truncate(path, os.path.getsize(path) // 2)
        for what, call in [("eval", lambda: eng.eval([4])), ("metadata", lambda: eng.metadata),
                           ("tensor_bytes", lambda: eng._model.file.tensor_bytes("output_norm.weight"))]:
            try:
                call()
                print(what, "no error")
            except pyengine.ModelFormatError as e:
                assert path in str(e) and "changed on disk" in str(e), str(e)
                print(what, "raised")
        print("n_past", eng.n_past)
    """, str(path))
    assert_clean_exit(r)
    assert r.stdout.split("\n")[:4] == ["eval raised", "metadata raised", "tensor_bytes raised", "n_past 3"]


def test_fault_inside_the_mapping_is_caught(tmp_path):
    """A read of the mapping after the file shrank, with no check before it (as when the file is
    truncated during a forward pass): the SIGBUS guard completes the read, the next call raises."""
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    r = run_script("""
        import ctypes, os, pyengine
        path = sys.argv[1]
        eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
        eng.eval([1, 2, 3])
        size = os.path.getsize(path)
        # Our mapping of the file, from /proc/self/maps.
        start = end = None
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith(os.path.realpath(path)):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                start, end = lo, hi
        assert start is not None
        os.truncate(path, 4096)
        byte = ctypes.string_at(start + size - 1, 1)   # past the new end: SIGBUS without the guard
        print("read", byte)
        try:
            eng.eval([4])
        except pyengine.ModelFormatError as e:
            assert path in str(e) and "changed on disk" in str(e), str(e)
            print("eval raised")
        # A fault outside any model mapping still kills the process (the guard only takes its own).
    """, str(path))
    assert_clean_exit(r)
    assert "read b'\\x00'" in r.stdout and "eval raised" in r.stdout


def test_fault_elsewhere_still_kills(tmp_path):
    """The guard forwards faults outside model mappings: a truncated mmap of another file dies of SIGBUS."""
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 65536)
    r = run_script("""
        import mmap, os, pyengine
        eng = pyengine.Engine(sys.argv[1], n_ctx=16, n_threads=1)
        f = open(sys.argv[2], "rb")
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        os.truncate(sys.argv[2], 0)
        print(m[60000])
    """, str(path), str(other))
    assert r.returncode == -7, (r.returncode, r.stderr)


def test_modified_in_place_raises(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
    eng.eval([1, 2])
    time.sleep(0.05)  # mtime has the kernel clock's granularity (a few ms)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x7f\x7f\x7f\x7f")
    with pytest.raises(pyengine.ModelFormatError, match="modified in place"):
        eng.eval([3])
    assert eng.n_past == 2


def test_replaced_by_rename_keeps_working(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1)
    before = eng.logits([1, 2, 3])
    new = tmp_path / "new.gguf"
    new.write_bytes(b"GGUF" + b"\0" * 100)
    os.replace(new, path)
    assert np.array_equal(eng.logits([1, 2, 3]), before)


def test_no_mmap_reads_a_private_copy(tmp_path):
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    mapped = pyengine.Engine(path, n_ctx=16, n_threads=1).logits([1, 2, 3])
    eng = pyengine.Engine(path, n_ctx=16, n_threads=1, use_mmap=False)
    assert np.array_equal(eng.logits([1, 2, 3]), mapped)
    os.truncate(path, 100)
    assert np.array_equal(eng.logits([1, 2, 3]), mapped)
    assert eng.metadata["llama.embedding_length"] == 32
    # The file is not mapped: /proc/self/maps does not name it.
    assert str(os.path.realpath(path)) not in Path("/proc/self/maps").read_text()


def test_cli_no_mmap_flag():
    from pyengine.commands.chat import add_model_args
    import argparse

    ap = argparse.ArgumentParser()
    add_model_args(ap)
    assert ap.parse_args([]).use_mmap is True
    assert ap.parse_args(["--no-mmap"]).use_mmap is False
