"""pyengine.sampling against straightforward numpy references (full sorts, transformers' rules) and
against transformers' own logits processors."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pyengine.sampling import Sampler, SamplingParams, TopLogits


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference(logits, params: SamplingParams, generated=(), prompt=()) -> np.ndarray:
    """The full distribution, step by step as transformers' processors and warpers do it, in float64."""
    x = logits.astype(np.float64).copy()
    for t in set(prompt) | set(generated):
        x[t] = x[t] * params.repetition_penalty if x[t] < 0 else x[t] / params.repetition_penalty
    for t, c in Counter(generated).items():
        x[t] -= c * params.frequency_penalty + params.presence_penalty
    if params.temperature == 0:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1
        return out
    x /= params.temperature
    if params.top_k:
        x[x < np.sort(x)[-min(params.top_k, x.size)]] = -np.inf
    if params.top_p < 1:
        asc = np.argsort(softmax(x), kind="stable")
        remove = np.cumsum(softmax(x)[asc]) <= 1 - params.top_p
        remove[-1] = False
        x[asc[remove]] = -np.inf
    if params.min_p:
        probs = softmax(x)
        x[probs < params.min_p * probs.max()] = -np.inf
    return softmax(x)


def chi_square_z(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square as a standard normal deviate (Wilson-Hilferty): large means a misfit."""
    df = counts.size - 1
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    return ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / np.sqrt(2 / (9 * df))


def dense(sampler: Sampler, logits, **kw) -> np.ndarray:
    ids, probs = sampler.distribution(logits, **kw)
    out = np.zeros(logits.n_vocab if isinstance(logits, TopLogits) else logits.size)
    out[ids] = probs
    return out


def logits_for(n: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


CASES = [
    dict(temperature=0),
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.5),
    dict(top_k=1),
    dict(top_k=10),
    dict(top_k=10, temperature=0.5),
    dict(top_p=0.9),
    dict(top_p=0.5, temperature=2.0),
    dict(top_p=0.01),
    dict(min_p=0.05),
    dict(min_p=0.2, temperature=1.3),
    dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8),
    dict(top_k=5000, top_p=0.9),
    dict(top_p=0.95, min_p=0.01),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8, temperature=0.9),
    dict(presence_penalty=1.5),
    dict(frequency_penalty=0.7),
    dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, top_k=50, top_p=0.9),
]
HISTORY = dict(generated=[3, 3, 3, 7, 11, 11, 42, 99, 3], prompt=[5, 7, 8, 90])


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("n", [100, 50_000])
def test_distribution_equals_reference(kw, n):
    params = SamplingParams(**kw)
    logits = logits_for(n)
    ours = dense(Sampler(params), logits, **HISTORY)
    ref = reference(logits, params, **HISTORY)
    assert np.array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


class Summary:
    """The TopLogits a sampler asks the engine for (built by the C++ op, as the engine builds it), counting
    the times the whole row is fetched."""

    def __init__(self, sampler: Sampler, logits: np.ndarray, **history):
        self.sampler, self.logits, self.history, self.fetches = sampler, logits, history, 0

    def __call__(self) -> TopLogits:
        top = TopLogits.of(self.logits, *self.sampler.request(self.logits.size, **self.history))
        row = top.full

        def full():
            self.fetches += 1
            return row()

        top.full = full
        return top


def fetches_expected(params: SamplingParams, n: int, history: bool) -> bool | None:
    """Whether sampling from the summary must fetch the whole row (None: it depends on the logits)."""
    if history and (params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty):
        return True
    if params.temperature == 0:
        return False
    if 0 < params.top_k < n:
        return params.top_k > 256  # _C.top_logits_max: a larger top-k reads the row
    return False if params.top_p >= 1 and params.min_p <= 0 else None  # plain sampling: the engine draws


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("n", [100, 50_000])
@pytest.mark.parametrize("history", [False, True])
def test_summary_draws_what_the_row_draws(kw, n, history):
    """Sampling from the engine's TopLogits gives the distribution and, seeded, the very tokens that
    sampling from the whole row gives; the row is fetched only where the summary cannot hold the
    candidates (penalties, a nucleus past the largest 128), plain sampling taking the token the engine
    drew with the sampler's next uniform number."""
    params = SamplingParams(seed=5, **kw)
    hist = HISTORY if history else {}
    logits = logits_for(n)
    whole, summarized = Sampler(params), Sampler(params)
    summary = Summary(summarized, logits, **hist)
    ids_a, p_a = whole.distribution(logits, **hist)
    ids_b, p_b = summarized.distribution(summary(), **hist)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(p_a, p_b, rtol=1e-6)
    summary.fetches = 0  # the distribution reads the row; sampling should not need to
    assert [whole(logits, **hist) for _ in range(100)] == [summarized(summary(), **hist) for _ in range(100)]
    expected = fetches_expected(params, n, history)
    if expected is not None:
        assert (summary.fetches > 0) == expected


@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_p=0.95, temperature=0.7), dict(min_p=0.05),
                                dict(top_p=0.9, min_p=0.02)])
