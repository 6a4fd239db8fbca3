"""JSON-schema constrained decoding for backends that sample in numpy (the ONNX backend).

A thin wrapper over llguidance (https://github.com/guidance-ai/llguidance): it compiles the schema
into a grammar, and at each step fills a bitmask of the tokens the grammar allows next (a few tens of
microseconds for a 49k vocabulary), which ``mask`` turns into ``-inf`` on the logits row. The sampler
then picks among what is left, and ``advance`` tells the matcher which token was chosen::

    c = JSONSchemaConstraint(tokenizer, schema, n_vocab, eos_ids)
    while not c.is_done():
        tok = sample(c.mask(logits))
        c.advance(tok)          # an EOS is accepted only where the document is complete
        ...

The JSON is compact apart from ``", "`` and ``": "`` (what ``json.dumps`` writes, and what small models
expect); a schema's own ``"x-guidance"`` options override that. Model logits wider than the tokenizer
(embeddings padded to a round size) are fine: the padding ids are never allowed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from .errors import BackendError, UsageError, missing_extra

# Applied before the schema's own "x-guidance" options (see llguidance's JsonCompileOptions).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_cache: dict = {}   # the last compiled tokenizer: building one walks the whole vocabulary (~0.2 s)


def _import_llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError as e:
        raise missing_extra("llguidance", extra="onnx") from e
    return llguidance


def _ll_tokenizer(tokenizer: Any, n_vocab: int | None, eos_ids: tuple[int, ...]):
    """An ``llguidance.LLTokenizer`` for a ``tokenizers.Tokenizer`` or a tokenizer.json path, cached
    for the last (tokenizer, n_vocab, eos) seen."""
    llg = _import_llguidance()
    if isinstance(tokenizer, (str, Path)):
        p = Path(tokenizer).expanduser()
        try:
            st = p.stat()
            key = (str(p.resolve()), st.st_mtime_ns, st.st_size, n_vocab, eos_ids)
        except OSError as e:
            raise BackendError(f"Cannot read the tokenizer {p}: {e.strerror or e}",
                               hint="Pass the model's tokenizer.json.") from e
    else:
        key = (id(tokenizer), n_vocab, eos_ids)   # the cache holds the object, so its id stays unique
    hit = _cache.get("entry")
    if hit is not None and hit[0] == key:
        return hit[2]
    try:
        text = p.read_text(encoding="utf-8") if isinstance(tokenizer, (str, Path)) else tokenizer.to_str()
        ll = llg.LLTokenizer(text, n_vocab=n_vocab, eos_token=list(eos_ids) or None)
    except (OSError, ValueError, RuntimeError) as e:
        raise BackendError(f"llguidance cannot read this tokenizer: {str(e).splitlines()[0][:200]}",
                           hint="Constrained output needs the model's own Hugging Face tokenizer.json.") from e
    _cache["entry"] = (key, tokenizer, ll)
    return ll


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


class JSONSchemaConstraint:
    """Keeps a sampler's output inside a JSON schema (see the module docstring)."""

    def __init__(self, tokenizer: Any, schema: dict, n_vocab: int, eos_ids: Iterable[int]) -> None:
        """``tokenizer``: a ``tokenizers.Tokenizer`` or the path of a tokenizer.json; ``n_vocab``: the
        width of the model's logits row (at least the tokenizer's size; 0: the tokenizer's size); ``eos_ids``: the ids that end
        the answer (allowed, and accepted by ``advance``, once the document is complete)."""
        _check_schema(schema)
        llg = _import_llguidance()
        import numpy as np

        self._np = np
        self._llg_np = llg.numpy
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self._tok = _ll_tokenizer(tokenizer, int(n_vocab) or None, tuple(sorted(self.eos_ids)))
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise UsageError(f"--schema cannot be compiled: {e}") from e
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tok)
        if is_error:
            why = " ".join(messages[0].split())[:300]
            raise UsageError(f"--schema cannot be used to constrain the output: {why}",
                             hint="llguidance supports most of JSON Schema but not every keyword "
                                  "(e.g. regex look-arounds); simplify the schema.")
        self._m = llg.LLMatcher(self._tok, grammar, log_level=0)
        if self._m.is_error():
            raise UsageError(f"--schema cannot be used to constrain the output: {_first_line(self._m.get_error())}",
                             hint="Simplify the schema.")
        self._bits = llg.numpy.allocate_token_bitmask(1, self._tok.vocab_size)
        self._bytes = self._bits.view(np.uint8).reshape(-1)   # bit i of the little-endian words = token i

    def mask(self, logits):
        """Set the logits of the tokens the grammar forbids next to ``-inf``, in place; returns ``logits``
        (a 1-D float row, ``n_vocab`` wide)."""
        np = self._np
        if self._m.is_error():
            raise BackendError(f"Constrained decoding failed: {_first_line(self._m.get_error())}")
        self._llg_np.fill_next_token_bitmask(self._m, self._bits)
        row = logits
        k = min(row.shape[-1], self._tok.vocab_size)
        if k < row.shape[-1]:   # logits wider than we were told: nothing out there is allowed
            row[k:] = -np.inf
            row = row[:k]
        allowed = np.unpackbits(self._bytes, count=k, bitorder="little").view(bool)
        np.copyto(row, -np.inf, where=~allowed)
        return logits

    def advance(self, token: int) -> None:
        """Feed the sampled token to the grammar; ``BackendError`` if the grammar does not allow it."""
        if not self._m.consume_token(int(token)):
            raise BackendError(f"The sampler chose token {token}, which the JSON schema does not allow here: "
                               f"{_first_line(self._m.get_error())}",
                               hint="This is a bug: mask() must be applied to the logits before sampling.")

    def is_done(self) -> bool:
        """The document is complete and nothing but an end-of-text token may follow."""
        return self._m.is_stopped() and not self._m.is_error()

    def is_accepting(self) -> bool:
        """The document is complete (an end-of-text token is allowed), though it could still go on."""
        return self._m.is_accepting()


def _first_line(msg: str) -> str:
    return (msg or "unknown error").strip().splitlines()[0][:300]


__all__ = ["JSONSchemaConstraint", "JSON_OPTIONS"]
