"""pyengine's WordPiece tokenizer (`tokenizer.ggml.model = "bert"`), rebuilt from a converted GGUF's
metadata alone, against transformers' AutoTokenizer on the original folder: tiny trained tokenizers with
each BertNormalizer setting, and the real all-MiniLM-L6-v2 on 100+ varied sentences."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pyengine.gguf import read_metadata
from pyengine.tokenizer import Tokenizer
from pyengine_convert import convert
from test_convert_bert import make_bert, minilm_dir

SENTENCES = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "I'm fine, thanks. We'll see what they've done.",
    "Héllo wörld: Ünïcödé naïve café résumé façade jalapeño Ångström", "ÉCOLE NORMALE SUPÉRIEURE", "Ça va? Très bien!",
    "我想在apple工作1314151天～", "日本語のテキスト、カタカナとひらがな。", "한국어 문장입니다", "русский текст и Български",
    "Ελληνικά γράμματα", "עברית ועربية", "हिन्दी पाठ", "ภาษาไทยไม่มีช่องว่าง",
    "emojis 🦙🚀 and 😶‍🌫️ ✅ 👍🏽", "symbols <>[]{}()=+-*/%&|^~ @#$", "!!!???...,,,;;;:::", "''''''```````\"\"\"\"",
    "Numbers: 1 12 123 1234 12345 3.14 1,000,000 $5.99 50% 2024-01-01 10:30pm", "0x1F 1e-5 -42 +7 ½ ² ①",
    "a" * 99, "b" * 100, "c" * 101, "d" * 150 + " end", "Supercalifragilisticexpialidocious", "antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis and " + "x" * 120 + "y",
    "[CLS] in text [SEP] and [MASK] but [cls] or [UNK]!", "[PAD][PAD]", "tabs\tand\nnewlines\r\n  double  spaces  ",
    "", " ", "   leading and trailing   ", "\x00control\x07chars\u200bzero\u200dwidth\ufeffbom", "soft\u00adhyphen",
    "combining: e\u0301 a\u0308 n\u0303", "ﬁ ligature ﬀ Ⅻ ㎏", "full-width ＡＢＣ１２３", "don't can't won't y'all",
    "e-mail: someone@example.com https://example.org/path?q=1&r=2", "C++ and C# and F#", "snake_case camelCase kebab-case",
    "def forward(x):\n    return rmsnorm(x) * weight  # comment", "<html><body>Hi</body></html>", "$$ \\frac{a}{b} $$",
]
WORDS = ["model", "token", "embedding", "Paris", "Zürich", "naïveté", "北京", "東京", "42", "3.5", "🙂", "--", "l'été",
         "unbelievable", "ĳ", "straße", "İstanbul", "ΣΊΣΥΦΟΣ", "Ⓐ", "x²"]
# 100+ sentences: the list above and pairings of words with punctuation
ALL = SENTENCES + [f"{a} {b}, {c}!" for a, b, c in itertools.islice(itertools.permutations(WORDS, 3), 0, 3000, 37)]


def check_equal(tok: Tokenizer, hf, texts: list[str]) -> None:
    for text in texts:
        for special in (True, False):
            want = hf.encode(text, add_special_tokens=special)
            assert tok.encode(text, add_special_tokens=special) == want, (text, special)
    got = tok.encode_batch(texts)
    assert got == [hf.encode(t) for t in texts]
    for text, ids in zip(texts, got):
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids) == hf.decode(ids), text


VARIANTS = {
    "uncased": {},
    "cased": {"lowercase": False},
    "cased_strip_accents": {"lowercase": False, "strip_accents": True},
    "uncased_keep_accents": {"lowercase": True, "strip_accents": False},
    "no_chinese_split": {"handle_chinese_chars": False},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_tokenizers_equal_transformers(tmp_path, variant):
    from transformers import AutoTokenizer

    d = make_bert(tmp_path / variant, **VARIANTS[variant])
    out = tmp_path / "vocab.gguf"
    convert(d, out, qtype="f32", vocab_only=True)
    tok = Tokenizer.from_gguf(out)
    hf = AutoTokenizer.from_pretrained(d)
    assert tok.model == "bert" and tok.n_vocab == len(hf)
    check_equal(tok, hf, ALL)
    # the trained vocabulary is tiny: much of ALL is [UNK]; the corpus itself is not
    from checkpoints import CORPUS

    check_equal(tok, hf, CORPUS.splitlines())
    assert tok.unk_id in tok.encode("🐘") and tok.encode("quick brown fox", add_special_tokens=False) == \
        hf.encode("quick brown fox", add_special_tokens=False)


def test_tiny_special_ids_and_stream(tmp_path):
    from transformers import AutoTokenizer

    d = make_bert(tmp_path / "m")
    out = tmp_path / "vocab.gguf"
    convert(d, out, qtype="f32", vocab_only=True)
    tok = Tokenizer.from_gguf(out)
    hf = AutoTokenizer.from_pretrained(d)
    assert (tok.bos_id, tok.sep_id, tok.unk_id, tok.pad_id) == (
        hf.cls_token_id, hf.sep_token_id, hf.unk_token_id, hf.pad_token_id)
    ids = tok.encode("The quick brown fox, the lazy dog")
    assert ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id
    assert tok.is_special(ids[0]) and not tok.is_special(ids[1])
    det = tok.detokenizer(skip_special_tokens=True)
    text = "".join(det.add(i) for i in ids) + det.flush()
    assert text.replace(" ,", ",") == tok.decode(ids, skip_special_tokens=True)


def test_llama_cpp_defaults_without_keys(tmp_path):
    """A file with no special-token or normalizer keys gets llama.cpp's bert defaults (ids 101/102/100/0,
    lowercase and accent stripping)."""
    md = {"tokenizer.ggml.model": "bert",
          "tokenizer.ggml.tokens": [f"[unused{i}]" for i in range(100)] + ["[UNK]", "[CLS]", "[SEP]", "\u2581hello",
                                                                          "\u2581cafe", "s"],
          "tokenizer.ggml.token_type": [1] * 100 + [3, 3, 3, 1, 1, 1]}
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("HELLO Café cafes") == [101, 103, 104, 104, 105, 102]
    assert tok.encode("hello world", add_special_tokens=False) == [103, 100]
    assert tok.decode([101, 104, 105, 102], skip_special_tokens=True) == "cafes"


@pytest.fixture(scope="module")
def minilm_gguf(tmp_path_factory) -> tuple[Path, Path]:
    d = minilm_dir(tmp_path_factory)
    out = d.parent / "minilm-vocab.gguf"
    convert(d, out, qtype="f16", vocab_only=True)
    return d, out


def test_minilm_equals_transformers(minilm_gguf):
    from transformers import AutoTokenizer

    d, out = minilm_gguf
    assert len(ALL) >= 100
    tok = Tokenizer.from_gguf(out)
    hf = AutoTokenizer.from_pretrained(d)
    check_equal(tok, hf, ALL)
    md = read_metadata(out)
    assert md["tokenizer.ggml.pre"] == "jina-v2-en" and md["tokenizer.ggml.normalizer.lowercase"] is True
    # long words become [UNK] past max_input_chars_per_word, as in transformers
    assert tok.encode("a" * 101, add_special_tokens=False) == [hf.unk_token_id]
    assert tok.decode(tok.encode("Hello, World! naïve café 123"), skip_special_tokens=True) == "hello, world! naive cafe 123"
