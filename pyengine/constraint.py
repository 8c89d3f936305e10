"""Constrained sampling for JSON output: which tokens may come next so that the text stays a prefix
of a JSON document (one that matches a JSON Schema, if given).

This is what the server's `response_format` needs: {"type": "json_object"} is `json_constraint(tok)`,
{"type": "json_schema", "json_schema": {"schema": s}} is `json_constraint(tok, s)`. Per step:

    constraint = json_constraint(llm.tokenizer, schema)
    logits[~constraint.mask()] = -np.inf
    token = sample(logits)
    constraint.advance(token)          # stop once token is in tokenizer.eog_ids

The grammar work is done by llguidance (github.com/guidance-ai/llguidance, the library llama.cpp
integrates for its JSON-schema sampling): a Rust Earley parser with a lazy lexer walked over a trie of
the vocabulary's byte strings (a mask in 10-50 us on SmolLM2's 49k vocabulary), no runtime
dependencies. The alternatives do not fit: xgrammar requires torch, outlines-core compiles a schema
to a regular expression (so "any JSON object" exists only up to a fixed nesting depth), and
interegular is a regex library, not a JSON one.

What we add on top: the vocabulary given as the bytes each token contributes to the decoded text
(`Tokenizer.token_to_piece`: byte-level BPE pieces, SentencePiece "▁" and <0xNN> byte fallbacks),
control/unknown/unused tokens marked special so no grammar ever allows them, end-of-generation as
the tokenizer's `eog_ids`, and bounded whitespace (`LEADING_WHITESPACE` before the document,
`WHITESPACE` between its tokens) so that a model cannot loop on spaces.

What llguidance decides, and clients may notice:
* Object properties come in the schema's `properties` order (as in OpenAI's structured outputs);
  further properties, where allowed, come after them.
* Where the grammar leaves one way on (the rest of `null`, a property name the schema fixes), the
  mask allows only the first token of that text as the tokenizer cuts it, not every token that fits.
* The escape "\\/" is not offered ("/" is written as itself); every other escape of RFC 8259 is.
* Keywords it cannot enforce make `json_constraint` raise ValueError: "not", "uniqueItems", unknown
  "format"s, unresolvable "$ref"s, among others. "pattern", "minLength"/"maxLength",
  "minimum"/"maximum", "enum", "const", "anyOf", "$ref"/"$defs", "minItems"/"maxItems",
  "additionalProperties" are enforced.
"""
from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

from .tokenizer import Tokenizer, TokenType

__all__ = ["LEADING_WHITESPACE", "WHITESPACE", "TokenConstraint", "json_constraint"]

# Between two tokens of the document: a few spaces, or a line break and an indentation deep enough
# for json.dumps(indent=2) eight levels down. One lexeme, so runs cannot be chained.
WHITESPACE = r"[\x20\x09]{1,16}|\r?\n[\x20\x09]{0,16}"
# Before the document: SentencePiece models often start a reply with "▁{" (a space, then "{").
LEADING_WHITESPACE = r"[\x20\x09\x0A\x0D]{1,4}"

# Token types whose ids must never be sampled as text (llama.cpp's llama_token_type).
_NON_TEXT_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED)


def _import_llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - llguidance is a dependency on Python >= 3.10
        raise ImportError(
            "JSON-constrained output needs llguidance (Python >= 3.10): pip install 'llguidance>=1.0'"
        ) from e
    return llguidance


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: each token's bytes, the special ids, and a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.tokens: list[bytes] = [tokenizer.token_to_piece(i) for i in range(tokenizer.n_vocab)]
        special = {i for i in range(tokenizer.n_vocab) if tokenizer.token_type(i) in _NON_TEXT_TYPES}
        special.update(i for i in (tokenizer.bos_id, *tokenizer.eog_ids) if i is not None)
        self.special_token_ids: list[int] = sorted(special)
        self.eos_token_id: int = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids)
        self.bos_token_id: int | None = tokenizer.bos_id

    def __call__(self, text: str) -> list[int]:
        # Rejecting bytes makes TokenizerWrapper hand us str (it probes with b"test").
        if not isinstance(text, str):
            raise TypeError("pass text as str")
        return self._tokenizer.encode(text, add_special_tokens=False)


_ll_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, Any]" = weakref.WeakKeyDictionary()
_ll_tokenizers_lock = threading.Lock()


