"""Batched decode: tokens/s summed over B sequences decoded together, pyengine vs llama-batched-bench.

One step is one forward pass over B rows, one per sequence. Protocol (llama-batched-bench's S_TG):
prefill each of the B sequences with --n-prompt random tokens (untimed), then time --n-gen steps, each a
decode call with B rows (random next tokens, logits for all B rows); tokens/s = B * n_gen / time.

- pyengine: one subprocess per (model, B); one warm-up round, then the median of --reps rounds.
- llama.cpp: `llama-batched-bench` (built natively by llama_cpp_tools.py) on the same file, one process
  per rep covering every B, the S_TG t/s column; median per B over --reps processes. Each process warms
  up on 16 tokens itself. Flash attention is left at its default, auto, in both llama-bench and
  llama-batched-bench (no -fa); in llama.cpp 0.3.36 auto builds FLASH_ATTN_EXT nodes on the CPU, so it is
  on. The JSON keeps the tool's own settings line and every rep's value: on a shared machine one rep
  can be several times slower than the others, which the median of 3 hides and of 2 does not.

    python benchmarks/make_models.py --types q4_0,q8_0
    python benchmarks/bench_batch.py [--models smollm2-q4_0,smollm2-q8_0,chatglm3-6b-q4_0] [--batches 1,2,4,8,16]
                                     [--threads 2] [--n-prompt 128] [--n-gen 32] [--reps 2] [--engines pyengine,llama.cpp]
                                     [--kv-type f16|q8_0]

The ChatGLM3-6B-shaped file is written by bench_chatglm.py's make_model on first use (3.8 GB). Prints a
markdown table and writes benchmarks/results/batch.json.
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
sys.path.insert(0, str(HERE))

MODELS = {"smollm2-q4_0": "smollm2-135m-q4_0.gguf", "smollm2-q8_0": "smollm2-135m-q8_0.gguf",
          "chatglm3-6b-q4_0": "bench-chatglm3-6b-q4_0.gguf"}
PREFILL_CHUNK = 512  # rows per prefill decode call, llama-batched-bench's -ub


def pyengine_worker(model: str, batch: int, n_prompt: int, n_gen: int, threads: int, reps: int,
                    kv_type: str = "f16") -> dict:
    import numpy as np
    from gguf import GGUFReader

    import pyengine

    n_vocab = len(GGUFReader(model).fields["tokenizer.ggml.tokens"].data)
    llm = pyengine.LLM(model, n_ctx=n_prompt + n_gen + 8, n_threads=threads, n_seq_max=batch, kv_type=kv_type)
    rng = np.random.default_rng(0)
    seq_ids = np.arange(batch, dtype=np.int32)

    def one_round() -> float:
        llm.reset()
        tokens = rng.integers(0, n_vocab, size=batch * n_prompt, dtype=np.int32)
        seqs = np.repeat(seq_ids, n_prompt)
        wanted = np.zeros(batch * n_prompt, dtype=bool)
        wanted[n_prompt - 1::n_prompt] = True  # the last prompt row of each sequence
        for i in range(0, len(tokens), PREFILL_CHUNK):
            llm.decode(tokens[i:i + PREFILL_CHUNK], seqs[i:i + PREFILL_CHUNK], logits=wanted[i:i + PREFILL_CHUNK])
        steps = rng.integers(0, n_vocab, size=(n_gen, batch), dtype=np.int32)
        t0 = time.perf_counter()
        for row in steps:
            llm.decode(row, seq_ids, logits=None)
        return time.perf_counter() - t0

    one_round()
    times = [one_round() for _ in range(reps)]
    return {"tg_tokens_per_s": batch * n_gen / statistics.median(times), "tg_s": times}


def run_pyengine(model: Path, batch: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--batches", str(batch), "--threads",
           str(args.threads), "--n-prompt", str(args.n_prompt), "--n-gen", str(args.n_gen), "--reps", str(args.reps),
           "--kv-type", args.kv_type]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"  pyengine failed on {model.name} B={batch}: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def batched_bench_cmd(model: Path, batches: list[int], args) -> list[str]:
    from llama_cpp_tools import tool_path

    n_ctx = max(batches) * (args.n_prompt + args.n_gen + 8)  # the tool skips a B whose KV would not fit
    return [str(tool_path("llama-batched-bench")), "-m", str(model), "-c", str(n_ctx), "-b", "2048",
            "-ub", str(PREFILL_CHUNK), "-npp", str(args.n_prompt), "-ntg", str(args.n_gen),
            "-npl", ",".join(map(str, batches)), "-t", str(args.threads), "-tb", str(args.threads),
            "-ctk", args.kv_type, "-ctv", args.kv_type]


def parse_batched_bench(text: str) -> dict[int, float]:
    """{B: S_TG t/s} from llama-batched-bench's table (| PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | ...)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            out[int(cells[2])] = float(cells[7])
    return out


