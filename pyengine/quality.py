"""Perplexity and KL divergence with llama-perplexity's protocol (llama.cpp tools/perplexity).

Perplexity: the whole text is tokenized once, with BOS if the model adds one. It is cut into
non-overlapping chunks of ``n_ctx`` tokens (a trailing partial chunk is dropped); each chunk is evaluated
in a fresh context, its first token replaced by BOS when the model adds BOS, and only the second half is
scored: the logits at positions ``n_ctx//2 .. n_ctx-2`` predict tokens ``n_ctx//2+1 .. n_ctx-1``, so every
scored token has at least half a window of context. ``PPL = exp(mean NLL)``; its uncertainty is
llama.cpp's ``PPL * sqrt(var(NLL) / (count - 1))``.

KL divergence: a base model (usually F16) saves its tokens and log-probabilities once
(`save_kl_base`); a quantized model is then evaluated on the same tokens and compared token by token
(`kl_divergence`): mean KL(base || model), top-1 agreement, ln(PPL ratio).

The base file is llama.cpp's ``--kl-divergence-base`` format, so files are interchangeable with
llama-perplexity (all integers little-endian int32):

    "_logits_"  n_ctx  n_vocab  n_chunk  tokens[n_chunk * n_ctx]
    then for each chunk, for each of its n_ctx - 1 - n_ctx//2 scored positions, nv = 2*((n_vocab+1)//2) + 4
    uint16: two float32 (scale, min_log_prob) followed by n_vocab uint16 q, log p[i] = scale*q[i] + min_log_prob.

The uint16 code spans [max_logit - 16, max_logit] (log-probs more than 16 nats below the top are clamped
to the bottom and ignored in the KL sum), a step of 16/65535 nats: 2 bytes per vocabulary entry, like
float16, with a uniform absolute error of at most 1.2e-4 nats.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["PerplexityResult", "KLResult", "tokenize_text", "perplexity", "perplexity_of_tokens",
           "save_kl_base", "kl_divergence", "log_softmax", "KL_MAGIC"]

KL_MAGIC = b"_logits_"
KL_LOGPROB_RANGE = 16.0   # llama.cpp: log-probs below max - 16 are clamped (and skipped in the KL sum)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (llama.cpp sums exp in double)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def mean_and_uncertainty(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """Mean and standard error of the mean from running sums (llama.cpp's ``mean_and_uncertainty``)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total_sq / count - mean * mean
    return mean, (math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0)


@dataclass
class PerplexityResult:
    """What `perplexity` measured. ``ppl`` and ``uncertainty`` are llama-perplexity's "Final estimate"."""
    ppl: float
    uncertainty: float
    n_ctx: int
    n_chunks: int
    n_scored: int                                   # tokens scored: n_chunks * (n_ctx - 1 - n_ctx//2)
    n_text_tokens: int                              # tokens in the whole text
    running: list[float] = field(default_factory=list)   # the estimate after each chunk ([1]x,[2]y,...)
    seconds: float = 0.0

    def final_line(self) -> str:
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.uncertainty:.5f}"


@dataclass
class KLResult:
    """Comparison of a model against a saved base (llama-perplexity --kl-divergence)."""
    count: int
    ppl: float
    ppl_unc: float
    ppl_base: float
    ppl_base_unc: float
    ln_ppl_ratio: float
    ln_ppl_ratio_unc: float
    kld: float
    kld_unc: float
    kld_values: np.ndarray                          # per scored token
    same_top: float                                 # fraction of tokens whose argmax agrees with the base
    same_top_unc: float
    rms_dp: float                                   # RMS of p(token) - p_base(token)
    rms_dp_unc: float

    def report(self) -> str:
        k = np.sort(self.kld_values)
        pct = lambda f: float(np.quantile(k, f)) if k.size else 0.0  # noqa: E731 (linear, like llama.cpp)
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {self.ppl:10.6f} ± {self.ppl_unc:10.6f}",
            f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_unc:10.6f}",
            f"Mean ln(PPL(Q)/PPL(base))     : {self.ln_ppl_ratio:10.6f} ± {self.ln_ppl_ratio_unc:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {math.exp(self.ln_ppl_ratio):10.6f} ± "
            f"{math.exp(self.ln_ppl_ratio) * self.ln_ppl_ratio_unc:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.kld:10.6f} ± {self.kld_unc:10.6f}",
            f"Maximum KLD: {pct(1.0):10.6f}",
            f"99.0%   KLD: {pct(0.99):10.6f}",
            f"Median  KLD: {pct(0.5):10.6f}",
            f"Minimum KLD: {pct(0.0):10.6f}",
            "",
            "====== Token probability statistics ======",
            f"RMS Δp    : {100 * self.rms_dp:6.3f} ± {100 * self.rms_dp_unc:5.3f} %",
            f"Same top p: {100 * self.same_top:6.3f} ± {100 * self.same_top_unc:5.3f} %",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "kld_values"}
        d["kld_median"] = float(np.median(self.kld_values)) if self.kld_values.size else 0.0
        d["kld_p99"] = float(np.quantile(self.kld_values, 0.99)) if self.kld_values.size else 0.0
        return d


