"""JSON-schema constrained decoding (runtime/generation/constrain.py) over llguidance, with SmolLM2's real tokenizer.

The decode loops pick the highest of *random* logits after ``mask()``: an adversarial "model" that
would write garbage on its own, so whatever comes out valid is the constraint's doing.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import CACHE

np = pytest.importorskip("numpy")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("tokenizers")
pytest.importorskip("llguidance")

from edgevlm.runtime.generation.constrain import JSONSchemaConstraint, compile_schema, tokenizer_from_hf  # noqa: E402
from edgevlm.runtime.errors import BackendError, MissingExtra, UsageError  # noqa: E402

pytestmark = pytest.mark.model

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
TAGGED = {"type": "object",
          "properties": {"color": {"enum": ["red", "green", "blue", None, 3]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                  "minItems": 1, "maxItems": 3},
                         "ok": {"type": "boolean"}},
          "required": ["color", "tags", "ok"], "additionalProperties": False}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 999}   # may end early: the EOS decides
N_TOK = 49152   # SmolLM2's vocabulary


@pytest.fixture(scope="session")
def tokenizer_json(smollm2_gguf) -> Path:
    from fixtures.smollm2_hf import smollm2_hf_checkpoint

    return smollm2_hf_checkpoint(CACHE / "fixtures", smollm2_gguf) / "tokenizer.json"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    assert tok.get_vocab_size(with_added_tokens=True) == N_TOK
    return tok


@pytest.fixture(scope="session")
def eos_ids(tokenizer) -> set[int]:
    return {tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")}


def _c(tokenizer, schema, n_vocab: int = N_TOK, eos_ids=()):
    return JSONSchemaConstraint(tokenizer_from_hf(tokenizer, n_vocab, eos_ids), schema, eos_ids)


def _decode_random(c: JSONSchemaConstraint, n_vocab: int, eos: set[int], seed: int, timings: list | None = None):
    """Greedy over seeded random logits, masked; returns (ids without EOS, ended by EOS)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(200):
        if c.is_done():
            return out, False
        logits = rng.standard_normal(n_vocab, dtype=np.float32)
        t = time.perf_counter()
        c.mask(logits)
        if timings is not None:
            timings.append(time.perf_counter() - t)
        tok = int(np.argmax(logits))
        assert np.isfinite(logits[tok])
        c.advance(tok)
        if tok in eos:
            assert c.is_done()
            return out, True
        out.append(tok)
    pytest.fail(f"seed {seed}: no complete document in 200 tokens: {out}")


@pytest.mark.parametrize("schema", [PERSON, TAGGED, SMALL_INT], ids=["person", "enum-array", "small-int"])
def test_random_logits_decode_to_valid_json(tokenizer, eos_ids, schema):
    for seed in range(8):
        c = _c(tokenizer, schema, N_TOK, eos_ids)
        ids, _ = _decode_random(c, N_TOK, eos_ids, seed)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        doc = json.loads(text)
        jsonschema.validate(doc, schema)
        if isinstance(doc, dict):   # json.dumps-style separators, no other whitespace between tokens
            assert all(f'"{k}": ' in text for k in doc) and "\n" not in text and not text.startswith(" ")


def test_done_allows_only_eos(tokenizer, eos_ids):
    c = _c(tokenizer, PERSON, N_TOK, eos_ids)
    for tok in tokenizer.encode('{"name": "Ada", "age": 36}').ids:
        assert not c.is_done()
        c.advance(tok)
    assert c.is_done()
    logits = np.zeros(N_TOK, dtype=np.float32)
    assert c.mask(logits) is logits    # in place
    assert set(np.flatnonzero(np.isfinite(logits)).tolist()) == eos_ids
    c.advance(min(eos_ids))
    assert c.is_done()


