"""Tokenizers built from a GGUF file's metadata alone, on top of Hugging Face `tokenizers`.

A GGUF stores the vocabulary under llama.cpp's keys (`tokenizer.ggml.*`). We rebuild from them the
`tokenizers.Tokenizer` that the model's own `tokenizer.json` would give:

* `tokenizer.ggml.model == "gpt2"`: byte-level BPE from `tokens` and `merges`, split first the way
  `tokenizer.ggml.pre` names (the regexes of llama.cpp's `llama-vocab.cpp`, or the model's own
  `tokenizer.json` pipeline where that one is what llama.cpp mimics).
* `tokenizer.ggml.model == "llama"`: SentencePiece BPE. SentencePiece merges the adjacent pair whose
  concatenation has the best score; that is a BPE whose merges are ranked by the merged token's score,
  with byte fallback to the `<0xXX>` tokens. Spaces become "▁", and a "▁" is prepended to every run of
  text between special tokens when `add_space_prefix` is set (llama.cpp and SentencePiece both do so).

* `tokenizer.ggml.model == "bert"`: WordPiece (BERT). llama.cpp stores the vocabulary in a "phantom
  space" spelling (a word-start token gets "▁", a "##" continuation loses its "##", control tokens stay);
  we undo it and rebuild BERT's pipeline: BertNormalizer (`tokenizer.ggml.normalizer.lowercase` /
  `strip_accents`, llama.cpp's keys, and pyengine's `pyengine.tokenizer.bert.clean_text` /
  `handle_chinese_chars`; all default to true as in BertNormalizer and llama.cpp), BertPreTokenizer,
  WordPiece with "##" continuations (`pyengine.tokenizer.bert.max_input_chars_per_word`, default 100),
  and `[CLS] ... [SEP]` (BOS and separator ids) around the text when special tokens are added.

* `tokenizer.huggingface.json` present (gguf-py's key; pyengine's converter writes it for BART and mBART):
  the model's own tokenizer.json, run as it is by `tokenizers` (its normalizer, pre-tokenizer, model,
  post-processor with the model's special tokens, and decoder), so that ids equal transformers'. The
  `tokenizer.ggml.*` keys still give the vocabulary, its token types and special ids, and must agree with it.

Control, unknown and user-defined tokens are matched whole in the text, before any splitting.

THUDM's ChatGLM tokenizers add their own tokens where `add_special_tokens` asks for them:
`[gMASK]sop` before the text (ChatGLM2/3, `pre = "chatglm-spm"`), `[gMASK]<sop>` before it (GLM-4,
`"chatglm-bpe"`), or `[gMASK]<sop>` after it (ChatGLM-6B, `"chatglm1"`). ChatGLM-6B also rewrites text
before SentencePiece sees it (newline -> `<n>`, tab -> `<|tab|>`, runs of 2-80 spaces -> `<|blank_N|>`,
undone when decoding) and, as SentencePiece does, prefixes "▁" only where a stretch of text between
special tokens starts, not after its user-defined pieces.
"""
from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any, Iterable, Mapping

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ._C import ModelFormatError, UnsupportedModelError

