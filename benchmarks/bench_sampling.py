"""Per-token cost of pyengine's Sampler, next to transformers' logits processors on the same logits.

    python benchmarks/bench_sampling.py    # writes benchmarks/results/sampling.json (--out)

Logits: SmolLM2-135M-Instruct's own (vocab 49152) after a Pride and Prejudice prompt, the same tiled
to a 151936-token vocabulary (Qwen2's size) with a little noise, and random normal * 3 (flatter than a
model's: a top-p nucleus of thousands of tokens). History: 1000 tokens.

"from top logits" is what generation pays since the engine hands rows over as `TopLogits`: the C++
top_logits op on the row (on the CPU here; where the output layer runs on a GPU the op runs there and only
the summary crosses PCIe) plus the sampler on it, fetching the whole row when it must.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine  # noqa: E402

from pyengine.sampling import Sampler, SamplingParams, TopLogits

CONFIGS = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=0.8),
    "top_k=40": dict(temperature=0.8, top_k=40),
    "top_p=0.95": dict(temperature=0.8, top_p=0.95),
    "min_p=0.05": dict(temperature=0.8, min_p=0.05),
    "llama.cpp-like": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1),
    "all penalties + top_p": dict(
        temperature=0.8, top_p=0.95, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5
    ),
}


def per_call_us(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def transformers_sampler(kw: dict):
    try:
        import torch
        from transformers.generation import logits_process as lp
    except ImportError:
        return None
    procs = []
    if kw.get("repetition_penalty", 1.0) != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw.get("temperature", 1.0) not in (0, 1.0):
        procs.append(lp.TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("top_k"):
        procs.append(lp.TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p", 1.0) < 1:
        procs.append(lp.TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        procs.append(lp.MinPLogitsWarper(kw["min_p"]))
    procs = lp.LogitsProcessorList(procs)
    torch.set_num_threads(1)  # numpy here is single-threaded too
    gen = torch.Generator().manual_seed(0)

    def sample(logits: np.ndarray, history: np.ndarray) -> int:
        scores = procs(torch.from_numpy(history)[None], torch.from_numpy(logits)[None])
        if kw.get("temperature") == 0:
            return int(scores.argmax())
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))

    return sample


def model_logits() -> np.ndarray | None:
    """SmolLM2's next-token logits after 400 tokens of the novel: from pyengine, else from transformers."""

    from pyengine.default_model import find_packaged_model
    from pyengine.tokenizer import Tokenizer

    path = find_packaged_model("smollm2")
    if path is None:
        return None
    novel = Path(__file__).resolve().parents[2] / "shared/data/pride_and_prejudice.txt"
    text = novel.read_text(encoding="utf-8")[5000:7000] if novel.exists() else "Once upon a time, " * 60
    ids = Tokenizer.from_gguf(path).encode(text)[:400]
    try:
        from pyengine import LLM

        return LLM(path, n_ctx=1024).eval(ids)
    except Exception:  # the engine may not run this file's quantization yet
        pass
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "sampling.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    cases = []
    real = model_logits()
    if real is not None:
        tiled = np.concatenate([real, real, real, real[: 151_936 - 3 * real.size]])
        cases += [("SmolLM2 logits", real), ("SmolLM2 logits tiled", tiled + rng.standard_normal(tiled.size).astype(np.float32) * 0.1)]
    cases += [("normal*3", (rng.standard_normal(n) * 3).astype(np.float32)) for n in (49_152, 151_936)]
    for label, logits in cases:
        n_vocab = logits.size
        history = rng.integers(0, n_vocab, 1000)
        print(f"{label}, vocab {n_vocab}, history 1000 tokens: microseconds per token")
        print(f"  {'config':24s} {'pyengine':>10s} {'from top logits':>16s} {'transformers':>13s}")
        for name, kw in CONFIGS.items():
            sampler = Sampler(SamplingParams(seed=0, **kw))
            hist = dict(generated=history[-200:], prompt=history[:-200])
            ours = per_call_us(lambda: sampler(logits, **hist), 200)
            top = per_call_us(lambda: sampler(TopLogits.of(logits, *sampler.request(n_vocab, **hist)), **hist), 200)
            ref = transformers_sampler(kw)
            theirs = per_call_us(lambda: ref(logits, history), 50) if ref else float("nan")
            print(f"  {name:24s} {ours:10.0f} {top:16.0f} {theirs:13.0f}")
            rows.append({"logits": label, "n_vocab": n_vocab, "config": name, "params": kw, "whole_row_us": ours,
                         "from_top_logits_us": top, "transformers_us": None if ref is None else theirs})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
