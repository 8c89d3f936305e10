"""`pyengine generate`: complete a prompt, streaming the continuation to stdout.

The prompt is raw text (no chat template unless --chat); `-p -` reads it from stdin, as does a
missing -p when stdin is not a terminal (without its final newline). Only the generated text goes to stdout,
ended by a newline unless it already ends with one (so a shell prompt or the next line of a log starts
on a line of its own); statistics (--verbose) go to stderr.

Exit codes: 0 done, 1 the model could not be loaded (the message says why), 2 bad arguments,
130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import sys

from .chat import add_model_args, add_sampling_args, format_stats, load_model, model_errors, sampling_overrides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("-p", "--prompt", default=None, help="the text to continue; '-' reads it from stdin")
    ap.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    ap.add_argument("-s", "--system", default=None, help="system prompt, with --chat")
    add_sampling_args(ap, default_n=256)
    args = ap.parse_args(argv)
    if args.prompt is None and sys.stdin.isatty():
        ap.error("give a prompt with -p TEXT (or -p - to read it from stdin)")
    # From stdin, drop the newline that `echo` and editors end the text with.
    prompt = sys.stdin.read().removesuffix("\n") if args.prompt in (None, "-") else args.prompt

    try:
        llm = load_model(args)
        params = llm.sampling_params(**sampling_overrides(args, llm.n_ctx))
    except model_errors() as e:
        print(f"pyengine generate: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # out-of-range sampling flags
        print(f"pyengine generate: {e}", file=sys.stderr)
        return 2

    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        generation = llm.chat(messages + [{"role": "user", "content": prompt}], stream=True, params=params)
    else:
        generation = llm.generate(prompt, stream=True, params=params)
    from .. import ContextLengthError

    last = ""
    try:
        for piece in generation:
            sys.stdout.write(piece)
            sys.stdout.flush()
            last = piece or last
    except ContextLengthError as e:
        print(f"pyengine generate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        generation.close()
        return 130
    finally:
        if not last.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        if args.verbose and generation.finished:
            print(format_stats(generation.stats), file=sys.stderr)
    return 0
