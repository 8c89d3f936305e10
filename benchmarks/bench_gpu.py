"""GPU benchmark: a Llama-2-7B-shaped model with random weights (32 layers, hidden 4096, ffn 11008,
32 heads, vocab 32000), written with the `gguf` package at Q4_0, Q4_K and F16, on the whole GPU:

- batch-1 decode tokens/s and the fraction of the GPU's memory bandwidth it reaches (weight bytes
  read per token x tokens/s / peak),
- prefill of 512 and 2048 tokens: tokens/s and TFLOP/s (2 x parameters x tokens / time),
- the same shapes in torch FP16 (transformers' LlamaForCausalLM, random init) as the peer,
- low VRAM: the Q4_0 file with the GPU capped at 4 GiB (n_gpu_layers from the offload plan) vs the CPU alone.

    python benchmarks/bench_gpu.py --out results.json [--types q4_0,q4_k,f16] [--no-torch]

Prints a table and writes JSON. Needs a CUDA build and a GPU (benchmarks/gpu_check.sh runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyengine  # noqa: E402
from pyengine import _C  # noqa: E402

SHAPE = dict(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_vocab=32000)
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts
PEAK_FP16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense FP16 tensor-core FLOP/s


def peak(table: dict, name: str) -> float | None:
    return next((v for k, v in table.items() if k in name), None)


def random_tensor(qtype: str, rows: int, cols: int, rng: np.random.Generator):
    """(data, raw_dtype) for gguf's writer: a few distinct rows quantized (pyengine's quantizers, byte-equal
    to ggml's; gguf-py cannot quantize K types), tiled to `rows`."""
    import gguf

    from pyengine import _C

    base = rng.standard_normal((min(rows, 64), cols)).astype(np.float32) * 0.02
    if qtype == "f16":
        return np.tile(base.astype(np.float16), (rows // base.shape[0] + 1, 1))[:rows], None
    t = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_k": gguf.GGMLQuantizationType.Q4_K,
         "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]
    q = _C.quantize(base, int(t))
    return np.tile(q, (rows // q.shape[0] + 1, 1))[:rows], t


def write_model(path: Path, qtype: str) -> int:
    """Writes the random model; returns the bytes of the weights a decode step reads (blocks + LM head)."""
    import gguf

    s = SHAPE
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head"])
    w.add_rope_dimension_count(s["n_embd"] // s["n_head"])
    w.add_layer_norm_rms_eps(1e-5)
    d, ff = s["n_embd"], s["n_ff"]
    shapes = {"attn_q": (d, d), "attn_k": (d, d), "attn_v": (d, d), "attn_output": (d, d),
              "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    slabs = {k: random_tensor(qtype, r, c, rng) for k, (r, c) in shapes.items()}  # shared by every layer
    norm = np.ones(d, np.float32)
    read = 0
    emb, emb_t = random_tensor("q4_0" if qtype != "f16" else "f16", s["n_vocab"], d, rng)
    w.add_tensor("token_embd.weight", emb, raw_dtype=emb_t)
    out, out_t = random_tensor(qtype if qtype != "q4_k" else "q4_0", s["n_vocab"], d, rng)
    w.add_tensor("output.weight", out, raw_dtype=out_t)
    w.add_tensor("output_norm.weight", norm)
    read += out.nbytes
    for l in range(s["n_layer"]):
        w.add_tensor(f"blk.{l}.attn_norm.weight", norm)
        w.add_tensor(f"blk.{l}.ffn_norm.weight", norm)
        for k, (data, t) in slabs.items():
            w.add_tensor(f"blk.{l}.{k}.weight", data, raw_dtype=t)
            read += data.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read


def n_params() -> int:
    s = SHAPE
    d, ff = s["n_embd"], s["n_ff"]
    return s["n_layer"] * (4 * d * d + 3 * d * ff) + s["n_vocab"] * d


def time_engine(path: Path, n_gpu_layers, n_threads: int | None, prefill=(512, 2048), n_decode: int = 64) -> dict:
    e = pyengine.Engine(path, n_ctx=max(prefill + (n_decode + 16,)) + 8, n_batch=max(prefill), n_threads=n_threads,
                        n_gpu_layers=n_gpu_layers)
    r = {"n_gpu_layers": e.n_gpu_layers}
    rng = np.random.default_rng(1)
    e.eval(rng.integers(0, SHAPE["n_vocab"], 16))  # warm-up: first launches, workspaces
    e.reset()
    for n in prefill:
        ids = rng.integers(0, SHAPE["n_vocab"], n)
        e.reset()
        t = time.perf_counter()
        e.eval(ids)
        dt = time.perf_counter() - t
        r[f"pp{n}_tok_s"] = n / dt
        r[f"pp{n}_tflops"] = 2 * n_params() * n / dt / 1e12
    e.reset()
    e.eval(rng.integers(0, SHAPE["n_vocab"], 16))
    tok = 1
    t = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(e.eval([tok])))
    r["tg_tok_s"] = n_decode / (time.perf_counter() - t)
    return r


def time_torch(prefill=(512, 2048), n_decode: int = 64) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPE
    cfg = LlamaConfig(hidden_size=s["n_embd"], intermediate_size=s["n_ff"], num_hidden_layers=s["n_layer"],
                      num_attention_heads=s["n_head"], num_key_value_heads=s["n_head"], vocab_size=s["n_vocab"],
                      max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    r = {}
    with torch.no_grad():
        for n in prefill:
            ids = torch.randint(0, s["n_vocab"], (1, n), device="cuda")
            model(ids[:, :16])
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            r[f"pp{n}_tok_s"] = n / dt
            r[f"pp{n}_tflops"] = 2 * n_params() * n / dt / 1e12
        ids = torch.randint(0, s["n_vocab"], (1, 16), device="cuda")
        out = model(ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_decode):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        r["tg_tok_s"] = n_decode / (time.perf_counter() - t)
    del model
    torch.cuda.empty_cache()
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--types", default="q4_0,q4_k,f16")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-low-vram", action="store_true")
    ap.add_argument("--dir", default=None, help="where to write the random models (default: a temp folder)")
    args = ap.parse_args(argv)
    mem = _C.cuda_memory() if _C.has_cuda else None
    if mem is None:
        print("bench_gpu: no CUDA GPU (or a build without the CUDA backend)", file=sys.stderr)
        return 1
    name = mem[2]
    res = {"device": name, "shape": SHAPE, "params": n_params(), "peak_bw": peak(PEAK_BW, name),
           "peak_fp16": peak(PEAK_FP16, name), "cpu_threads": os.cpu_count(), "runs": {}}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(res, indent=2))

    work = Path(args.dir or tempfile.mkdtemp(prefix="pe_gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    for qtype in args.types.split(","):
        try:
            path = work / f"llama7b-random-{qtype}.gguf"
            t = time.perf_counter()
            read = write_model(path, qtype)
            print(f"{qtype}: wrote {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s", flush=True)
            r = time_engine(path, 99, None)
            r["weight_bytes_per_token"] = read
            if res["peak_bw"]:
                r["bw_fraction"] = read * r["tg_tok_s"] / res["peak_bw"]
            res["runs"][f"pyengine-{qtype}"] = r
            print(qtype, r, flush=True)
            if qtype == "q4_0" and not args.no_low_vram:
                model = _C.Model(str(path))
                n = _C.plan_offload(model, -1, 2048 + 88, 1, 2048, "f16", 4 << 30)["n_gpu_layers"]
                del model
                low = time_engine(path, n, None, prefill=(512,), n_decode=16)
                low["gpu_cap_gib"] = 4
                res["runs"]["pyengine-q4_0-4GiB"] = low
                cpu = time_engine(path, 0, None, prefill=(512,), n_decode=16)
                res["runs"]["pyengine-q4_0-cpu"] = cpu
                print("low vram", low, "cpu", cpu, flush=True)
            path.unlink()
        except Exception as e:  # one failing type must not hide the others' numbers
            traceback.print_exc()
            res["runs"][f"pyengine-{qtype}"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    if not args.no_torch:
        try:
            res["runs"]["torch-fp16"] = time_torch()
            print("torch", res["runs"]["torch-fp16"], flush=True)
        except Exception as e:
            traceback.print_exc()
            res["runs"]["torch-fp16"] = {"error": f"{type(e).__name__}: {e}"}
        save()

    print(f"\n{name}, Llama-2-7B shape, random weights")
    print(f"{'run':24} {'ngl':>4} {'tg tok/s':>9} {'BW frac':>8} {'pp512 tok/s':>12} {'pp2048 tok/s':>13} {'pp2048 TFLOP/s':>15}")
    for k, r in res["runs"].items():
        if "error" in r:
            print(f"{k:24} error: {r['error'][:80]}")
            continue
        bw = f"{r['bw_fraction']:.2f}" if "bw_fraction" in r else "-"
        p2 = f"{r['pp2048_tok_s']:.1f}" if "pp2048_tok_s" in r else "-"
        tf = f"{r['pp2048_tflops']:.1f}" if "pp2048_tflops" in r else "-"
        print(f"{k:24} {r.get('n_gpu_layers', '-')!s:>4} {r['tg_tok_s']:9.1f} {bw:>8} {r['pp512_tok_s']:12.1f} "
              f"{p2:>13} {tf:>15}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
