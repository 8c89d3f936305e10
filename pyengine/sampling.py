"""Choosing the next token from a logits vector.

`SamplingParams` uses transformers' names. The processing order is transformers' too: penalties,
then temperature, top-k, top-p, min-p, then a draw from what is left. Temperature 0 is greedy.

* `repetition_penalty` (transformers / CTRL): a logit of a token seen in the prompt or the output is
  divided by the penalty when positive, multiplied when negative.
* `presence_penalty`, `frequency_penalty` (OpenAI): subtract `presence` once and `frequency` per
  occurrence, for tokens in the output so far.

Where the logits are: the engine hands the sampler each row as `TopLogits`, its largest logits (computed
by the C++ op `top_logits` on the device that ran the output layer, a GPU's included), and the whole row
only when asked (`TopLogits.full()`). Greedy decoding, top-k up to 256 and top-p / min-p whose candidates
lie among the 128 largest never need more; penalties, plain sampling over the whole vocabulary and a
nucleus that reaches past them take the whole row. Both paths order the candidates the same way (largest
first, equal logits lower id first), so a seeded request draws the same tokens whichever it takes.

Cost: everything is O(vocab) with small constants. Only the surviving candidates are ever sorted:
top-k takes them with `np.argpartition`; top-p without top-k grows a partial selection until it holds
the nucleus, and min-p cuts by a threshold. The draw from the candidates (their softmax, then the
inverse CDF at a uniform from the request's generator) is one C++ pass (`_C.softmax_draw`,
cpu/sampling.h): in numpy the exponentials and the block sums of a 49k vocabulary took 60 us of a
65 us token. See benchmarks/bench_sampling.py.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import _C

__all__ = ["Sampler", "SamplingParams", "TopLogits", "json_schema_of"]

# Candidates a summary holds for top-p / min-p without a smaller top-k (more: the whole row is fetched).
TOP_P_CANDIDATES = 128


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. The defaults sample from the model's plain distribution."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed
    stop: Sequence[str] = ()  # strings that end generation; they are not part of the output
    stop_token_ids: Sequence[int] = ()  # ids that end generation, besides the model's end-of-generation ids
    ignore_eos: bool = False  # keep going past the model's end-of-generation ids
    logprobs: int | None = None  # record each token's log-probability and the top-N alternatives (0-20)
    # Constrained output, OpenAI's (and llama-cpp-python's) shape: {"type": "json_object"}, or
    # {"type": "json_schema", "json_schema": {"schema": {...}}}; {"type": "text"} or None: free text.
    response_format: dict | None = None
    # transformers' ForcedBOS/ForcedEOSTokenLogitsProcessor (BART, mBART): the first generated token of a one-token
    # prompt (an encoder-decoder's decoder start) is forced_bos_token_id, and the token that reaches
    # max_new_tokens is forced_eos_token_id. None: not forced.
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    # transformers' MinLength / MinNewTokensLengthLogitsProcessor: the end ids are suppressed while the sequence
    # (prompt included: an encoder-decoder's decoder start counts) is shorter than min_length, or, when
    # min_new_tokens is set, while fewer than min_new_tokens tokens were generated (it replaces min_length).
    min_length: int = 0
    min_new_tokens: int | None = None

    def ends_suppressed(self, n_prompt: int, n_generated: int) -> bool:
        """Whether the end ids are banned from the next token after `n_generated` tokens of an `n_prompt`-token
        prompt (transformers' min_length / min_new_tokens)."""
        if self.min_new_tokens is not None:
            return n_generated < self.min_new_tokens
        return n_prompt + n_generated < self.min_length

    def forced_token(self, n_prompt: int, n_generated: int) -> int | None:
        """The token the next step must take after `n_generated` tokens of an `n_prompt`-token prompt, as
        transformers forces it at cur_len == 1 (BOS) and cur_len == max_length - 1 (EOS); None: any."""
        if self.forced_bos_token_id is not None and n_prompt + n_generated == 1:
            return self.forced_bos_token_id
        if self.forced_eos_token_id is not None and n_generated == self.max_new_tokens - 1:
            return self.forced_eos_token_id
        return None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            # Bounded so that penalised float32 logits stay finite (a logit of 1e4 times 1e4).
            (1e-4 <= self.repetition_penalty <= 1e4, "repetition_penalty must be in [1e-4, 1e4]"),
            (self.seed is None or self.seed >= 0, "seed must be None or >= 0"),
            (all(math.isfinite(v) for v in (self.presence_penalty, self.frequency_penalty)),
             "presence_penalty and frequency_penalty must be finite"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be None or in [0, 20]"),
            (all(t is None or t >= 0 for t in (self.forced_bos_token_id, self.forced_eos_token_id)),
             "forced_bos_token_id and forced_eos_token_id must be None or >= 0"),
            (self.min_length >= 0 and (self.min_new_tokens is None or self.min_new_tokens >= 0),
             "min_length and min_new_tokens must be >= 0"),
        ]
        if self.response_format is not None:
            json_schema_of(self.response_format)  # raises on a malformed one
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}, got {self}")


