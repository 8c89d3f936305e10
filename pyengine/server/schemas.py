"""Request bodies of the OpenAI API, as much of them as the server honours.

Fields the server does not implement but clients send by habit (`user`, ...) are ignored; ones that
would change the answer if ignored (`tools`, `echo`, `suffix`, `n` above `MAX_N`) are rejected with a
400 by `check_supported`.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "EmbeddingRequest", "MAX_N",
           "StreamOptions"]

MAX_N = 8  # choices per request; each takes a slot


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI's content parts; only {"type": "text"} parts are understood.
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat completions and completions."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # llama.cpp / vLLM extensions, off by default
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    # chat: logprobs (bool) + top_logprobs (0-20); completions: logprobs (int, 0-5 in OpenAI's API)
    logprobs: Optional[Union[bool, int]] = None
    # {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}
    response_format: Optional[dict[str, Any]] = None

    def n_top_logprobs(self) -> Optional[int]:
        """None: no log-probabilities; else how many alternatives per token."""
        raise NotImplementedError

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    tools: Optional[list[Any]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def n_top_logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    # A string, a list holding one string, or a list of token ids.
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def n_top_logprobs(self) -> Optional[int]:
        return None if self.logprobs is None or self.logprobs is False else int(self.logprobs)


class EmbeddingRequest(_Request):
    model: str
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float"] = "float"


def check_supported(req: _Request) -> tuple[str, str] | None:
    """(message, param) of the first field set to something the server does not do, or None."""
    if not isinstance(req, _Sampling):
        return None
    if not 1 <= req.n <= MAX_N:
        return f"n must be in [1, {MAX_N}]", "n"
    if isinstance(req, CompletionRequest) and req.logprobs is not None and not 0 <= int(req.logprobs) <= 20:
        return "logprobs must be in [0, 20]", "logprobs"
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs and not req.logprobs:
        return "top_logprobs needs logprobs: true", "top_logprobs"
    if len(req.stop_list()) > 4:
        return "at most 4 stop sequences", "stop"
    if isinstance(req, ChatCompletionRequest) and req.tools:
        return "tools are not supported", "tools"
    if isinstance(req, CompletionRequest):
        if req.echo:
            return "echo is not supported", "echo"
        if req.suffix:
            return "suffix is not supported", "suffix"
        if req.best_of not in (None, 1):
            return "only best_of=1 is supported", "best_of"
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str) and len(req.prompt) != 1:
            return "only one prompt per request is supported", "prompt"
    return None