def test_summary_holds_a_confident_models_nucleus(kw):
    """A peaked row (a model sure of the next few tokens): top-p / min-p need only the summary."""
    logits = logits_for(150_000, seed=2, scale=1.0)
    logits[[10, 20, 30, 40]] += [14, 13, 12.5, 11]
    sampler = Sampler(SamplingParams(seed=0, **kw))
    summary = Summary(sampler, logits)
    assert len({sampler(summary()) for _ in range(200)}) > 1
    assert summary.fetches == 0
    np.testing.assert_allclose(dense(sampler, summary()), reference(logits, sampler.params), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_on_a_flat_distribution(top_p):
    """A nucleus of thousands of tokens: the partial selection has to grow, even to the whole vocabulary."""
    params = SamplingParams(top_p=top_p)
    logits = logits_for(150_000, scale=0.3)
    ref = reference(logits, params)
    ours = dense(Sampler(params), logits)
    assert (ref > 0).sum() > 10_000
    assert np.array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0, 300.0])
@pytest.mark.parametrize("k", [1, 40, 900])
def test_top_k_any_spread(scale, k):
    """The k largest whatever how far below the maximum they lie (the cut-then-partition shortcut)."""
    logits = logits_for(20_000, seed=11, scale=scale)
    logits[::7] = -np.inf
    ids = Sampler._top_k(logits, k)
    assert sorted(logits[ids].tolist()) == sorted(np.sort(logits)[-k:].tolist())
    params = SamplingParams(top_k=k, temperature=0.7)
    np.testing.assert_allclose(dense(Sampler(params), logits), reference(logits, params), rtol=1e-4, atol=1e-7)


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams(temperature=0, top_k=5, top_p=0.5, seed=1))
    for seed in range(20):
        logits = logits_for(1000, seed)
        assert sampler(logits) == int(np.argmax(logits))


def test_penalties_change_greedy_choice():
    logits = np.zeros(10, np.float32)
    logits[[2, 4]] = [2.0, 1.9]
    greedy = SamplingParams(temperature=0, repetition_penalty=1.1)
    assert Sampler(greedy)(logits, generated=[2]) == 4
    assert Sampler(greedy)(logits, prompt=[2]) == 4  # the prompt counts for repetition_penalty
    presence = SamplingParams(temperature=0, presence_penalty=0.05)
    assert Sampler(presence)(logits, generated=[2]) == 2
    assert Sampler(presence)(logits, prompt=[2]) == 2  # ... but not for OpenAI's penalties
    assert Sampler(SamplingParams(temperature=0, frequency_penalty=0.06))(logits, generated=[2, 2]) == 4
    # Negative logits are multiplied by the penalty (pushed further down), not divided.
    neg = np.full(3, -5, np.float32)
    neg[[0, 1]] = [-1.0, -1.05]
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.1))(neg, generated=[0]) == 1


def test_penalties_leave_caller_logits_alone():
    logits = logits_for(100)
    before = logits.copy()
    Sampler(SamplingParams(repetition_penalty=1.5, presence_penalty=1, frequency_penalty=1, seed=0))(logits, **HISTORY)
    assert np.array_equal(logits, before)


@pytest.mark.parametrize(
    "kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=8), dict(top_p=0.8), dict(min_p=0.1, temperature=1.4)]
)
def test_draws_follow_the_distribution(kw):
    """Many seeded draws against the reference probabilities (chi-square, z < 4: p ~ 3e-5; fixed seeds)."""
    params = SamplingParams(seed=1234, **kw)
    logits = logits_for(30, seed=5, scale=1.0)
    ref = reference(logits, params)
    sampler = Sampler(params)
    n = 40_000
    counts = np.bincount([sampler(logits) for _ in range(n)], minlength=logits.size)
    assert counts[ref == 0].sum() == 0
    support = ref > 0
    assert chi_square_z(counts[support], n * ref[support]) < 4


