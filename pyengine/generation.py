"""Text generation and multi-turn chat on top of `Engine`, `Tokenizer`, `Sampler` and `ChatTemplate`.

A `Generation` is a state machine (logits in; token and text out) with a driver for one sequence;
`generate_batch` drives many of them on one engine, one forward pass per step for all. Text streams
in pieces. Stop strings are held back while the text could still turn into one, so no
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
from .sampling import Sampler, SamplingParams, TopLogits, json_schema_of

# ChatTemplate is imported where a session needs it: what never renders a template (pyengine bench)
# then never loads jinja2, nor the tokenizers library (Engine.tokenizer imports it on first use).
if TYPE_CHECKING:
    from .chat_template import ChatTemplate
    from .engine import Engine
    from .tokenizer import Tokenizer

__all__ = ["ChatSession", "ContextShiftWarning", "Generation", "GenerationStats", "TokenLogprob", "generate",
           "generate_batch"]


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


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its raw logits, before
    penalties and temperature, as OpenAI and vLLM report them) and the most likely tokens at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), most likely first


def _logprob_entry(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    x = np.asarray(logits, dtype=np.float64)
    log_z = x.max() + np.log(np.exp(x - x.max()).sum())
    top: list[tuple[int, float]] = []
    if n_top > 0:
        ids = np.argpartition(x, x.size - n_top)[x.size - n_top:]
        ids = ids[np.argsort(-x[ids], kind="stable")]
        top = [(int(i), float(x[i] - log_z)) for i in ids]
    return TokenLogprob(token, float(x[token] - log_z), top)


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
    """One sequence's generation: a state machine that takes the logits of the last evaluated token
    and gives the next token and the text it completes, plus a driver that runs it on one sequence.

    Iterate it for text pieces (that runs the model: `llm.eval` on sequence 0, reusing `n_cached`
    prompt tokens already in the KV cache); breaking out of the loop stops it (`finish_reason`
    "cancelled"). `text`, `token_ids` and `stats` fill in as it runs. Drivers of many sequences
    (`generate_batch`) call `step` and `finish` themselves.
    """

    def __init__(self, llm: "Engine", tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
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
        self.logprobs: list[TokenLogprob] = []  # per generated token, when params.logprobs is set
        self._sampler = Sampler(params)
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eog_ids))
        self._stops = [s for s in params.stop if s]
        self._detok = tokenizer.detokenizer(skip_special_tokens=True)
        self._pending = ""  # decoded, not yet streamed: could be the start of a stop string
        constrained, schema = json_schema_of(params.response_format)
        self._constraint = None
        if constrained:
            from .constraint import json_constraint

            self._constraint = json_constraint(tokenizer, schema)
            self._stop_ids |= set(tokenizer.eog_ids)  # the document is complete: nothing may follow
        self._iterator = self._run()
        self._on_finish: list[Callable[[Generation], None]] = []
        self._closed = False

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

    # --- the state machine ------------------------------------------------------------------
    def check_prompt(self, n_ctx: int) -> None:
        """Raise if the prompt cannot be generated from in a context of `n_ctx` tokens."""
        if not self.prompt_ids:
            raise ValueError("generate needs a prompt of at least one token")
        if len(self.prompt_ids) > n_ctx:
            raise ContextLengthError(
                f"the prompt has {len(self.prompt_ids)} tokens, more than the context of {n_ctx}"
            )

    def _needs_row(self) -> bool:
        """Whether the next step reads the whole row of logits (a constraint's mask, suppressed end
        ids, a forced token, log-probabilities), not only what the sampler asks for."""
        p, n_prompt, n_out = self.params, len(self.prompt_ids), len(self.token_ids)
        return (self._constraint is not None or p.logprobs is not None
                or bool(self._stop_ids and p.ends_suppressed(n_prompt, n_out))
                or p.forced_token(n_prompt, n_out) is not None)

    def top_request(self, n_vocab: int) -> tuple[int, float, float]:
        """(k, inv_t, u) of the `TopLogits` the next `step` wants from the engine (`Sampler.request`)."""
        if self._needs_row():
            return 1, 0.0, -1.0
        return self._sampler.request(n_vocab, self.token_ids, self.prompt_ids)

    def step(self, logits: np.ndarray | TopLogits) -> str:
        """Sample the next token from `logits` (float32 [n_vocab], of the last evaluated token, or their
        `TopLogits` as `top_request` asked) and return the text it completes, possibly "" (text that
        could still become a stop string is held back). Afterwards either `finished` is set, or the
        caller evaluates `token_ids[-1]` and steps again."""
        p, stats = self.params, self.stats
        if self.finished:
            raise RuntimeError("step() on a finished generation")
        if len(self.token_ids) >= p.max_new_tokens:
            stats.finish_reason = "length"
            return ""
        t0 = time.perf_counter()
        if isinstance(logits, TopLogits) and self._needs_row():
            logits = logits.full()
        allowed = logits
        if self._constraint is not None:  # only tokens that keep the output valid JSON
            allowed = np.where(self._constraint.mask(), logits, np.float32(-np.inf))
        if self._stop_ids and p.ends_suppressed(len(self.prompt_ids), len(self.token_ids)):
            allowed = allowed.copy() if allowed is logits else allowed
            allowed[list(self._stop_ids)] = -np.inf
        forced = p.forced_token(len(self.prompt_ids), len(self.token_ids))
        if forced is not None:  # as transformers: every other token's score -inf
            allowed = np.full_like(logits, -np.inf)
            allowed[forced] = 0.0
        token = self._sampler(allowed, self.token_ids, self.prompt_ids)
        if self._constraint is not None and token not in self._stop_ids:
            self._constraint.advance(token)
        stats.sampling_seconds += time.perf_counter() - t0
        self.token_ids.append(token)
        stats.generated_tokens += 1
        if p.logprobs is not None:
            self.logprobs.append(_logprob_entry(logits, token, p.logprobs))
        if token in self._stop_ids:
            stats.finish_reason, stats.stop = "stop", token
            return ""
        self._pending += self._detok.add(token)
        hit = min(((self._pending.find(s), s) for s in self._stops if s in self._pending), default=None)
        if hit is not None:
            self._pending, stats.finish_reason, stats.stop = self._pending[: hit[0]], "stop", hit[1]
            return ""
        out = self._pending[: len(self._pending) - _held_back(self._pending, self._stops)]
        self._pending = self._pending[len(out):]
        self.text += out
        if len(self.token_ids) >= p.max_new_tokens:
            stats.finish_reason = "length"  # nothing follows this token: no need to evaluate it
        return out

    def finish(self, reason: str = "length") -> str:
        """End the generation with `reason` unless `step` already ended it; return the text held
        back until now, which is final."""
        if self.stats.finish_reason is None:
            self.stats.finish_reason = reason
        if not isinstance(self.stats.stop, str):
            self._pending += self._detok.flush()  # an unfinished character shows as U+FFFD, as decode() has it
        out, self._pending = self._pending, ""
        self.text += out
        return out

    def _close(self, loop_start: float | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.stats.finish_reason is None:
            self.stats.finish_reason = "cancelled"
        if loop_start is not None:
            self.stats.generation_seconds = time.perf_counter() - loop_start
        for callback in self._on_finish:
            callback(self)

    # --- the one-sequence driver --------------------------------------------------------------
    def _run(self) -> Iterator[str]:
        llm, stats = self.llm, self.stats
        loop_start = None
        try:
            self.check_prompt(llm.n_ctx)
            # At least one prompt token is evaluated, to get logits; and the cache must hold what we reuse.
            n_cached = max(0, min(self.n_cached, len(self.prompt_ids) - 1, llm.n_past))
            stats.cached_tokens = n_cached
            start = time.perf_counter()
            _claim(llm, self.owner)
            llm.truncate(n_cached)
            n_cached = stats.cached_tokens = llm.n_past  # fewer when a sliding window dropped what it needs
            k, inv_t, u = self.top_request(llm.n_vocab)
            logits = llm.eval_top(self.prompt_ids[n_cached:], k, inv_t, u=u)
            self.cache_ids = list(self.prompt_ids)
            stats.prompt_seconds = time.perf_counter() - start

            loop_start = time.perf_counter()
            while True:
                piece = self.step(logits)
                if piece:
                    yield piece
                if self.finished or llm.n_past >= llm.n_ctx:
                    break
                k, inv_t, u = self.top_request(llm.n_vocab)
                logits = llm.eval_top([self.token_ids[-1]], k, inv_t, u=u)
                self.cache_ids.append(self.token_ids[-1])
            piece = self.finish("length")
            if piece:
                yield piece
        except Exception:
            stats.finish_reason = "error"
            raise
        finally:
            self._close(loop_start)


def generate_batch(engine: "Engine", generations: Sequence[Generation],
                   encoder_inputs: Sequence[Sequence[int]] | None = None) -> Iterator[tuple[int, str]]:
    """Run many generations together on `engine`, generation i on sequence i: their prompts are
    evaluated as one batch, then each step samples every unfinished generation and evaluates all
    their new tokens in one forward pass (the weights are read once per step for all of them).
    Yields (index, text piece) as the pieces come. Each generation samples with its own seeded
    sampler, so its text is the one it would give alone. `engine` is emptied first. An encoder-decoder
    (T5) takes `encoder_inputs`, one per generation, encoded into its sequence before its prompt (the
    decoder start token) is evaluated."""
    n = len(generations)
    if n > engine.n_seq_max:
        raise ValueError(f"{n} generations need a context of at least {n} sequences, not {engine.n_seq_max}")
    for g in generations:
        g.check_prompt(engine.n_ctx)
    loop_start = None
    try:
        start = time.perf_counter()
        engine.reset()
        for i, ids in enumerate(encoder_inputs or ()):
            engine.encode(ids, i)
        tokens = [t for g in generations for t in g.prompt_ids]
        seqs = [i for i, g in enumerate(generations) for _ in g.prompt_ids]
        last = np.cumsum([len(g.prompt_ids) for g in generations]) - 1
        want = np.zeros(len(tokens), dtype=bool)
        want[last] = True
        rows = engine.decode_top(tokens, seqs, want, [g.top_request(engine.n_vocab) for g in generations])
        for g in generations:
            g.cache_ids = list(g.prompt_ids)
            g.stats.prompt_seconds = time.perf_counter() - start
        loop_start = time.perf_counter()
        active = list(range(n))
        while active:
            going = []
            for row, i in zip(rows, active):
                g = generations[i]
                piece = g.step(row)
                if piece:
                    yield i, piece
                if g.finished or engine.seq_len(i) >= engine.n_ctx:
                    piece = g.finish("length")
                    g._close(loop_start)
                    if piece:
                        yield i, piece
                else:
                    going.append(i)
            if not going:
                break
            next_tokens = [generations[i].token_ids[-1] for i in going]
            rows = engine.decode_top(next_tokens, going, None,
                                     [generations[i].top_request(engine.n_vocab) for i in going])
            for i, t in zip(going, next_tokens):
                generations[i].cache_ids.append(t)
            active = going
    except BaseException:
        for g in generations:
            if not g.finished:
                g.stats.finish_reason = "error"
        raise
    finally:
        for g in generations:
            g._close(loop_start)


def _claim(llm: "Engine", owner: object) -> None:
    """Mark the KV cache as `owner`'s: a ChatSession reuses cached tokens only while it holds the
    cache, so a `generate` call or another session on the same context in between is not mistaken
    for the conversation's prefix."""
    try:
        llm._kv_owner = owner
    except AttributeError:  # a stand-in without attributes of its own: nobody shares it
        pass


def generate(
    llm: "Engine",
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

    llm: "Engine"
    tokenizer: Tokenizer
    template: ChatTemplate | None = None
    system_prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict[str, Any]] = field(default_factory=list)
    context_shifts: int = 0

    def __post_init__(self) -> None:
        if self.template is None:
            from .chat_template import ChatTemplate

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
