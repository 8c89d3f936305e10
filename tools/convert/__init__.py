"""pyengine's converter: Hugging Face checkpoint folder -> GGUF (`pyengine convert`).

    from pyengine_convert import convert
    report = convert("TinyLlama-1.1B", "tinyllama.q4_0.gguf", qtype="q4_0")
"""
from .errors import ConversionError

# The rest loads on first use (PEP 562): `pyengine quantize` imports a submodule of this package and
# should not pay for the converter's torch-facing code at start-up.
_LAZY = {"QTYPES": "convert", "ConversionReport": "convert", "convert": "convert", "main": "cli"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pyengine_convert' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value

__all__ = ["ConversionError", "ConversionReport", "QTYPES", "convert", "main"]
