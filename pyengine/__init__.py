"""pyengine: quantized LLM inference on CPUs and small GPUs."""
from ._C import ContextLengthError, EngineError, ModelFormatError, UnsupportedModelError
from .llm import LLM

__all__ = ["LLM", "ContextLengthError", "EngineError", "ModelFormatError", "UnsupportedModelError"]
__version__ = "0.1.0"
