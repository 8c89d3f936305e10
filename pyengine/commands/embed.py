"""`pyengine embed`: sentence embeddings of texts, as JSON (or one line of numbers per text).

Texts come from -p (repeatable) or from stdin, one per line. Encoder models (BERT, e.g.
all-MiniLM-L6-v2 converted with `pyengine convert`) pool as their file says (mean / CLS); decoder
models by the mean of the final hidden states. Vectors are L2-normalized unless --no-normalize.

Exit codes: 0 done, 1 the model could not be loaded or an input is too long, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys

from .chat import add_model_args, load_model, model_errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine embed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("-p", "--prompt", action="append", default=None, help="a text to embed (repeatable)")
    ap.add_argument("--no-normalize", action="store_true", help="return the pooled vectors as they are")
    ap.add_argument("--format", choices=["json", "text"], default="json",
                    help="json: a list of vectors (default); text: one line of numbers per input")
    ap.add_argument("--batch", type=int, default=32, help="texts per forward pass (default 32)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("argument --batch: must be >= 1")
    texts = args.prompt if args.prompt else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        ap.error("give texts with -p TEXT or one per line on stdin")
    from .. import ContextLengthError

    try:
        llm = load_model(args)
        vectors = []
        for i in range(0, len(texts), args.batch):
            vectors.extend(llm.embed(texts[i:i + args.batch], normalize=False if args.no_normalize else None))
    except model_errors() as e:
        print(f"pyengine embed: {e}", file=sys.stderr)
        return 1
    except ContextLengthError as e:
        print(f"pyengine embed: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        json.dump([[round(float(x), 7) for x in v] for v in vectors], sys.stdout)
        print()
    else:
        for v in vectors:
            print(" ".join(f"{float(x):.7g}" for x in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
