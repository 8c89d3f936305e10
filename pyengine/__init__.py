"""pyengine: quantized LLM inference on CPUs and small GPUs.

    import pyengine
    llm = pyengine.LLM("model.gguf", n_ctx=4096)
"""
from ._C import (ContextLengthError, DeviceMemoryError, EngineError, MemoryLimitError, ModelFormatError, NumericalError,
                 UnsupportedModelError)
from ._lazy import lazy_getattr

# Everything else loads on first use (PEP 562): `pyengine quantize` and the other commands that need
# only the engine should not pay for jinja2, the tokenizer and the generation loop at start-up.
_LAZY = {
    "ChatTemplate": "chat_template", "TemplateError": "chat_template",
    "ModelNotFoundError": "default_model", "find_default_model": "default_model",
    "find_packaged_model": "default_model", "resolve_model": "default_model",
    "ChatSession": "generation", "ContextShiftWarning": "generation", "Generation": "generation",
    "GenerationStats": "generation", "generate": "generation", "generate_batch": "generation",
    "Engine": "engine", "LLM": "llm", "Sampler": "sampling", "SamplingParams": "sampling",
    "IncrementalDetokenizer": "tokenizer", "Tokenizer": "tokenizer",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "LLM", "Engine", "Tokenizer", "IncrementalDetokenizer", "SamplingParams", "Sampler", "ChatTemplate", "ChatSession",
    "Generation", "GenerationStats", "generate", "generate_batch", "find_default_model", "find_packaged_model", "resolve_model",
    "ContextLengthError", "ContextShiftWarning", "DeviceMemoryError", "EngineError", "MemoryLimitError", "ModelFormatError",
    "ModelNotFoundError", "NumericalError",
    "TemplateError", "UnsupportedModelError",
]
__version__ = "0.1.0"
