"""Tokenizer metadata from untrusted files: a campaign of malformed vocabularies.

Three small valid vocabularies (byte-level BPE, SentencePiece BPE, WordPiece) are each broken in every
way a GGUF can hold (wrong types, lengths and ranges of every tokenizer key, odd token strings, invalid
merges, special ids out of range, UTF-8 the file cannot decode). Each case must either load and then
encode, decode and stream every token without error, or be refused at load with ModelFormatError /
UnsupportedModelError naming the key. Anything else (TypeError, IndexError, a Rust panic from
`tokenizers`, a hang) is a crash. `python tests/test_untrusted_tokenizer.py` prints the tally.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from pyengine import ModelFormatError, Tokenizer, UnsupportedModelError
from pyengine.tokenizer import MAX_TOKEN_CHARS, _bytes_to_unicode

TEXTS = ["", "hello world", "héllo wörld, 世界 🎉", "\x00\x01\t\n\r", "<s>hello</s>[CLS]", " " * 300, "a" * 20000,
         "\ud7ff\ue000\uffff"]


def _gpt2() -> dict[str, Any]:
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + ["he", "ll", "hell", "hello", "Ġw", "Ġworld", "<|endoftext|>"]
    types = np.array([1] * (len(tokens) - 1) + [3], np.int32)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw orld"],
            "tokenizer.ggml.bos_token_id": len(tokens) - 1, "tokenizer.ggml.eos_token_id": len(tokens) - 1}


def _spm() -> dict[str, Any]:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "▁hell", "▁hello", "▁w", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = np.array([2, 3, 3] + [6] * 256 + [1] * len(pieces), np.int32)
    scores = np.array([0, 0, 0] + [0] * 256 + [-float(i) for i in range(len(pieces))], np.float32)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": True}


def _bert() -> dict[str, Any]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "▁hello", "▁world", "lo", "▁he", "l", "▁w", "▁,"]
    types = np.array([3, 2, 3, 3, 3] + [1] * 7, np.int32)
    return {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.seperator_token_id": 3,
            "tokenizer.ggml.unknown_token_id": 1, "tokenizer.ggml.padding_token_id": 0}


BASES = {"gpt2": _gpt2, "llama": _spm, "bert": _bert}
ID_KEYS = ["bos", "eos", "unknown", "padding", "seperator", "eot", "eom"]


def _set(key: str, value: Any) -> Callable[[dict], None]:
    def f(md: dict) -> None:
        md[key] = value(md) if callable(value) else value
    return f


def _drop(key: str) -> Callable[[dict], None]:
    return lambda md: md.pop(key, None)


def _tokens(change: Callable[[list], list]) -> Callable[[dict], None]:
    def f(md: dict) -> None:
        md["tokenizer.ggml.tokens"] = change(list(md["tokenizer.ggml.tokens"]))
    return f


def _replace_token(i: int, text: str) -> Callable[[list], list]:
    def f(tokens: list) -> list:
        tokens[i] = text
        return tokens
    return f


def _mutations() -> dict[str, Callable[[dict], None]]:
    T, TT, SC, MG = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges"
    n = lambda md: len(md[T])  # noqa: E731
    m: dict[str, Callable[[dict], None]] = {
        "valid": lambda md: None,
        "tokens missing": _drop(T),
        "tokens empty": _set(T, []),
        "tokens are integers": _set(T, lambda md: np.arange(n(md), dtype=np.int32)),
        "tokens are a string": _set(T, "hello"),
        "token is empty": _tokens(_replace_token(-2, "")),
        "token duplicated": _tokens(lambda t: t[:-1] + [t[-2]]),
        "token too long": _tokens(_replace_token(-2, "x" * (MAX_TOKEN_CHARS + 1))),
        "token of 60000 chars": _tokens(_replace_token(-2, "ab" * 30000)),
        "token with NUL and controls": _tokens(_replace_token(-2, "\x00\x07\x1b[31m")),
        "token of spaces": _tokens(_replace_token(-2, "▁" * 500)),
        "token lone byte name": _tokens(_replace_token(-2, "<0xZZ>")),
        "token private-use chars": _tokens(_replace_token(-2, "\ue000\U0010ffff")),
        "one extra token": _tokens(lambda t: t + ["extra"]),
        "type missing": _drop(TT),
        "type short": _set(TT, lambda md: md[TT][:-1]),
        "type long": _set(TT, lambda md: np.append(md[TT], 1)),
        "type -1": _set(TT, lambda md: np.where(np.arange(n(md)) == 3, -1, md[TT])),
        "type 7": _set(TT, lambda md: np.where(np.arange(n(md)) == 3, 7, md[TT])),
        "type 2^31": _set(TT, lambda md: np.where(np.arange(n(md)) == 3, 2**31, md[TT]).astype(np.int64)),
        "type 0 (undefined)": _set(TT, lambda md: np.zeros(n(md), np.int32)),
        "types all control": _set(TT, lambda md: np.full(n(md), 3, np.int32)),
        "types all byte": _set(TT, lambda md: np.full(n(md), 6, np.int32)),
        "types all unused": _set(TT, lambda md: np.full(n(md), 5, np.int32)),
        "type floats": _set(TT, lambda md: np.ones(n(md), np.float32)),
        "type strings": _set(TT, lambda md: ["1"] * n(md)),
        "scores short": _set(SC, lambda md: np.zeros(n(md) - 1, np.float32)),
        "scores NaN": _set(SC, lambda md: np.full(n(md), np.nan, np.float32)),
        "scores inf": _set(SC, lambda md: np.full(n(md), np.inf, np.float32)),
        "scores strings": _set(SC, lambda md: ["0"] * n(md)),
        "scores int64": _set(SC, lambda md: np.arange(n(md), dtype=np.int64)),
        "merges missing": _drop(MG),
        "merges empty": _set(MG, []),
        "merge without space": _set(MG, ["hello"]),
        "merge leading space": _set(MG, [" h", "h e"]),
        "merge of three": _set(MG, ["h e l"]),
        "merge unknown pieces": _set(MG, ["zz yy", "h e"]),
        "merges integers": _set(MG, lambda md: np.arange(5, dtype=np.int32)),
        "merges 100k repeated": _set(MG, ["h e"] * 100000),
        "model unknown": _set("tokenizer.ggml.model", "t5"),
        "model integer": _set("tokenizer.ggml.model", 5),
        "model missing": _drop("tokenizer.ggml.model"),
        "pre unknown": _set("tokenizer.ggml.pre", "no-such-pre"),
        "pre integer": _set("tokenizer.ggml.pre", 3),
        "pre array": _set("tokenizer.ggml.pre", ["default"]),
        "chat_template integer": _set("tokenizer.chat_template", 7),
        "add_bos string": _set("tokenizer.ggml.add_bos_token", "false"),
        "add_space_prefix integer": _set("tokenizer.ggml.add_space_prefix", 2),
        "remove_extra_whitespaces": _set("tokenizer.ggml.remove_extra_whitespaces", True),
        "bert max chars 0": _set("pyengine.tokenizer.bert.max_input_chars_per_word", 0),
        "bert max chars -5": _set("pyengine.tokenizer.bert.max_input_chars_per_word", -5),
        "bert max chars 10^12": _set("pyengine.tokenizer.bert.max_input_chars_per_word", 10**12),
        "lowercase string": _set("tokenizer.ggml.normalizer.lowercase", "yes"),
    }
    for k in ID_KEYS:
        key = f"tokenizer.ggml.{k}_token_id"
        m[f"{k} id -1"] = _set(key, -1)
        m[f"{k} id = n"] = _set(key, n)
        m[f"{k} id 2^62"] = _set(key, 2**62)
        m[f"{k} id string"] = _set(key, "1")
        m[f"{k} id float"] = _set(key, 1.5)
        m[f"{k} id array"] = _set(key, np.array([1], np.int32))
    return m


MUTATIONS = _mutations()


def exercise(tok: Tokenizer) -> None:
    """Everything a model run does with a tokenizer; raises on anything wrong."""
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert all(0 <= i < tok.n_vocab for i in ids), ids
            tok.decode(ids)
    every = list(range(tok.n_vocab))
    tok.decode(every)
    tok.decode(every, skip_special_tokens=True)
    for skip in (False, True):
        d = tok.detokenizer(skip_special_tokens=skip)
        "".join(d.add(i) for i in every) + d.flush()
    for i in every:
        tok.id_to_token(i), tok.token_type(i), tok.is_special(i), tok.is_eog(i)
    for bad in (-1, tok.n_vocab, 2**40):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([bad])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.token_to_piece(bad)


def run_case(base: str, mutation: str) -> tuple[str, str]:
    """('ok' | 'refused' | 'crash', detail)."""
    md = copy.deepcopy(BASES[base]())
    MUTATIONS[mutation](md)
    t0 = time.perf_counter()
    try:
        tok = Tokenizer.from_metadata(md)
    except (ModelFormatError, UnsupportedModelError) as e:
        return "refused", str(e)
    except BaseException as e:  # noqa: BLE001 (a Rust panic is a BaseException)
        return "crash", f"at load: {type(e).__name__}: {e}"
    try:
        exercise(tok)
    except BaseException as e:  # noqa: BLE001
        return "crash", f"in use: {type(e).__name__}: {e}"
    if time.perf_counter() - t0 > 20:
        return "crash", f"took {time.perf_counter() - t0:.0f} s"
    return "ok", ""


CASES = [(b, m) for b in BASES for m in MUTATIONS]


@pytest.mark.parametrize("base,mutation", CASES, ids=[f"{b}: {m}" for b, m in CASES])
def test_malformed_tokenizer_metadata(base, mutation):
    outcome, detail = run_case(base, mutation)
    assert outcome != "crash", detail
    if mutation == "valid":
        assert outcome == "ok"
    if outcome == "refused":  # the message names what is wrong
        assert "tokenizer" in detail or "token" in detail, detail


def test_invalid_utf8_in_a_file_is_refused_naming_the_key(tmp_path: Path):
    from gguf_craft import ARR, STR, gguf_bytes

    kv = [("general.architecture", STR, "llama"), ("tokenizer.ggml.model", STR, "gpt2"),
          ("tokenizer.ggml.tokens", ARR, (STR, [b"ok", b"\xff\xfe bad", b"\xc3"]))]
    path = tmp_path / "bad_utf8.gguf"
    path.write_bytes(gguf_bytes(kv, [], b""))
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens.*not valid UTF-8"):
        Tokenizer.from_gguf(path)


def test_model_and_vocabulary_sizes_must_agree(tmp_path: Path):
    import gguf_craft as g

    import pyengine

    n_vocab = 300
    tokens = [f"t{i}" for i in range(n_vocab - 1)]  # one token short of the embedding's rows
    extra = [("tokenizer.ggml.model", g.STR, "gpt2"), ("tokenizer.ggml.tokens", g.ARR, (g.STR, tokens))]
    path = g.shared_llama(tmp_path / "m.gguf", 32, 1, 64, 4, n_vocab, extra_kv=extra)
    llm = pyengine.LLM(path, n_ctx=32)
    with pytest.raises(ModelFormatError, match="299 tokens but the model's embedding has 300 rows"):
        llm.tokenizer


if __name__ == "__main__":
    tally: dict[str, int] = {"ok": 0, "refused": 0, "crash": 0}
    for b, m in CASES:
        outcome, detail = run_case(b, m)
        tally[outcome] += 1
        if outcome == "crash":
            print(f"CRASH {b}: {m}: {detail}")
    print(f"{len(CASES)} cases: {tally['ok']} load and work, {tally['refused']} refused with a clear error, "
          f"{tally['crash']} crashes")
