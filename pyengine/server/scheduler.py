"""One engine thread serving several requests at once, token by token.

Each of the `parallel` slots is an `LLM.new_context()`: its own KV cache on the shared weights. The
engine thread admits waiting jobs into free slots, then visits the busy slots in turn and does one
step for each: a chunk of the prompt while it prefills, else one decode step of its `Generation`.
So N clients progress together while only one forward pass runs at a time (the machine's cores
go to that pass instead of N passes fighting over them).

A slot's result depends only on its own request: the prompt is always prefilled in the same chunks
from an empty cache, and each request samples with its own seeded `Sampler`, so a seed gives the
same text whether the request ran alone or next to others.

Jobs talk to the asyncio side through an `asyncio.Queue` fed with `call_soon_threadsafe`; a job
whose client went away is cancelled, and its slot is freed before the next step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..generation import Generation, GenerationStats
from ..llm import LLM
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
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


class _Slot:
    def __init__(self, index: int, llm: LLM):
        self.index = index
        self.llm = llm
        self.job: Job | None = None
        self.generation: Generation | None = None
        self.n_prefilled = 0

    def start(self, job: Job) -> None:
        self.job, self.generation, self.n_prefilled = job, None, 0
        self.llm.reset()

    def free(self) -> None:
        if self.generation is not None:
            self.generation.close()
        self.job, self.generation, self.n_prefilled = None, None, 0


class Scheduler:
    """`parallel` slots on `llm`'s weights, a waiting queue of `queue_size` jobs, one engine thread.

    `prefill_chunk` tokens of a prompt are evaluated per step, so a long prompt delays the other
    slots' next tokens by one chunk at a time rather than by the whole prompt.
    """

    def __init__(self, llm: LLM, tokenizer: Tokenizer, parallel: int = 4, queue_size: int = 16,
                 n_ctx: int | None = None, prefill_chunk: int = 128):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.tokenizer = tokenizer
        self.queue_size = queue_size
        self.prefill_chunk = max(1, prefill_chunk)
        # Every slot gets a context of its own, so `llm`'s context stays its owner's.
        self.slots = [_Slot(i, llm.new_context(n_ctx)) for i in range(parallel)]
        self.n_ctx = self.slots[0].llm.n_ctx
        self._waiting: collections.deque[Job] = collections.deque()
        self.counters = {"requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0, "tokens_generated": 0}
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

    def status(self) -> dict[str, int]:
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
                for slot in self.slots:
                    while slot.job is None and self._waiting:
                        job = self._waiting.popleft()
                        if not job.cancelled.is_set():
                            slot.start(job)
                busy = [s for s in self.slots if s.job is not None]
            for slot in busy:
                try:
                    self._step(slot)
                except Exception as e:  # a failed request must not take the engine thread down
                    log.exception("slot %d failed", slot.index)
                    job = slot.job
                    self._free(slot, "requests_failed")
                    if job is not None:
                        job._emit("error", e)
        for slot in self.slots:
            if slot.job is not None:
                slot.job._emit("error", RuntimeError("server shutting down"))
                self._free(slot)

    def _free(self, slot: _Slot, outcome: str | None = None) -> None:
        with self._cond:
            if slot.generation is not None:
                self.counters["tokens_generated"] += len(slot.generation.token_ids)
            if outcome:
                self.counters[outcome] += 1
            slot.free()

    def _step(self, slot: _Slot) -> None:
        job = slot.job
        if job.cancelled.is_set():
            self._free(slot, "requests_cancelled")
            return
        if slot.generation is None:
            # Prefill all but the last prompt token in fixed chunks; Generation evaluates the last
            # one itself and samples from its logits.
            end = len(job.prompt_ids) - 1
            if slot.n_prefilled < end:
                stop = min(end, slot.n_prefilled + self.prefill_chunk)
                slot.llm.eval(job.prompt_ids[slot.n_prefilled:stop])
                slot.n_prefilled = stop
                return
            slot.generation = Generation(slot.llm, self.tokenizer, job.prompt_ids, job.params, n_cached=end)
        try:
            piece = next(slot.generation)
        except StopIteration:
            stats: GenerationStats = slot.generation.stats
            self._free(slot, "requests_finished")
            job._emit("done", stats)
            return
        job._emit("text", piece)
