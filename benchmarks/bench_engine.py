"""pyengine vs llama.cpp's llama-bench (built natively) on the same GGUF files, threads and token counts.

Rows: SmolLM2-135M at Q4_0, Q8_0 and F16, Qwen2.5-Coder-0.5B-Instruct Q4_K_M, and a random 1.1B
Llama-shaped model at Q4_K_M and Q4_0 (too large for any cache: decode there is bound by memory
bandwidth). pp = prompt processing of -p tokens in a fresh context; tg = generating -n tokens one at a
time from an empty context (llama-bench's definitions); median (pyengine) / mean (llama-bench) of -r
repetitions after a warm-up. Each measurement runs in its own process; peak RSS is that process's.

For every tg row the table also gives the share of the measured read bandwidth the decode uses: weight
bytes read per token (every tensor but the token embedding, which is read a row at a time, unless it is
also the output matrix) x tokens/s / the read bandwidth measured with as many threads just before and
just after that engine's run (the larger of the two, each engine's read_bandwidth_gb_s: a shared
machine's bandwidth moves from minute to minute, by a fifth and more on the development VM).

    python benchmarks/make_models.py --random-1b      # SmolLM2 variants, the random 1.1B files
    python benchmarks/bench_engine.py --threads 1,2   # writes benchmarks/results/engine.json

--pairs N runs each row's two engines N times, alternating which goes first: a row's tokens/s and
bandwidth shares are then the medians over the passes, its ratios the medians of the passes' own
ratios (each pass's two runs a minute apart), and every pass is in the JSON. On a machine whose speed
moves by tens of percent between minutes, one pass cannot tell 0.95x from 1.05x.

The peer is llama.cpp from the llama-cpp-python sdist built with -DGGML_NATIVE=ON (on CPUs that report
AMX, the same ISA flags one by one without AMX: see benchmarks/llama_cpp_tools.py)
(benchmarks/llama_cpp_tools.py builds it on first use).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = ["smollm2-135m-q4_0", "smollm2-135m-q8_0", "smollm2-135m-f16", "qwen2.5-coder-0.5b-instruct-q4_k_m",
          "llama-1.1b-random-q4_k_m", "llama-1.1b-random-q4_0"]


def pyengine_worker(model: str, n_prompt: int, n_gen: int, threads: int, reps: int) -> dict:
    from pyengine.commands.bench import run_bench

    r = run_bench(model, n_prompt, n_gen, threads, reps)
    return {k: r[k] for k in ("pp_tokens_per_s", "tg_tokens_per_s")}


def run_measured(cmd: list[str]) -> tuple[str, float]:
    """Runs cmd; returns its stdout and its peak RSS in MB. The peak is the process's VmHWM, read from
    /proc while it runs: getrusage's ru_maxrss would carry over the high-water mark of this (larger)
    process through fork and exec."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak_kb = 0
        while p.poll() is None:
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kb = max(peak_kb, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {tail}")
        return out.read().decode(), peak_kb / 1024.0


def run_pyengine(model: Path, args, threads: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "-p", str(args.n_prompt), "-n",
           str(args.n_gen), "-r", str(args.reps), "--threads", str(threads)]
    try:
        out, rss = run_measured(cmd)
    except RuntimeError as e:
        print(f"  pyengine: {e}", file=sys.stderr)
        return None
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": rss}


def run_llamacpp(model: Path, args, threads: int) -> dict | None:
    import llama_cpp_tools

    result: dict = {}
    # pp and tg in separate processes, as pyengine's worker measures both in one: the RSS is the larger.
    for key, flags in (("pp_tokens_per_s", ["-p", str(args.n_prompt), "-n", "0"]),
                       ("tg_tokens_per_s", ["-p", "0", "-n", str(args.n_gen)])):
        cmd = [str(llama_cpp_tools.tool_path("llama-bench")), "-m", str(model), "-t", str(threads), "-r",
               str(args.reps), "-o", "json", *flags]
        try:
            out, rss = run_measured(cmd)
        except RuntimeError as e:
            print(f"  llama.cpp: {e}", file=sys.stderr)
            return None
        result[key] = json.loads(out)[0]["avg_ts"]
        result["peak_rss_mb"] = max(rss, result.get("peak_rss_mb", 0.0))
    return result


def weight_bytes_per_token(model: Path) -> int:
    """Bytes of the tensors one decode step reads in full (the embedding only when it is the output too)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(model)).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if tied or name != "token_embd.weight")


def read_bandwidth_gb_s(threads: int, gib: float = 2.0, reps: int = 5) -> float:
    """Memory read bandwidth: `threads` threads taking the byte maximum (one SIMD op per 64 bytes, so the
    loads are the limit) of disjoint parts of a buffer far larger than cache. The buffer is written
    first: untouched pages all map to one zero page and would read from cache."""
    import threading

    import numpy as np

    buf = np.empty(int(gib * 2**30), np.uint8)
    buf.fill(1)
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=np.maximum.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="names in the models directory, or GGUF paths")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=1, help="passes over each row's two engines, alternating the order")
    ap.add_argument("--out", default=str(HERE / "results" / "engine.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(pyengine_worker(args.model, args.n_prompt, args.n_gen, int(args.threads), args.reps)))
        return 0

    from pyengine.default_model import models_dir

    def with_bandwidth(run, threads: int) -> dict | None:
        before = read_bandwidth_gb_s(threads)
        result = run()
        if result is not None:
            result["read_bandwidth_before_after_gb_s"] = [before, read_bandwidth_gb_s(threads)]
            result["read_bandwidth_gb_s"] = max(result["read_bandwidth_before_after_gb_s"])
        return result

    rows = []
    for name in args.models.split(","):
        model = Path(name) if name.endswith(".gguf") else models_dir() / f"{name}.gguf"
        if not model.is_file():
            print(f"skipped {model}: not found (python benchmarks/make_models.py --random-1b makes the "
                  "benchmark files)", file=sys.stderr)
            continue
        per_token = weight_bytes_per_token(model)
        for threads in [int(t) for t in args.threads.split(",")]:
            runs = {"pyengine": lambda: run_pyengine(model, args, threads),
                    "llama.cpp": lambda: run_llamacpp(model, args, threads)}
            passes = []
            for i in range(args.pairs):
                order = ("pyengine", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "pyengine")
                passes.append({engine: with_bandwidth(runs[engine], threads) for engine in order})
                for engine in order:
                    r = passes[-1][engine]
                    if r and r["read_bandwidth_gb_s"]:
                        r["tg_bandwidth_share"] = per_token * r["tg_tokens_per_s"] / 1e9 / r["read_bandwidth_gb_s"]
            row = {"model": model.name, "threads": threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
                   "weight_bytes_per_token": per_token, **combine_passes(passes)}
            if args.pairs > 1:
                row["passes"] = passes
            rows.append(row)
            print(format_row(row), flush=True)
    out = {"machine": machine(), "llama.cpp": llama_cpp_info(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print()
    print(markdown_table(rows))
    print(f"\nwrote {args.out}")
    return 0


def combine_passes(passes: list[dict]) -> dict:
    """A row's "pyengine" and "llama.cpp" results over its passes (medians; peak RSS the largest) and its
    pp / tg ratios (medians of each pass's own ratio; with one pass, that pass's)."""
    out: dict = {}
    for engine in ("pyengine", "llama.cpp"):
        ok = [p[engine] for p in passes if p[engine]]
        out[engine] = None if not ok else {
            **ok[-1],
            **{k: statistics.median(r[k] for r in ok) for k in ("pp_tokens_per_s", "tg_tokens_per_s", "tg_bandwidth_share", "read_bandwidth_gb_s")
               if all(k in r for r in ok)},
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}
    for key in ("pp", "tg"):
        ratios = [p["pyengine"][f"{key}_tokens_per_s"] / p["llama.cpp"][f"{key}_tokens_per_s"]
                  for p in passes if p["pyengine"] and p["llama.cpp"]]
        if ratios:
            out[f"{key}_ratio"] = statistics.median(ratios)
            if len(ratios) > 1:
                out[f"{key}_ratios"] = ratios
    return out


def _fmt(r: dict | None, key: str, spec: str = ".1f") -> str:
    return format(r[key], spec) if r and key in r else "n/a"


def format_row(row: dict) -> str:
    pe, lc = row["pyengine"], row["llama.cpp"]
    return (f"{row['model']} t={row['threads']}: pp{row['n_prompt']} pyengine {_fmt(pe, 'pp_tokens_per_s')} vs "
            f"llama.cpp {_fmt(lc, 'pp_tokens_per_s')}; tg{row['n_gen']} pyengine {_fmt(pe, 'tg_tokens_per_s')} vs "
            f"llama.cpp {_fmt(lc, 'tg_tokens_per_s')}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | threads | pp pyengine | pp llama.cpp | pp ratio | tg pyengine | tg llama.cpp | tg ratio | "
             "tg share of read bandwidth (pyengine / llama.cpp) | peak RSS MB (pyengine / llama.cpp) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pe, lc = r["pyengine"], r["llama.cpp"]
        ratio = lambda k: f"{r[k]:.2f}" if k in r else "n/a"  # noqa: E731
        lines.append(f"| {r['model']} | {r['threads']} | {_fmt(pe, 'pp_tokens_per_s')} | {_fmt(lc, 'pp_tokens_per_s')} | "
                     f"{ratio('pp_ratio')} | {_fmt(pe, 'tg_tokens_per_s')} | {_fmt(lc, 'tg_tokens_per_s')} | "
                     f"{ratio('tg_ratio')} | {_fmt(pe, 'tg_bandwidth_share', '.0%')} / "
                     f"{_fmt(lc, 'tg_bandwidth_share', '.0%')} | {_fmt(pe, 'peak_rss_mb', '.0f')} / "
                     f"{_fmt(lc, 'peak_rss_mb', '.0f')} |")
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform.processor() is empty on Linux)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    from bench_batch import machine as batch_machine
    from pyengine import _C

    return {**batch_machine(), "cpu_path": _C.cpu_path(), "physical_cores": _C.physical_core_count(),
            "python": platform.python_version()}


def llama_cpp_info() -> dict:
    from bench_batch import llama_cpp_info as info

    return info()


if __name__ == "__main__":
    sys.exit(main())
