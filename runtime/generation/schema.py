"""JSON-schema output: load and check a schema before any model loads; validate what came out."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import EdgeVLMError, UsageError


class SchemaViolation(EdgeVLMError, ValueError):
    """The model's output did not parse or did not match the schema."""
    exit_code = 11


def load_schema(arg: str) -> dict:
    """``arg`` is a path to a JSON file or the JSON text itself."""
    import jsonschema

    text = arg
    p = Path(arg).expanduser()
    if not arg.lstrip().startswith(("{", "[")):
        if not p.is_file():
            raise UsageError(f"--schema: no such file and not JSON: {arg[:60]}",
                             hint="Pass a path to a .json schema file, or the schema itself in quotes.")
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--schema: cannot read {p}: {e.strerror or e}") from e
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--schema is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.",
                         hint="Check the quoting; a schema is a JSON object like {\"type\": \"object\", ...}.") from e
    if not isinstance(schema, dict):
        raise UsageError("--schema must be a JSON object.", hint='For example {"type": "object", "properties": {...}}')
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(x) for x in e.absolute_path) or "(top level)"
        raise UsageError(f"--schema is not a valid JSON Schema: {e.message} at {where}.",
                         hint="See https://json-schema.org/understanding-json-schema/") from e
    return schema


def parse_and_validate(text: str, schema: dict, finish_reason: Optional[str] = None) -> Any:
    """The answer as JSON, checked against ``schema`` (every keyword, including those the constraint
    engine could not enforce while generating). ``finish_reason`` "length" means the answer was cut
    off, which is what the hint then says."""
    import jsonschema

    cut = finish_reason == "length"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaViolation(f"The answer is not valid JSON ({e.msg})" + ("; it was cut off." if cut else "."),
                              hint="Raise --max-tokens." if cut else "Simplify the schema.") from e
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as e:
        raise SchemaViolation(f"The answer does not match the schema: {e.message}.",
                              hint="Raise --max-tokens." if cut else
                              "The schema uses keywords that cannot be enforced while generating (see the "
                              "warning above); simplify them, or try another --seed.") from e
    return doc