def test_tokenizer_as_path_and_schema_x_guidance(tokenizer_json, tokenizer, eos_ids):
    schema = {**PERSON, "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}}
    c = JSONSchemaConstraint(tokenizer_from_hf(tokenizer_json, N_TOK, eos_ids), schema, eos_ids)
    ids, _ = _decode_random(c, N_TOK, eos_ids, seed=1)
    text = tokenizer.decode(ids)
    jsonschema.validate(json.loads(text), PERSON)
    assert text.startswith('{"name":"') and '","age":' in text


@pytest.mark.parametrize("schema", [
    {"type": "wat"},                                              # not JSON Schema (jsonschema's check)
    {"type": "object", "required": "name"},                       # idem
    ["not", "an", "object"],
    {"$ref": "#/definitions/nope"},                               # a reference to nothing
])
def test_invalid_schema_is_a_usage_error(tokenizer, eos_ids, schema):
    with pytest.raises(UsageError, match="--schema"):
        _c(tokenizer, schema, N_TOK, eos_ids)


def test_forbidden_token_is_a_backend_error(tokenizer, eos_ids):
    c = _c(tokenizer, PERSON, N_TOK, eos_ids)
    with pytest.raises(BackendError, match="does not allow"):
        c.advance(tokenizer.token_to_id("hello"))
    c = _c(tokenizer, PERSON, N_TOK, eos_ids)
    for tok in tokenizer.encode('{"name": "Ada"').ids:
        c.advance(tok)
    with pytest.raises(BackendError):   # EOS before the document is complete
        c.advance(min(eos_ids))
    with pytest.raises(BackendError):   # and the matcher stays failed
        c.mask(np.zeros(N_TOK, dtype=np.float32))


def test_padded_vocab(tokenizer, eos_ids):
    n_vocab = N_TOK + 128 + 5          # model rows padded past the tokenizer (and not a multiple of 32)
    c = _c(tokenizer, TAGGED, n_vocab, eos_ids)
    logits = np.full(n_vocab, 100.0, dtype=np.float32)
    c.mask(logits)
    assert np.isneginf(logits[N_TOK:]).all()
    assert np.isfinite(logits[:N_TOK]).sum() >= 1
    for seed in range(4):   # the padding ids are never chosen, however high they score
        c = _c(tokenizer, TAGGED, n_vocab, eos_ids)
        rng = np.random.default_rng(seed)
        ids = []
        while not c.is_done() and len(ids) < 200:
            logits = rng.standard_normal(n_vocab, dtype=np.float32)
            logits[N_TOK:] = 1e9
            tok = int(np.argmax(c.mask(logits)))
            assert tok < N_TOK
            c.advance(tok)
            if tok not in eos_ids:
                ids.append(tok)
        jsonschema.validate(json.loads(tokenizer.decode(ids)), TAGGED)
    c = _c(tokenizer, TAGGED, n_vocab, eos_ids)
    with pytest.raises(BackendError):
        c.advance(N_TOK + 3)


def test_vocab_smaller_than_tokenizer_is_refused(tokenizer, eos_ids):
    with pytest.raises(BackendError, match="vocab"):
        _c(tokenizer, PERSON, N_TOK - 1000, eos_ids)


def test_missing_llguidance_names_the_package(tokenizer, eos_ids, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(MissingExtra) as e:
        _c(tokenizer, PERSON, N_TOK, eos_ids)
    assert "llguidance" in e.value.hint


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "(?<=x)a"},                      # a regex llguidance cannot compile
    {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]},
    {"type": "string", "format": "edgevlm-made-up-format"},
])
def test_unenforceable_keywords_compile_leniently(tokenizer, eos_ids, schema):
    """Keywords the engine cannot enforce do not make the schema unusable: it generates under the rest
    and says what it ignored (the CLI prints it; the answer is validated with jsonschema afterwards)."""
    tok = tokenizer_from_hf(tokenizer, N_TOK, eos_ids)
    _, unenforced = compile_schema(schema, tok)
    assert unenforced, schema
    c = JSONSchemaConstraint(tok, schema, eos_ids)
    ids, _ = _decode_random(c, N_TOK, eos_ids, seed=0)
    json.loads(tokenizer.decode(ids))                               # still JSON of the right shape


def test_compiled_grammar_is_cached(tokenizer, eos_ids):
    tok = tokenizer_from_hf(tokenizer, N_TOK, eos_ids)
    a = compile_schema(TAGGED, tok)
    assert compile_schema(json.loads(json.dumps(TAGGED)), tok) is a


def test_mask_cost_is_reported(tokenizer, eos_ids, record_property):
    """Per-step cost of mask() over SmolLM2's vocabulary (reported, not asserted)."""
    timings: list[float] = []
    for seed in range(5):
        c = _c(tokenizer, TAGGED, N_TOK, eos_ids)
        _decode_random(c, N_TOK, eos_ids, seed, timings)
    us = np.array(timings[5:]) * 1e6   # skip the very first calls (lazy tables)
    stats = {"steps": len(us), "median_us": round(float(np.median(us)), 1),
             "p90_us": round(float(np.percentile(us, 90)), 1), "max_us": round(float(us.max()), 1)}
    record_property("mask_cost", stats)
    print(f"\nmask() over {N_TOK} tokens: {stats}")
