"""One engine thread serving many requests with continuous batching.

The `parallel` slots are the sequences of one engine context (one KV cache on the shared weights).
Each step is one forward pass over one batch: a chunk of the prompt of every slot that is still
prefilling, plus the last sampled token of every slot that is decoding. So the weights are read once
per step for all the requests, new requests join the running batch at the next step, and a long
prompt advances `prefill_chunk` tokens a step instead of stalling the others. A request that finishes
or whose client went away leaves the batch at once.

A slot's result depends only on its own request: each request samples with its own seeded `Sampler`,
and the kernels give a row the same result whatever else is in the batch, so a seed gives the same
text whether the request ran alone or next to others.

A slot keeps the tokens of its last request when it is freed; a new request whose prompt starts with
the same tokens (the next turn of a conversation, a shared system prompt) is placed in the free slot
that shares the longest prefix and evaluates only the rest. Where a busy slot shares more, the new
request's slot takes its cache pages (a fork, shared until written) and evaluates only what follows.

Jobs talk to the asyncio side through an `asyncio.Queue` fed with `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine import Engine
from ..generation import Generation, GenerationStats, _common_prefix
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer

__all__ = ["Job", "QueueFullError", "Scheduler"]

log = logging.getLogger("pyengine.server")


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class Job:
    """One generation request. Events arrive on `events`: ("text", str), then ("done", stats) or ("error", exc)."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (the client is gone); the engine thread frees the slot."""
        self.cancelled.set()

    def _emit(self, kind: str, value: Any) -> None:
        _deliver([(self, kind, value)])


def _deliver(events: list[tuple[Job, str, Any]]) -> None:
    """Hands events to their jobs' event loops, in order: one wake-up of each loop for all of them (a
    decode step's tokens for every slot), not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, str, Any]]] = {}
    for e in events:
        by_loop.setdefault(e[0].loop, []).append(e)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            for job, _, _ in items:
                job.cancelled.set()


def _put_all(items: list[tuple[Job, str, Any]]) -> None:
    for job, kind, value in items:
        job.events.put_nowait((kind, value))


class _Slot:
    """Sequence `index` of the engine's context, and the request it serves."""

    def __init__(self, index: int, llm: Engine):
        self.index = index
        self.llm = llm
        self.job: Job | None = None
        self.generation: Generation | None = None
        self.n_evaluated = 0  # prompt tokens in the cache
        self.cached: list[int] = []  # tokens in the cache (kept after the request, for prefix reuse)
        self.loop_start: float | None = None
        self.sent_logprobs = 0  # entries of generation.logprobs already sent

    @property
    def prefilling(self) -> bool:
        return self.n_evaluated < len(self.job.prompt_ids)