def json_schema_of(response_format: dict | None) -> tuple[bool, dict | None]:
    """(constrained?, schema) of a response_format: json_object is (True, None), any JSON object."""
    if response_format is None:
        return False, None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError('response_format json_schema needs {"json_schema": {"schema": {...}}}')
        return True, schema
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', not {kind!r}")


@dataclass
class TopLogits:
    """A row of logits as the engine hands it to sampling (`Engine.decode_top`): its `ids` and `values`,
    largest first (equal values: lower id first); `weight_sum`, the whole row's sum of
    e^((x - max) * inv_t) at the inverse temperature asked (0: not asked); `n_vocab`; `full()`, which
    copies the whole row (from the GPU when the output layer ran there); and `drawn`, the token the
    engine drew from the whole row at the temperature and uniform number asked (-1: none asked)."""

    ids: np.ndarray
    values: np.ndarray
    weight_sum: float
    n_vocab: int
    full: Callable[[], np.ndarray]
    drawn: int = -1

    @classmethod
    def of(cls, row: np.ndarray, k: int, inv_t: float = 0.0, u: float = -1.0) -> "TopLogits":
        """The summary of a row already on the host (the C++ ops on the CPU), as `Engine.decode_top`
        gives it for the request (k, inv_t, u)."""
        row = np.ascontiguousarray(row, dtype=np.float32).reshape(-1)
        k = max(1, min(int(k), row.size))
        draw = u >= 0
        ids, values, stats = _C.top_logits(row[None], np.array([k], np.int32),
                                           np.array([0.0 if draw else inv_t], np.float32), k)
        if stats[0, 1]:
            raise ValueError("TopLogits.of: the row holds a NaN or an infinity")
        drawn = _C.softmax_draw(row, float(inv_t), float(u)) if draw else -1
        return cls(ids[0], values[0], float(stats[0, 0]), row.size, lambda: row, drawn)


