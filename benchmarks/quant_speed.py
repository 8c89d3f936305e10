"""Speed and peak memory of `pyengine quantize` against llama.cpp's `llama-quantize`, same input, same run.

    python benchmarks/quant_speed.py                        # SmolLM2-135M F16, five presets, +/- imatrix
    python benchmarks/quant_speed.py --make-7b /tmp/llama7b-f16.gguf [--layers 32]
    python benchmarks/quant_speed.py -m /tmp/llama7b-f16.gguf --presets q4_k_m --repeat 1 --no-imatrix

Each tool runs as a command (`python -m pyengine quantize IN OUT TYPE -t T -q` and `llama-quantize IN OUT
TYPE T`), one after the other with the same thread count; wall time is measured around the process and
peak RSS (VmHWM) is GNU time's %M. The input is read once beforehand so that both
start from the page cache (for a file larger than free memory, both read from disk alike). The best of
--repeat runs is kept for each; the two outputs' tensors are compared byte for byte with gguf-py.

The imatrix: `pyengine imatrix` on the second half of pride_and_prejudice.txt (--imatrix-chunks chunks
of 512), the same file given to both tools.

--make-7b writes a Llama-2-7B-shaped F16 GGUF of random weights (N(0, 0.02)) with gguf-py, tensor by
tensor (no torch): 32 layers of 4096/11008, 32 heads, a 32000-token embedding and output.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_engine import cpu_model  # noqa: E402

TEXT = Path("/work/shared/data/pride_and_prejudice.txt")
SMOLLM2 = Path.home() / ".cache/pyengine/models/smollm2-135m-f16.gguf"
PRESETS = ("q4_k_m", "q6_k", "q3_k_m", "q4_0", "q8_0")


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a command; raises with its log's tail if it fails. Peak RSS is
    GNU time's %M (the command's own VmHWM): a child forked from this process and exec'd directly would
    report this process's size as its own high-water mark (Linux keeps it across exec)."""
    rss = log.with_suffix(".rss")
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss), *cmd], stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n" + log.read_text()[-3000:])
    return wall, int(rss.read_text().split()[-1]) / 1024


