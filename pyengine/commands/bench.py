"""`pyengine bench`: prompt-processing and generation speed with llama-bench's semantics.

pp: evaluate a prompt of p tokens in a fresh context (one forward over the prompt, in n_batch
chunks). tg: generate n tokens one at a time from an empty context (each step evaluates one
token). Each test runs once as a warm-up, then -r times. The table shows, as llama-bench does, the mean
and the standard deviation of the -r tokens/s samples ("562.51 ± 3.20"); --json has them as
`pp_avg_ts` / `pp_stddev_ts` (and tg_...) beside the samples (`pp_samples_ts`, `pp_times_s`) and the
median's tokens/s (`pp_tokens_per_s`, what benchmarks/bench_engine.py compares with llama.cpp).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .chat import add_gpu_args, positive_int


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_bench(model: str | Path, n_prompt: int = 512, n_gen: int = 128, threads: int | None = None,
              reps: int = 3, n_batch: int = 512, n_gpu_layers: int | str = 0, kv_type: str = "f16") -> dict:
    """Measure pp and tg tokens/s; returns the result dict that `--json` prints."""
    from ..default_model import resolve_model
    from ..gguf import file_type_name
    from ..llm import LLM

    path = resolve_model(None if model is None else str(model))
    llm = LLM(path, n_ctx=max(n_prompt, n_gen, 1) + 1, n_threads=threads, n_batch=n_batch, n_gpu_layers=n_gpu_layers,
              kv_type=kv_type)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, llm.n_vocab, size=n_prompt, dtype=np.int32)
    gen = rng.integers(0, llm.n_vocab, size=n_gen, dtype=np.int32)

    def pp() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - t0

    def tg() -> float:
        llm.reset()
        t0 = time.perf_counter()
        for tok in gen:
            llm.eval([int(tok)])
        return time.perf_counter() - t0

    result = {
        "model": str(path),
        "arch": llm.config["arch"],
        "file_type": file_type_name(llm.metadata_value("general.file_type")),
        "threads": llm.n_threads,
        "n_gpu_layers": llm.n_gpu_layers,
        "kv_type": kv_type,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "reps": reps,
        "pp_tokens_per_s": None,
        "tg_tokens_per_s": None,
    }
    if n_prompt > 0:
        pp()
        result.update(_summary("pp", n_prompt, [pp() for _ in range(reps)]))
    if n_gen > 0:
        llm.reset()
        llm.eval(gen[:1])
        result.update(_summary("tg", n_gen, [tg() for _ in range(reps)]))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _summary(test: str, n_tokens: int, times: list[float]) -> dict:
    """llama-bench's statistics of one test: mean and sample standard deviation of the per-repetition
    tokens/s (0 with one repetition), plus the median's tokens/s."""
    samples = [n_tokens / t for t in times]
    return {f"{test}_tokens_per_s": n_tokens / statistics.median(times), f"{test}_times_s": times,
            f"{test}_samples_ts": samples, f"{test}_avg_ts": statistics.mean(samples),
            f"{test}_stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0}


def format_table(r: dict) -> str:
    name = Path(r["model"]).name
    rows = [("model", "type", "threads", "test", "t/s")]
    for test, n in (("pp", r["n_prompt"]), ("tg", r["n_gen"])):
        if r[f"{test}_tokens_per_s"] is not None:
            rows.append((name, r["file_type"], str(r["threads"]), f"{test}{n}",
                         f"{r[f'{test}_avg_ts']:.2f} ± {r[f'{test}_stddev_ts']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    out = []
    for k, row in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.append(f"peak RSS: {r['peak_rss_mb']:.0f} MB")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF file, folder or model name (default: the default model, see pyengine chat --help)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp (0 to skip)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for tg (0 to skip)")
    ap.add_argument("-t", "--threads", type=positive_int, default=None, help="threads (default: physical cores)")
    add_gpu_args(ap)
    ap.add_argument("-r", "--reps", type=int, default=3, help="repetitions after the warm-up")
    ap.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per forward pass in pp")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args(argv)
    if args.n_prompt < 0 or args.n_gen < 0 or args.reps < 1:
        ap.error("-p and -n must be >= 0 and -r >= 1")
    from .. import EngineError, ModelFormatError, UnsupportedModelError

    try:
        r = run_bench(args.model, args.n_prompt, args.n_gen, args.threads, args.reps, args.batch_size,
                          n_gpu_layers=args.n_gpu_layers, kv_type=args.kv_type)
    except (FileNotFoundError, ValueError, ModelFormatError, UnsupportedModelError, EngineError) as e:
        print(f"pyengine bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r))
    else:
        print(format_table(r))
    return 0
