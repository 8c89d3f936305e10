"""Beam search over the engine's KV cache: each beam is a sequence of one context, and reordering
the beams after a step is a `seq_copy` of its parent (pages shared until they diverge, so a fork
costs a page-table copy), as llama.cpp's beam search and vLLM do.

The selection rules are transformers' `generate(num_beams=...)` (its `_beam_search`), step for step,
so results are equal token for token: the top max(2, 1 + #eos) x num_beams continuations over all
beams by accumulated log-probability; candidates that end (an end id, or the length limit) among the
first num_beams become finished hypotheses scored by sum_logprobs / generated_length ** length_penalty;
the others continue; `early_stopping` (True, False, "never") decides when the search stops. Every
ranking is torch.topk's, equal scores included (pyengine.topk), and costs a pass over the scores plus a
heap of a few candidates, not a sort of beams x vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .topk import topk as _topk

if TYPE_CHECKING:
    from .engine import Engine

NEG = np.float32(-1.0e9)


@dataclass
class BeamHypothesis:
    token_ids: list[int]  # generated tokens (the end id included when the beam ended on one)
    score: float          # sum of log-probabilities / generated_length ** length_penalty


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class _NGrams:
    """transformers' NoRepeatNGramLogitsProcessor, kept up to date a token at a time: for each beam, the tokens
    that followed each (n-1)-token prefix so far. A beam's table is its parent's plus the n-gram its new token
    closes (a shallow dict copy: the values are tuples)."""

    def __init__(self, n: int, seqs: Sequence[Sequence[int]]):
        self.n = n
        self.tables = [self._table(s) for s in seqs]

    def _table(self, seq: Sequence[int]) -> dict[tuple[int, ...], tuple[int, ...]]:
        table: dict[tuple[int, ...], tuple[int, ...]] = {}
        for i in range(len(seq) - self.n + 1):
            key = tuple(seq[i:i + self.n - 1])
            table[key] = table.get(key, ()) + (seq[i + self.n - 1],)
        return table

    def banned(self, b: int, seq: Sequence[int]) -> tuple[int, ...]:
        """Tokens that would repeat an n-gram of beam b's `seq`."""
        if len(seq) + 1 < self.n:
            return ()
        return self.tables[b].get(tuple(seq[len(seq) - self.n + 1:]), ())

    def advance(self, parents: Sequence[int], seqs: Sequence[Sequence[int]]) -> None:
        """The beams are now `seqs`, each its parent's sequence plus one token."""
        tables = []
        for parent, seq in zip(parents, seqs):
            table = self.tables[parent].copy()
            if len(seq) >= self.n:
                key = tuple(seq[len(seq) - self.n:-1])
                table[key] = table.get(key, ()) + (seq[-1],)
            tables.append(table)
        self.tables = tables


