"""Tokenizer -> GGUF `tokenizer.ggml.*` metadata, as llama.cpp's convert_hf_to_gguf.py writes it.

Two kinds:
  * byte-level BPE from tokenizer.json (Llama 3, Qwen2, SmolLM2, GPT-2): model "gpt2", tokens, token types,
    merges, and `tokenizer.ggml.pre`, the pre-tokenizer name llama.cpp knows;
  * SentencePiece from tokenizer.model (Llama 2, Mistral): model "llama", tokens, scores, token types
    (byte tokens included).
Both add the special-token ids, add_bos/add_eos, EOT and the chat template.
  * WordPiece from tokenizer.json (BERT): model "bert", llama.cpp's phantom-space token list, special ids
    as llama.cpp's gguf-py SpecialVocab finds them, and the BertNormalizer settings (see load_wordpiece).
  * BART's and mBART's tokenizer.json kept whole under tokenizer.huggingface.json (see load_hf_json).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType

from .errors import ConversionError

# llama.cpp (convert_hf_to_gguf.py get_vocab_base_pre) names the BPE pre-tokenizer by hashing the ids
# of this text; a few hashes of the families we support. Anything else is matched on its config below.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# The pre-tokenizer configs (tokenizer.json "pre_tokenizer", flattened) of those families.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE_CONFIGS: dict[tuple[tuple[str, Any], ...], str] = {
    (("Split", LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("ByteLevel", True),): "gpt-2",
}

# Texts of end-of-turn tokens (llama.cpp's llama-vocab.cpp looks for the same ones).
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|endoftext|>")


@dataclass
class Vocab:
    model: str                                  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad, eot
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool = False      # SentencePiece's normalizer option (llama.cpp's key)
    chat_template: str | list[dict[str, str]] | None = None
    add_sep: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)        # other keys: bool, int or str values
    precompiled_charsmap: bytes = b""           # SentencePiece unigram normalizer (tokenizer.ggml.precompiled_charsmap)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp `does_token_look_special`)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _flatten_pre_tokenizer(pt: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    if not pt:
        return ()
    if pt.get("type") == "Sequence":
        return tuple(x for p in pt.get("pretokenizers", []) for x in _flatten_pre_tokenizer(p))
    kind = pt.get("type", "")
    if kind == "Split":
        pattern = pt.get("pattern", {})
        return ((kind, pattern.get("Regex", pattern.get("String"))),)
    if kind == "ByteLevel":
        return ((kind, bool(pt.get("use_regex", True))),)
    if kind == "Digits":
        return ((kind, bool(pt.get("individual_digits", False))),)
    return ((kind, None),)


def detect_bpe_pre(tokenizer_json: Path, tj: dict[str, Any]) -> str:
    """The llama.cpp name of the pre-tokenizer: by llama.cpp's hash of CHKTXT's ids, else by config."""
    try:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHKTXT).ids
        name = KNOWN_PRE_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())
        if name:
            return name
    except Exception:  # a tokenizer.json `tokenizers` cannot load is still matched on its config
        pass
    signature = _flatten_pre_tokenizer(tj.get("pre_tokenizer"))
    name = KNOWN_PRE_CONFIGS.get(signature)
    if name is None:
        raise ConversionError(
            f"unrecognized BPE pre-tokenizer in {tokenizer_json} ({signature}); "
            f"supported: {', '.join(sorted(set(KNOWN_PRE_CONFIGS.values())))}")
    return name


def _is_byte_level(tj: dict[str, Any]) -> bool:
    kinds = [k for k, _ in _flatten_pre_tokenizer(tj.get("pre_tokenizer"))]
    return "ByteLevel" in kinds or (tj.get("decoder") or {}).get("type") == "ByteLevel"


def _merges(model: dict[str, Any], path: Path) -> list[str]:
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        # since transformers 4.45 a merge is a pair; llama.cpp wants "a b" with spaces as U+0120
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    if merges and not isinstance(merges[0], str):
        raise ConversionError(f"cannot read {path}: unknown merges format")
    return list(merges)


def load_bpe(model_dir: Path, n_vocab: int) -> Vocab:
    path = model_dir / "tokenizer.json"
    tj = _read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(tj):
        raise ConversionError(f"unsupported tokenizer in {path}: only byte-level BPE tokenizer.json "
                              "or a SentencePiece tokenizer.model can be converted")
    id_to_text: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        id_to_text[i] = a["content"]
    if id_to_text and max(id_to_text) >= n_vocab:
        raise ConversionError(f"tokenizer in {path} has token id {max(id_to_text)} but config.json vocab_size "
                              f"is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        text = id_to_text.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(TokenType.CONTROL if added[i].get("special") or looks_special(text)
                         else TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    vocab = Vocab(model="gpt2", pre=detect_bpe_pre(path, tj), tokens=tokens, token_types=types,
                  merges=_merges(model, path), add_bos=False, add_eos=False)
    _add_bos_eos_from_post_processor(vocab, tj.get("post_processor"))
    return vocab


def _add_bos_eos_from_post_processor(vocab: Vocab, pp: dict[str, Any] | None) -> None:
    """A TemplateProcessing post-processor that wraps each sequence in special tokens means HF adds them."""
    for proc in (pp or {}).get("processors", [pp] if pp else []):
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single", [])
        if len(single) > 1:
            vocab.add_bos = "SpecialToken" in single[0]
            vocab.add_eos = "SpecialToken" in single[-1]
            first, last = single[0].get("SpecialToken", {}).get("id"), single[-1].get("SpecialToken", {}).get("id")
            text_to_id = {t: i for i, t in enumerate(vocab.tokens)}
            if first in text_to_id:
                vocab.special_ids.setdefault("bos", text_to_id[first])
            if last in text_to_id:
                vocab.special_ids.setdefault("eos", text_to_id[last])


@dataclass
class SentencePieceModel:
    """The pieces of a SentencePiece .model file. Its piece types (normal, unknown, control,
    user-defined, unused, byte) are numbered as GGUF's token types."""
    pieces: list[str]
    scores: list[float]
    types: list[int]
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool  # the normalizer strips spaces at the ends and collapses runs of them
    special_ids: dict[str, int]     # bos, eos, unk, pad as the trainer set them
    model_type: int = 2             # the trainer's: 1 unigram, 2 BPE
    precompiled_charsmap: bytes = b""  # the normalizer's character map (unigram models such as T5's)