def run_llamacpp(model: Path, batches: list[int], args) -> tuple[dict[int, dict], dict]:
    """Median S_TG per B over --reps llama-batched-bench processes, and what the tool reported about itself."""
    cmd = batched_bench_cmd(model, batches, args)
    runs: list[dict[int, float]] = []
    settings = ""
    for _ in range(args.reps):
        p = subprocess.run(cmd, capture_output=True, text=True)
        text = p.stdout + p.stderr
        if p.returncode != 0:
            print(f"  llama-batched-bench failed on {model.name}: {text.strip().splitlines()[-1:]}", file=sys.stderr)
            return {}, {"command": cmd}
        runs.append(parse_batched_bench(text))
        settings = next((line.strip() for line in text.splitlines() if "n_kv_max" in line), settings)
    res = {}
    for b in batches:
        vals = [r[b] for r in runs if b in r]
        if vals:
            res[b] = {"tg_tokens_per_s": statistics.median(vals), "runs": vals}
    return res, {"command": cmd, "settings": settings}


def model_path(name: str) -> Path:
    from pyengine.default_model import models_dir

    path = models_dir() / MODELS.get(name, name)
    if not path.is_file() and name.startswith("chatglm"):
        from bench_chatglm import make_model

        print(f"writing {path} ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        make_model(path, name.rsplit("-", 1)[-1])
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"names ({', '.join(MODELS)}) or GGUF file names")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-prompt", type=int, default=128, help="tokens prefilled per sequence before timing")
    ap.add_argument("--n-gen", type=int, default=32, help="decode steps timed")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--engines", default="pyengine,llama.cpp")
    ap.add_argument("--kv-type", default="f16", choices=("f16", "q8_0"),
                    help="KV cache type of both engines (llama.cpp: -ctk/-ctv)")
    ap.add_argument("--out", default=str(HERE / "results" / "batch.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    if args.worker:
        print(json.dumps(pyengine_worker(args.model, batches[0], args.n_prompt, args.n_gen, args.threads, args.reps,
                                         args.kv_type)))
        return 0

    engines = args.engines.split(",")
    rows, llamacpp_runs = [], {}
    for name in args.models.split(","):
        model = model_path(name)
        if not model.is_file():
            print(f"missing {model}: run python benchmarks/make_models.py", file=sys.stderr)
            return 1
        lc, lc_info = run_llamacpp(model, batches, args) if "llama.cpp" in engines else ({}, {})
        llamacpp_runs[model.name] = lc_info
        pe = {b: run_pyengine(model, b, args) for b in batches} if "pyengine" in engines else {}
        for b in batches:
            row = {"model": model.name, "batch": b, "pyengine": pe.get(b), "llama.cpp": lc.get(b)}
            for engine in ("pyengine", "llama.cpp"):
                base = (pe if engine == "pyengine" else lc).get(batches[0])
                if row[engine] and base:
                    row[f"{engine}_vs_b{batches[0]}"] = row[engine]["tg_tokens_per_s"] / base["tg_tokens_per_s"]
            if row["pyengine"] and row["llama.cpp"]:
                row["ratio"] = row["pyengine"]["tg_tokens_per_s"] / row["llama.cpp"]["tg_tokens_per_s"]
            rows.append(row)
            print(markdown_table([row], batches[0]).splitlines()[-1], flush=True)

    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "settings": {"threads": args.threads, "batches": batches, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
                        "kv_type": args.kv_type,
                        "reps": args.reps, "prefill_chunk": PREFILL_CHUNK, "engines": engines,
                        "llama_cpp": llama_cpp_info(), "llama_batched_bench": llamacpp_runs},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print()
    print(markdown_table(rows, batches[0]))
    print(f"\nwrote {args.out}")
    return 0


def markdown_table(rows: list[dict], b0: int) -> str:
    lines = [f"| model | B | pyengine tok/s | vs B={b0} | llama.cpp tok/s | vs B={b0} | pyengine / llama.cpp |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tps = lambda e: f"{r[e]['tg_tokens_per_s']:.1f}" if r[e] else "n/a"  # noqa: E731
        ratio = lambda k: f"{r[k]:.2f}" if k in r else "n/a"  # noqa: E731
        lines.append(f"| {r['model']} | {r['batch']} | {tps('pyengine')} | {ratio(f'pyengine_vs_b{b0}')} | "
                     f"{tps('llama.cpp')} | {ratio(f'llama.cpp_vs_b{b0}')} | {ratio('ratio')} |")
    return "\n".join(lines)


def machine() -> dict:
    """CPU model as lscpu and /proc/cpuinfo name it (a VM may only say "AMD EPYC"), with family/model/stepping."""
    info = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU family", "Model", "Stepping", "CPU(s)", "Hypervisor vendor", "L3 cache"):
                info[key.strip()] = value.strip()
    except OSError:
        pass
    import bench_engine

    info["cpuinfo_model_name"] = bench_engine.cpu_model()
    return info


def llama_cpp_info() -> dict:
    import llama_cpp_tools

    return {"version": llama_cpp_tools.VERSION, "bin": str(llama_cpp_tools.bin_dir()),
            "build": llama_cpp_tools.build_info()}


if __name__ == "__main__":
    sys.exit(main())
