"""Writes the fuzzer's seed corpus: tiny valid models of every architecture and weight type the
engine runs (llama, qwen2, chatglm, chatglm1; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
K-quants), plus files that exercise the edge paths (tensors sharing data, alignment 1, rope_freqs).

    python tests/fuzz/make_seeds.py OUT_DIR

Each file loads and runs in the engine (checked here when pyengine is importable)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_craft import ARR, F32, STR, U32, gguf_bytes  # noqa: E402

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

K_SCALE_OFFSETS = {QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def raw(qtype: QT, rows: int, cols: int, rng: np.random.Generator) -> bytes:
    w = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    if qtype == QT.F32:
        return w.tobytes()
    if qtype == QT.F16:
        return w.astype(np.float16).tobytes()
    if qtype in K_SCALE_OFFSETS:
        block, size = GGML_QUANT_SIZES[qtype]
        b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype]:
            d = rng.uniform(0.001, 0.01, (rows, cols // block)).astype(np.float16)
            b[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
        return b.tobytes()
    return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).tobytes()


def model(arch: str, qtype: QT, n_embd: int = 32, n_ff: int = 32, n_head: int = 2, n_head_kv: int = 2,
          n_vocab: int = 16, n_layer: int = 1, alignment: int = 32, shift: int = 0, extra_kv=(),
          rope_freqs: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    hd = n_embd // n_head
    q_dim, kv_dim = n_head * hd, n_head_kv * hd
    kv = [("general.architecture", STR, arch), ("general.alignment", U32, alignment),
          (f"{arch}.context_length", U32, 64), (f"{arch}.embedding_length", U32, n_embd),
          (f"{arch}.block_count", U32, n_layer), (f"{arch}.feed_forward_length", U32, n_ff),
          (f"{arch}.attention.head_count", U32, n_head), (f"{arch}.attention.head_count_kv", U32, n_head_kv)]
    layer_norm = arch == "chatglm1"
    kv.append((f"{arch}.attention.layer_norm_epsilon" if layer_norm else f"{arch}.attention.layer_norm_rms_epsilon",
               F32, 1e-5))
    if arch in ("chatglm", "chatglm1"):
        kv.append((f"{arch}.rope.dimension_count", U32, hd // 2))
    if arch == "chatglm1":
        kv += [(f"{arch}.residual_scale", F32, 1.5), ("tokenizer.ggml.bos_token_id", U32, 1),
               ("tokenizer.ggml.mask_token_id", U32, 2)]
    kv += [("tokenizer.ggml.tokens", ARR, (STR, [f"t{i}" for i in range(n_vocab)])),
           ("tokenizer.ggml.scores", ARR, (F32, [0.0] * n_vocab))]
    kv += list(extra_kv)

    tensors: list[tuple[str, list[int], int, bytes]] = []

    def mat(name, rows, cols, t=qtype):
        tensors.append((name, [cols, rows], int(t), raw(t, rows, cols, rng)))

    def vec(name, n, ones=False):
        v = np.ones(n, np.float32) if ones else (rng.standard_normal(n) * 0.1).astype(np.float32)
        tensors.append((name, [n], int(QT.F32), v.tobytes()))

    mat("token_embd.weight", n_vocab, n_embd)
    vec("output_norm.weight", n_embd, True)
    if layer_norm:
        vec("output_norm.bias", n_embd)
    if arch == "llama":
        mat("output.weight", n_vocab, n_embd)
    if rope_freqs:
        tensors.append(("rope_freqs.weight", [hd // 2], int(QT.F32), np.linspace(1, 8, hd // 2, dtype=np.float32).tobytes()))
    for i in range(n_layer):
        b = f"blk.{i}."
        vec(b + "attn_norm.weight", n_embd, True)
        vec(b + "ffn_norm.weight", n_embd, True)
        if layer_norm:
            vec(b + "attn_norm.bias", n_embd)
            vec(b + "ffn_norm.bias", n_embd)
        if arch in ("chatglm", "chatglm1"):
            mat(b + "attn_qkv.weight", q_dim + 2 * kv_dim, n_embd)
            vec(b + "attn_qkv.bias", q_dim + 2 * kv_dim)
        else:
            mat(b + "attn_q.weight", q_dim, n_embd)
            mat(b + "attn_k.weight", kv_dim, n_embd)
            mat(b + "attn_v.weight", kv_dim, n_embd)
            if arch == "qwen2":
                vec(b + "attn_q.bias", q_dim)
                vec(b + "attn_k.bias", kv_dim)
                vec(b + "attn_v.bias", kv_dim)
        mat(b + "attn_output.weight", n_embd, q_dim)
        if arch == "chatglm":
            mat(b + "ffn_up.weight", 2 * n_ff, n_embd)
        elif arch == "chatglm1":
            mat(b + "ffn_up.weight", n_ff, n_embd)
            vec(b + "ffn_up.bias", n_ff)
        else:
            mat(b + "ffn_gate.weight", n_ff, n_embd)
            mat(b + "ffn_up.weight", n_ff, n_embd)
        mat(b + "ffn_down.weight", n_embd, n_ff)
        if layer_norm:
            vec(b + "ffn_down.bias", n_embd)
            vec(b + "attn_output.bias", n_embd)
    data, infos = bytearray(), []
    for name, ne, t, blob in tensors:
        data += b"\0" * ((-len(data) % max(alignment, 32)) + shift)
        infos.append((name, ne, t, len(data)))
        data += blob
    return gguf_bytes(kv, infos, bytes(data), alignment=alignment)


def seeds() -> dict[str, bytes]:
    out = {}
    for arch in ("llama", "qwen2", "chatglm", "chatglm1"):
        out[f"{arch}-q8_0"] = model(arch, QT.Q8_0)
        out[f"{arch}-f16"] = model(arch, QT.F16)
    for t in (QT.F32, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1):
        if t == QT.BF16:
            continue  # gguf-py has no BF16 quantizer here; covered by F16's path
        out[f"llama-{t.name.lower()}"] = model("llama", t)
    for t in K_SCALE_OFFSETS:  # 256-element blocks: a wider model
        out[f"llama-{t.name.lower()}"] = model("llama", t, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=8)
    out["llama-gqa-2layers"] = model("llama", QT.Q4_0, n_head=4, n_head_kv=1, n_layer=2)
    out["llama-align1-odd"] = model("llama", QT.Q8_0, alignment=1, shift=1)
    out["llama-rope-freqs"] = model("llama", QT.Q8_0, rope_freqs=True)
    out["llama-linear-rope"] = model("llama", QT.Q8_0, extra_kv=[("llama.rope.scaling.type", STR, "linear"),
                                                                 ("llama.rope.scaling.factor", F32, 4.0)])
    return out


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    check = None
    try:
        from pyengine import _C

        check = _C
    except ImportError:
        pass
    for name, data in seeds().items():
        p = out / f"{name}.gguf"
        p.write_bytes(data)
        if check is not None:
            m = check.Model(str(p))
            ctx = check.Context(m, check.Executor(1), 8, 2, 4)
            assert np.isfinite(ctx.decode(np.array([1, 2, 3], np.int32), np.array([0, 1, 0], np.int32))).all(), name
    print(f"{len(seeds())} seeds in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
