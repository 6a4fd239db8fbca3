"""A model's or checkpoint's JSON file (config.json, tokenizer_config.json, ...), read one way everywhere."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadModelFile


def read_json_object(p: Path) -> dict:
    """A model's JSON file (config, tokenizer settings...) as a dict, or a one-line ``BadModelFile``."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadModelFile(f"{p.name} in {p.parent} is not valid JSON: {e}",
                           hint="The download may be incomplete: fetch the model's files again.") from e
    if not isinstance(data, dict):
        raise BadModelFile(f"{p.name} in {p.parent} is not a JSON object.", hint="Fetch the model's files again.")
    return data