class Scheduler:
    """`parallel` slots on `llm`'s weights, a waiting queue of `queue_size` jobs, one engine thread.

    `prefill_chunk` prompt tokens of each prefilling slot are evaluated per step; `kv_type` is the slots'
    KV cache type (Engine's).
    """

    def __init__(self, llm: Engine, tokenizer: Tokenizer, parallel: int = 4, queue_size: int = 16,
                 n_ctx: int | None = None, prefill_chunk: int = 128, kv_type: str = "f16"):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.tokenizer = tokenizer
        self.queue_size = queue_size
        self.prefill_chunk = max(1, prefill_chunk)
        # A context of its own with a sequence per slot, so `llm`'s context stays its owner's.
        self.engine = llm.new_context(n_ctx, n_seq_max=parallel, kv_type=kv_type)
        self.slots = [_Slot(i, self.engine) for i in range(parallel)]
        self.n_ctx = self.engine.n_ctx
        self._waiting: collections.deque[Job] = collections.deque()
        # engine_*: forward passes, the rows they evaluated and the seconds spent in them (what a pass
        # of B rows costs, and how full the batches run, under real load).
        self.counters = {"requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0,
                         "tokens_generated": 0, "prompt_tokens": 0, "prompt_tokens_reused": 0,
                         "engine_steps": 0, "engine_step_rows": 0, "engine_step_seconds": 0.0}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pyengine-engine", daemon=True)
        self._thread.start()

    # --- asyncio side ----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Queue a job; raises `QueueFullError` when all slots are busy and the queue is full."""
        job = Job(list(prompt_ids), params, asyncio.get_running_loop())
        with self._cond:
            busy = sum(s.job is not None for s in self.slots)
            if busy + len(self._waiting) >= len(self.slots) + self.queue_size:
                raise QueueFullError(
                    f"server busy: {len(self.slots)} slots processing and {len(self._waiting)} requests waiting"
                )
            self._waiting.append(job)
            self._cond.notify()
        return job

    def status(self) -> dict[str, int | float]:
        with self._cond:
            busy = sum(s.job is not None for s in self.slots)
            return {"slots_idle": len(self.slots) - busy, "slots_processing": busy,
                    "requests_waiting": len(self._waiting), **self.counters}

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # --- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and all(s.job is None for s in self.slots):
                    self._cond.wait()
                if self._stopping:
                    break
                self._admit()
            for slot in self.slots:
                if slot.job is not None and slot.job.cancelled.is_set():
                    self._free(slot, "requests_cancelled")
            busy = [s for s in self.slots if s.job is not None]
            if not busy:
                continue
            try:
                self._step(busy)
            except Exception as e:  # a failed step fails its requests, never the engine thread
                log.exception("engine step failed")
                for slot in busy:
                    job = slot.job
                    if job is not None:
                        self._free(slot, "requests_failed")
                        job._emit("error", e)
        for slot in self.slots:
            if slot.job is not None:
                slot.job._emit("error", RuntimeError("server shutting down"))
                self._free(slot)

    def _admit(self) -> None:
        """Move waiting jobs into free slots, each into the one whose cache shares most of its prompt."""
        while self._waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            try:  # a request the engine refuses fails alone: the engine thread must never die
                generation = Generation(self.engine, self.tokenizer, job.prompt_ids, job.params)
                generation.check_prompt(self.n_ctx)
            except Exception as e:
                self.counters["requests_failed"] += 1
                job._emit("error", e)
                continue
            shared = {s.index: _common_prefix(job.prompt_ids, s.cached) for s in self.slots}
            slot = max(free, key=lambda s: shared[s.index])
            common = shared[slot.index]
            # A busy slot may hold more of the prompt (a system prompt or a question that another request
            # sent a moment earlier): the free slot then takes that slot's cache pages, shared until
            # either writes to one, instead of evaluating the tokens again. Each cached token is what
            # evaluating it in this slot would give (a row's result does not depend on its batch).
            source = max(self.slots, key=lambda s: shared[s.index])
            if shared[source.index] > common:
                self.engine.seq_copy(source.index, slot.index)
                slot.cached, common = list(source.cached), shared[source.index]
            # At least the last prompt token is evaluated, for its logits.
            keep = min(common, len(job.prompt_ids) - 1)
            self.engine.seq_truncate(slot.index, keep)
            keep = self.engine.seq_len(slot.index)  # fewer when a sliding window dropped what it needs
            slot.cached = slot.cached[:keep]
            slot.job, slot.generation, slot.n_evaluated, slot.loop_start = job, generation, keep, None
            slot.sent_logprobs = 0
            generation.n_cached = generation.stats.cached_tokens = keep
            self.counters["prompt_tokens_reused"] += keep
            self.counters["prompt_tokens"] += len(job.prompt_ids)

    def _free(self, slot: _Slot, outcome: str | None = None) -> None:
        with self._cond:
            gen = slot.generation
            if gen is not None:
                self.counters["tokens_generated"] += len(gen.token_ids)
                gen._close(slot.loop_start)
            slot.cached = slot.cached[: self.engine.seq_len(slot.index)]  # what the cache holds
            if outcome:
                self.counters[outcome] += 1
            slot.job, slot.generation = None, None

    @staticmethod
    def _send_logprobs(slot: _Slot, out: list) -> None:
        """The new tokens' log-probabilities, ahead of their text; not those of a stop token."""
        gen = slot.generation
        end = len(gen.logprobs) - (1 if gen.finished and isinstance(gen.stats.stop, int) else 0)
        if end > slot.sent_logprobs:
            out.append((slot.job, "logprobs", gen.logprobs[slot.sent_logprobs:end]))
            slot.sent_logprobs = end

    def _step(self, busy: list[_Slot]) -> None:
        """One forward pass: a prompt chunk of each prefilling slot, the new token of each decoding one."""
        tokens: list[int] = []
        seqs: list[int] = []
        want: list[bool] = []
        chunks: list[list[int]] = []  # what each slot evaluates in this pass
        requests: list[tuple[int, float, float]] = []  # what each row with logits asks of them (TopLogits)
        for slot in busy:
            if slot.prefilling:
                chunk = slot.job.prompt_ids[slot.n_evaluated: slot.n_evaluated + self.prefill_chunk]
                want += [False] * (len(chunk) - 1) + [slot.n_evaluated + len(chunk) == len(slot.job.prompt_ids)]
            else:
                chunk = [slot.generation.token_ids[-1]]
                want.append(True)
            if want[-1]:
                requests.append(slot.generation.top_request(self.engine.n_vocab))
            tokens += chunk
            seqs += [slot.index] * len(chunk)
            chunks.append(chunk)
        start = time.perf_counter()
        rows = iter(self.engine.decode_top(np.array(tokens, np.int32), np.array(seqs, np.int32), np.array(want),
                                           requests))
        elapsed = time.perf_counter() - start
        with self._cond:
            self.counters["engine_steps"] += 1
            self.counters["engine_step_rows"] += len(tokens)
            self.counters["engine_step_seconds"] += elapsed
        out: list[tuple[Job, str, Any]] = []  # the step's events, delivered together
        try:
            self._finish_step(busy, chunks, rows, elapsed, out)
        finally:
            _deliver(out)

    def _finish_step(self, busy: list[_Slot], chunks: list[list[int]], rows: Any, elapsed: float,
                     out: list[tuple[Job, str, Any]]) -> None:
        """Samples each decoding slot's next token from the step's logits `rows`; events go to `out`."""
        for slot, chunk in zip(busy, chunks):
            gen = slot.generation
            slot.cached += chunk
            if slot.prefilling:
                slot.n_evaluated += len(chunk)
                gen.stats.prompt_seconds += elapsed
                if slot.prefilling:
                    continue
                slot.loop_start = time.perf_counter()
            piece = gen.step(next(rows))
            self._send_logprobs(slot, out)
            if piece:
                out.append((slot.job, "text", piece))
            if gen.finished or self.engine.seq_len(slot.index) >= self.n_ctx:
                piece = gen.finish("length")
                if piece:
                    out.append((slot.job, "text", piece))
                job = slot.job
                stats: GenerationStats = gen.stats
                gen.cache_ids = list(slot.cached)
                self._free(slot, "requests_finished")
                out.append((job, "done", stats))
