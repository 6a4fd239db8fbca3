"""Where edgevlm keeps its files ($VLM_HOME) and the user's config.yaml in it.

``config.yaml`` is small and strict: an unknown key is an error that names it (a typo should not be
silently ignored), and every key is optional.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .errors import UsageError

CONFIG_FILE = "config.yaml"


def vlm_home() -> Path:
    """``$VLM_HOME`` if set, else the platform's user data dir (``~/.local/share/edgevlm`` on Linux)."""
    env = os.environ.get("VLM_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgevlm", appauthor=False))


@dataclass
class Config:
    default_text_model: Optional[str] = None     # alias or alias:artifact; overrides the registry default
    default_vision_model: Optional[str] = None
    max_image_pixels: Optional[int] = None       # refuse (decompression bomb) / downscale above this
    rpc: Optional[str] = None                    # a standing cluster: HOST:PORT,... used when --rpc is not given
    image_cache_max_bytes: Optional[int] = None  # cap of the image-embedding cache (LRU; default 1 GiB)
    guard: Optional[str] = None                  # --guard by default: input, output, both (or off)
    guard_model: Optional[str] = None            # the guard model (default llama-guard3-1b)
    kv_type: Optional[str] = None                # --kv-type by default: f16, q8_0 or q4_0 (GGUF models)
    draft: Optional[str] = None                  # --draft by default: auto, off or ngram (generation/draft.py)


_TYPES: dict[str, type] = {
    "default_text_model": str,
    "default_vision_model": str,
    "max_image_pixels": int,
    "rpc": str,
    "image_cache_max_bytes": int,
    "guard": str,
    "guard_model": str,
    "kv_type": str,
    "draft": str,
}


def _config_path(home: Optional[Path]) -> Path:
    return (home if home is not None else vlm_home()) / CONFIG_FILE


def _check(key: str, value: Any, path: Path) -> Any:
    if value is None:
        return None
    if key == "draft" and isinstance(value, bool):
        value = "auto" if value else "off"         # YAML reads a bare off / on as a boolean
    want = _TYPES[key]
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"{path}: '{key}' must be a positive whole number (got {value!r}).",
                             hint=f"Fix or remove '{key}' in {path}.")
    elif not isinstance(value, str) or not value.strip():
        example = {"rpc": "a list of workers such as 10.0.0.2:50052,10.0.0.3:50052"}.get(key, "a model name such as llama3.2-1b")
        raise UsageError(f"{path}: '{key}' must be {example} (got {value!r}).",
                         hint=f"Fix or remove '{key}' in {path}.")
    else:
        value = value.strip()
        if key == "kv_type" and value.lower() not in ("f16", "q8_0", "q4_0"):
            raise UsageError(f"{path}: 'kv_type' must be f16, q8_0 or q4_0 (got {value!r}).",
                             hint=f"Fix or remove 'kv_type' in {path}.")
        if key == "draft" and value.lower() not in ("auto", "off", "ngram"):
            raise UsageError(f"{path}: 'draft' must be auto, off or ngram (got {value!r}).",
                             hint=f"Fix or remove 'draft' in {path}.")
        if key == "guard" and value.lower() not in ("input", "output", "both", "off"):
            raise UsageError(f"{path}: 'guard' must be input, output, both or off (got {value!r}).",
                             hint=f"Fix or remove 'guard' in {path}.")
    return value


def load_config(home: Optional[Path] = None) -> Config:
    """Read ``$VLM_HOME/config.yaml``; a missing or empty file gives the defaults."""
    import yaml

    path = _config_path(home)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise UsageError(f"Cannot read {path}: {e.strerror or e}", hint=f"Check the permissions of {path}.") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {_one_line(e)}", hint=f"Fix {path}, or delete it to use the defaults.") from e
    if data is None:
        return Config()
    if not isinstance(data, dict):
        raise UsageError(f"{path} must be a mapping of settings (key: value), not {type(data).__name__}.",
                         hint=f"Fix {path}, or delete it to use the defaults.")
    known = {f.name for f in fields(Config)}
    for key in data:
        if key not in known:
            raise UsageError(f"{path}: unknown setting '{key}'.",
                             hint=f"Known settings: {', '.join(sorted(known))}.")
    return Config(**{k: _check(k, v, path) for k, v in data.items()})


def save_config(config: Config, home: Optional[Path] = None) -> Path:
    """Write the settings that are set (not None) to ``$VLM_HOME/config.yaml``, atomically."""
    import yaml

    path = _config_path(home)
    data = {k: _check(k, v, path) for k, v in asdict(config).items() if v is not None}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False) if data else "")
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