def test_draws_over_a_large_vocabulary():
    """Without filters the draw goes block by block over the whole vocabulary; check it by id bins."""
    logits = logits_for(10_000, seed=7, scale=1.5)
    logits[5000:5100] += 4  # some heavy tokens in one block
    params = SamplingParams(seed=99, temperature=0.9)
    ref = reference(logits, params)
    sampler = Sampler(params)
    n, bins = 40_000, 40
    draws = np.array([sampler(logits) for _ in range(n)])
    counts = np.bincount(draws * bins // logits.size, minlength=bins)
    expected = n * ref.reshape(bins, -1).sum(1)
    assert chi_square_z(counts, expected) < 4


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1023, 1024, 1025, 3000, 49152, 151936])
def test_softmax_draw_is_the_inverse_cdf(n):
    """_C.softmax_draw (the draw behind every sampled token) against numpy's float64 softmax and
    searchsorted: the same index for every u not within 1e-5 of the total mass from a boundary of the
    CDF (float32 weights and float32 block sums may fall on either side there). Block edges (1024) and
    16-wide tails, masked (-inf) tokens, and temperatures from near-greedy to flat."""
    from pyengine import _C

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    if n > 4:
        x[rng.choice(n, n // 5, replace=False)] = -np.inf
        x[rng.integers(n)] = 5.0  # a finite maximum survives the masking
    checked = 0
    for inv_t in (0.5, 1.0, 1.25, 8.0, 1e30):
        p = np.exp((x.astype(np.float64) - x.max()) * np.float64(np.float32(inv_t)))
        cdf = np.cumsum(p)
        for u in np.concatenate([[0.0, 1 - 2**-53], rng.random(400)]):
            t = u * cdf[-1]
            k = min(int(np.searchsorted(cdf, t, side="right")), n - 1)
            got = _C.softmax_draw(x, inv_t, u)
            assert np.isfinite(x[got]), f"n={n} inv_t={inv_t} u={u}: drew masked token {got}"
            if np.min(np.abs(cdf - t)) < 1e-5 * cdf[-1]:
                continue
            assert got == k, f"n={n} inv_t={inv_t} u={u}: {got} != {k}"
            checked += 1
    assert checked > 1500


def test_softmax_draw_rejects_what_has_no_distribution():
    from pyengine import _C

    x = np.zeros(40, np.float32)
    for bad, match in [(np.full(40, -np.inf, np.float32), "finite maximum"),
                       (np.array([0, np.inf], np.float32), "finite maximum"),
                       (np.array([0, np.nan, 1], np.float32), "NaN"),
                       (np.zeros(0, np.float32), "non-empty")]:
        with pytest.raises(ValueError, match=match):
            _C.softmax_draw(bad, 1.0, 0.5)
    for inv_t in (0.0, -1.0, np.inf, np.nan, 1e39):
        with pytest.raises(ValueError, match="temperature"):
            _C.softmax_draw(x, inv_t, 0.5)
    for u in (-0.1, 1.0, np.nan):
        with pytest.raises(ValueError, match="u must"):
            _C.softmax_draw(x, 1.0, u)


def test_seed_reproducible():
    logits = logits_for(1000, scale=1.0)

    def draws(seed):
        sampler = Sampler(SamplingParams(seed=seed, top_p=0.95))
        return [sampler(logits) for _ in range(200)]

    a = draws(42)
    assert a == draws(42)
    assert a != draws(43)
    assert len(set(a)) > 10


def test_params_validation():
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1),
                dict(repetition_penalty=0), dict(max_new_tokens=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ("###",)


def test_equals_transformers_processors():
    """The same pipeline through transformers' own LogitsProcessor classes (torch, CPU)."""
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    logits = logits_for(5000, seed=3)
    prompt, generated = [1, 2, 3, 2000], [7, 7, 9, 2000]
    params = SamplingParams(temperature=0.8, top_k=100, top_p=0.9, min_p=0.02, repetition_penalty=1.25)
    processors = gen.LogitsProcessorList(
        [
            gen.RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
            gen.TemperatureLogitsWarper(params.temperature),
            gen.TopKLogitsWarper(params.top_k),
            gen.TopPLogitsWarper(params.top_p),
            gen.MinPLogitsWarper(params.min_p),
        ]
    )
    input_ids = torch.tensor([prompt + generated])
    scores = processors(input_ids, torch.from_numpy(logits.copy())[None])
    ref = torch.softmax(scores, -1)[0].double().numpy()
    ours = dense(Sampler(params), logits, generated=generated, prompt=prompt)
    assert np.array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)
