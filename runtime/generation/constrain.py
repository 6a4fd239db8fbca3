"""JSON-schema constrained decoding: one engine (llguidance) for every backend.

llguidance (https://github.com/guidance-ai/llguidance) compiles the schema into a grammar and, at each
step, fills a bitmask of the tokens the grammar allows next (tens of microseconds for a 49k vocabulary);
``mask`` turns it into ``-inf`` on the logits row in our own decode loop (``core.generate``), the sampler
picks among what is left, and ``advance`` tells the matcher which token was chosen::

    c = JSONSchemaConstraint.for_backend(backend, schema)
    while not c.is_done():
        tok = sample(c.mask(logits))
        c.advance(tok)          # an EOS is accepted only where the document is complete

The backend supplies llguidance's tokenizer: from tokenizer.json (ONNX) or from llama.cpp's own vocabulary
(GGUF). No schema reaches llama.cpp's grammar code, so none can crash the process there.

Keywords the engine cannot enforce (``format`` values it does not know, patterns it cannot compile, ``not``,
remote ``$ref``s, ...) do not make the schema unusable: it compiles leniently, generates under what it can
enforce, and ``unenforced`` lists what it ignored; the caller validates the answer with ``jsonschema``.

The JSON is compact apart from ``", "`` and ``": "`` (what ``json.dumps`` writes, and what small models
expect); a schema's own ``"x-guidance"`` options override that. Model logits wider than the tokenizer
(embeddings padded to a round size) are fine: the padding ids are never allowed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..errors import BackendError, UsageError, missing_extra

# Applied before the schema's own "x-guidance" options (see llguidance's JsonCompileOptions).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

def import_llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError as e:
        raise missing_extra("llguidance") from e
    return llguidance


def tokenizer_from_hf(tokenizer: Any, n_vocab: int | None, eos_ids: Iterable[int]):
    """An ``llguidance.LLTokenizer`` for a ``tokenizers.Tokenizer`` or a tokenizer.json path, ``n_vocab``
    wide (the model's logits row; None: the tokenizer's size)."""
    llg = import_llguidance()
    try:
        if isinstance(tokenizer, (str, Path)):
            text = Path(tokenizer).expanduser().read_text(encoding="utf-8")
        else:
            text = tokenizer.to_str()
        return llg.LLTokenizer(text, n_vocab=n_vocab or None, eos_token=sorted(int(i) for i in eos_ids) or None)
    except (OSError, ValueError, RuntimeError) as e:
        raise BackendError(f"llguidance cannot read this tokenizer: {str(e).splitlines()[0][:200]}",
                           hint="Constrained output needs the model's own Hugging Face tokenizer.json.") from e


def _check_schema(schema: dict) -> None:
    """The same checks (and messages) as ``--schema`` in the CLI: ``schema.load_schema``."""
    from .schema import load_schema

    if not isinstance(schema, dict):
        raise UsageError("--schema must be a JSON object.", hint='For example {"type": "object", "properties": {...}}')
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--schema is not JSON-serializable: {e}") from e
    load_schema(text)


_SAFE_INT = 2 ** 53 - 1


def _safe_integers(schema):
    """A copy of ``schema`` for the engine in which integers without bounds get I-JSON's interoperable
    range (RFC 7493: +-(2**53 - 1), at most 16 digits), the cap llama.cpp's JSON grammar has too. Without
    it a small model can repeat a digit until --max-tokens ("population": 1111...). The answer is still
    validated against the user's own schema."""
    if isinstance(schema, list):
        return [_safe_integers(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _safe_integers(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    t = schema.get("type")
    if t == "integer" or (isinstance(t, list) and "integer" in t and "number" not in t):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -_SAFE_INT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = _SAFE_INT
    return out


_REF_KEEP = {"$ref", "definitions", "$defs", "$id", "id", "$schema"}


def _simplified(schema, ref_siblings: bool) -> tuple[object, list[str]]:
    """``schema`` without what the engine cannot compile, and notes on what was taken out: ``pattern``
    and ``patternProperties`` regexes (look-arounds, back-references), and with ``ref_siblings`` the
    keywords beside a ``$ref`` (which drafts 4 to 7 say to ignore anyway; recursive references with
    siblings are what the engine refuses)."""
    notes: list[str] = []

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        out = {}
        for k, v in x.items():
            if k == "pattern" and isinstance(v, str):       # (a property named "pattern" maps to a dict)
                notes.append(f"pattern {v[:60]!r} (regex not supported)")
                continue
            if k == "patternProperties" and isinstance(v, dict) and all(isinstance(r, str) for r in v):
                notes.append(f"patternProperties {list(v)[:3]} (regex not supported)")
                continue
            if ref_siblings and "$ref" in x and isinstance(x["$ref"], str) and k not in _REF_KEEP:
                notes.append(f"{k!r} beside a $ref")
                continue
            out[k] = v if k in ("const", "enum", "default", "examples") else walk(v)
        return out

    return walk(schema), notes


def compile_schema(schema: dict, ll_tokenizer: Any) -> tuple[str, list[str]]:
    """The grammar for ``schema`` and the warnings of what it does not enforce; cached per tokenizer.
    Strict first (every keyword enforced); a schema with keywords the engine cannot enforce compiles
    leniently instead. ``UsageError`` (one line) for schemas that are invalid or cannot be compiled."""
    _check_schema(schema)
    llg = import_llguidance()
    key = (json.dumps(schema, sort_keys=True), id(ll_tokenizer))
    schema = _safe_integers(schema)
    hit = _GRAMMARS.get(key)
    if hit is not None and hit[0] is ll_tokenizer:
        return hit[1]
    why = ""
    result = None
    original, notes = schema, []
    for stage in ("strict", "lenient", "no-regex", "no-ref-siblings"):
        if stage in ("no-regex", "no-ref-siblings"):
            schema, notes = _simplified(original, ref_siblings=stage == "no-ref-siblings")
            if not notes:
                continue
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                schema, defaults={**JSON_OPTIONS, "lenient": stage != "strict"})
        except (ValueError, RuntimeError) as e:
            why = _first_line(str(e))
            continue
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
        if is_error:
            why = " ".join((messages[0] if messages else "invalid grammar").split())[:300]
            continue
        result = (grammar, list(dict.fromkeys(notes)) + [" ".join(m.split())[:200] for m in messages])
        break
    if result is None:
        raise UsageError(f"--schema cannot be used to constrain the output: {why}",
                         hint="Check that the schema is valid JSON Schema and can be satisfied.")
    if len(_GRAMMARS) >= _GRAMMARS_MAX:
        _GRAMMARS.pop(next(iter(_GRAMMARS)))
    _GRAMMARS[key] = (ll_tokenizer, result)
    return result


# Compiled grammars, by (schema text, tokenizer): a caption run or a server compiles a schema once.
_GRAMMARS: dict = {}
_GRAMMARS_MAX = 32


class UnsatisfiableSchema(UsageError):
    """No JSON document satisfies the schema (the matcher ran out of allowed tokens)."""


class GrammarConstraint:
    """Keeps a sampler's output inside a compiled llguidance grammar (a JSON schema's, or a tool set's:
    ``tools.py``); see the module docstring for the protocol."""

    what = "The grammar"      # how messages name it

    def __init__(self, ll_tokenizer: Any, grammar: str, eos_ids: Iterable[int] = ()) -> None:
        """``ll_tokenizer``: an ``llguidance.LLTokenizer`` as wide as the logits row; ``grammar``: what
        ``LLMatcher`` takes; ``eos_ids``: the ids that end the answer (allowed, and accepted by ``advance``,
        once the grammar is complete)."""
        llg = import_llguidance()
        import numpy as np

        self._np = np
        self._llg_np = llg.numpy
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self._tok = ll_tokenizer
        self.unenforced: list[str] = []
        self._m = llg.LLMatcher(self._tok, grammar, log_level=0)
        if self._m.is_error():
            raise UsageError(f"{self.what} cannot be used to constrain the output: {_first_line(self._m.get_error())}",
                             hint="Simplify the schema.")
        self._buffers()

    def copy(self) -> "GrammarConstraint":
        """A fresh constraint in this one's state, sharing nothing mutable: a compiled grammar serves many
        answers (llguidance's ``deep_copy`` of the matcher; no recompilation)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._m = self._m.deep_copy()
        new.unenforced = list(self.unenforced)
        new._buffers()
        return new

    def _buffers(self) -> None:
        np, llg_np = self._np, self._llg_np
        self._bits = llg_np.allocate_token_bitmask(1, self._tok.vocab_size)
        self._bytes = self._bits.view(np.uint8).reshape(-1)   # bit i of the little-endian words = token i
        self._masked = False                                   # _bits holds a mask the engine filled
        self._words = self._bits.reshape(-1).view(np.uint32)
        # population count of the mask: numpy >= 2 counts bits natively, older ones by unpacking
        self._popcount = ((lambda: int(np.bitwise_count(self._words).sum())) if hasattr(np, "bitwise_count")
                          else (lambda: int(np.unpackbits(self._bytes).sum())))

    def mask(self, logits):
        """Set the logits of the tokens the grammar forbids next to ``-inf``, in place; returns ``logits``
        (a 1-D float row, ``n_vocab`` wide)."""
        np = self._np
        if self._m.is_error():
            raise BackendError(f"Constrained decoding failed: {_first_line(self._m.get_error())}")
        self._llg_np.fill_next_token_bitmask(self._m, self._bits)
        self._masked = True
        row = logits
        k = min(row.shape[-1], self._tok.vocab_size)
        if k < row.shape[-1]:   # logits wider than we were told: nothing out there is allowed
            row[k:] = -np.inf
            row = row[:k]
        n_allowed = self._popcount()
        if n_allowed >= k and k == self._tok.vocab_size:   # free text in a string: all allowed, nothing to write
            return logits
        if n_allowed <= 64:     # a few tokens (a key, an enum, a digit): keep those, the rest -inf
            keep = np.flatnonzero(np.unpackbits(self._bytes, count=k, bitorder="little"))
            vals = row[keep]
            row.fill(-np.inf)
            row[keep] = vals
            return logits
        allowed = np.unpackbits(self._bytes, count=k, bitorder="little").view(bool)
        np.copyto(row, -np.inf, where=~allowed)
        return logits

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar forces from here, consumed: llguidance's fast-forward tokens (the
        canonical tokens of the bytes the schema fixes: keys, quotes, braces, the rest of an enum value),
        each taken only while it is the one token the mask allows, so that sampling could not have chosen
        another; at most ``limit``, none past the end of the document."""
        out: list[int] = []
        if limit <= 0 or self._m.is_stopped() or self._m.is_error():
            return out
        words = self._words
        for t in self._m.compute_ff_tokens()[:limit]:
            self._llg_np.fill_next_token_bitmask(self._m, self._bits)
            if (t >= self._tok.vocab_size or t in self.eos_ids or not (int(words[t >> 5]) >> (t & 31)) & 1
                    or self._popcount() != 1):
                break
            self.advance(t)
            out.append(t)
            if self._m.is_stopped():
                break
        return out

    def advance(self, token: int) -> None:
        """Feed the sampled token to the grammar; ``BackendError`` if the grammar does not allow it,
        ``UnsatisfiableSchema`` if the engine gave up on a token its mask allowed, or allowed none (the
        schema has no finite document; checked only on failure: no cost per token)."""
        if not self._m.consume_token(int(token)):
            t = int(token)
            allowed = t < self._tok.vocab_size and (int(self._bytes[t >> 3]) >> (t & 7)) & 1
            if self._masked and (allowed or not self._bytes.any()):   # it gave up on a token it allowed, or allows none
                raise UnsatisfiableSchema(
                    f"The JSON schema cannot be satisfied ({_first_line(self._m.get_error())}): a required "
                    "property that recurses forever has no finite document.",
                    hint="Make the recursion optional, or give it an end.")
            raise BackendError(f"The sampler chose token {token}, which the constraint does not allow here: "
                               f"{_first_line(self._m.get_error())}",
                               hint="This is a bug: mask() must be applied to the logits before sampling.")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the grammar would accept in a row from here (nothing is consumed)."""
        return int(self._m.validate_tokens([int(t) for t in tokens])) if not self._m.is_error() else 0

    def is_done(self) -> bool:
        """The document is complete and nothing but an end-of-text token may follow."""
        return self._m.is_stopped() and not self._m.is_error()

    def is_accepting(self) -> bool:
        """The document is complete (an end-of-text token is allowed), though it could still go on."""
        return self._m.is_accepting()


class JSONSchemaConstraint(GrammarConstraint):
    """Keeps a sampler's output inside a JSON schema (see the module docstring)."""

    what = "--schema"

    def __init__(self, ll_tokenizer: Any, schema: dict, eos_ids: Iterable[int] = ()) -> None:
        grammar, unenforced = compile_schema(schema, ll_tokenizer)
        super().__init__(ll_tokenizer, grammar, eos_ids)
        self.unenforced = unenforced

    @classmethod
    def for_backend(cls, backend, schema: dict) -> "JSONSchemaConstraint":
        return cls(backend.constraint_tokenizer(), schema, backend.eog_ids())


def _first_line(msg: str) -> str:
    return (msg or "unknown error").strip().splitlines()[0][:300]


__all__ = ["GrammarConstraint", "JSONSchemaConstraint", "JSON_OPTIONS", "UnsatisfiableSchema"]
