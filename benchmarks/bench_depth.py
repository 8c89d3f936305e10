"""Decode speed deep into a context: pyengine vs llama.cpp (llama-cpp-python) on the same GGUF.

For each depth D the context first holds D random tokens (evaluated as a prompt, not timed), then
-n tokens are decoded one at a time (llama-bench's "tg @ dD"). Attention reads the whole cache every
step, so this is where its speed shows. Each engine runs in its own subprocess; the median of -r
repetitions after a warm-up.

    PYTHONPATH=<llama-cpp-python> python benchmarks/bench_depth.py [-m smollm2-135m-q4_0] [--depths 0,1000,3000]

Writes benchmarks/results/depth.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _random_ids(n: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(100, 40000, size=n).tolist()


def _decode_speed(eval_ids, reset, depth: int, n_gen: int, reps: int) -> float:
    """tok/s of n_gen single-token evals after `depth` prompt tokens; median of reps after a warm-up."""
    def run() -> float:
        reset()
        if depth:
            eval_ids(_random_ids(depth, 0))
        t0 = time.perf_counter()
        for tok in _random_ids(n_gen, 1):
            eval_ids([tok])
        return time.perf_counter() - t0

    run()
    return n_gen / statistics.median(run() for _ in range(reps))


def pyengine_worker(model: str, depth: int, n_gen: int, threads: int, reps: int) -> float:
    import pyengine
    from pyengine.default_model import resolve_model

    llm = pyengine.LLM(str(resolve_model(model)), n_ctx=depth + n_gen + 8, n_threads=threads)
    return _decode_speed(llm.eval, llm.reset, depth, n_gen, reps)


def llamacpp_worker(model: str, depth: int, n_gen: int, threads: int, reps: int) -> float:
    from llama_cpp import Llama

    from pyengine.default_model import resolve_model

    llm = Llama(model_path=str(resolve_model(model)), n_ctx=depth + n_gen + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)

    def reset() -> None:
        llm.reset()
        llm._ctx.kv_cache_clear()

    return _decode_speed(llm.eval, reset, depth, n_gen, reps)


WORKERS = {"pyengine": pyengine_worker, "llama.cpp": llamacpp_worker}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m-q4_0")
    ap.add_argument("--depths", default="0,1000,3000")
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "depth.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.model, args.depth, args.n_gen, args.threads, args.reps)))
        return 0

    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        row = {"model": args.model, "threads": args.threads, "depth": depth, "n_gen": args.n_gen}
        for engine in WORKERS:
            cmd = [sys.executable, __file__, "--worker", engine, "-m", args.model, "--depth", str(depth),
                   "-n", str(args.n_gen), "-t", str(args.threads), "-r", str(args.reps)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            row[engine] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
            if p.returncode != 0:
                print(f"  {engine} failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        rows.append(row)
        print(f"depth {depth}: tg{args.n_gen} pyengine {row['pyengine']} llama.cpp {row['llama.cpp']}", flush=True)

    out = {"date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("\n| depth | tg tok/s pyengine | tg tok/s llama.cpp | ratio |\n|---:|---:|---:|---:|")
    for r in rows:
        pe, lc = r["pyengine"], r["llama.cpp"]
        ratio = f"{pe / lc:.2f}" if pe and lc else "n/a"
        print(f"| {r['depth']} | {pe or float('nan'):.1f} | {lc or float('nan'):.1f} | {ratio} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