def read_through(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def same_tensors(a: Path, b: Path) -> bool:
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    if len(ra.tensors) != len(tb):
        return False
    for t in ra.tensors:
        u = tb.get(t.name)
        if u is None or u.tensor_type != t.tensor_type or t.data.tobytes() != u.data.tobytes():
            return False
    return True


def make_imatrix(model: Path, out: Path, chunks: int, threads: int) -> Path:
    if out.is_file():
        return out
    text = TEXT.read_text(encoding="utf-8")
    calib = out.with_suffix(".txt")
    calib.write_text(text[len(text) // 2:], encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pyengine", "imatrix", "-m", str(model), "-f", str(calib), "-o", str(out),
                    "--chunks", str(chunks), "-t", str(threads), "-q"], check=True, cwd=ROOT)
    return out


def make_7b(path: Path, n_layers: int = 32, seed: int = 0) -> None:
    """A Llama-2-7B-shaped F16 GGUF of random weights, written tensor by tensor."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    d, ff, vocab, n_head = 4096, 11008, 32000, 32
    shapes = [("token_embd.weight", (vocab, d))]
    for i in range(n_layers):
        b = f"blk.{i}."
        shapes += [(b + "attn_norm.weight", (d,)), (b + "attn_q.weight", (d, d)), (b + "attn_k.weight", (d, d)),
                   (b + "attn_v.weight", (d, d)), (b + "attn_output.weight", (d, d)), (b + "ffn_norm.weight", (d,)),
                   (b + "ffn_gate.weight", (ff, d)), (b + "ffn_up.weight", (ff, d)), (b + "ffn_down.weight", (d, ff))]
    shapes += [("output_norm.weight", (d,)), ("output.weight", (vocab, d))]
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".part")
    w = GGUFWriter(tmp, "llama")
    w.add_name(f"random-llama-2-7b-shape-{n_layers}l")
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ff)
    w.add_rope_dimension_count(d // n_head)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(LlamaFileType.MOSTLY_F16)
    for name, shape in shapes:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in shapes:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
        print(f"\r{name}", end="", file=sys.stderr, flush=True)
    w.close()
    os.replace(tmp, path)
    print(f"\nwrote {path}: {path.stat().st_size / 1e9:.2f} GB", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(SMOLLM2), help="F16 GGUF to quantize (default: SmolLM2-135M)")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and setting; the fastest is kept")
    ap.add_argument("--no-imatrix", action="store_true", help="only without an imatrix")
    ap.add_argument("--imatrix-chunks", type=int, default=8)
    ap.add_argument("--work-dir", default="/tmp/pyengine-quant-speed")
    ap.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/quant_speed[_<model>].json)")
    ap.add_argument("--make-7b", metavar="PATH", default=None, help="write a random Llama-2-7B-shaped F16 GGUF and exit")
    ap.add_argument("--layers", type=int, default=32, help="layers of the --make-7b model")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args(argv)
    if args.make_7b:
        make_7b(Path(args.make_7b), args.layers)
        return 0

    from llama_cpp_tools import VERSION, bin_dir

    exe = bin_dir() / "llama-quantize"
    if not exe.is_file():
        raise SystemExit(f"{exe} not built: python benchmarks/llama_cpp_tools.py --build")
    model = Path(args.model)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    imatrix = None
    if not args.no_imatrix:
        imatrix = make_imatrix(model, work / f"{model.stem}.imatrix.gguf", args.imatrix_chunks, args.threads)
    read_through(model)

    rows = []
    for preset in args.presets.split(","):
        for im in ([None] if imatrix is None else [None, imatrix]):
            ours, theirs = work / f"ours-{preset}.gguf", work / f"theirs-{preset}.gguf"
            flag = ["--imatrix", str(im)] if im else []
            ours_cmd = [sys.executable, "-m", "pyengine", "quantize", *flag, str(model), str(ours), preset,
                        "-t", str(args.threads), "-q"]
            theirs_cmd = [str(exe), *flag, str(model), str(theirs), preset.upper(), str(args.threads)]
            t_ours, t_theirs = [], []
            for _ in range(args.repeat):
                t_ours.append(run(ours_cmd, work / "ours.log"))
                t_theirs.append(run(theirs_cmd, work / "theirs.log"))
            row = dict(preset=preset, imatrix=bool(im),
                       pyengine_s=min(t for t, _ in t_ours), llama_quantize_s=min(t for t, _ in t_theirs),
                       pyengine_rss_mib=max(r for _, r in t_ours), llama_quantize_rss_mib=max(r for _, r in t_theirs),
                       pyengine_runs_s=[round(t, 3) for t, _ in t_ours],
                       llama_quantize_runs_s=[round(t, 3) for t, _ in t_theirs],
                       same_tensors=same_tensors(ours, theirs), out_mb=ours.stat().st_size / 1e6)
            rows.append(row)
            print(f"{preset:7s} imatrix={row['imatrix']!s:5s} pyengine {row['pyengine_s']:7.2f} s "
                  f"{row['pyengine_rss_mib']:7.0f} MiB | llama-quantize {row['llama_quantize_s']:7.2f} s "
                  f"{row['llama_quantize_rss_mib']:7.0f} MiB | same tensors {row['same_tensors']}", flush=True)
            if not args.keep_outputs:
                ours.unlink(missing_ok=True)
                theirs.unlink(missing_ok=True)

    result = dict(model=str(model), model_mb=model.stat().st_size / 1e6, cpu=cpu_model(), threads=args.threads,
                  llama_cpp=VERSION, repeat=args.repeat, date=time.strftime("%Y-%m-%d"),
                  imatrix=f"pyengine imatrix, {args.imatrix_chunks} x 512 tokens of the second half of "
                          f"{TEXT.name}" if imatrix else None, rows=rows)
    out = Path(args.out) if args.out else ROOT / "benchmarks/results" / (
        "quant_speed.json" if model == SMOLLM2 else f"quant_speed_{model.stem}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['cpu']}, {args.threads} threads, {model.name} ({result['model_mb']:.0f} MB)\n")
    print("| preset | imatrix | pyengine s | llama-quantize s | pyengine peak RSS MiB | llama-quantize peak RSS MiB "
          "| same tensors |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['preset']} | {'yes' if r['imatrix'] else 'no'} | {r['pyengine_s']:.2f} | {r['llama_quantize_s']:.2f} "
              f"| {r['pyengine_rss_mib']:.0f} | {r['llama_quantize_rss_mib']:.0f} | {r['same_tensors']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