def read_sentencepiece(path: Path) -> SentencePieceModel:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if not proto.pieces:
        raise ConversionError(f"cannot read {path}: not a SentencePiece model (no pieces)")
    spec = proto.trainer_spec
    special = {typ: i for typ, i in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id),
                                     ("pad", spec.pad_id)) if 0 <= i < len(proto.pieces)}
    return SentencePieceModel(pieces=[p.piece for p in proto.pieces], scores=[p.score for p in proto.pieces],
                              types=[int(p.type) for p in proto.pieces],
                              add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix,
                              remove_extra_whitespaces=proto.normalizer_spec.remove_extra_whitespaces,
                              special_ids=special, model_type=int(spec.model_type),
                              precompiled_charsmap=bytes(proto.normalizer_spec.precompiled_charsmap))


def load_sentencepiece(model_dir: Path, n_vocab: int, sp: SentencePieceModel | None = None) -> Vocab:
    """tokenizer.model (`sp`: its contents, when the caller has read them already) and the added tokens."""
    path = model_dir / "tokenizer.model"
    sp = sp or read_sentencepiece(path)
    path = path if path.is_file() else model_dir / "spiece.model"
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    if len(sp.pieces) > n_vocab:
        raise ConversionError(f"{path} has {len(sp.pieces)} tokens but config.json vocab_size is {n_vocab}")
    tokens[:len(sp.pieces)], scores[:len(sp.pieces)], types[:len(sp.pieces)] = sp.pieces, sp.scores, sp.types

    def add_token(i: int, text: str, special: bool) -> None:
        if i >= n_vocab:
            raise ConversionError(f"added token {text!r} has id {i} but config.json vocab_size is {n_vocab}")
        if special or looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp wants user-defined tokens pre-normalized
            types[i] = TokenType.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0

    if (model_dir / "added_tokens.json").is_file():
        for text, i in _read_json(model_dir / "added_tokens.json").items():
            add_token(int(i), text, False)
    config = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}
    for i, data in (config.get("added_tokens_decoder") or {}).items():
        add_token(int(i), data["content"], bool(data.get("special")))
    if (model_dir / "tokenizer.json").is_file():
        # tokens added on top of the SentencePiece model (transformers 5 keeps them only here)
        for a in _read_json(model_dir / "tokenizer.json").get("added_tokens", []):
            if a["id"] >= len(sp.pieces):
                add_token(a["id"], a["content"], bool(a.get("special")))

    return Vocab(model="llama", pre="default", tokens=tokens, token_types=[int(t) for t in types],
                 scores=scores, special_ids=dict(sp.special_ids), add_bos=True, add_eos=False,
                 add_space_prefix=sp.add_dummy_prefix, remove_extra_whitespaces=sp.remove_extra_whitespaces)


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


# THUDM's tokenizers add these after the SentencePiece / tiktoken vocabulary, in this order
# (tokenization_chatglm.py); GLM-4 adds more, listed in its tokenizer_config.json.
CHATGLM_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                   "<|observation|>")
GLM4_SPECIAL = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                "<|end_of_video|>")


def is_chatglm2(model_dir: Path) -> bool:
    """ChatGLM2 and ChatGLM3 share config.json and tokenizer.model; ChatGLM3's tokenizer adds the role
    tokens and chats with them. The checkpoint's name tells them apart; unnamed folders are ChatGLM3."""
    config = _read_json(model_dir / "config.json")
    names = f"{config.get('_name_or_path', '')} {model_dir.resolve().name}".lower()
    return "chatglm2" in names and "chatglm3" not in names


