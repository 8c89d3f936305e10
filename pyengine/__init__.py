"""pyengine: quantized LLM inference on CPUs and small GPUs.

    import pyengine
    llm = pyengine.LLM("model.gguf", n_ctx=4096)
"""
from ._C import (ContextLengthError, DeviceMemoryError, EngineError, MemoryLimitError, ModelFormatError, NumericalError,
                 UnsupportedModelError)
from .chat_template import ChatTemplate, TemplateError
from .default_model import ModelNotFoundError, find_default_model, find_packaged_model, resolve_model
from .generation import ChatSession, ContextShiftWarning, Generation, GenerationStats, generate, generate_batch
from .engine import Engine
from .llm import LLM
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "LLM", "Engine", "Tokenizer", "IncrementalDetokenizer", "SamplingParams", "Sampler", "ChatTemplate", "ChatSession",
    "Generation", "GenerationStats", "generate", "generate_batch", "find_default_model", "find_packaged_model", "resolve_model",
    "ContextLengthError", "ContextShiftWarning", "DeviceMemoryError", "EngineError", "MemoryLimitError", "ModelFormatError",
    "ModelNotFoundError", "NumericalError",
    "TemplateError", "UnsupportedModelError",
]
__version__ = "0.1.0"