__all__ = ["IncrementalDetokenizer", "TokenType", "Tokenizer"]


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`, SentencePiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# --- pre-tokenizers ------------------------------------------------------------------------------

# Regexes as the models' tokenizer.json files spell them; llama.cpp carries rewrites of the same ones.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# The cased letters of DeepSeek LLM's tokenizer.json, as code points: several of them (U+1F7D, U+2126,
# U+212A, ...) are canonical singletons that an editor's normalization would silently replace.
_DEEPSEEK_LETTERS = "".join(
    chr(lo) if hi is None else f"{chr(lo)}-{chr(hi)}"
    for lo, hi in [
        (0x41, 0x5A), (0x61, 0x7A), (0xB5, None), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
        (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, None),
        (0x386, None), (0x388, 0x38A), (0x38C, None), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481),
        (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
        (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
        (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, None), (0x1F5B, None), (0x1F5D, None),
        (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, None), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC),
        (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, None),
        (0x2107, None), (0x210A, 0x2113), (0x2115, None), (0x2119, 0x211D), (0x2124, None), (0x2126, None),
        (0x2128, None), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, None), (0x213C, 0x213F), (0x2145, 0x2149),
        (0x214E, None), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3),
        (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
        (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
        (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
        (0x1E900, 0x1E943),
    ]
)
_DEEPSEEK_LLM_SPLITS = (
    "[\r\n]",
    rf"\s?[{_DEEPSEEK_LETTERS}]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER_SPLITS = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
# llama.cpp's choice when a file names no pre-tokenizer.
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]")


@dataclass(frozen=True)
class _PreTokenizer:
    """How a byte-level BPE vocabulary cuts text before merging, plus the flags llama.cpp ties to it."""

    splits: tuple[str, ...] = ()  # regexes applied in turn, each isolating its matches
    digits: bool = False  # every digit on its own, before the byte-level regex (StarCoder, SmolLM)
    gpt2_regex: bool = False  # ByteLevel's own GPT-2 regex
    falcon: bool = False  # Falcon's tokenizer.json pipeline, see _build_pre_tokenizer
    nfc: bool = False  # NFC-normalize first (Qwen2's tokenizer.json has an NFC normalizer)
    ignore_merges: bool = False  # a word that is a token is not merged (Llama 3's tokenizer.json)
    add_bos: bool = False  # llama.cpp's default when the file says nothing


_GPT2 = _PreTokenizer(gpt2_regex=True)
_STARCODER = _PreTokenizer(digits=True, gpt2_regex=True)
_LLAMA3 = _PreTokenizer(splits=(_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer(splits=(_QWEN2_SPLIT,), nfc=True)

# `tokenizer.ggml.pre` -> pre-tokenizer, following the name table of llama.cpp's llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer(splits=_DEFAULT_SPLITS),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"], _LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe"], replace(_LLAMA3, ignore_merges=False, add_bos=False)),
    **dict.fromkeys(["chatglm-bpe", "glm4"], _PreTokenizer(splits=(_LLAMA3_SPLIT,))),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2),
    "stablelm2": replace(_QWEN2, nfc=False),
    "deepseek-llm": _PreTokenizer(splits=_DEEPSEEK_LLM_SPLITS),
    "deepseek-coder": _PreTokenizer(splits=_DEEPSEEK_CODER_SPLITS),
    "falcon": _PreTokenizer(falcon=True),
    **dict.fromkeys(
        ["gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de"],
        _GPT2,
    ),
    **dict.fromkeys(
        ["starcoder", "smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _STARCODER
    ),
}

# THUDM's tokens around a prompt (tokenization_chatglm.py build_inputs_with_special_tokens):
# `tokenizer.ggml.pre` -> (before the text, after it).
_GLM_AFFIXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chatglm-spm": (("[gMASK]", "sop"), ()),
    "chatglm-bpe": (("[gMASK]", "<sop>"), ()),
    "glm4": (("[gMASK]", "<sop>"), ()),
    "chatglm1": ((), ("[gMASK]", "<sop>")),
}
# ChatGLM-6B's text rewriting (SPTokenizer._preprocess): longest runs of spaces first, as str.replace goes.
_GLM1_MAX_BLANK = 80
_GLM1_REWRITES = (("\n", "<n>"), ("\t", "<|tab|>"),
                  *((" " * n, f"<|blank_{n}|>") for n in range(_GLM1_MAX_BLANK, 1, -1)))
_GLM1_PIECES = {token: text for text, token in _GLM1_REWRITES}


def _glm1_preprocess(text: str) -> str:
    for old, new in _GLM1_REWRITES:
        if old in text:
            text = text.replace(old, new)
    return text


def _glm1_postprocess(text: str) -> str:
    if "<" in text:
        text = re.sub(r"<n>|<\|tab\|>|<\|blank_(\d+)\|>", lambda m: _GLM1_PIECES.get(m.group(0), m.group(0)), text)
    return text


def _build_pre_tokenizer(spec: _PreTokenizer) -> pre_tokenizers.PreTokenizer:
    if spec.falcon:
        # Falcon's tokenizer.json; llama.cpp's regex list is a rewrite of it.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Punctuation(behavior="contiguous"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated"),
            ]
        )
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in spec.splits
    ]
    if spec.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.gpt2_regex))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}

# Tokens that end a turn in some model family, as llama.cpp's list (llama-vocab.cpp) has them.
_EOG_TEXTS = frozenset(
    [
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
        "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>",
    ]
)
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|end_of_text|>")


# --- the tokenizer -------------------------------------------------------------------------------


def _meta_int(md: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < n_vocab else None


# Limits on what a vocabulary may ask of us (files are untrusted). Real vocabularies are far inside:
# the longest token we know is ~130 characters, the largest vocabularies ~260,000 tokens holding
# ~2 million characters.
MAX_TOKEN_CHARS = 1 << 16
MAX_VOCAB_CHARS = 1 << 26  # all tokens together (SentencePiece's merge search visits every split of every token)
HF_JSON_KEY = "tokenizer.huggingface.json"  # gguf-py's Keys.Tokenizer.HF_JSON
_STR_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template", HF_JSON_KEY)
_SPECIAL_IDS = ("bos", "eos", "unknown", "padding", "seperator", "eot", "eom")
_INT_KEYS = tuple(f"tokenizer.ggml.{k}_token_id" for k in _SPECIAL_IDS) + (
    "pyengine.tokenizer.bert.max_input_chars_per_word",)
_BOOL_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
              "tokenizer.ggml.remove_extra_whitespaces", "tokenizer.ggml.normalizer.lowercase",
              "tokenizer.ggml.normalizer.strip_accents", "pyengine.tokenizer.bert.clean_text",
              "pyengine.tokenizer.bert.handle_chinese_chars")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_metadata(md: Mapping[str, Any]) -> None:
    """Types, lengths and ranges of every tokenizer key, so that a bad file fails here with the key's
    name instead of deep inside `tokenizers` (or silently)."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelFormatError("GGUF metadata has no tokenizer.ggml.tokens: the file carries no vocabulary")
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError("tokenizer.ggml.tokens must be an array of strings")
    n = len(tokens)
    if n == 0:
        raise ModelFormatError("tokenizer.ggml.tokens is empty")
    total = 0
    for i, t in enumerate(tokens):
        if len(t) > MAX_TOKEN_CHARS:
            raise ModelFormatError(f"tokenizer.ggml.tokens[{i}] has {len(t)} characters "
                                   f"(the limit is {MAX_TOKEN_CHARS})")
        total += len(t)
    if total > MAX_VOCAB_CHARS:
        raise ModelFormatError(f"tokenizer.ggml.tokens hold {total} characters (the limit is {MAX_VOCAB_CHARS})")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        arr = md.get(key)
        if arr is None:
            continue
        kind = "iu" if key.endswith("type") else "iuf"
        if isinstance(arr, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arr):
            arr = np.asarray(arr)  # a caller's dict (from_metadata) may hold lists
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in kind:
            raise ModelFormatError(f"{key} must be a numeric array" + (" of integers" if kind == "iu" else ""))
        if arr.shape != (n,):
            raise ModelFormatError(f"{key} has {arr.size} entries for {n} tokens")
        if kind == "iu" and arr.size and (arr.min() < 0 or arr.max() > max(TokenType)):  # 0: undefined
            bad = int(np.flatnonzero((arr < 0) | (arr > max(TokenType)))[0])
            raise ModelFormatError(f"{key}[{bad}] = {arr[bad]} is not a token type (0..{max(TokenType)})")
        if kind == "iuf" and not np.isfinite(arr).all():
            raise ModelFormatError(f"{key}[{int(np.flatnonzero(~np.isfinite(arr))[0])}] is not a finite number")
    merges = md.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, (list, tuple)) or not all(isinstance(m, str) for m in merges)):
        raise ModelFormatError("tokenizer.ggml.merges must be an array of strings")
    for key in _STR_KEYS:
        if md.get(key) is not None and not isinstance(md[key], str):
            raise ModelFormatError(f"{key} must be a string, not {type(md[key]).__name__}")
    for key in _INT_KEYS:
        if md.get(key) is not None and not _is_int(md[key]):
            raise ModelFormatError(f"{key} must be an integer, not {type(md[key]).__name__}")
    for key in _BOOL_KEYS:
        if md.get(key) is not None and not isinstance(md[key], (bool, np.bool_)) and not _is_int(md[key]):
            raise ModelFormatError(f"{key} must be a boolean, not {type(md[key]).__name__}")
    max_chars = md.get("pyengine.tokenizer.bert.max_input_chars_per_word")
    if max_chars is not None and not 1 <= int(max_chars) <= MAX_TOKEN_CHARS:
        raise ModelFormatError(f"pyengine.tokenizer.bert.max_input_chars_per_word = {max_chars} is outside "
                               f"[1, {MAX_TOKEN_CHARS}]")


def _check_text(text: str) -> None:
    """Text must be valid Unicode: a lone surrogate (from a JSON "\\ud800" escape) has no UTF-8."""
    if not isinstance(text, str):
        raise TypeError(f"text to encode must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: {e.reason} at position {e.start}") from None


class Tokenizer:
    """Text <-> token ids for one model, built from its GGUF metadata.

    Use `Tokenizer.from_gguf(path)` (a full model or a vocab-only GGUF) or
    `Tokenizer.from_metadata(md)` with a dict of `tokenizer.*` keys as `pyengine.gguf.read_metadata`
    returns them. The underlying `tokenizers.Tokenizer` is `self.backend`.
    """

    def __init__(self, metadata: Mapping[str, Any]):
        md = metadata
        _check_metadata(md)
        self.model: str = md.get("tokenizer.ggml.model", "")
        self._tokens: list[str] = list(md["tokenizer.ggml.tokens"])
        n = len(self._tokens)
        types = md.get("tokenizer.ggml.token_type")
        self._types = np.full(n, TokenType.NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
        self._types[self._types == 0] = TokenType.NORMAL  # llama.cpp's LLAMA_TOKEN_TYPE_UNDEFINED
        self._index = {}
        for i, token in enumerate(self._tokens):
            if self._index.setdefault(token, i) != i:
                raise ModelFormatError(f"duplicate token {token!r} in tokenizer.ggml.tokens (ids {self._index[token]} and {i})")

        self.pre: str | None = md.get("tokenizer.ggml.pre")
        try:
            add_bos_default = self._build_backend(md)
        except (ModelFormatError, UnsupportedModelError):
            raise
        except Exception as e:  # `tokenizers` refusing what the checks above let through
            raise ModelFormatError(f"tokenizer metadata ({self.model} vocabulary of {n} tokens) is invalid: "
                                   f"{type(e).__name__}: {e}") from None
        self._finish(md, n, add_bos_default)

    def _build_backend(self, md: Mapping[str, Any]) -> bool:
        """Builds self.backend for the vocabulary's model; returns whether BOS is added by default."""
        self._from_json = md.get(HF_JSON_KEY) is not None
        if self._from_json:
            if self.model not in ("gpt2", "t5"):
                raise UnsupportedModelError(f"{HF_JSON_KEY} with tokenizer.ggml.model = {self.model!r} is not "
                                            "supported ('gpt2' and 't5' are)")
            self.add_space_prefix = self.model == "t5" and bool(md.get("tokenizer.ggml.add_space_prefix", True))
            self.backend = self._build_from_json(md[HF_JSON_KEY])
            return False  # the json's post-processor adds the special tokens
        if self.model == "gpt2":
            pre = PRE_TOKENIZERS.get(self.pre or "default")
            if pre is None:
                raise UnsupportedModelError(
                    f"tokenizer.ggml.pre = {self.pre!r} is not supported; known: {', '.join(sorted(PRE_TOKENIZERS))}"
                )
            self.backend = self._build_byte_level_bpe(md, pre)
            self.add_space_prefix = False
            add_bos_default = pre.add_bos
        elif self.model == "bert":
            self.backend = self._build_wordpiece(md)
            self.add_space_prefix = False
            add_bos_default = True
        elif self.model == "t5":
            self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            self.backend = self._build_unigram(md)
            add_bos_default = False
        elif self.model == "llama":
            self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            self.backend = self._build_sentencepiece_bpe(md, prepend=self.add_space_prefix and self.pre != "chatglm1")
            add_bos_default = True
        else:
            raise UnsupportedModelError(
                f"tokenizer.ggml.model = {self.model!r} is not supported (supported: 'gpt2', 'llama', 'bert', 't5')"
            )
        return add_bos_default

    def _finish(self, md: Mapping[str, Any], n: int, add_bos_default: bool) -> None:
        self.bos_id = _meta_int(md, "tokenizer.ggml.bos_token_id", n)
        self.eos_id = _meta_int(md, "tokenizer.ggml.eos_token_id", n)
        self.unk_id = _meta_int(md, "tokenizer.ggml.unknown_token_id", n)
        self.pad_id = _meta_int(md, "tokenizer.ggml.padding_token_id", n)
        self.sep_id = _meta_int(md, "tokenizer.ggml.seperator_token_id", n)  # sic: llama.cpp's spelling
        if self.model == "bert":  # llama.cpp's defaults for a file that names none (bert-base's ids)
            for attr, typ, i in (("bos_id", "bos", 101), ("unk_id", "unknown", 100), ("sep_id", "seperator", 102),
                                 ("pad_id", "padding", 0)):
                if f"tokenizer.ggml.{typ}_token_id" not in md and i < n:
                    setattr(self, attr, i)
        if self.pre in ("chatglm-bpe", "glm4"):
            self.bos_id = None  # llama.cpp: GLM-4 has no BOS, whatever the file says
        self.eot_id = _meta_int(md, "tokenizer.ggml.eot_token_id", n)
        if self.eot_id is None:
            self.eot_id = next((self._index[t] for t in _EOT_TEXTS if t in self._index), None)
        self.eom_id = _meta_int(md, "tokenizer.ggml.eom_token_id", n)
        eog = {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        eog.update(self._index[t] for t in _EOG_TEXTS if t in self._index)
        if self.pre in _GLM_AFFIXES:  # THUDM's chat() also stops where the model hands the turn back
            eog.update(self._index[t] for t in ("<|user|>", "<|observation|>") if t in self._index)
        self.eog_ids: frozenset[int] = frozenset(eog)
        self.add_bos: bool = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and self.bos_id is not None
        self.add_eos: bool = bool(md.get("tokenizer.ggml.add_eos_token", False)) and self.eos_id is not None
        self.chat_template: str | None = md.get("tokenizer.chat_template")
        self._special = set(np.flatnonzero((self._types == TokenType.CONTROL) | (self._types == TokenType.UNKNOWN)).tolist())
        # ids `add_special_tokens` puts before and after the text
        self._prefix = [self.bos_id] if self.add_bos else []
        self._suffix = [self.eos_id] if self.add_eos else []
        if self.model == "bert":
            # llama.cpp's WordPiece tokenizer adds BOS ([CLS]) and the separator ([SEP]), whatever the flags say
            sep = self.sep_id if self.sep_id is not None else self.eos_id
            self._prefix = [self.bos_id] if self.bos_id is not None else []
            self._suffix = [sep] if sep is not None else []
            self.add_bos, self.add_eos = bool(self._prefix), False
        before, after = _GLM_AFFIXES.get(self.pre or "", ((), ()))
        if all(t in self._index for t in before + after):
            self._prefix += [self._index[t] for t in before]
            self._suffix = [self._index[t] for t in after] + self._suffix
        self._remove_extra_ws = bool(md.get("tokenizer.ggml.remove_extra_whitespaces", False))
        self._glm1_split: re.Pattern[str] | None = None
        if self.pre == "chatglm1":
            specials = sorted((self._tokens[i] for i in self._special), key=len, reverse=True)
            self._glm1_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else re.compile("(?!)")
        if not self._from_json:
            self._set_post_processor()
        self._pieces: list[bytes | None] = [None] * n

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Tokenizer":
        """Build from a metadata dict with llama.cpp's `tokenizer.*` keys."""
        return cls(md)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Build from a GGUF file's metadata (a vocab-only GGUF is enough)."""
        from .gguf import read_metadata

        return cls(read_metadata(path))

    # --- construction ---

    def _build_from_json(self, text: str) -> HFTokenizer:
        """The tokenizer.json stored whole, checked against tokenizer.ggml.tokens: every id it can give must
        be the token the vocabulary has there."""
        if len(text) > 4 * MAX_VOCAB_CHARS:
            raise ModelFormatError(f"{HF_JSON_KEY} has {len(text)} characters (the limit is {4 * MAX_VOCAB_CHARS})")
        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:
            raise ModelFormatError(f"{HF_JSON_KEY} is not a tokenizer.json `tokenizers` can load: {e}") from None
        for token, i in tok.get_vocab(with_added_tokens=True).items():
            if not 0 <= i < len(self._tokens) or self._tokens[i] != token:
                have = repr(self._tokens[i]) if 0 <= i < len(self._tokens) else "no token"
                raise ModelFormatError(f"{HF_JSON_KEY} has token {token!r} at id {i}, but tokenizer.ggml.tokens has "
                                       f"{have} there")
        return tok

    def _add_tokens_matched_whole(self, tok: HFTokenizer) -> None:
        """Control, unknown and user-defined tokens are matched whole in raw text, as llama.cpp does;
        only the first two are special (dropped by `skip_special_tokens`)."""
        for kinds, special in (((TokenType.CONTROL, TokenType.UNKNOWN), True), ((TokenType.USER_DEFINED,), False)):
            ids = np.flatnonzero(np.isin(self._types, kinds))
            added = [AddedToken(self._tokens[i], special=special, normalized=False) for i in ids]
            if special:
                tok.add_special_tokens(added)
            else:
                tok.add_tokens(added)

    def _build_byte_level_bpe(self, md: Mapping[str, Any], pre: _PreTokenizer) -> HFTokenizer:
        merges = []
        for line in md.get("tokenizer.ggml.merges") or ():
            # llama.cpp splits at the first space after the first character: a merge may start with " ".
            cut = line.find(" ", 1)
            if cut < 0:
                raise ModelFormatError(f"tokenizer.ggml.merges entry {line!r} has no space")
            left, right = line[:cut], line[cut + 1 :]
            if left in self._index and right in self._index and left + right in self._index:
                merges.append((left, right))
        bpe = models.BPE(vocab=dict(self._index), merges=merges, ignore_merges=pre.ignore_merges)
        tok = HFTokenizer(bpe)
        if pre.nfc:
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = _build_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        self._add_tokens_matched_whole(tok)
        return tok

    def _build_wordpiece(self, md: Mapping[str, Any]) -> HFTokenizer:
        # undo llama.cpp's phantom spelling (tools/convert/vocab.py phantom_token)
        words = []
        for token, kind in zip(self._tokens, self._types):
            if kind == TokenType.CONTROL:
                words.append(token)
            elif token.startswith("\u2581"):
                words.append(token[1:])
            else:
                words.append("##" + token)
        vocab: dict[str, int] = {}
        for i, word in enumerate(words):
            vocab.setdefault(word, i)
        unk = _meta_int(md, "tokenizer.ggml.unknown_token_id", len(words))
        if unk is None:  # no valid id: the vocabulary's unknown-type token, else BERT's spelling
            unk = next(iter(np.flatnonzero(self._types == TokenType.UNKNOWN)), vocab.get("[UNK]"))
        if unk is None:
            raise ModelFormatError("the WordPiece vocabulary has no unknown token (tokenizer.ggml.unknown_token_id "
                                   "is missing or out of range and no token is of the unknown type or '[UNK]')")
        unk_word = words[int(unk)]
        max_chars = int(md.get("pyengine.tokenizer.bert.max_input_chars_per_word", 100))
        tok = HFTokenizer(models.WordPiece(vocab=vocab, unk_token=unk_word, max_input_chars_per_word=max_chars))
        lowercase = bool(md.get("tokenizer.ggml.normalizer.lowercase", True))
        strip_accents = md.get("tokenizer.ggml.normalizer.strip_accents")
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=bool(md.get("pyengine.tokenizer.bert.clean_text", True)),
            handle_chinese_chars=bool(md.get("pyengine.tokenizer.bert.handle_chinese_chars", True)),
            strip_accents=None if strip_accents is None else bool(strip_accents),
            lowercase=lowercase,
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        for kinds, special in (((TokenType.CONTROL, TokenType.UNKNOWN), True), ((TokenType.USER_DEFINED,), False)):
            # a user-defined token is stored "▁" + its text, like a word start
            added = [AddedToken(words[i], special=special, normalized=False)
                     for i in np.flatnonzero(np.isin(self._types, kinds))]
            if special:
                tok.add_special_tokens(added)
            else:
                tok.add_tokens(added)
        return tok

    def _build_sentencepiece_bpe(self, md: Mapping[str, Any], prepend: bool) -> HFTokenizer:
        scores = md.get("tokenizer.ggml.scores")
        scores = np.zeros(len(self._tokens), np.float32) if scores is None else np.asarray(scores, np.float32)
        # SentencePiece merges into NORMAL and USER_DEFINED pieces only (bpe_model.cc skips the rest).
        mergeable = (self._types == TokenType.NORMAL) | (self._types == TokenType.USER_DEFINED)
        pieces = {t for t, ok in zip(self._tokens, mergeable) if ok}
        ranked = []
        for i in np.flatnonzero(mergeable):
            token = self._tokens[i]
            for cut in range(1, len(token)):
                if token[:cut] in pieces and token[cut:] in pieces:
                    ranked.append((-float(scores[i]), i, cut))
        ranked.sort()
        merges = [(self._tokens[i][:cut], self._tokens[i][cut:]) for _, i, cut in ranked]
        unk = md.get("tokenizer.ggml.unknown_token_id")
        unk_token = self._tokens[int(unk)] if unk is not None and 0 <= int(unk) < len(self._tokens) else None
        bpe = models.BPE(vocab=dict(self._index), merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
        tok = HFTokenizer(bpe)
        # A normalizer runs on each stretch of text between special tokens, so every stretch gets its
        # "▁" prefix, as in llama.cpp and in SentencePiece run on each stretch.
        norm = [normalizers.Replace(" ", "▁")]
        if prepend:
            norm.insert(0, normalizers.Prepend("▁"))
        if md.get("tokenizer.ggml.remove_extra_whitespaces"):
            # SentencePiece's remove_extra_whitespaces: no spaces at the ends, one for each run inside.
            # The normalizer sees each stretch between matched-whole tokens; ChatGLM-6B's user-defined
            # pieces sit inside SentencePiece's text, so its ends are stripped before (_encode_chatglm1).
            norm.insert(0, normalizers.Replace(Regex(" {2,}"), " "))
            if self.pre != "chatglm1":
                norm.insert(0, normalizers.Replace(Regex(r"\A +| +\z"), ""))
        tok.normalizer = normalizers.Sequence(norm)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.add_space_prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        self._add_tokens_matched_whole(tok)
        return tok

    def _build_unigram(self, md: Mapping[str, Any]) -> HFTokenizer:
        """SentencePiece unigram (T5, mT5): the most probable segmentation (Viterbi) by the pieces' scores,
        after SentencePiece's normalizer (the precompiled character map, extra whitespace removed), in the
        order transformers' SpmConverter builds it."""
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise ModelFormatError("a 't5' (unigram) vocabulary needs tokenizer.ggml.scores")
        unk = md.get("tokenizer.ggml.unknown_token_id")
        if unk is None or not 0 <= int(unk) < len(self._tokens):
            raise ModelFormatError("a 't5' (unigram) vocabulary needs tokenizer.ggml.unknown_token_id")
        tok = HFTokenizer(models.Unigram([(t, float(s)) for t, s in zip(self._tokens, scores)], unk_id=int(unk),
                                         byte_fallback=False))
        norm = []
        charsmap = md.get("tokenizer.ggml.precompiled_charsmap")
        if charsmap is not None and len(charsmap):
            norm.append(normalizers.Precompiled(bytes(bytearray(int(b) & 0xFF for b in charsmap))))
        if md.get("tokenizer.ggml.remove_extra_whitespaces"):
            norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
        norm.append(normalizers.Replace(" ", "▁"))
        if self.add_space_prefix:  # SentencePiece adds its dummy prefix even before a leading "▁"
            norm.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
        tok.normalizer = normalizers.Sequence(norm)
        if self.add_space_prefix:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
        steps = [decoders.Replace("▁", " ")]
        if self.add_space_prefix:
            steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
        tok.decoder = decoders.Sequence(steps)
        self._add_tokens_matched_whole(tok)
        return tok

    def _set_post_processor(self) -> None:
        if self._prefix or self._suffix:
            single = [self._tokens[i] for i in self._prefix] + ["$A"] + [self._tokens[i] for i in self._suffix]
            special = {self._tokens[i]: i for i in self._prefix + self._suffix}
            self.backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=list(special.items()))

    # --- the vocabulary ---

    @property
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._tokens)

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < len(self._tokens):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._tokens) - 1})")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        """The token's spelling in the vocabulary (byte-level or "▁"-spelled)."""
        return self._tokens[self._check_id(token_id)]

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled as in the vocabulary, or None."""
        return self._index.get(token)

    def token_type(self, token_id: int) -> TokenType:
        return TokenType(int(self._types[self._check_id(token_id)]))

    def is_special(self, token_id: int) -> bool:
        """True for control and unknown tokens, the ones `skip_special_tokens` drops."""
        return token_id in self._special

    def is_eog(self, token_id: int) -> bool:
        """True for tokens that end generation (EOS, EOT, `<|im_end|>`, ...)."""
        return token_id in self.eog_ids

    # --- encode / decode ---

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched whole.

        With `add_special_tokens`, BOS/EOS are added as the file says (`tokenizer.ggml.add_bos_token`).
        """
        _check_text(text)
        if self._glm1_split is not None:
            ids = self._encode_chatglm1(text)
        elif self.model == "llama" and not text:
            ids = []  # `tokenizers` would prepend "▁" to nothing; llama.cpp encodes nothing
        else:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._prefix + ids + self._suffix if add_special_tokens else ids

    def _encode_chatglm1(self, text: str) -> list[int]:
        """ChatGLM-6B: each stretch between special tokens rewritten, then SentencePiece with its dummy prefix."""
        ids: list[int] = []
        for k, part in enumerate(self._glm1_split.split(text)):
            if k % 2:
                ids.append(self._index[part])
            elif part:
                part = _glm1_preprocess(part)
                if self._remove_extra_ws:  # only single spaces are left after the rewriting
                    part = part.strip(" ")
                if part:
                    ids += self.backend.encode("▁" + part if self.add_space_prefix else part, add_special_tokens=False).ids
        return ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts, in parallel threads."""
        texts = list(texts)
        for text in texts:
            _check_text(text)
        if (self.model == "llama" and not all(texts)) or self._glm1_split is not None:
            return [self.encode(t, add_special_tokens) for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of the token ids; bytes that are not valid UTF-8 become U+FFFD."""
        text = self.backend.decode([self._check_id(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _glm1_postprocess(text) if self._glm1_split is not None else text

    def token_to_piece(self, token_id: int) -> bytes:
        """The bytes this token contributes to decoded text.

        Concatenating the pieces of a sequence gives the UTF-8 of `decode(ids)`, except that a
        SentencePiece decode drops the single leading space that `add_space_prefix` put there.
        """
        piece = self._pieces[self._check_id(token_id)]
        if piece is None:
            piece = self._pieces[token_id] = self._compute_piece(token_id)
        return piece

    def _compute_piece(self, token_id: int) -> bytes:
        token = self._tokens[token_id]
        kind = self._types[token_id]
        if self.model == "gpt2":
            # As tokenizers' ByteLevel decoder: a token spelled in the byte alphabet is bytes, any
            # other (a user-defined token stored as raw text) is its own UTF-8.
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in token)
            except KeyError:
                return token.encode("utf-8")
        if self._glm1_split is not None and token in _GLM1_PIECES:
            return _GLM1_PIECES[token].encode()
        if kind == TokenType.BYTE and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("▁", " ").encode("utf-8")

    def detokenizer(self, skip_special_tokens: bool = False) -> "IncrementalDetokenizer":
        """A streaming detokenizer over this vocabulary."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab})"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that are always whole UTF-8 characters.

    A character split across tokens (byte-fallback pieces, byte-level pieces of CJK or emoji) is held
    back until complete. For a SentencePiece vocabulary with `add_space_prefix`, the space that opens
    the text is dropped, as `Tokenizer.decode` drops it. The pieces joined, plus `flush()`, equal
    `tokenizer.decode(ids, skip_special_tokens)` whenever the bytes are valid UTF-8.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # a SentencePiece text's dummy-prefix space, a WordPiece text's first word-start "▁"
        self._strip_space = (tokenizer.model in ("llama", "t5") and tokenizer.add_space_prefix) or tokenizer.model == "bert"
        self._started = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (often "", never a partial character)."""
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        text = self._utf8.decode(self.tokenizer.token_to_piece(token_id), final=False)
        return self._strip(text)

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._strip(self._utf8.decode(b"", final=True))

    def _strip(self, text: str) -> str:
        if not self._started and text:
            self._started = True
            if self._strip_space and text.startswith(" "):
                text = text[1:]
        return text
