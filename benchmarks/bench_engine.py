"""pyengine vs llama.cpp (llama-cpp-python) on the same GGUF files, threads and token counts.

Each measurement runs in its own subprocess. pp = prompt processing of -p tokens in a fresh
context; tg = generating -n tokens one at a time from an empty context (llama-bench's
definitions); median of -r repetitions after a warm-up. Prints a table and writes JSON.

    python benchmarks/make_models.py              # SmolLM2 at f16/q8_0/q4_0/q4_1 into the models dir
    python benchmarks/bench_engine.py --types q4_0,q8_0,f16 --threads 1,2

llama-cpp-python must be importable (e.g. on PYTHONPATH). Build it for the CPU it runs on; on
VMs whose CPUID reports AMX without the kernel enabling it, build with -DGGML_NATIVE=OFF and the
AVX-512 flags, as llama.cpp's AMX path dies with an illegal instruction there.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def llamacpp_worker(model: str, n_prompt: int, n_gen: int, threads: int, reps: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=max(n_prompt, n_gen) + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, n_ubatch=512, verbose=False)
    rng = np.random.default_rng(0)
    n_vocab = llm.n_vocab()
    prompt = rng.integers(0, n_vocab, size=n_prompt).tolist()
    gen = rng.integers(0, n_vocab, size=n_gen).tolist()

    def pp() -> float:
        llm.reset()
        llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - t0

    def tg() -> float:
        llm.reset()
        llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        for tok in gen:
            llm.eval([tok])
        return time.perf_counter() - t0

    pp()
    pp_times = [pp() for _ in range(reps)]
    tg_times = [tg() for _ in range(reps)]
    return {"pp_tokens_per_s": n_prompt / statistics.median(pp_times),
            "tg_tokens_per_s": n_gen / statistics.median(tg_times), "peak_rss_mb": _peak_rss_mb()}


def pyengine_worker(model: str, n_prompt: int, n_gen: int, threads: int, reps: int) -> dict:
    from pyengine.commands.bench import run_bench

    r = run_bench(model, n_prompt, n_gen, threads, reps)
    return {k: r[k] for k in ("pp_tokens_per_s", "tg_tokens_per_s", "peak_rss_mb")}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


WORKERS = {"pyengine": pyengine_worker, "llama.cpp": llamacpp_worker}


def run_worker(engine: str, model: Path, args, threads: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "-p", str(args.n_prompt),
           "-n", str(args.n_gen), "-r", str(args.reps), "--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  {engine} failed on {model.name}: {p.stderr.strip().splitlines()[-1:]} ", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q4_0,q8_0,f16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--model", default=None, help="one GGUF file instead of the SmolLM2 variants")
    ap.add_argument("--out", default=str(HERE / "results" / "engine.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        r = WORKERS[args.worker](args.model, args.n_prompt, args.n_gen, int(args.threads), args.reps)
        print(json.dumps(r))
        return 0

    from pyengine.default_model import models_dir

    models = [Path(args.model)] if args.model else [models_dir() / f"smollm2-135m-{t}.gguf" for t in args.types.split(",")]
    missing = [m for m in models if not m.is_file()]
    if missing:
        print(f"missing {', '.join(map(str, missing))}: run python benchmarks/make_models.py", file=sys.stderr)
        return 1
    rows = []
    for model in models:
        for threads in [int(t) for t in args.threads.split(",")]:
            res = {e: run_worker(e, model, args, threads) for e in WORKERS}
            row = {"model": model.name, "threads": threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen}
            for e, r in res.items():
                row[e] = r
            if res["pyengine"] and res["llama.cpp"]:
                row["pp_ratio"] = res["pyengine"]["pp_tokens_per_s"] / res["llama.cpp"]["pp_tokens_per_s"]
                row["tg_ratio"] = res["pyengine"]["tg_tokens_per_s"] / res["llama.cpp"]["tg_tokens_per_s"]
            rows.append(row)
            print(format_row(row), flush=True)
    out = {"machine": {"cpu": _cpu_name(), "cores": _cores(), "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print()
    print(markdown_table(rows))
    print(f"\nwrote {args.out}")
    return 0


def _fmt(r: dict | None, key: str) -> str:
    return f"{r[key]:.1f}" if r else "n/a"


def format_row(row: dict) -> str:
    pe, lc = row["pyengine"], row["llama.cpp"]
    return (f"{row['model']} t={row['threads']}: pp{row['n_prompt']} pyengine {_fmt(pe, 'pp_tokens_per_s')} vs "
            f"llama.cpp {_fmt(lc, 'pp_tokens_per_s')}; tg{row['n_gen']} pyengine {_fmt(pe, 'tg_tokens_per_s')} vs "
            f"llama.cpp {_fmt(lc, 'tg_tokens_per_s')}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | threads | pp pyengine | pp llama.cpp | pp ratio | tg pyengine | tg llama.cpp | tg ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pe, lc = r["pyengine"], r["llama.cpp"]
        ratio = lambda k: f"{r[k]:.2f}" if k in r else "n/a"  # noqa: E731
        lines.append(f"| {r['model']} | {r['threads']} | {_fmt(pe, 'pp_tokens_per_s')} | {_fmt(lc, 'pp_tokens_per_s')} | "
                     f"{ratio('pp_ratio')} | {_fmt(pe, 'tg_tokens_per_s')} | {_fmt(lc, 'tg_tokens_per_s')} | {ratio('tg_ratio')} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cores() -> int:
    from pyengine import _C

    return _C.physical_core_count()


if __name__ == "__main__":
    sys.exit(main())
