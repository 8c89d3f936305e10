"""ChatGLM3-6B-shaped speed on this machine: pyengine vs llama.cpp, and the memory-bandwidth bound.

No THUDM weights can be downloaded here, so the model is random: ChatGLM3-6B's shapes (28 layers,
hidden 4096, ffn 13696, 32 heads of 128, 2 KV groups, vocab 65024) written straight into GGUF as
random quantized blocks (speed does not depend on the values), with the metadata `pyengine convert`
writes for a THUDM folder. Decoding a token reads every weight once, so tokens/s can be at most
(memory read bandwidth) / (bytes of weights read per token); the bandwidth is measured here too.

    python benchmarks/bench_chatglm.py [--types q4_0,q8_0] [--threads 2] [-p 128] [-n 32] [-r 2]

Writes benchmarks/results/chatglm.json. llama-cpp-python must be importable for the llama.cpp
column (see bench_engine.py); the files are left in the models directory as bench-chatglm3-6b-<type>.gguf.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# ChatGLM3-6B's config.json
SHAPE = dict(n_layer=28, n_embd=4096, n_ff=13696, n_head=32, n_head_kv=2, head_dim=128, n_vocab=65024, n_ctx=8192)


def _random_blocks(rng: np.random.Generator, qtype, shape: tuple[int, int]) -> np.ndarray:
    """Random ggml blocks of `qtype` for a (rows, cols) weight: random codes, scales ~ 2e-3."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = shape[0] * shape[1] // block
    data = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    data[:, :2] = rng.uniform(1e-3, 3e-3, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return data.reshape(shape[0], -1)


def make_model(path: Path, qtype_name: str, seed: int = 0) -> None:
    from gguf import GGML_QUANT_VERSION, GGUFWriter, TokenType

    from pyengine_convert.arch import CHATGLM, HParams
    from pyengine_convert.convert import FILE_TYPES, parse_qtype, write_hparams
    from pyengine_convert.vocab import CHATGLM_SPECIAL, Vocab, write_vocab

    s = SHAPE
    qtype = parse_qtype(qtype_name)
    out_qtype = parse_qtype("q8_0")  # what `pyengine convert --qtype q4_0/q8_0` gives token_embd and output
    hp = HParams(n_vocab=s["n_vocab"], n_embd=s["n_embd"], n_layer=s["n_layer"], n_head=s["n_head"],
                 n_head_kv=s["n_head_kv"], n_ff=s["n_ff"], n_ctx=s["n_ctx"], head_dim=s["head_dim"],
                 head_dim_explicit=False, norm_eps=1e-5, rope_theta=10000.0, rope_scaling={}, tied=False,
                 n_rot=s["head_dim"] // 2)
    n_sp = s["n_vocab"] - 240  # SentencePiece pieces, then THUDM's specials, then padding
    tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(3, n_sp)]
    tokens += list(CHATGLM_SPECIAL) + [f"[PAD{i}]" for i in range(n_sp + len(CHATGLM_SPECIAL), s["n_vocab"])]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.NORMAL] * (n_sp - 3)
    types += [TokenType.CONTROL] * len(CHATGLM_SPECIAL) + [TokenType.UNUSED] * (s["n_vocab"] - len(types) - len(CHATGLM_SPECIAL))
    vocab = Vocab(model="llama", pre="chatglm-spm", tokens=tokens, token_types=[int(t) for t in types],
                  scores=[-float(i) for i in range(s["n_vocab"])], special_ids={"bos": 1, "eos": 2, "unk": 0},
                  add_bos=False)

    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    tensors: list[tuple[str, tuple[int, ...], object]] = [("token_embd.weight", (hp.n_vocab, hp.n_embd), out_qtype)]
    for i in range(hp.n_layer):
        tensors += [(f"blk.{i}.attn_norm.weight", (hp.n_embd,), None),
                    (f"blk.{i}.attn_qkv.weight", (q + 2 * kv, hp.n_embd), qtype),
                    (f"blk.{i}.attn_qkv.bias", (q + 2 * kv,), None),
                    (f"blk.{i}.attn_output.weight", (hp.n_embd, q), qtype),
                    (f"blk.{i}.ffn_norm.weight", (hp.n_embd,), None),
                    (f"blk.{i}.ffn_up.weight", (2 * hp.n_ff, hp.n_embd), qtype),
                    (f"blk.{i}.ffn_down.weight", (hp.n_embd, hp.n_ff), qtype)]
    tensors += [("output_norm.weight", (hp.n_embd,), None), ("output.weight", (hp.n_vocab, hp.n_embd), out_qtype)]

    from gguf import GGMLQuantizationType as Q

    from pyengine_convert import quants

    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".part")
    w = GGUFWriter(tmp, CHATGLM.name)
    w.add_type("model")
    w.add_name("random ChatGLM3-6B-shaped benchmark model")
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(GGML_QUANT_VERSION)
    write_hparams(w, hp, CHATGLM)
    write_vocab(w, vocab)
    for name, shape, t in tensors:
        t = t or Q.F32
        w.add_tensor_info(name, shape, np.dtype(np.float32), quants.nbytes(t, shape), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, t in tensors:
        if t is None:  # norms near 1, biases near 0
            base = 0.0 if name.endswith("bias") else 1.0
            w.write_tensor_data((base + 0.02 * rng.standard_normal(shape)).astype(np.float32))
        else:
            w.write_tensor_data(_random_blocks(rng, t, shape))
    w.close()
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--threads", default="2")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "chatglm.json"))
    args = ap.parse_args(argv)

    import bench_engine
    from pyengine.default_model import models_dir

    models = []
    for t in args.types.split(","):
        path = models_dir() / f"bench-chatglm3-6b-{t}.gguf"
        if not path.is_file():
            print(f"writing {path} ...", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            make_model(path, t)
        models.append(path)

    rows = []
    for model in models:
        engine_json = Path(args.out).with_suffix(f".{model.stem}.tmp.json")
        bench_engine.main(["--models", str(model), "--threads", args.threads, "-p", str(args.n_prompt),
                           "-n", str(args.n_gen), "-r", str(args.reps), "--out", str(engine_json)])
        for row in json.loads(engine_json.read_text())["rows"]:
            bw = bench_engine.read_bandwidth_gb_s(row["threads"])
            per_token = bench_engine.weight_bytes_per_token(model)
            row.update(file_gb=model.stat().st_size / 1e9, weight_gb_per_token=per_token / 1e9,
                       read_bandwidth_gb_s=bw, tg_bound_tokens_per_s=bw * 1e9 / per_token)
            rows.append(row)
        engine_json.unlink()

    out = {"machine": bench_engine.machine(),
           "date": time.strftime("%Y-%m-%d"), "shape": SHAPE, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print()
    print(markdown_table(rows))
    print(f"\nwrote {args.out}")
    return 0


def markdown_table(rows: list[dict]) -> str:
    lines = ["| type | threads | file GB | pp tok/s pyengine / llama.cpp | tg tok/s pyengine / llama.cpp | "
             "ms/token pyengine | peak RSS GB pyengine / llama.cpp | bandwidth bound tg tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pe, lc = r["pyengine"] or {}, r["llama.cpp"] or {}
        f = lambda d, k, s=1.0: f"{d[k] * s:.2f}" if k in d else "n/a"  # noqa: E731
        lines.append(f"| {r['model'].split('-')[-1].removesuffix('.gguf').upper()} | {r['threads']} | {r['file_gb']:.2f} | "
                     f"{f(pe, 'pp_tokens_per_s')} / {f(lc, 'pp_tokens_per_s')} | "
                     f"{f(pe, 'tg_tokens_per_s')} / {f(lc, 'tg_tokens_per_s')} | "
                     f"{1000 / pe['tg_tokens_per_s'] if pe else float('nan'):.0f} | "
                     f"{f(pe, 'peak_rss_mb', 1e-3)} / {f(lc, 'peak_rss_mb', 1e-3)} | "
                     f"{r['tg_bound_tokens_per_s']:.2f} ({r['read_bandwidth_gb_s']:.1f} GB/s) |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
