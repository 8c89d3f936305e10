"""`pyengine list`: the models in the models directory ($PYENGINE_MODELS, default ~/.cache/pyengine/models).

One row per .gguf file: the name `-m` and `pyengine rm` take, size, architecture and quantization (from
the file's GGUF metadata), and when the file was written. `pyengine pull` fills the directory.
"""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyengine list", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per model, one per line")
    args = ap.parse_args(argv)

    from ..default_model import models_dir
    from ..hub import format_size, local_models

    models = local_models()
    if args.json:
        for m in models:
            print(json.dumps({"name": m.name, "path": str(m.path), "size": m.size, "arch": m.arch,
                              "quant": m.quant, "modified": m.modified.isoformat(timespec="seconds")}))
        return 0
    if not models:
        print(f"no models in {models_dir()} (pyengine pull OWNER/NAME downloads one)")
        return 0
    rows = [("NAME", "SIZE", "ARCH", "QUANT", "MODIFIED")]
    rows += [(m.name, format_size(m.size), m.arch, m.quant, m.modified.strftime("%Y-%m-%d %H:%M")) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