def beam_search(engine: "Engine", prompt: Sequence[int], num_beams: int, max_new_tokens: int,
                eos_ids: Sequence[int], length_penalty: float = 1.0, early_stopping: bool | str = False,
                no_repeat_ngram_size: int = 0, num_return_sequences: int = 1,
                encoder_input: Sequence[int] | None = None, forced_bos_token_id: int | None = None,
                forced_eos_token_id: int | None = None, min_length: int = 0,
                min_new_tokens: int | None = None) -> list[BeamHypothesis]:
    """The `num_return_sequences` best hypotheses, best first. `encoder_input`: an encoder-decoder's input
    (its encoder output is shared by every beam through seq_copy); `prompt` is then the decoder's start.
    forced_bos_token_id / forced_eos_token_id: transformers' forced first token (at length 1) and forced
    token at max_length - 1, whose log-probability becomes 0 and every other's -inf (its logits processors).
    min_length / min_new_tokens: the end ids are -inf while the sequence (prompt included) is shorter than
    min_length, or, when min_new_tokens is set (it replaces min_length), fewer tokens than that were generated."""
    if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
        raise ValueError("need num_beams >= 1 and 1 <= num_return_sequences <= num_beams")
    if early_stopping not in (True, False, "never"):
        raise ValueError("early_stopping must be True, False or 'never'")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("beam search needs a non-empty prompt")
    k, p_len = num_beams, len(prompt)
    max_length = p_len + max(0, int(max_new_tokens))
    eos = set(int(t) for t in eos_ids)
    eos_list = sorted(eos)
    keep = max(2, 1 + len(eos)) * k
    ctx = engine.new_context(n_ctx=max(max_length + 1, len(encoder_input or ())), n_seq_max=2 * k)
    if encoder_input is not None:
        ctx.encode(encoder_input, 0)
    slots, spare = list(range(k)), list(range(k, 2 * k))

    running = [list(prompt) for _ in range(k)]
    running_scores = np.full(k, NEG, np.float32)
    running_scores[0] = 0.0
    finished: list[list[int]] = [list(prompt) for _ in range(k)]
    finished_scores = np.full(k, NEG, np.float32)
    is_finished = np.zeros(k, bool)
    unsatisfied = True
    cur_len = p_len
    if max_length <= p_len:
        return [BeamHypothesis([], 0.0)]

    logits = ctx.decode(prompt, [0] * p_len, np.arange(p_len) == p_len - 1)  # [1, V]
    logits = np.repeat(logits, k, axis=0)  # every beam holds the prompt (beams 1.. score -1e9)
    for j in range(1, k):  # and may be a parent: when forced tokens leave every other score -inf, they are
        ctx.seq_copy(0, slots[j])
    ngrams = _NGrams(no_repeat_ngram_size, running) if no_repeat_ngram_size > 0 else None
    while True:
        log_probs = _log_softmax(logits)
        if ngrams is not None:
            for b in range(k):
                banned = ngrams.banned(b, running[b])
                if banned:
                    log_probs[b, list(banned)] = -np.inf
        if eos and (cur_len - p_len < min_new_tokens if min_new_tokens is not None else cur_len < min_length):
            log_probs[:, eos_list] = -np.inf
        forced = (forced_bos_token_id if cur_len == 1 else None) if forced_bos_token_id is not None else None
        if forced is None and forced_eos_token_id is not None and cur_len == max_length - 1:
            forced = forced_eos_token_id
        if forced is not None:
            log_probs[:] = -np.inf
            log_probs[:, forced] = 0.0
        acc = (log_probs + running_scores[:, None]).reshape(-1)
        vocab = log_probs.shape[1]
        top = _topk(acc, keep)
        top_lp, parents, tokens = acc[top], top // vocab, top % vocab
        top_seqs = [running[p] + [int(t)] for p, t in zip(parents, tokens)]
        hits = np.array([int(t) in eos or cur_len + 1 >= max_length for t in tokens])

        # Beams that go on: the best num_beams candidates that did not just end.
        go_on = _topk(top_lp + hits.astype(np.float32) * NEG, k)
        new_running = [top_seqs[i] for i in go_on]
        new_scores = (top_lp + hits.astype(np.float32) * NEG)[go_on]
        new_parents = parents[go_on]

        # Finished hypotheses: candidates among the first num_beams that ended, if they beat the worst kept.
        just_done = hits & (np.arange(keep) < k)
        scored = (top_lp / np.float32((cur_len + 1 - p_len) ** length_penalty)).astype(np.float32)
        if early_stopping is True and is_finished.all():
            scored = scored + NEG
        if not unsatisfied:
            scored = scored + NEG
        scored = scored + (~just_done).astype(np.float32) * NEG
        merged_scores = np.concatenate([finished_scores, scored])
        merged = finished + top_seqs
        merged_done = np.concatenate([is_finished, just_done])
        best = _topk(merged_scores, k)
        finished = [merged[i] for i in best]
        finished_scores = merged_scores[best]
        is_finished = merged_done[best]

        running, running_scores = new_running, new_scores.astype(np.float32)
        if ngrams is not None:
            ngrams.advance([int(p) for p in new_parents], running)
        cur_len += 1
        hyp_len = (max_length if early_stopping == "never" and length_penalty > 0 else cur_len) - p_len
        best_running = running_scores[0] / np.float32(hyp_len ** length_penalty)
        worst_done = np.where(is_finished, finished_scores.min(), NEG)
        unsatisfied = bool(unsatisfied and np.any(best_running > worst_done))
        if not unsatisfied or (early_stopping is True and is_finished.all()) or hits.all():
            break
        # Reorder the cache: beam j continues its parent's sequence with its new token.
        for j, parent in enumerate(new_parents):
            ctx.seq_copy(slots[int(parent)], spare[j])
        slots, spare = spare, slots
        logits = ctx.decode([s[-1] for s in running], slots)

    return [BeamHypothesis(finished[i][p_len:], float(finished_scores[i])) for i in range(num_return_sequences)]
