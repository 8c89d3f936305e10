"""The `pyengine` command: dispatches to one module per subcommand, each with its own flags.

Exit codes: 0 success, 1 a failure the message explains (bad model file, bad arguments),
2 usage error, 130 interrupted.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "chat": ("pyengine.commands.chat", "talk to a model in the terminal (default model: Qwen2.5-Coder-0.5B-Instruct, else SmolLM2-135M-Instruct)"),
    "generate": ("pyengine.commands.generate", "complete a prompt, streaming to stdout"),
    "embed": ("pyengine.commands.embed", "sentence embeddings of texts (BERT-style encoders, or any model)"),
    "convert": ("pyengine_convert", "convert a Hugging Face checkpoint folder to a GGUF file"),
    "quantize": ("pyengine_convert.requantize", "requantize a GGUF file (q4_k_m, q6_k, ...; llama-quantize style)"),
    "imatrix": ("pyengine_convert.imatrix_cmd", "importance matrix of a model on a text, for quantize --imatrix (llama-imatrix style)"),
    "bench": ("pyengine.commands.bench", "measure prompt processing and generation speed (llama-bench style)"),
    "perplexity": ("pyengine.commands.perplexity", "perplexity / KL divergence on a text (llama-perplexity style)"),
    "serve": ("pyengine.server", "OpenAI-compatible HTTP server"),
    "pull": ("pyengine.commands.pull", "download a GGUF model from the Hugging Face hub (OWNER/NAME[:FILE])"),
    "list": ("pyengine.commands.list_models", "the downloaded models: name, size, architecture, quantization"),
    "rm": ("pyengine.commands.rm", "delete a downloaded model"),
}


def usage() -> str:
    lines = ["usage: pyengine COMMAND [options]   (pyengine COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"pyengine {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pyengine: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ImportError as e:
        extra = " (pip install 'pyengine[server]')" if name == "serve" else ""
        extra = " (pip install 'pyengine[convert]')" if name in ("convert", "quantize") else extra
        print(f"pyengine {name}: missing dependency: {e}{extra}", file=sys.stderr)
        return 1
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