def load_chatglm(model_dir: Path, n_vocab: int) -> Vocab:
    """ChatGLM2/3's SentencePiece tokenizer.model, or GLM-4's tiktoken tokenizer.model (base64 token and
    rank per line), with THUDM's special tokens, as llama.cpp's ChatGLMModel.set_vocab writes them."""
    path = model_dir / "tokenizer.model"
    try:
        sp = read_sentencepiece(path)
    except ConversionError:
        sp = None  # GLM-4's tiktoken file
    if sp is not None:
        vocab = load_sentencepiece(model_dir, n_vocab, sp)
        n_sp, chatglm2 = len(sp.pieces), is_chatglm2(model_dir)
        specials = CHATGLM_SPECIAL[:5] if chatglm2 else CHATGLM_SPECIAL
        for k, text in enumerate(specials):
            if text not in vocab.tokens and n_sp + k < n_vocab:
                vocab.tokens[n_sp + k], vocab.token_types[n_sp + k], vocab.scores[n_sp + k] = text, TokenType.CONTROL, 0.0
        vocab.pre = "chatglm-spm"
        vocab.chat_template = _builtin_template("chatglm2" if chatglm2 else "chatglm3")
    else:
        vocab = _load_tiktoken(path, n_vocab)
    _set_glm_special_ids(vocab)
    return vocab


def _set_glm_special_ids(vocab: Vocab) -> None:
    """THUDM's turn and end tokens, as llama.cpp's ChatGLMModel names them."""
    for typ, text in (("eot", "<|user|>"), ("eos", "<|endoftext|>"), ("unk", "<|endoftext|>")):
        if text in vocab.tokens:
            vocab.special_ids[typ] = vocab.tokens.index(text)


def _load_tiktoken(path: Path, n_vocab: int) -> Vocab:
    import base64

    ranks: dict[bytes, int] = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: neither SentencePiece nor tiktoken ({e})") from None
    if max(ranks.values(), default=-1) >= n_vocab:
        raise ConversionError(f"{path} has token id {max(ranks.values())} but config.json vocab size is {n_vocab}")
    byte_char = _byte_chars()
    spell = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    merges = []
    for token, rank in ranks.items():
        tokens[rank], types[rank] = spell(token), int(TokenType.NORMAL)
        if len(token) > 1:
            # the pair BPE merges last to make this token: BPE on its bytes with ranks below its own
            parts = _tiktoken_bpe(ranks, token, rank)
            if len(parts) == 2:
                merges.append((rank, f"{spell(parts[0])} {spell(parts[1])}"))
    config_path = path.parent / "tokenizer_config.json"
    added = _read_json(config_path).get("added_tokens_decoder", {}) if config_path.is_file() else {}
    specials = {int(i): d["content"] for i, d in added.items()} or {len(ranks) + k: t for k, t in enumerate(GLM4_SPECIAL)}
    for i, text in specials.items():
        if i < n_vocab:
            tokens[i], types[i] = text, int(TokenType.CONTROL)
    return Vocab(model="gpt2", pre="chatglm-bpe", tokens=tokens, token_types=types,
                 merges=[m for _, m in sorted(merges)], add_bos=False, add_eos=False)


def _byte_chars() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in printable):
        table[b] = chr(256 + extra)
    return table


def _tiktoken_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


CHATGLM1_SPECIAL = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")


