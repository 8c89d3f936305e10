"""pyengine's converter: Hugging Face checkpoint folder -> GGUF (`pyengine convert`).

    from pyengine_convert import convert
    report = convert("TinyLlama-1.1B", "tinyllama.q4_0.gguf", qtype="q4_0")
"""
from pyengine._lazy import lazy_getattr

from .errors import ConversionError

# The rest loads on first use (PEP 562): `pyengine quantize` imports a submodule of this package and
# should not pay for the converter's torch-facing code at start-up.
_LAZY = {"QTYPES": "convert", "ConversionReport": "convert", "convert": "convert", "main": "cli"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
