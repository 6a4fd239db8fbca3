"""`vlm info`: what a model is, read from its own files (or the registry when not installed)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from .errors import BadModelFile
from .gguf_file import read_gguf


def sha256_file(path: Path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _human_params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit} ({n:,})"
    return str(n)


def _file_entry(p: Path, hash_files: bool) -> dict:
    return {"name": p.name, "path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p) if hash_files else None}


def describe(ref: str, mmproj: Optional[Path] = None, hash_files: bool = True) -> dict:
    from . import loader

    resolved = loader.resolve(ref, want_vision=True, mmproj=mmproj)
    art = resolved.artifact
    if art is None:                       # registry entry, not installed: say what we know
        spec, a = resolved.model, resolved.artifact_spec
        return {
            "model": resolved.alias_ref, "name": spec.name, "installed": False, "format": a.format,
            "architecture": spec.architecture, "parameters": _human_params(spec.parameters) if spec.parameters else None,
            "quantization": a.quantization, "context_length": spec.context_length,
            "vision_projector": a.mmproj, "chat_template": None if spec.chat_format is None else spec.chat_format,
            "license": spec.license,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in a.files],
        }
    if art.format != "gguf":
        files = sorted(p for p in Path(art.path).rglob("*") if p.is_file())
        return {"model": resolved.alias_ref, "installed": True, "format": art.format, "path": str(art.path),
                "files": [_file_entry(p, hash_files) for p in files]}
    info = read_gguf(art.path)
    doc: dict = {
        "model": resolved.alias_ref, "installed": True, "format": "gguf", "path": str(art.path),
        "architecture": info.architecture, "name": info.get("general.name"),
        "parameters": _human_params(info.n_params), "quantization": info.quantization,
        "context_length": info.context_length, "chat_template": "yes" if info.chat_template else "no",
        "vocab_size": info.vocab_size, "vision_projector": None,
    }
    files = [art.path]
    if art.mmproj is not None:
        mm = read_gguf(art.mmproj)
        from .backends.gguf import check_mmproj

        try:
            check_mmproj(info, mm)
            match = "matches the model"
        except BadModelFile as e:
            match = f"MISMATCH: {e.message}"
        doc["vision_projector"] = f"{art.mmproj.name} ({mm.get('clip.projector_type', 'clip')}, {match})"
        files.append(art.mmproj)
    doc["files"] = [_file_entry(p, hash_files) for p in files]
    return doc