def load_chatglm1(model_dir: Path, n_vocab: int) -> Vocab:
    """ChatGLM-6B's ice_text.model, after its image tokens (20000 in the first release, none since; the
    offset is config.json's gmask_token_id minus the piece id of [gMASK]). The text rewriting of
    THUDM's tokenizer (newline as <n>, tab as <|tab|>, runs of spaces as <|blank_N|>) is named by
    `tokenizer.ggml.pre = "chatglm1"`; the runtime applies it."""
    path = model_dir / "ice_text.model"
    sp = read_sentencepiece(path)
    config = _read_json(model_dir / "config.json")
    n_image = 20000 if n_vocab >= len(sp.pieces) + 20000 else 0
    if isinstance(config.get("gmask_token_id"), int) and "[gMASK]" in sp.pieces:
        n_image = config["gmask_token_id"] - sp.pieces.index("[gMASK]")
    if n_image < 0 or n_image + len(sp.pieces) > n_vocab:
        raise ConversionError(f"{path} has {len(sp.pieces)} pieces after {n_image} image tokens but config.json "
                              f"vocab_size is {n_vocab}")
    tokens = [f"<image_{i}>" for i in range(n_image)] + [f"[PAD{i}]" for i in range(n_image, n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    scores = [-10000.0] * n_vocab
    for i, (text, score, kind) in enumerate(zip(sp.pieces, sp.scores, sp.types)):
        tokens[n_image + i], scores[n_image + i] = text, score
        types[n_image + i] = int(TokenType.CONTROL) if text in CHATGLM1_SPECIAL else kind
    vocab = Vocab(model="llama", pre="chatglm1", tokens=tokens, token_types=types, scores=scores, add_bos=False,
                  add_space_prefix=sp.add_dummy_prefix, remove_extra_whitespaces=sp.remove_extra_whitespaces,
                  chat_template=_builtin_template("chatglm1"))
    for typ, text in (("bos", "<sop>"), ("eos", "<eop>"), ("mask", "[gMASK]"), ("unk", "<unk>"), ("pad", "<pad>")):
        if text in tokens:
            vocab.special_ids[typ] = tokens.index(text)
    return vocab


def _builtin_template(name: str) -> str:
    """pyengine's Jinja version of a THUDM chat format, written into the GGUF when the folder has no template."""
    from pyengine.chat_template import BUILTIN_TEMPLATES

    return BUILTIN_TEMPLATES[name]


def load_glm4_bpe(model_dir: Path, n_vocab: int) -> Vocab:
    """GLM-4's tokenizer.json (the -hf checkpoints): byte-level BPE with GLM-4's special tokens and no BOS."""
    vocab = load_bpe(model_dir, n_vocab)
    vocab.pre, vocab.add_bos = "chatglm-bpe", False
    _set_glm_special_ids(vocab)
    return vocab


# --- WordPiece (BERT) ------------------------------------------------------------------------------------

# llama.cpp names the pre-tokenizer of a WordPiece vocabulary by the same hash of CHKTXT's ids (special
# tokens included); llama.cpp's tokenizer ignores the name for WordPiece, so an unknown one is "default".
KNOWN_WORDPIECE_HASHES = {
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",  # bge-small-en, MiniLM
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",  # bge-large-zh
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
}
# BertNormalizer settings llama.cpp has keys for (written as its SpecialVocab writes them) ...
NORMALIZER_LOWERCASE_KEY = "tokenizer.ggml.normalizer.lowercase"
NORMALIZER_STRIP_ACCENTS_KEY = "tokenizer.ggml.normalizer.strip_accents"
# ... and the ones it has none for (pyengine's own keys; absent means BertNormalizer's default, true,
# and WordPiece's 100)
CLEAN_TEXT_KEY = "pyengine.tokenizer.bert.clean_text"
CHINESE_CHARS_KEY = "pyengine.tokenizer.bert.handle_chinese_chars"
MAX_WORD_CHARS_KEY = "pyengine.tokenizer.bert.max_input_chars_per_word"


def phantom_token(token: str, token_type: int) -> str:
    """llama.cpp's spelling of a WordPiece token: a word start gets "\u2581", a "##" continuation loses
    its "##", control tokens stay as they are (conversion/bert.py BertModel.set_vocab)."""
    if token_type == TokenType.CONTROL:
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def _bert_normalizer(normalizer: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """The GGUF keys of a tokenizer.json BertNormalizer (None: no normalizer, nothing changes the text)."""
    if normalizer is None:
        return {NORMALIZER_LOWERCASE_KEY: False, NORMALIZER_STRIP_ACCENTS_KEY: False, CLEAN_TEXT_KEY: False,
                CHINESE_CHARS_KEY: False}
    if normalizer.get("type") != "BertNormalizer":
        raise ConversionError(f"unsupported normalizer {normalizer.get('type')!r} in {path}: only BertNormalizer "
                              "WordPiece tokenizers can be converted")
    keys: dict[str, Any] = {}
    # as gguf-py SpecialVocab._parse_normalizer: each key only where tokenizer.json has it, strip_accents
    # only when set (null: follow lowercase, which is also llama.cpp's default)
    if isinstance(normalizer.get("lowercase"), bool):
        keys[NORMALIZER_LOWERCASE_KEY] = normalizer["lowercase"]
    if isinstance(normalizer.get("strip_accents"), bool):
        keys[NORMALIZER_STRIP_ACCENTS_KEY] = normalizer["strip_accents"]
    keys[CLEAN_TEXT_KEY] = bool(normalizer.get("clean_text", True))
    keys[CHINESE_CHARS_KEY] = bool(normalizer.get("handle_chinese_chars", True))
    return keys


def _wordpiece_pre(path: Path) -> str:
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.no_padding()
        tok.no_truncation()
        ids = tok.encode(CHKTXT).ids
    except Exception:  # an unreadable tokenizer.json gets llama.cpp's default name
        return "default"
    return KNOWN_WORDPIECE_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest(), "default")


def _special_vocab(tj: dict[str, Any], tok_config: dict[str, Any] | None, config: dict[str, Any],
                   n_vocab: int, vocab: Vocab) -> None:
    """Special-token ids and add_bos/add_eos/add_sep as llama.cpp's gguf-py SpecialVocab finds them for a
    tokenizer.json with a TemplateProcessing post-processor (BERT's `[CLS] $A [SEP]`): [CLS] is BOS, [SEP]
    EOS and separator. Without tokenizer_config.json only config.json's *_token_id are used, as there.
    (SpecialVocab also finds cls, but llama.cpp's writer has no key for it: BOS is the one to read.)"""
    tc = dict(tok_config) if tok_config else None
    text = lambda e: e if isinstance(e, str) else e.get("content") if isinstance(e, dict) else None  # noqa: E731
    bos, cls = text((tc or {}).get("bos_token")), text((tc or {}).get("cls_token"))
    eos, sep = text((tc or {}).get("eos_token")), text((tc or {}).get("sep_token"))
    if tc and not bos and cls:
        tc["bos_token"] = bos = cls
    if tc and not eos and sep:
        tc["eos_token"] = eos = sep
    flags: dict[str, bool] = {}
    pp = tj.get("post_processor") or {}
    for proc in pp.get("processors", [pp]):
        if proc.get("type") != "TemplateProcessing":
            continue
        single, pair = proc.get("single", []), proc.get("pair", [])
        first = last = None
        if len(single) > 1:
            first = single[0].get("SpecialToken", {}).get("id")
            if first:
                if not tc:
                    bos = first
                elif first not in (bos, cls):
                    if not bos:
                        tc["bos_token"] = bos = first
                    if not cls:
                        tc["cls_token"] = cls = first
                flags["bos"] = first in (bos, cls)
            last = single[-1].get("SpecialToken", {}).get("id")
            if last:
                if not tc:
                    eos = last
                elif last != eos:
                    tc["eos_token"] = eos = last
                flags["eos"] = last == eos
        if pair:
            start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
            stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
            middle = pair[start:stop]
            if (middle and middle[0].get("Sequence", {}).get("id") == "A"
                    and middle[-1].get("Sequence", {}).get("id") == "B" and middle[1:-1]):
                middle = middle[1:-1]
                add_sep = False
                entry = middle[0].get("SpecialToken", {}).get("id")
                if entry and entry in (sep, eos) and not last:
                    add_sep = True
                if len(middle) == 2 and middle[1].get("SpecialToken", {}).get("id") in (sep, eos):
                    add_sep = True
                flags["sep"] = add_sep
    ids: dict[str, int] = {}
    types = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
    if tc:
        added = tj.get("added_tokens", [])
        for typ in types:
            if isinstance(tc.get(f"add_{typ}_token"), bool):
                flags.setdefault(typ, tc[f"add_{typ}_token"])
            content = text(tc.get(f"{typ}_token"))
            i = next((a.get("id") for a in added if a.get("content") == content), None) if content else None
            if isinstance(i, int) and 0 <= i < n_vocab:
                ids.setdefault(typ, i)
    for typ in types:
        i = config.get(f"{typ}_token_id")
        if isinstance(i, int) and 0 <= i < n_vocab:
            ids.setdefault(typ, i)
    ids.pop("cls", None)
    vocab.special_ids = ids
    vocab.add_bos, vocab.add_eos, vocab.add_sep = flags.get("bos"), flags.get("eos"), flags.get("sep")


def load_wordpiece(model_dir: Path, n_vocab: int) -> Vocab:
    """A BERT tokenizer.json as llama.cpp's BertModel.set_vocab writes it: tokens in its phantom-space
    spelling (see phantom_token), types (added special tokens CONTROL, other added tokens USER_DEFINED,
    ids without a token UNUSED "[PAD<i>]"), `tokenizer.ggml.token_type_count` (config.json
    type_vocab_size), the special ids and flags of _special_vocab, and the normalizer keys of
    _bert_normalizer plus MAX_WORD_CHARS_KEY, so that pyengine's runtime rebuilds the exact tokenizer."""
    path = model_dir / "tokenizer.json"
    tj = _read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ConversionError(f"unsupported tokenizer in {path}: a BERT model needs a WordPiece tokenizer.json "
                              f"(found {model.get('type')!r})")
    if model.get("continuing_subword_prefix", "##") != "##":
        raise ConversionError(f"unsupported tokenizer in {path}: continuing_subword_prefix "
                              f"{model['continuing_subword_prefix']!r} (llama.cpp's vocabulary assumes '##')")
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") != "BertPreTokenizer":
        raise ConversionError(f"unsupported pre-tokenizer {pre.get('type')!r} in {path}: only BertPreTokenizer")
    id_to_text: dict[int, str] = {i: t for t, i in (model.get("vocab") or {}).items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        id_to_text[i] = a["content"]
    if id_to_text and max(id_to_text) >= n_vocab:
        raise ConversionError(f"tokenizer in {path} has token id {max(id_to_text)} but config.json vocab_size "
                              f"is {n_vocab}")
    unk = model.get("unk_token", "[UNK]")
    if unk not in id_to_text.values():
        raise ConversionError(f"{path}: the unknown token {unk!r} is not in the vocabulary")
    tokens, types = [], []
    for i in range(n_vocab):
        text = id_to_text.get(i)
        if text is None:
            text, kind = f"[PAD{i}]", TokenType.UNUSED
        elif i in added:
            if added[i].get("special") or looks_special(text):
                kind = TokenType.CONTROL
            else:
                text, kind = text.replace("\u2581", " "), TokenType.USER_DEFINED
        else:
            kind = TokenType.NORMAL
        tokens.append(phantom_token(text, kind))
        types.append(int(kind))
    config = _read_json(model_dir / "config.json")
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else None
    vocab = Vocab(model="bert", pre=_wordpiece_pre(path), tokens=tokens, token_types=types)
    _special_vocab(tj, tok_config, config, n_vocab, vocab)
    vocab.extra = {"tokenizer.ggml.token_type_count": int(config.get("type_vocab_size", 1)),
                   **_bert_normalizer(tj.get("normalizer"), path),
                   MAX_WORD_CHARS_KEY: int(model.get("max_input_chars_per_word", 100))}
    return vocab


def load_t5(model_dir: Path, n_vocab: int) -> Vocab:
    """T5's SentencePiece unigram model (spiece.model, or tokenizer.model) as llama.cpp's T5Model writes it:
    tokenizer.ggml.model "t5", the pieces with their scores, the normalizer's precompiled character map."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        path = model_dir / "spiece.model"
    sp = read_sentencepiece(path)
    if sp.model_type != 1:
        raise ConversionError(f"{path}: a SentencePiece model of type {sp.model_type}, not unigram (1), which "
                              "T5's vocabulary is")
    vocab = load_sentencepiece(model_dir, n_vocab, sp)
    vocab.model = "t5"
    # T5 appends </s> and has no BOS; llama.cpp's SpecialVocab reads the same from T5's "$A </s>" template
    vocab.add_bos, vocab.add_eos, vocab.add_sep = None, True, False
    vocab.precompiled_charsmap = sp.precompiled_charsmap
    return vocab


# --- a tokenizer.json kept whole (BART, mBART) ----------------------------------------------------------
# tokenizer.huggingface.json (gguf-py's key) holds the model's tokenizer.json, which pyengine's Tokenizer runs
# as it is with `tokenizers`; the tokenizer.ggml.* keys describe the same vocabulary (llama.cpp's "gpt2"
# byte-level BPE with merges, or its "t5" unigram with scores). A folder without tokenizer.json gets the one
# transformers 5 builds from its other files: BART's vocab.json + merges.txt (RobertaTokenizer), mBART's
# sentencepiece.bpe.model with fairseq's ids (MBartTokenizer).
HF_JSON_KEY = "tokenizer.huggingface.json"
# transformers' MBartTokenizer: fairseq's language codes, after the SentencePiece pieces
MBART_LANGUAGE_CODES = ("ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN",
                        "it_IT", "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO",
                        "ru_RU", "si_LK", "tr_TR", "vi_VN", "zh_CN")
# transformers' MBart50Tokenizer: those, then mBART-50's 27 others, in fairseq's order
MBART50_LANGUAGE_CODES = MBART_LANGUAGE_CODES + (
    "af_ZA", "az_AZ", "bn_IN", "fa_IR", "he_IL", "hr_HR", "id_ID", "ka_GE", "km_KH", "mk_MK", "ml_IN", "mn_MN", "mr_IN",
    "pl_PL", "ps_AF", "pt_XX", "sv_SE", "sw_KE", "ta_IN", "te_IN", "th_TH", "tl_XX", "uk_UA", "ur_PK", "xh_ZA", "gl_ES",
    "sl_SI")


def _special_texts(tok_config: dict[str, Any]) -> dict[str, str]:
    names = dict(bos="<s>", eos="</s>", sep="</s>", cls="<s>", unk="<unk>", pad="<pad>", mask="<mask>")
    return {k: _token_text(tok_config.get(f"{k}_token")) or v for k, v in names.items()}


def _roberta_tokenizer_json(model_dir: Path, tok_config: dict[str, Any]) -> str:
    """BART's vocab.json + merges.txt as transformers' RobertaTokenizer builds them (byte-level BPE, <s> $A </s>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = _read_json(model_dir / "vocab.json")
    try:
        lines = (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {model_dir / 'merges.txt'}: {e}") from None
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
        raise ConversionError(f"{model_dir}: vocab.json must map tokens to ids and merges.txt hold pairs")
    special = _special_texts(tok_config)
    prefix_space = bool(tok_config.get("add_prefix_space", False))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(special[k], normalized=False, special=True)
                            for k in ("bos", "pad", "eos", "unk", "mask")])
    ids = {k: tok.token_to_id(special[k]) for k in ("sep", "cls")}
    if None in ids.values():
        raise ConversionError(f"{model_dir / 'vocab.json'} has no {special['sep']!r} / {special['cls']!r}")
    tok.post_processor = processors.RobertaProcessing((special["sep"], ids["sep"]), (special["cls"], ids["cls"]),
                                                      trim_offsets=True, add_prefix_space=prefix_space)
    return tok.to_str()


def _tokenizer_class(tok_config: dict[str, Any], default: str | None) -> str:
    return str(tok_config.get("tokenizer_class") or default or "").removesuffix("Fast")


def _mbart_tokenizer_json(model_dir: Path, tok_config: dict[str, Any]) -> str:
    """mBART's sentencepiece.bpe.model as transformers 5's MBartTokenizer builds it: fairseq's ids (<s> <pad>
    </s> <unk>, the pieces after SentencePiece's first three, the language codes, <mask>), a unigram model,
    no normalizer, whitespace split and "▁" prefixes, `$A </s> src_lang` (en_XX unless tokenizer_config.json
    says otherwise). With tokenizer_config.json's MBart50Tokenizer: mBART-50's 52 codes and its pipeline
    (see _set_mbart_template)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    sp = read_sentencepiece(model_dir / "sentencepiece.bpe.model")
    if sp.model_type != 1:
        raise ConversionError(f"{model_dir / 'sentencepiece.bpe.model'}: a SentencePiece model of type "
                              f"{sp.model_type}, not unigram (1), which mBART's vocabulary is")
    special = _special_texts(tok_config)
    fixed = [special[k] for k in ("bos", "pad", "eos", "unk")]
    vocab = [(t, 0.0) for t in fixed] + list(zip(sp.pieces[3:], sp.scores[3:]))
    codes = MBART50_LANGUAGE_CODES if _tokenizer_class(tok_config, None) == "MBart50Tokenizer" else MBART_LANGUAGE_CODES
    vocab += [(code, 0.0) for code in codes] + [(special["mask"], 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    added = [AddedToken(t, normalized=False, special=True) for t in fixed]
    added += [AddedToken(special["mask"], lstrip=True, normalized=False, special=True)]
    added += [AddedToken(code, normalized=False, special=True) for code in codes]
    tok.add_special_tokens(added)
    _set_mbart_template(tok, tok_config, model_dir, "MBartTokenizer", sp.precompiled_charsmap)
    return tok.to_str()


def _set_mbart_template(tok: Any, tok_config: dict[str, Any], model_dir: Path, default_class: str | None,
                        charsmap: bytes = b"") -> None:
    """What transformers' mBART tokenizers set whatever tokenizer.json says. MBartTokenizer: the special tokens
    `$A </s> src_lang`. MBart50Tokenizer (transformers 5) keeps only the vocabulary and rebuilds the rest: the
    normalizer (SentencePiece's character map `charsmap`, when the file has one, then runs of spaces as one),
    "▁" prefixes without a whitespace split, and the language code in front, `src_lang $A </s>`. src_lang comes
    from tokenizer_config.json, else en_XX. Another tokenizer class keeps the tokenizer.json's own pipeline."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    cls = _tokenizer_class(tok_config, default_class)
    if cls not in ("MBartTokenizer", "MBart50Tokenizer"):
        return
    lang, eos = tok_config.get("src_lang") or "en_XX", _special_texts(tok_config)["eos"]
    for token in (lang, eos):
        if tok.token_to_id(token) is None:
            raise ConversionError(f"{model_dir}: the {cls}'s token {token!r} (tokenizer_config.json src_lang / "
                                  "eos_token) is not in its vocabulary")
    special = [(eos, tok.token_to_id(eos)), (lang, tok.token_to_id(lang))]
    if cls == "MBartTokenizer":
        tok.post_processor = processors.TemplateProcessing(
            single=["$A", eos, lang], pair=["$A", "$B", eos, lang], special_tokens=special)
        return
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap)] * bool(charsmap)
                                          + [normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=[lang, "$A", eos], pair=[lang, "$A", "$B", eos], special_tokens=special)


def _precompiled_charsmap(tokenizer_json: dict[str, Any]) -> bytes:
    """The character map of the first Precompiled normalizer of a tokenizer.json (as transformers 5 finds it)."""
    import base64

    norm = tokenizer_json.get("normalizer") or {}
    for n in norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]:
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return base64.b64decode(n["precompiled_charsmap"])
    return b""


def load_hf_json(model_dir: Path, n_vocab: int, kind: str) -> Vocab:
    """kind "bpe" (BART) or "unigram" (mBART): the folder's tokenizer.json, or the one built from its other files."""
    from tokenizers import Tokenizer

    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    path = model_dir / "tokenizer.json"
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConversionError(f"cannot read {path}: {e}") from None
    elif kind == "bpe" and (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        text = _roberta_tokenizer_json(model_dir, tok_config)
    elif kind == "unigram" and (model_dir / "sentencepiece.bpe.model").is_file():
        text = _mbart_tokenizer_json(model_dir, tok_config)
    else:
        other = "vocab.json and merges.txt" if kind == "bpe" else "sentencepiece.bpe.model"
        raise ConversionError(f"no tokenizer in {model_dir}: expected tokenizer.json or {other}")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:
        raise ConversionError(f"cannot load the tokenizer of {model_dir} ({path.name}): {e}") from None
    if kind == "unigram":
        _set_mbart_template(tok, tok_config, model_dir, None, _precompiled_charsmap(json.loads(text)))
        text = tok.to_str()
    tj = json.loads(text)
    model = tj.get("model") or {}
    want = "BPE" if kind == "bpe" else "Unigram"
    if model.get("type") != want:
        raise ConversionError(f"{path}: a {model.get('type')} tokenizer, where this model has a {want} one")
    id_to_text = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if id_to_text and max(id_to_text) >= n_vocab:
        raise ConversionError(f"tokenizer of {model_dir} has token id {max(id_to_text)} but config.json vocab_size "
                              f"is {n_vocab}")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    scores = dict(model.get("vocab", [])) if kind == "unigram" else {}
    tokens, types, token_scores = [], [], []
    for i in range(n_vocab):
        text_i = id_to_text.get(i)
        if text_i is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        else:
            tokens.append(text_i)
            a = added.get(i)
            types.append(int(TokenType.NORMAL if a is None else TokenType.CONTROL if a.get("special")
                             else TokenType.USER_DEFINED))
        token_scores.append(float(scores.get(text_i, -10000.0)) if text_i is not None else -10000.0)
    # llama.cpp's flags for the same ids: what the post-processor puts around a text
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), 0)
    special_ids = {typ: tok.token_to_id(t) for typ, t in _special_texts(tok_config).items()
                   if typ in ("bos", "eos", "unk", "pad") and tok.token_to_id(t) is not None}
    if kind == "bpe":
        try:
            pre = detect_bpe_pre(path, tj) if path.is_file() else "gpt-2"
        except ConversionError:
            pre = "default"  # the tokenizer.json runs as it is; llama.cpp's name is for other readers
        vocab = Vocab(model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=_merges(model, path))
    else:
        vocab = Vocab(model="t5", pre="default", tokens=tokens, token_types=types, scores=token_scores,
                      add_space_prefix=True)
    vocab.special_ids = special_ids
    vocab.add_bos, vocab.add_eos = at > 0, len(full) > at + len(plain)
    vocab.extra[HF_JSON_KEY] = text
    return vocab