class Sampler:
    """Picks token ids for one request; owns the request's random generator (seeded by `params.seed`)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._u: float | None = None  # the next draw's uniform number, taken early by `request`

    def request(self, n_vocab: int, generated: Sequence[int] = (),
                prompt: Sequence[int] = ()) -> tuple[int, float, float]:
        """(k, inv_t, u) of the `TopLogits` to ask the engine for (`Engine.decode_top`): the k largest
        logits of the next row and its weight sum at inv_t (0: not needed); for plain sampling over the
        whole vocabulary also the token the engine draws at inv_t with u, this sampler's next uniform
        number, which `__call__` then takes (u < 0: no draw). (1, 0, -1) when the whole row will be
        needed anyway."""
        p = self.params
        if p.temperature == 0 or self._penalizes(generated, prompt):
            return 1, 0.0, -1.0
        if self._whole_row(n_vocab, generated, prompt):
            return 1, float(self._inv_t()), self._next_u()
        if 0 < p.top_k < n_vocab:
            return (p.top_k, 0.0, -1.0) if p.top_k <= _C.top_logits_max else (1, 0.0, -1.0)
        # top-p or min-p
        return min(TOP_P_CANDIDATES, n_vocab), float(self._inv_t()) if p.top_p < 1 else 0.0, -1.0

    def __call__(self, logits: np.ndarray | TopLogits, generated: Sequence[int] = (),
                 prompt: Sequence[int] = ()) -> int:
        """The next token id, given float32 `logits` over the vocabulary (or their `TopLogits`) and the
        ids so far."""
        if self.params.temperature == 0:
            return self._greedy(logits, generated, prompt)
        u = self._next_u()
        self._u = None
        if isinstance(logits, TopLogits) and logits.drawn >= 0 and self._whole_row(logits.n_vocab, generated, prompt):
            return logits.drawn  # drawn by the engine with u, as below
        ids, cand = self._pool(logits, generated, prompt)
        i = _C.softmax_draw(cand, float(self._inv_t()), u)
        return int(ids[i]) if ids is not None else i

    def _next_u(self) -> float:
        """The uniform number of the next draw: one per sampled token, whichever side draws it."""
        if self._u is None:
            self._u = float(self.rng.random())
        return self._u

    def _whole_row(self, n_vocab: int, generated: Sequence[int], prompt: Sequence[int]) -> bool:
        """Whether the next draw is over the whole row as it is: the engine can draw it (`request`)."""
        p = self.params
        return (p.temperature != 0 and not self._penalizes(generated, prompt) and not 0 < p.top_k < n_vocab
                and p.top_p >= 1 and p.min_p <= 0)

    def distribution(
        self, logits: np.ndarray | TopLogits, generated: Sequence[int] = (), prompt: Sequence[int] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) that `__call__` draws from, most likely first; for tests and inspection."""
        if self.params.temperature == 0:
            return np.array([self._greedy(logits, generated, prompt)]), np.ones(1)
        ids, cand = self._pool(logits, generated, prompt)
        ids = np.arange(cand.size) if ids is None else ids
        weights = np.exp((cand - cand.max()) * self._inv_t())
        order = np.argsort(-weights, kind="stable")
        return ids[order], weights[order] / weights.sum(dtype=np.float64)

    def _penalizes(self, generated: Sequence[int], prompt: Sequence[int]) -> bool:
        p = self.params
        return bool((p.repetition_penalty != 1.0 and (len(generated) or len(prompt)))
                    or ((p.presence_penalty or p.frequency_penalty) and len(generated)))

    def _greedy(self, logits: np.ndarray | TopLogits, generated: Sequence[int], prompt: Sequence[int]) -> int:
        if isinstance(logits, TopLogits):
            if not self._penalizes(generated, prompt):
                return int(logits.ids[0])
            logits = logits.full()
        return int(np.argmax(self.penalized(logits, generated, prompt)))

    def _pool(self, logits: np.ndarray | TopLogits, generated: Sequence[int],
              prompt: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray]:
        """(ids, logits) of the candidates of the next draw, from a summary when it holds them all."""
        if isinstance(logits, TopLogits):
            found = None if self._penalizes(generated, prompt) else self._from_top(logits)
            if found is not None:
                return found
            logits = logits.full()
        return self._candidates(self.penalized(logits, generated, prompt))

    def _from_top(self, top: TopLogits) -> tuple[np.ndarray, np.ndarray] | None:
        """`_candidates` of the row that `top` summarises, or None when they may reach past it."""
        p = self.params
        if 0 < p.top_k < top.n_vocab:
            if top.ids.size < p.top_k:
                return None
            ids, x = top.ids[: p.top_k], top.values[: p.top_k]
            if p.top_p >= 1 and p.min_p <= 0:
                return ids, x
            keep = self._keep(x, presorted=True)
            return ids[keep], x[keep]
        if p.top_p >= 1 and p.min_p <= 0:
            return None  # the whole vocabulary
        ids, x = top.ids, top.values
        whole = ids.size >= top.n_vocab
        if not whole:
            if p.min_p > 0:  # every logit above the cut is here when the last one is below it
                if x[-1] >= self._min_p_cut(x[0]):
                    return None
            elif np.exp((x - x[0]) * self._inv_t()).sum(dtype=np.float64) < p.top_p * top.weight_sum:
                return None  # the nucleus reaches past these
        keep = self._keep(x, None if whole else top.weight_sum, presorted=True)
        return ids[keep], x[keep]

    def penalized(self, logits: np.ndarray, generated: Sequence[int] = (), prompt: Sequence[int] = ()) -> np.ndarray:
        """`logits` after the repetition, presence and frequency penalties (a copy when any applies)."""
        p = self.params
        x = np.asarray(logits, dtype=np.float32)
        rep = p.repetition_penalty != 1.0 and (len(generated) or len(prompt))
        openai = (p.presence_penalty or p.frequency_penalty) and len(generated)
        if not (rep or openai):
            return x
        x = x.copy()
        out = np.asarray(generated, np.int64)
        # Fancy indexing with repeated ids: reads see the original value and `x[ids] op= c` applies
        # once per distinct id, which is what repetition and presence penalties want; the frequency
        # penalty counts repeats, so it goes through np.add.at.
        if rep:
            seen = np.concatenate([np.asarray(prompt, np.int64), out])
            v = x[seen]
            x[seen] = np.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty)
        if openai:
            if p.frequency_penalty:
                np.add.at(x, out, np.float32(-p.frequency_penalty))
            if p.presence_penalty:
                x[out] -= np.float32(p.presence_penalty)
        return x

    def _inv_t(self) -> np.float32:
        """1 / temperature, capped: a tiny positive temperature (1e-300) would make inf, and 0 * inf a NaN
        at the maximum."""
        t = self.params.temperature
        return np.float32(min(1.0 / t, 1e30)) if t > 1e-30 else np.float32(1e30)

    def _candidates(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Token ids left after top-k, top-p and min-p (None: the whole vocabulary, in id order) and their
        logits, largest first (equal logits: lower id first); each one's probability is proportional to
        e^((logit - max) / temperature)."""
        p = self.params
        ids = None
        if 0 < p.top_k < x.size:
            ids = self._top_k(x, p.top_k)
            ids = ids[np.lexsort((ids, -x[ids]))]
            x = x[ids]
        if p.top_p >= 1 and p.min_p <= 0:
            return ids, x
        keep = self._keep(x, presorted=ids is not None)
        return (keep if ids is None else ids[keep]), x[keep]

    def _min_p_cut(self, top: float) -> float:
        """The logit below which min-p drops a token, for a row whose largest logit is `top`:
        p_i >= min_p * p_max  <=>  x_i >= top + T * log(min_p)."""
        return top + self.params.temperature * np.log(self.params.min_p)

    def _keep(self, x: np.ndarray, total: float | None = None, presorted: bool = False) -> np.ndarray:
        """Indices into logits `x` of what top-p and min-p leave, largest first (equal: lower index first).
        total: what top-p normalizes by (None: the weights of x: top-k's, or everything). presorted: x is
        already in that order (a top-k set, or a summary's prefix)."""
        p = self.params
        top = x[0] if presorted else x.max()
        min_p_cut = self._min_p_cut(top) if p.min_p > 0 else None
        if p.top_p < 1:
            weights = np.exp((x - top) * self._inv_t())
            if total is None:
                total = float(weights.sum(dtype=np.float64))
            if min_p_cut is not None:
                pool = np.flatnonzero(x >= min_p_cut)
            elif presorted:
                pool = np.arange(x.size)
            else:
                pool = self._nucleus_pool(weights, total, p.top_p)
            order = pool if presorted else pool[np.argsort(-x[pool], kind="stable")]
            # Keep a token while the probability before it is below top_p (transformers' rule).
            # float64: over thousands of tokens float32 sums drift across the boundary.
            before = np.cumsum(weights[order], dtype=np.float64) - weights[order]
            return order[before < p.top_p * total]
        keep = np.flatnonzero(x >= min_p_cut)
        return keep if presorted else keep[np.argsort(-x[keep], kind="stable")]

    @staticmethod
    def _top_k(x: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k largest logits, in no order.

        A partition of the whole vocabulary is the slow part; the k largest are almost always within
        a few units of the maximum, so partition only the logits above a cut when it leaves k of them.
        """
        top = x.max()
        for width in (8.0, 32.0):
            near = np.flatnonzero(x >= top - width)
            if near.size >= k:
                return near[np.argpartition(x[near], near.size - k)[near.size - k :]]
        return np.argpartition(x, x.size - k)[x.size - k :]

    @staticmethod
    def _nucleus_pool(weights: np.ndarray, total: float, top_p: float) -> np.ndarray:
        """Indices of a set of the heaviest weights that is sure to hold the top-p nucleus.

        Tokens under a weight w carry at most n * w of mass, so everything at or above
        (1 - top_p) * total / n holds at least top_p of it. Try tighter cuts first: they are
        usually enough and leave fewer tokens to sort.
        """
        n = weights.size
        for cut in (1e-3, 1e-5):
            pool = np.flatnonzero(weights >= cut * total)
            if weights[pool].sum(dtype=np.float64) >= top_p * total:
                return pool
        return np.flatnonzero(weights >= (1 - top_p) * total / n)
