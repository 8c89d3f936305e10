"""Text generation and multi-turn chat on top of `LLM`, `Tokenizer`, `Sampler` and `ChatTemplate`.

`generate()` evaluates a prompt, then samples, evaluates and detokenizes one token at a time,
streaming text pieces. Stop strings are held back while the text could still turn into one, so no
part of a stop string is ever streamed; stop token ids and the model's end-of-generation ids end the
stream without text.

`ChatSession` keeps a conversation and the KV cache that goes with it: each turn renders the whole
conversation with the chat template, keeps the cached tokens it shares with the new prompt and
evaluates only the rest. When the conversation outgrows the context it drops the oldest turns (the
system prompt stays), warns, and re-evaluates.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ._C import ContextLengthError
from .chat_template import ChatTemplate
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .llm import LLM

__all__ = ["ChatSession", "ContextShiftWarning", "Generation", "GenerationStats", "generate"]


class ContextShiftWarning(UserWarning):
    """Old turns of a chat were dropped to fit the context."""


@dataclass
class GenerationStats:
    """What one generation cost. Times are wall-clock seconds."""

    prompt_tokens: int = 0  # tokens of the prompt
    cached_tokens: int = 0  # of which already in the KV cache (not evaluated again)
    generated_tokens: int = 0  # sampled tokens, including a final stop token
    prompt_seconds: float = 0.0  # evaluating the prompt, up to the first logits
    generation_seconds: float = 0.0  # the token-by-token loop: eval + sampling + detokenizing
    sampling_seconds: float = 0.0  # of which in the sampler
    # "stop" (stop token or string), "length" (max_new_tokens or a full context), "cancelled", "error"
    finish_reason: str | None = None
    stop: str | int | None = None  # the stop string or token id that ended it
    context_shifted: bool = False  # ChatSession dropped old turns to make room

    @property
    def prompt_tokens_per_second(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else float("nan")


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may still become one)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class Generation:
    """A generation in progress: iterate it for text pieces; `text`, `token_ids` and `stats` fill in as it runs.

    Iterating is what runs the model; breaking out of the loop stops it (`finish_reason` "cancelled").
    """

    def __init__(self, llm: "LLM", tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 n_cached: int = 0, owner: object = None):
        self.llm = llm
        self.owner = owner  # who may reuse the KV cache this leaves behind (a ChatSession), see _claim
        self.tokenizer = tokenizer
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.n_cached = n_cached
        self.token_ids: list[int] = []  # generated, including a final stop token
        self.text = ""  # streamed so far (stop strings and stop tokens excluded)
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self.cache_ids: list[int] = []  # tokens held in the KV cache once done
        self._iterator = self._run()
        self._on_finish: list[Callable[[Generation], None]] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._iterator)

    def close(self) -> None:
        """Stop generating (as breaking out of the loop does)."""
        self._iterator.close()

    def wait(self) -> str:
        """Run to the end; return the whole text."""
        for _ in self:
            pass
        return self.text

    def _run_now(self) -> "Generation":
        """Run to the end; iterating afterwards yields the whole text once (non-streaming use)."""
        self.wait()
        self._iterator = iter([self.text] if self.text else [])
        return self

    @property
    def finished(self) -> bool:
        return self.stats.finish_reason is not None

    def _run(self) -> Iterator[str]:
        llm, tok, p, stats = self.llm, self.tokenizer, self.params, self.stats
        sampler = Sampler(p)
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(tok.eog_ids))
        stops = [s for s in p.stop if s]
        detok = tok.detokenizer(skip_special_tokens=True)
        pending = ""  # decoded, not yet streamed: could be the start of a stop string
        loop_start = None
        try:
            if not self.prompt_ids:
                raise ValueError("generate needs a prompt of at least one token")
            if len(self.prompt_ids) > llm.n_ctx:
                raise ContextLengthError(
                    f"the prompt has {len(self.prompt_ids)} tokens, more than the context of {llm.n_ctx}"
                )
            # At least one prompt token is evaluated, to get logits; and the cache must hold what we reuse.
            n_cached = max(0, min(self.n_cached, len(self.prompt_ids) - 1, llm.n_past))
            stats.cached_tokens = n_cached
            start = time.perf_counter()
            _claim(llm, self.owner)
            llm.truncate(n_cached)
            logits = llm.eval(self.prompt_ids[n_cached:])
            self.cache_ids = list(self.prompt_ids)
            stats.prompt_seconds = time.perf_counter() - start

            loop_start = time.perf_counter()
            while len(self.token_ids) < p.max_new_tokens:
                t0 = time.perf_counter()
                token = sampler(logits, self.token_ids, self.prompt_ids)
                stats.sampling_seconds += time.perf_counter() - t0
                self.token_ids.append(token)
                stats.generated_tokens += 1
                if token in stop_ids:
                    stats.finish_reason, stats.stop = "stop", token
                    break
                pending += detok.add(token)
                hit = min(((pending.find(s), s) for s in stops if s in pending), default=None)
                if hit is not None:
                    pending, stats.finish_reason, stats.stop = pending[: hit[0]], "stop", hit[1]
                    break
                out = pending[: len(pending) - _held_back(pending, stops)]
                if out:
                    pending = pending[len(out) :]
                    self.text += out
                    yield out
                if len(self.token_ids) >= p.max_new_tokens:
                    break  # nothing follows this token: no need to evaluate it
                if llm.n_past >= llm.n_ctx:
                    break
                logits = llm.eval([token])
                self.cache_ids.append(token)
            if stats.finish_reason is None:
                stats.finish_reason = "length"
            if not isinstance(stats.stop, str):
                pending += detok.flush()  # an unfinished character shows as U+FFFD, as decode() has it
            if pending:
                self.text += pending
                yield pending
        except Exception:
            stats.finish_reason = "error"
            raise
        finally:
            if stats.finish_reason is None:
                stats.finish_reason = "cancelled"
            if loop_start is not None:
                stats.generation_seconds = time.perf_counter() - loop_start
            for callback in self._on_finish:
                callback(self)


def _claim(llm: "LLM", owner: object) -> None:
    """Mark the KV cache as `owner`'s: a ChatSession reuses cached tokens only while it holds the
    cache, so a `generate` call or another session on the same context in between is not mistaken
    for the conversation's prefix."""
    try:
        llm._kv_owner = owner
    except AttributeError:  # a stand-in without attributes of its own: nobody shares it
        pass