TOKENIZER_FILES = {"spm": ("tokenizer.model", load_sentencepiece), "bpe": ("tokenizer.json", load_bpe),
                   "chatglm": ("tokenizer.model", load_chatglm), "chatglm1": ("ice_text.model", load_chatglm1),
                   "glm4-bpe": ("tokenizer.json", load_glm4_bpe), "wordpiece": ("tokenizer.json", load_wordpiece),
                   "t5": ("spiece.model", load_t5),
                   # BART / mBART: any of the files load_hf_json takes
                   "hf-bpe": ("config.json", lambda d, n: load_hf_json(d, n, "bpe")),
                   "hf-unigram": ("config.json", lambda d, n: load_hf_json(d, n, "unigram"))}


def load_vocab(model_dir: Path, n_vocab: int, config: dict[str, Any],
               kinds: tuple[str, ...] = ("spm", "bpe")) -> Vocab:
    """The tokenizer of an HF model folder, from the first of `kinds` whose file is there (llama.cpp
    prefers tokenizer.model, SentencePiece, over tokenizer.json)."""
    for kind in kinds:
        fname, load = TOKENIZER_FILES[kind]
        if (model_dir / fname).is_file():
            vocab = load(model_dir, n_vocab)
            break
    else:
        names = " or ".join(TOKENIZER_FILES[k][0] for k in kinds)
        raise ConversionError(f"no tokenizer in {model_dir}: expected {names}")
    if vocab.model == "bert":
        return vocab  # its special ids and flags are llama.cpp's SpecialVocab's, set by load_wordpiece

    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = _read_json(tok_config_path) if tok_config_path.is_file() else {}
    # later sources only fill what earlier ones left unset: tokenizer_config.json, config.json, the model
    text_to_id: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        text_to_id.setdefault(t, i)
    special: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        text = _token_text(tok_config.get(f"{typ}_token"))
        if text is not None and text in text_to_id:
            special[typ] = text_to_id[text]
        elif isinstance(config.get(f"{typ}_token_id"), int) and 0 <= config[f"{typ}_token_id"] < n_vocab:
            special[typ] = config[f"{typ}_token_id"]
        elif typ in vocab.special_ids:
            special[typ] = vocab.special_ids[typ]
    for text in EOT_TEXTS:
        if text in text_to_id and vocab.token_types[text_to_id[text]] == TokenType.CONTROL:
            special["eot"] = text_to_id[text]
            break
    for typ in ("eot", "mask"):  # chosen by the loader (ChatGLM's <|user|>, [gMASK])
        if typ in vocab.special_ids:
            special[typ] = vocab.special_ids[typ]
    vocab.special_ids = special

    for typ in ("bos", "eos"):
        if isinstance(tok_config.get(f"add_{typ}_token"), bool):
            setattr(vocab, f"add_{typ}", tok_config[f"add_{typ}_token"])
    if isinstance(tok_config.get("add_prefix_space"), bool) and vocab.model == "llama":
        vocab.add_space_prefix = tok_config["add_prefix_space"]

    template = tok_config.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (model_dir / "chat_template.json").is_file():
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, (str, list)):
        vocab.chat_template = template
    return vocab


def write_vocab(w: GGUFWriter, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.token_types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for typ, i in vocab.special_ids.items():
        getattr(w, f"add_{typ}_token_id")(i)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        w.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.remove_extra_whitespaces:
        w.add_remove_extra_whitespaces(True)
    if vocab.precompiled_charsmap:
        w.add_precompiled_charsmap(vocab.precompiled_charsmap)
    if vocab.add_sep is not None:
        w.add_add_sep_token(vocab.add_sep)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)
    for key, value in vocab.extra.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