def _ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """The llguidance tokenizer (vocabulary bytes and their trie) of `tokenizer`, built once (~0.2 s)."""
    with _ll_tokenizers_lock:
        ll = _ll_tokenizers.get(tokenizer)
        if ll is None:
            if not tokenizer.eog_ids:
                raise ValueError(f"{tokenizer!r} has no end-of-generation token, so a JSON document could never end")
            llg = _import_llguidance()
            ll = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tokenizer)), eos_token=sorted(tokenizer.eog_ids))
            _ll_tokenizers[tokenizer] = ll
        return ll


def _with_options(schema: dict) -> dict:
    """`schema` with our llguidance options: any "x-guidance" (llguidance's extension of JSON Schema)
    a client sent is replaced."""
    options = {
        "whitespace_pattern": WHITESPACE,
        # \u00e9 as well as \u0001 (llguidance's default allows \u escapes only for control characters).
        "json_allow_general_unicode_escapes": True,
    }
    return {**schema, "x-guidance": options}


def _lark_grammar(schema: dict) -> str:
    """A Lark grammar (llguidance's dialect) for: bounded leading whitespace, then a JSON document of `schema`."""
    return (
        "start: LEADING_WS? document\n"
        f"LEADING_WS: /{LEADING_WHITESPACE}/\n"
        f"document: %json {json.dumps(_with_options(schema))}\n"
    )


class TokenConstraint:
    """The tokens allowed next in one generation constrained to a grammar. Not thread-safe.

    Call `mask()`, sample among its True entries, `advance(token)`; repeat until an end-of-generation
    token has been sampled. Once the document is complete and cannot grow (an object, an array, a
    string or a literal has closed) the mask allows exactly `tokenizer.eog_ids`. A top-level number is
    complete after each digit yet may still grow: there the mask allows both its continuations and
    end-of-generation.
    """

    def __init__(self, matcher: Any, tokenizer: Tokenizer):
        self._matcher = matcher
        self._n_vocab = tokenizer.n_vocab
        self._eog = np.zeros(self._n_vocab, dtype=bool)
        self._eog[sorted(tokenizer.eog_ids)] = True
        self._bitmask: np.ndarray | None = None  # of the current step, until advance()

    def mask(self) -> np.ndarray:
        """bool [n_vocab]: the tokens allowed as the next token (a new array each call)."""
        if self._matcher.is_stopped():
            return self._eog.copy() if self._matcher.is_accepting() else np.zeros(self._n_vocab, dtype=bool)
        if self._bitmask is None:
            self._bitmask = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(self._bitmask, count=self._n_vocab, bitorder="little").view(bool)

    def advance(self, token: int) -> None:
        """Take the token that was sampled. Raises ValueError if the mask did not allow it; the
        constraint is then unusable."""
        self._bitmask = None
        if not self._matcher.consume_token(int(token)):
            raise ValueError(f"token {int(token)} is not allowed here: {self._matcher.get_error()}")

    def is_complete(self) -> bool:
        """Whether the output so far is a complete JSON document (matching the schema, if any)."""
        return self._matcher.is_accepting()


def json_constraint(tokenizer: Tokenizer, schema: dict | None = None) -> TokenConstraint:
    """A constraint to a JSON document over `tokenizer`'s vocabulary.

    schema None: any JSON object (OpenAI's json_object mode: a JSON object at top level);
    else a JSON Schema. Raises ValueError, with llguidance's reason, for a schema it cannot enforce
    (an unknown "format", "not", "uniqueItems", an unresolvable "$ref", ...).
    """
    if schema is None:
        schema = {"type": "object"}
    elif not isinstance(schema, dict):
        raise ValueError(f"a JSON Schema must be a JSON object (a dict), not {type(schema).__name__}")
    llg = _import_llguidance()
    ll = _ll_tokenizer(tokenizer)
    try:
        grammar = _lark_grammar(schema)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the JSON Schema is not JSON-serializable: {e}") from e
    matcher = llg.LLMatcher(ll, grammar, log_level=0)
    if matcher.is_error():
        # The schema alone gives the reason without our grammar around it.
        reason = llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_json_schema(_with_options(schema)))
        raise ValueError(f"cannot enforce this JSON Schema: {reason or matcher.get_error()}")
    return TokenConstraint(matcher, tokenizer)
