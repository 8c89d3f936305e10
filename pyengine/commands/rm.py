"""`pyengine rm`: delete models from the models directory ($PYENGINE_MODELS, default ~/.cache/pyengine/models).

NAME is what `pyengine list` shows (with or without .gguf). Asks before deleting unless -y; files outside
the models directory are never touched.

Exit codes: 0 removed (or nothing confirmed), 1 a name not found or outside the models directory.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine rm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", metavar="NAME", help="models to delete")
    ap.add_argument("-y", "--yes", action="store_true", help="delete without asking")
    args = ap.parse_args(argv)

    from ..default_model import ModelNotFoundError
    from ..hub import find_local_model, format_size, remove_model

    try:
        paths = [find_local_model(name) for name in args.names]
    except (ValueError, ModelNotFoundError) as e:
        print(f"pyengine rm: {e}", file=sys.stderr)
        return 1
    for name, path in zip(args.names, paths):
        if not args.yes:
            print(f"delete {path} ({format_size(path.stat().st_size)})? [y/N] ", end="", file=sys.stderr, flush=True)
            answer = sys.stdin.readline()
            if not sys.stdin.isatty():
                print(file=sys.stderr)  # the answer came from a pipe: end the question's line
            if answer.strip().lower() not in ("y", "yes"):
                continue
        remove_model(path)
        print(f"deleted {name}")
    return 0
