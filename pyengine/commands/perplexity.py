"""`pyengine perplexity`: perplexity and KL divergence on a text file, as llama-perplexity computes them.

    pyengine perplexity -m model.gguf -f text.txt [-c 512] [--chunks N]
    pyengine perplexity -m f16.gguf -f text.txt --kl-divergence-base base.kld     # save the reference
    pyengine perplexity -m q4_0.gguf --kl-divergence-base base.kld --kl-divergence  # compare against it

The text is cut into chunks of -c tokens; the second half of each chunk is scored (see
pyengine/quality.py). The running estimate is printed after each chunk as [1]x,[2]y,... and the result as
"Final estimate: PPL = X +/- Y". The base file is llama.cpp's format: files written by either tool work
with the other.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .chat import add_gpu_args, positive_int


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF file, folder or model name (default: the default model, see pyengine chat --help)")
    ap.add_argument("-f", "--file", default=None, help="text file to evaluate")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=-1, help="max chunks to evaluate (default: all)")
    ap.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per forward pass")
    ap.add_argument("-t", "--threads", type=positive_int, default=None, help="threads (default: physical cores)")
    add_gpu_args(ap)
    ap.add_argument("--kl-divergence-base", metavar="FILE", default=None,
                    help="with -f: save tokens and log-probs here; with --kl-divergence: read them")
    ap.add_argument("--kl-divergence", action="store_true",
                    help="compare the model with the base saved by --kl-divergence-base")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args(argv)
    if args.kl_divergence and not args.kl_divergence_base:
        ap.error("--kl-divergence needs --kl-divergence-base FILE")
    if not args.kl_divergence and not args.file:
        ap.error("-f FILE is required (except with --kl-divergence)")

    from .. import EngineError, ModelFormatError, UnsupportedModelError
    from .. import quality
    from ..default_model import resolve_model
    from ..llm import LLM

    started = False  # whether stdout holds an unfinished line of running estimates

    def progress(i: int, ppl: float) -> None:
        nonlocal started
        started = True
        print(f"[{i}]{ppl:.4f},", end="", flush=True)

    try:
        path = resolve_model(args.model)
        # with --kl-divergence the base file sets the chunk size, as in llama-perplexity
        n_ctx = _base_ctx(args.kl_divergence_base) if args.kl_divergence else args.ctx_size
        llm = LLM(path, n_ctx=max(n_ctx, 4), n_threads=args.threads, n_batch=args.batch_size,
                  n_gpu_layers=args.n_gpu_layers, kv_type=args.kv_type)
        if args.kl_divergence:
            def kl_progress(i: int, r: quality.KLResult) -> None:
                print(f"{i:4d}    {r.ppl:9.4f} ± {r.ppl_unc:9.4f}    {r.ln_ppl_ratio:10.5f} ± {r.ln_ppl_ratio_unc:10.5f}"
                      f"    {r.kld:10.5f} ± {r.kld_unc:10.5f}    {100 * r.same_top:6.3f} ± {100 * r.same_top_unc:6.3f} %",
                      flush=True)

            print("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence          Same top p")
            r = quality.kl_divergence(llm, args.kl_divergence_base, args.chunks, on_chunk=kl_progress)
            print()
            print(r.report())
            if args.json:
                print(json.dumps({"model": str(path), **r.to_dict()}))
            return 0
        text = Path(args.file).read_text(encoding="utf-8", errors="replace")
        if args.kl_divergence_base:
            r = quality.save_kl_base(llm, text, args.kl_divergence_base, args.ctx_size, args.chunks, progress)
        else:
            r = quality.perplexity(llm, text, args.ctx_size, args.chunks, progress)
    except (FileNotFoundError, ValueError, ModelFormatError, UnsupportedModelError, EngineError) as e:
        if started:
            print()  # end the line of running estimates; the error is then one line on stderr
        print(f"pyengine perplexity: {e}", file=sys.stderr)
        return 1
    print()
    print(f"{r.n_chunks} chunks of {r.n_ctx} tokens, {r.n_scored} tokens scored "
          f"({r.n_text_tokens} in the text), {r.seconds:.1f} s")
    print(r.final_line())
    if args.json:
        print(json.dumps({"model": str(path), "file": args.file, "ppl": r.ppl, "uncertainty": r.uncertainty,
                          "n_ctx": r.n_ctx, "n_chunks": r.n_chunks, "n_scored": r.n_scored, "seconds": r.seconds}))
    return 0


def _base_ctx(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(12)
    return int.from_bytes(head[8:12], "little", signed=True) if len(head) == 12 else 0