# --- tokens and chunks ---------------------------------------------------------------------------------

def _tokenizer(llm: "Engine"):
    from .tokenizer import Tokenizer

    return Tokenizer.from_metadata(llm.metadata)


def tokenize_text(llm: "Engine", text: str) -> tuple[np.ndarray, int | None]:
    """The text's tokens (with BOS when the model adds it) and the BOS id to put at each chunk's start
    (None when the model adds no BOS), as llama-perplexity's ``common_tokenize(ctx, text, true)``."""
    tok = _tokenizer(llm)
    ids = np.asarray(tok.encode(text, add_special_tokens=True), dtype=np.int32)
    return ids, (tok.bos_id if tok.add_bos else None)


def _check_length(n_tokens: int, n_ctx: int) -> None:
    if n_ctx < 4:
        raise ValueError(f"context size {n_ctx} is too small (need at least 4 tokens per chunk)")
    if n_tokens < 2 * n_ctx:
        raise ValueError(f"the text tokenizes to only {n_tokens} tokens; perplexity with a context of {n_ctx} "
                         f"needs at least {2 * n_ctx}")


def _n_chunks(n_tokens: int, n_ctx: int, n_chunks: int | None) -> int:
    n_max = n_tokens // n_ctx
    return n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)


def _chunk_logits(llm: "Engine", tokens: np.ndarray, i: int, n_ctx: int, bos: int | None) -> np.ndarray:
    """Logits of chunk ``i`` at the scored positions: float32 [n_ctx - 1 - n_ctx//2, n_vocab]. Only those
    rows are computed and returned, so a chunk holds half a window of logits, not a whole one."""
    chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
    if bos is not None:
        chunk[0] = bos
    want = np.zeros(n_ctx, dtype=bool)
    want[n_ctx // 2:n_ctx - 1] = True
    llm.reset()
    return llm.decode(chunk, np.zeros(n_ctx, dtype=np.int32), logits=want)


# Rows per block of the float64 work on a chunk's logits: the temporaries of log_softmax are a few
# [ROW_BLOCK, n_vocab] float64 arrays (~13 MB each for a 49k vocabulary), whatever the chunk size.
ROW_BLOCK = 32


def _row_blocks(n_rows: int) -> Iterator[slice]:
    for start in range(0, n_rows, ROW_BLOCK):
        yield slice(start, min(start + ROW_BLOCK, n_rows))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[row, target] per row, float64, computed ROW_BLOCK rows at a time."""
    out = np.empty(len(targets), dtype=np.float64)
    for b in _row_blocks(len(targets)):
        out[b] = -log_softmax(logits[b])[np.arange(b.stop - b.start), targets[b]]
    return out


def _context_for(llm: "Engine", n_ctx: int) -> "Engine":
    return llm if llm.n_ctx >= n_ctx else llm.new_context(n_ctx=n_ctx)


# --- perplexity ----------------------------------------------------------------------------------------

def perplexity_of_tokens(llm: "Engine", tokens: np.ndarray, bos: int | None, n_ctx: int = 512,
                         n_chunks: int | None = None, on_chunk: Callable[[int, float], None] | None = None,
                         kl_base_out: BinaryIO | None = None) -> PerplexityResult:
    """Perplexity of already tokenized text (see the module docstring for the protocol).

    on_chunk(i, running_ppl) is called after each chunk (1-based i). With ``kl_base_out`` the tokens and
    log-probs are also written there in the KL base format.
    """
    import time

    tokens = np.asarray(tokens, dtype=np.int32)
    _check_length(tokens.size, n_ctx)
    n = _n_chunks(tokens.size, n_ctx, n_chunks)
    ctx = _context_for(llm, n_ctx)
    first = n_ctx // 2
    n_vocab = ctx.n_vocab
    if kl_base_out is not None:
        kl_base_out.write(KL_MAGIC)
        kl_base_out.write(np.array([n_ctx, n_vocab, n], dtype="<i4").tobytes())
        kl_base_out.write(tokens[:n * n_ctx].astype("<i4").tobytes())
    nll = nll2 = 0.0
    count = 0
    running: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        logits = _chunk_logits(ctx, tokens, i, n_ctx, bos)
        targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
        v = token_nll(logits, targets)
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += v.size
        if kl_base_out is not None:
            for b in _row_blocks(len(targets)):
                kl_base_out.write(encode_logprobs(logits[b]).tobytes())
        running.append(math.exp(nll / count))
        if on_chunk is not None:
            on_chunk(i + 1, running[-1])
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    unc = ppl * math.sqrt(var / (count - 1)) if var > 0 else 0.0
    return PerplexityResult(ppl=ppl, uncertainty=unc, n_ctx=n_ctx, n_chunks=n, n_scored=count,
                            n_text_tokens=int(tokens.size), running=running, seconds=time.perf_counter() - t0)


def perplexity(llm: "Engine", text: str, n_ctx: int = 512, n_chunks: int | None = None,
               on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Perplexity of ``text`` under ``llm`` with llama-perplexity's protocol (chunks of ``n_ctx`` tokens,
    second half of each chunk scored). ``n_chunks`` limits the number of chunks (default: all).
    Uses ``llm``'s context if it holds ``n_ctx`` tokens, else another context on the same weights."""
    tokens, bos = tokenize_text(llm, text)
    return perplexity_of_tokens(llm, tokens, bos, n_ctx, n_chunks, on_chunk)


# --- KL divergence -------------------------------------------------------------------------------------

def _nv(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def _nearest_int(x: np.ndarray) -> np.ndarray:
    # llama.cpp's nearest_int adds 1.5*2^23: round half to even, as np.rint does
    return np.rint(x).astype(np.int64)


def encode_logprobs(logits: np.ndarray) -> np.ndarray:
    """Rows of logits -> llama.cpp's uint16 log-prob records ([rows, nv] uint16), see the module docstring."""
    logits = np.asarray(logits, dtype=np.float32)
    rows, n_vocab = logits.shape
    out = np.zeros((rows, _nv(n_vocab)), dtype="<u2")
    max_logit = logits.max(axis=1)
    min_logit = np.maximum(logits.min(axis=1), max_logit - np.float32(KL_LOGPROB_RANGE))
    log_sum_exp = np.log(np.exp(logits.astype(np.float64) - max_logit[:, None]).sum(axis=1)).astype(np.float32)
    min_log_prob = (min_logit - max_logit - log_sum_exp).astype(np.float32)
    scale = ((max_logit - min_logit) / np.float32(65535)).astype(np.float32)
    header = np.stack([scale, min_log_prob], axis=1).astype("<f4")
    out[:, :4] = header.view("<u2")
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    q = _nearest_int(inv[:, None] * (logits - min_logit[:, None]))
    q = np.where(logits > min_logit[:, None], q, 0)
    out[:, 4:4 + n_vocab] = np.clip(q, 0, 65535).astype("<u2")
    return out


def decode_logprobs(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """uint16 records [rows, nv] -> float32 log-probs [rows, n_vocab]."""
    header = np.ascontiguousarray(records[:, :4]).view("<f4")
    scale, min_log_prob = header[:, 0:1], header[:, 1:2]
    return scale * records[:, 4:4 + n_vocab].astype(np.float32) + min_log_prob


def save_kl_base(llm: "Engine", text: str, path: str | os.PathLike, n_ctx: int = 512, n_chunks: int | None = None,
                 on_chunk: Callable[[int, float], None] | None = None) -> PerplexityResult:
    """Evaluate the base model's perplexity on ``text`` and save its tokens and log-probs to ``path``
    (llama.cpp's --kl-divergence-base format). About n_chunks * n_ctx/2 * n_vocab * 2 bytes."""
    tokens, bos = tokenize_text(llm, text)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            result = perplexity_of_tokens(llm, tokens, bos, n_ctx, n_chunks, on_chunk, kl_base_out=f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def _read_kl_header(f: BinaryIO, path: Path) -> tuple[int, int, int, np.ndarray]:
    if f.read(8) != KL_MAGIC:
        raise ValueError(f"{path} is not a KL divergence base file (no '_logits_' header)")
    head = np.frombuffer(f.read(12), dtype="<i4")
    if head.size != 3:
        raise ValueError(f"{path}: truncated header")
    n_ctx, n_vocab, n_chunk = (int(v) for v in head)
    tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype="<i4")
    if tokens.size != n_ctx * n_chunk:
        raise ValueError(f"{path}: truncated token list")
    return n_ctx, n_vocab, n_chunk, tokens.astype(np.int32)


def kl_divergence(llm: "Engine", base_path: str | os.PathLike, n_chunks: int | None = None,
                  on_chunk: Callable[[int, "KLResult"], None] | None = None) -> KLResult:
    """Compare ``llm`` against a base file written by `save_kl_base` (or llama-perplexity
    --kl-divergence-base) on the tokens stored in it: KL(base || llm) per scored token, as llama.cpp."""
    path = Path(base_path)
    tok = _tokenizer(llm)
    bos = tok.bos_id if tok.add_bos else None
    with open(path, "rb") as f:
        n_ctx, n_vocab, n_chunk, tokens = _read_kl_header(f, path)
        if n_vocab != llm.n_vocab:
            raise ValueError(f"{path}: vocabulary of {n_vocab} tokens, but the model has {llm.n_vocab}")
        n = n_chunk if n_chunks is None or n_chunks < 0 else min(n_chunks, n_chunk)
        ctx = _context_for(llm, n_ctx)
        first = n_ctx // 2
        rows = n_ctx - 1 - first
        nv = _nv(n_vocab)
        s = dict.fromkeys(["nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2",
                           "dp", "dp2", "dp4"], 0.0)
        same_top = 0
        kld_all: list[np.ndarray] = []
        result = None
        for i in range(n):
            raw = np.frombuffer(f.read(rows * nv * 2), dtype="<u2")
            if raw.size != rows * nv:
                raise ValueError(f"{path}: truncated log-probs for chunk {i + 1}")
            records = raw.reshape(rows, nv)
            logits = _chunk_logits(ctx, tokens, i, n_ctx, bos)
            targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
            kld = np.empty(rows, dtype=np.float64)
            for b in _row_blocks(rows):
                base_logp = decode_logprobs(records[b], n_vocab)
                idx = np.arange(b.stop - b.start)
                logp = log_softmax(logits[b])
                nll = -logp[idx, targets[b]]
                nll_base = -base_logp[idx, targets[b]].astype(np.float64)
                keep = base_logp > -KL_LOGPROB_RANGE
                p_base = np.where(keep, np.exp(base_logp.astype(np.float64)), 0.0)
                kld[b] = (p_base * np.where(keep, base_logp - logp, 0.0)).sum(axis=1)
                same_top += int((logits[b].argmax(axis=1) == base_logp.argmax(axis=1)).sum())
                dp = np.exp(-nll) - np.exp(-nll_base)
                s["nll"] += nll.sum(); s["nll2"] += (nll * nll).sum()  # noqa: E702
                s["nll_base"] += nll_base.sum(); s["nll_base2"] += (nll_base * nll_base).sum()  # noqa: E702
                s["nll_nll_base"] += (nll * nll_base).sum()
                s["dp"] += dp.sum(); s["dp2"] += (dp * dp).sum(); s["dp4"] += (dp ** 4).sum()  # noqa: E702
            s["kld"] += kld.sum(); s["kld2"] += (kld * kld).sum()  # noqa: E702
            kld_all.append(kld)
            result = _kl_result(s, same_top, (i + 1) * rows, np.concatenate(kld_all))
            if on_chunk is not None:
                on_chunk(i + 1, result)
    if result is None:
        raise ValueError(f"{path}: no chunks to compare")
    return result


def _kl_result(s: dict, same_top: int, count: int, kld_values: np.ndarray) -> KLResult:
    log_ppl, log_ppl_unc = mean_and_uncertainty(s["nll"], s["nll2"], count)
    log_base, log_base_unc = mean_and_uncertainty(s["nll_base"], s["nll_base2"], count)
    cov = 0.0
    if count >= 10:
        cov = (s["nll_nll_base"] / count - (s["nll"] / count) * (s["nll_base"] / count)) / (count - 1)
    ratio_unc = math.sqrt(max(log_ppl_unc ** 2 + log_base_unc ** 2 - 2 * cov, 0.0))
    kld, kld_unc = mean_and_uncertainty(s["kld"], s["kld2"], count)
    mse, mse_unc = mean_and_uncertainty(s["dp2"], s["dp4"], count)
    rms = math.sqrt(mse)
    top = same_top / count
    return KLResult(
        count=count, ppl=math.exp(log_ppl), ppl_unc=math.exp(log_ppl) * log_ppl_unc,
        ppl_base=math.exp(log_base), ppl_base_unc=math.exp(log_base) * log_base_unc,
        ln_ppl_ratio=log_ppl - log_base, ln_ppl_ratio_unc=ratio_unc, kld=kld, kld_unc=kld_unc,
        kld_values=kld_values, same_top=top,
        same_top_unc=math.sqrt(top * (1 - top) / (count - 1)) if count > 1 else 0.0,
        rms_dp=rms, rms_dp_unc=0.5 / rms * mse_unc if rms > 0 else 0.0)
