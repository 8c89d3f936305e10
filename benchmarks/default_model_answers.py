"""Does the default chat model answer simple questions? pyengine on every CPU path (greedy and sampled with
the model's default sampling) against transformers in float32 on the same weights (the GGUF dequantized
by transformers' GGUF loader), for each candidate default model.

    python benchmarks/default_model_answers.py [--seeds 10] [--models qwen2.5-coder smollm2]

Prints a table and writes benchmarks/results/default_model_answers.json. A reply counts as right when it
contains the answer; "len" is the longest reply in characters (replies should stop at the end token).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the capital of Germany?", "Berlin"),
             ("What is the capital of Italy?", "Rome"), ("What is the capital of Japan?", "Tokyo"),
             ("What is the capital of Egypt?", "Cairo"), ("What is 12 x 12?", "144")]
MAX_NEW = 200


def pyengine_replies(path: Path, cpu: str, seeds: int) -> dict:
    """In a child process (the CPU path is fixed at start): greedy replies and sampled ones per seed."""
    code = f"""
import json, pyengine
llm = pyengine.LLM({str(path)!r}, n_ctx=1024)
out = {{"defaults": llm.sampling_defaults, "greedy": [], "sampled": []}}
for q, _ in {QUESTIONS!r}:
    msg = [{{"role": "user", "content": q}}]
    out["greedy"].append(llm.chat(msg, max_new_tokens={MAX_NEW}, temperature=0))
    out["sampled"].append([llm.chat(msg, max_new_tokens={MAX_NEW}, seed=s) for s in range({seeds})])
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYENGINE_CPU": cpu})
    return json.loads(r.stdout.strip().splitlines()[-1])


def transformers_replies(path: Path) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    replies = []
    for q, _ in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
        replies.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


def main() -> None:
    import pyengine._C as C
    from pyengine.default_model import find_packaged_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder", "smollm2"])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "default_model_answers.json"))
    args = ap.parse_args()
    order = ["amx", "avx512", "avx2", "portable"]
    paths = order[order.index(C.best_cpu_path()):]
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                     platform.processor())
    results = {"cpu": cpu_model, "questions": QUESTIONS, "seeds": args.seeds, "models": {}}
    print(f"CPU: {cpu_model}; sampled: {args.seeds} seeds with the model's default sampling")
    print(f"| model | question | transformers f32 | " + " | ".join(f"pyengine {p} greedy" for p in paths)
          + " | sampled right | len |")
    print("|---|---|---|" + "---|" * len(paths) + "---:|---:|")
    for name in args.models:
        path = find_packaged_model(name)
        if path is None:
            print(f"{name}: not installed, skipped")
            continue
        ref = None if args.no_transformers else transformers_replies(path)
        runs = {cpu: pyengine_replies(path, cpu, args.seeds) for cpu in paths}
        rows = []
        for i, (q, answer) in enumerate(QUESTIONS):
            sampled = [r for cpu in paths for r in runs[cpu]["sampled"][i]]
            greedy = {cpu: runs[cpu]["greedy"][i] for cpu in paths}
            row = {"question": q, "answer": answer, "transformers": ref[i] if ref else None, "greedy": greedy,
                   "sampled_right": sum(answer in r for r in sampled), "sampled_total": len(sampled),
                   "max_len": max(len(r) for r in [*greedy.values(), *sampled])}
            rows.append(row)
            mark = lambda text: ("✓ " if answer in text else "✗ ") + repr(text[:40])
            print(f"| {path.name} | {q} | {mark(ref[i]) if ref else '-'} | "
                  + " | ".join(mark(greedy[c]) for c in paths)
                  + f" | {row['sampled_right']}/{row['sampled_total']} | {row['max_len']} |")
        results["models"][path.name] = {"sampling_defaults": runs[paths[0]]["defaults"], "rows": rows}
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
