"""`pyengine pull`: download a GGUF model from a Hugging Face-style hub into the models directory.

    pyengine pull OWNER/NAME:FILE.gguf     that file of the repository
    pyengine pull OWNER/NAME:Q8_0          the smallest .gguf whose name contains Q8_0
    pyengine pull OWNER/NAME               the Q4_K_M file if the repository has one, else the smallest
                                           .gguf (split files and mmproj projectors are never chosen)

The file lands in the models directory ($PYENGINE_MODELS, default ~/.cache/pyengine/models) under its own
name, so `pyengine chat -m NAME` runs it (NAME with or without .gguf); `-m hf://OWNER/NAME/FILE.gguf`
works wherever -m does and pulls the file first if it is missing. huggingface_hub does the transfer: a
progress bar, retries that resume with a Range request, HF_TOKEN / `hf auth login` for gated repos, and
HF_ENDPOINT for a mirror. The file is then checked against the hub's sha256. The path is printed on stdout.

Exit codes: 0 done, 1 the repository, file or hub could not be reached (the message says which),
2 bad arguments, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine pull", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="REPO[:FILE]", help="OWNER/NAME, OWNER/NAME:FILE.gguf or OWNER/NAME:QUANT")
    ap.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    args = ap.parse_args(argv)

    from ..default_model import models_dir
    from ..hub import HubError, choose_file, format_size, list_gguf_files, parse_ref, pull

    try:
        repo, file = parse_ref(args.model)
        if file is None or not file.lower().endswith(".gguf"):
            files = list_gguf_files(repo, args.revision)
            file = choose_file(repo, files, file)
            others = len(files) - 1
            print(f"pulling {file} from {repo}" + (f" ({others} other .gguf files: pyengine pull {repo}:FILE picks one)"
                                                   if others else ""), file=sys.stderr)
        path = pull(repo, file, args.revision)
    except HubError as e:
        print(f"pyengine pull: {e}", file=sys.stderr)
        return 1
    name = path.relative_to(models_dir()).as_posix() if path.is_relative_to(models_dir()) else str(path)
    print(f"{format_size(path.stat().st_size)}, run it with: pyengine chat -m {name.removesuffix('.gguf')}",
          file=sys.stderr)
    print(path)
    return 0
