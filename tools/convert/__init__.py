"""pyengine's converter: Hugging Face checkpoint folder -> GGUF (`pyengine convert`).

    from pyengine_convert import convert
    report = convert("TinyLlama-1.1B", "tinyllama.q4_0.gguf", qtype="q4_0")
"""
from .cli import main
from .convert import QTYPES, ConversionReport, convert
from .errors import ConversionError

__all__ = ["ConversionError", "ConversionReport", "QTYPES", "convert", "main"]
