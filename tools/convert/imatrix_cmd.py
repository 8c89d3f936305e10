"""`pyengine imatrix`: an importance matrix from running the engine (not torch) on a calibration text,
as llama.cpp's `llama-imatrix` makes one, in its GGUF format, so the file works with `pyengine quantize
--imatrix` and with `llama-quantize --imatrix` alike.

The text is tokenized with BOS and cut into chunks of `-c` tokens whose first token becomes BOS, as
llama-imatrix and llama-perplexity do; every token of every chunk adds its inputs to the sums of each
linear layer it passes through (the LM head excluded, as llama-imatrix does without --process-output).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .errors import ConversionError
from .imatrix_file import ImatrixData, save_imatrix
from .progress import Progress


def load_chunks(model_path: str | Path, text: str, n_ctx: int, n_chunks: int | None, n_threads: int | None,
                kv_type: str):
    """The engine behind an imatrix and a calibration, and `text` as `n_chunks` chunks of `n_ctx` tokens (all
    when None), BOS first."""
    from pyengine import Engine
    from pyengine.quality import tokenize_text

    if n_ctx < 2:
        raise ConversionError(f"context size {n_ctx} is too small for a calibration chunk")
    llm = Engine(model_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, kv_type=kv_type)
    tokens, bos = tokenize_text(llm, text)
    available = len(tokens) // n_ctx
    if available == 0:
        raise ConversionError(f"the text tokenizes to {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    count = available if n_chunks is None or n_chunks <= 0 else min(n_chunks, available)
    chunks = []
    for i in range(count):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos is not None:
            chunk[0] = bos
        chunks.append(chunk)
    return llm, chunks


def run_chunks(llm, chunks: list[np.ndarray], progress: bool, covariance: bool = False,
               covariance_tensors: list[str] | None = None) -> None:
    """Runs the chunks one by one with the engine collecting its input statistics from zero (and with
    `covariance`, each layer's X^T X: of the weights named in `covariance_tensors` only, when given); the
    engine keeps them."""
    n_ctx = len(chunks[0])
    llm.collect_input_stats(True, covariance=covariance, covariance_tensors=covariance_tensors)
    bar = Progress(len(chunks) * n_ctx, len(chunks), enabled=progress, unit="tokens", scale=1)
    for i, chunk in enumerate(chunks):
        llm.reset()
        llm.decode(chunk, np.zeros(n_ctx, dtype=np.int32), logits=np.zeros(n_ctx, dtype=bool))
        bar.update(f"chunk {i + 1}", n_ctx)
    bar.close()


def collect(model_path: str | Path, text: str, n_ctx: int = 512, n_chunks: int | None = None,
            n_threads: int | None = None, dataset: str = "", progress: bool = True,
            kv_type: str = "f16") -> ImatrixData:
    """Per-column sums of x^2 of every linear layer's input over `n_chunks` chunks (all when None); the
    KV cache in `kv_type` (F16 as llama-imatrix's default)."""
    llm, chunks = load_chunks(model_path, text, n_ctx, n_chunks, n_threads, kv_type)
    run_chunks(llm, chunks, progress)
    count = len(chunks)
    stats = llm.input_stats()
    llm.collect_input_stats(False)
    # dense weights: (sums, tokens); 3-D expert tensors: ((n_expert, n_cols) sums, tokens per expert)
    return ImatrixData(sums={k: v[0] for k, v in stats.items()},
                       counts={k: v[1] if isinstance(v[1], np.ndarray) else int(v[1]) for k, v in stats.items()},
                       datasets=[dataset], chunk_count=count, chunk_size=n_ctx)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyengine imatrix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="GGUF model (F16/F32 or any type pyengine runs)")
    ap.add_argument("-f", "--file", required=True, help="calibration text (UTF-8)")
    ap.add_argument("-o", "--output", default="imatrix.gguf", help="output file (default: imatrix.gguf)")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk (default: 512)")
    ap.add_argument("--chunks", type=int, default=None, help="chunks to process (default: all of the text)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pyengine import EngineError, ModelFormatError, UnsupportedModelError
    from pyengine.default_model import resolve_model

    try:
        path = Path(args.file)
        if not path.is_file():
            raise ConversionError(f"calibration text not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace")
        data = collect(resolve_model(args.model), text, args.ctx_size, args.chunks, args.threads,
                       dataset=path.name, progress=not args.quiet)
        save_imatrix(args.output, data)
    except (ConversionError, FileNotFoundError, ModelFormatError, UnsupportedModelError, EngineError, ValueError) as e:
        print(f"pyengine imatrix: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"wrote {args.output}: {len(data.sums)} matrices, {data.chunk_count} chunks of {data.chunk_size} tokens",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
