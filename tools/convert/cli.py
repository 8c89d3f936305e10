"""`pyengine convert MODEL_DIR -o OUT.gguf ...`: argument parsing around `convert`."""
from __future__ import annotations

import argparse
import sys

from .convert import OUTPUT_QTYPES, QTYPE_CHOICES, convert
from .errors import ConversionError


def build_parser(prog: str = "pyengine convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert a Hugging Face checkpoint folder to GGUF.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder with config.json, weights and tokenizer")
    p.add_argument("-o", "--out", required=True, metavar="OUT.gguf", help="output file")
    p.add_argument("--qtype", default="q4_0", choices=list(QTYPE_CHOICES),
                   help="type of the weight matrices (default q4_0), or a llama.cpp K-quant preset "
                        "(q2_k ... q6_k: a type per tensor as llama-quantize chooses)")
    p.add_argument("--output-qtype", choices=list(OUTPUT_QTYPES), default=None,
                   help="type of token_embd and output (default q8_0 for q4_*/q5_* files, the preset's for "
                        "K presets, else --qtype)")
    p.add_argument("--lora", metavar="ADAPTER_DIR", default=None, help="PEFT LoRA adapter merged before quantization")
    p.add_argument("--quant-method", choices=["rtn", "search"], default=None,
                   help="rtn: round to nearest (llama.cpp's reference, default without --calibration); "
                        "search: per-block error-minimising scale search for q4_0/q4_1 (default with --calibration, "
                        "except for K presets)")
    p.add_argument("--calibration", metavar="TEXT_FILE", default=None,
                   help="weight the quantizers by mean squared activations on this text (an imatrix; "
                        "needs torch)")
    p.add_argument("--ptuning", metavar="PTUNING_CHECKPOINT", default=None,
                   help="a THUDM P-Tuning v2 checkpoint (folder or weights file) of a ChatGLM2/3 / GLM-4 model: its "
                        "prefix is stored in the GGUF and every sequence starts from it")
    p.add_argument("--vocab-only", action="store_true", help="write only the metadata and tokenizer")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the converter CLI; returns the process exit code (0 ok, 1 conversion error)."""
    args = build_parser().parse_args(argv)
    try:
        report = convert(args.model_dir, args.out, qtype=args.qtype, lora=args.lora,
                         output_qtype=args.output_qtype, vocab_only=args.vocab_only, progress=not args.quiet,
                         quant_method=args.quant_method, calibration=args.calibration, ptuning=args.ptuning)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    return 0