def generate(
    llm: "LLM",
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    stream: bool = True,
    n_cached: int = 0,
) -> Generation:
    """Generate a continuation of `prompt_ids`.

    Returns a `Generation`: iterate it for text pieces (with `stream=False` it has already run, and
    yields the whole text once). `n_cached` says how many leading prompt tokens the KV cache
    already holds; the rest is evaluated. `generation.stats` has token counts and timings.
    """
    generation = Generation(llm, tokenizer, prompt_ids, params or SamplingParams(), n_cached)
    return generation if stream else generation._run_now()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


@dataclass
class ChatSession:
    """A conversation with one model, reusing the KV cache from turn to turn.

    `send(text)` adds a user message and returns the `Generation` of the reply; once it has run,
    the reply is in `messages`. `context_shifts` counts the times old turns were dropped.
    """

    llm: "LLM"
    tokenizer: Tokenizer
    template: ChatTemplate | None = None
    system_prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict[str, Any]] = field(default_factory=list)
    context_shifts: int = 0

    def __post_init__(self) -> None:
        if self.template is None:
            self.template = ChatTemplate.for_tokenizer(self.tokenizer)
        if self.system_prompt and not (self.messages and self.messages[0]["role"] == "system"):
            self.messages.insert(0, {"role": "system", "content": self.system_prompt})
        self._cache_ids: list[int] = []  # tokens in the KV cache, in order
        self._active: Generation | None = None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]

    def prompt_ids(self, messages: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of the conversation rendered with a generation prompt."""
        text = self.template.render(self.messages if messages is None else messages, add_generation_prompt=True)
        # As transformers' apply_chat_template: the template writes BOS itself where the model wants one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def send(self, content: str, params: SamplingParams | None = None, stream: bool = True) -> Generation:
        """Add a user message and generate the assistant's reply."""
        params = params or self.params
        if self._active is not None and not self._active.finished:
            self._active.close()  # the reply so far stays in the conversation
            if not self._active.finished:  # it never started: there is no reply
                self.messages.pop()
        self._active = None
        self.messages.append({"role": "user", "content": content})
        ids, shifted = self._fit(params)
        holds_cache = getattr(self.llm, "_kv_owner", self) is self
        n_cached = _common_prefix(ids, self._cache_ids) if holds_cache else 0
        generation = Generation(self.llm, self.tokenizer, ids, params, n_cached, owner=self)
        generation.stats.context_shifted = shifted
        generation._on_finish.append(self._finished)
        self._active = generation
        return generation if stream else generation._run_now()

    def _fit(self, params: SamplingParams) -> tuple[list[int], bool]:
        """Prompt ids that leave room for the reply, dropping the oldest turns if needed."""
        room = min(params.max_new_tokens, self.llm.n_ctx // 4)
        first = 1 if self.messages[0]["role"] == "system" else 0
        ids = self.prompt_ids()
        if len(ids) + room <= self.llm.n_ctx:
            return ids, False
        alone = self.prompt_ids(self.messages[:first] + self.messages[-1:])
        if len(alone) + room > self.llm.n_ctx:
            self.messages.pop()
            raise ContextLengthError(
                f"the message does not fit: with the system prompt it takes {len(alone)} tokens, and the "
                f"context holds {self.llm.n_ctx} with {room} kept for the reply"
            )
        while len(ids) + room > self.llm.n_ctx:
            # Drop the oldest exchange: a user message and everything up to the next user message.
            end = next(i for i in range(first + 1, len(self.messages)) if self.messages[i]["role"] == "user")
            del self.messages[first:end]
            ids = self.prompt_ids()
        self.context_shifts += 1
        warnings.warn("chat context full: dropped the oldest turns and re-evaluated the conversation",
                      ContextShiftWarning, stacklevel=3)
        return ids, True

    def _finished(self, generation: Generation) -> None:
        self._cache_ids = generation.cache_ids
        if generation.stats.finish_reason == "error" and not generation.text:
            self.messages.pop()  # no reply: forget the question too
        else:
            self.messages.append({"role": "assistant", "content": generation.text})
