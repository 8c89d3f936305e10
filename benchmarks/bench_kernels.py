"""Matmul kernel throughput on SmolLM2-135M's weight shapes.

For each weight type, CPU path, activation row count m (1 = decode, 512 = prefill) and thread count,
times Y = X @ W.T summed over the model's matrix shapes and prints GFLOP/s and weight GB/s (the decode
number to compare with memory bandwidth). Results also go to a JSON file.

By default the weights are in the panel layout a loaded model's CPU weights get (cpu/panels.h),
repacked once, and a product's time is the best of 3 means of --repeat products (_C.time_matmul's own
clock, the repacking untimed); --layout rows times the kernels on the file's row-major layout.

Two clocks: wall time, and the calling thread's CPU time. On a machine shared with other work the
wall clock counts time the benchmark was not running at all; CPU time does not (with n threads it
still includes the caller's share of the wait for the others, so it is exact only for 1 thread).

--int8-peak (AVX-512 VNNI machines with a C compiler) also measures one core's vpdpbusd rate alone and
with the kernels' scale step (int8_peak.py) just before each quantized row of the avx512 path (whose
int8 kernels are vpdpbusd; amx's prefill is not), and gives the row's MACs per second as a share of the
first ("peak %": wall clock, threads x one core's rate); the second, as a share of the first
("ceiling"), is the most a compute-bound row can reach.

    python benchmarks/bench_kernels.py --types Q4_0,Q8_0 --paths avx512 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from pyengine import _C

# SmolLM2-135M: hidden 576, ffn 1536, 9 heads x 64 (3 KV heads), vocab 49152 (tied output).
SHAPES = {"attn_q/o": (576, 576), "attn_k/v": (192, 576), "ffn_gate/up": (1536, 576), "ffn_down": (576, 1536),
          "output": (49152, 576)}
K_SCALE_OFFSETS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def make_weights(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype == QT.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype == QT.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype.name in K_SCALE_OFFSETS:
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype.name]:
            d = rng.uniform(0.001, 0.01, (rows, cols // block)).astype(np.float16)
            raw[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1)
    import gguf

    # Quantizing 28M values in numpy is slow: tile a small random matrix instead (the bytes' values do
    # not change the kernels' speed).
    small = gguf.quants.quantize(rng.standard_normal((64, cols)).astype(np.float32), qtype)
    small = np.ascontiguousarray(small).view(np.uint8)
    return np.ascontiguousarray(np.tile(small, (rows // 64 + 1, 1))[:rows])


def time_call(fn, min_time: float) -> tuple[float, float]:
    """Seconds per call: (wall clock, calling thread's CPU time)."""
    fn()  # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_time and n >= 3:
            return dt / n, (time.thread_time() - c0) / n


def time_product(w, qtype, r: int, c: int, x, nt: int, args, min_time: float) -> tuple[float, float]:
    """Seconds per product (wall, CPU). Panels: _C.time_matmul's own clock around --repeat products on
    weights repacked once (the CPU clock is then the wall clock's)."""
    if args.layout == "rows":
        return time_call(lambda: _C.matmul(w, int(qtype), r, c, x, nt), min_time)
    t = min(_C.time_matmul(w, int(qtype), r, c, x, nt, repeat=args.repeat) for _ in range(3))
    return t, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="F32,F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--paths", default=None, help="comma-separated CPU paths (default: the best one)")
    ap.add_argument("--m", default="1,512", help="activation rows to test")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="subset of: " + ",".join(SHAPES))
    ap.add_argument("--layout", choices=["panels", "rows"], default="panels",
                    help="weights in the panel layout, as a loaded model's (default), or as the file stores them")
    ap.add_argument("--repeat", type=int, default=20, help="products per timed call with --layout panels")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    ap.add_argument("--int8-peak", action="store_true", help="measure the vpdpbusd ceiling (int8_peak.py) and show each quantized row's share of it")
    ap.add_argument("--out", default="bench_kernels.json")
    args = ap.parse_args()
    measure_peak = None
    if args.int8_peak:
        from int8_peak import measure

        if measure() is None:
            print("--int8-peak: no C compiler or no AVX-512 VNNI here: no peak column")
        else:
            measure_peak = measure

    rng = np.random.default_rng(0)
    paths = args.paths.split(",") if args.paths else [_C.cpu_path()]
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    results = []
    print(f"{'':24}{'---- wall clock ----':>28}  {'---- CPU time ----':>28}")
    print(f"{'type':6} {'path':9} {'m':>4} {'thr':>3} {'ms':>9} {'GFLOP/s':>9} {'W GB/s':>8}  "
          f"{'ms':>9} {'GFLOP/s':>9} {'W GB/s':>8}")
    before = _C.cpu_path()
    for tname in args.types.split(","):
        qtype = QT[tname]
        block, size = GGML_QUANT_SIZES[qtype]
        # K-quants need rows of multiples of 256: of SmolLM2's matrices only ffn_down (as in llama.cpp,
        # which falls back to other types for the 576-column ones).
        type_shapes = {k: rc for k, rc in shapes.items() if rc[1] % block == 0}
        if not type_shapes:
            print(f"{tname}: no shape with a multiple of {block} columns, skipped")
            continue
        weights = {k: make_weights(qtype, r, c, rng) for k, (r, c) in type_shapes.items()}
        for path in paths:
            _C.set_cpu_path(path)
            for m in map(int, args.m.split(",")):
                xs = {c: rng.standard_normal((m, c)).astype(np.float32) for _, c in type_shapes.values()}
                for nt in map(int, args.threads.split(",")):
                    int8 = measure_peak is not None and qtype not in (QT.F32, QT.F16, QT.BF16) and path == "avx512"
                    peak = measure_peak() if int8 else None
                    total_t = total_cpu = total_flop = total_bytes = 0.0
                    for k, (r, c) in type_shapes.items():
                        w, x = weights[k], xs[c]
                        t, cpu = time_product(w, qtype, r, c, x, nt, args, args.min_time / len(type_shapes))
                        total_t += t
                        total_cpu += cpu
                        total_flop += 2.0 * m * r * c
                        total_bytes += w.nbytes
                    row = {"type": tname, "path": path, "layout": args.layout, "m": m, "threads": nt, "shapes": list(type_shapes),
                           "seconds": total_t, "gflops": total_flop / total_t / 1e9,
                           "weight_gbps": total_bytes / total_t / 1e9,
                           "cpu_seconds": total_cpu, "cpu_gflops": total_flop / total_cpu / 1e9,
                           "cpu_weight_gbps": total_bytes / total_cpu / 1e9}
                    if peak is not None:
                        row["int8_peak"] = peak
                        row["int8_peak_share"] = row["gflops"] / 2 / (nt * peak["gmac_per_s"])
                        row["int8_ceiling_share"] = peak["with_scale_step_gmac_per_s"] / peak["gmac_per_s"]
                    results.append(row)
                    print(f"{tname:6} {path:9} {m:4d} {nt:3d} {total_t * 1e3:9.3f} {row['gflops']:9.1f} "
                          f"{row['weight_gbps']:8.2f}  {total_cpu * 1e3:9.3f} {row['cpu_gflops']:9.1f} "
                          f"{row['cpu_weight_gbps']:8.2f}"
                          + (f"  {row['int8_peak_share']:4.0%} peak ({row['int8_ceiling_share']:.0%} ceiling)"
                             if "int8_peak_share" in row else "")
                          + ("" if len(type_shapes) == len(shapes) else "  (" + ",".join(type_shapes) + ")"),
                          flush=True)
    _C.set_cpu_path(before)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
