"""Installing quantize output into the model store and the user's registry, so `vlm chat -m NAME` runs it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..runtime.protocol import ProgressCallback, report
from .results import QuantizeResult


def registry_entry(result: QuantizeResult) -> dict:
    """The user-registry entry (docs/models-yaml.md) for the published artifacts."""
    m = result.manifest
    src = m["source"]
    cfg_path = result.out_dir / "onnx" / "config.json"
    arts = {}
    default = None
    kv = None
    arch = src.get("model_type")
    ctx = None
    for rec in m["artifacts"]:
        files = [{"name": Path(f["name"]).name if rec["format"] == "onnx" else f["name"], "size": f["size"],
                  "sha256": f["sha256"], "source": {"local": str(result.out_dir / f["name"])}}
                 for f in rec["files"]]
        entry = {"format": rec["format"], "quantization": rec["quantization"],
                 "model": Path(rec["model"]).name, "files": files}
        if rec.get("mmproj"):
            entry["mmproj"] = rec["mmproj"]
        arts[rec["key"]] = entry
        if rec["format"] == "gguf":
            default = default or rec["key"]
            if kv is None:
                from ..runtime.formats.gguf_file import read_gguf

                info = read_gguf(result.out_dir / rec["model"])
                kv, arch, ctx = info.kv_shape, info.architecture, info.context_length
    default = default or next(iter(arts))
    if ctx is None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    has_template = _has_chat_template(result.out_dir, m)
    out = {"name": f"{m['name']} (vlm quantize of {src.get('repo') or src['ref']})",
           "kind": m["kind"], "architecture": arch, "parameters": m["verification"]["source_parameters"],
           "context_length": int(ctx) if ctx else None, "chat_format": None, "completion_only": not has_template,
           "default": default, "artifacts": arts}
    if src.get("repo"):
        out["homepage"] = f"https://huggingface.co/{src['repo']}"
    if kv:
        out["kv"] = {"layers": kv[0], "kv_heads": kv[1], "head_dim": kv[2]}
    return {k: v for k, v in out.items() if v is not None}


def _has_chat_template(out_dir: Path, manifest: dict) -> bool:
    for rec in manifest["artifacts"]:
        if rec["format"] == "gguf":
            from ..runtime.formats.gguf_file import read_gguf

            return read_gguf(out_dir / rec["model"]).chat_template is not None
    d = out_dir / "onnx"
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    tc = d / "tokenizer_config.json"
    return tc.is_file() and bool(json.loads(tc.read_text()).get("chat_template"))


def register(result: QuantizeResult, *, home: Optional[Path] = None,
             on_progress: Optional[ProgressCallback] = None) -> list[str]:
    """Install every artifact into the store as ``NAME:key`` and add NAME to the user registry."""
    from ..runtime.models.registry import register_user_model, validate_model
    from ..runtime.models.store import Store

    name = result.manifest["name"]
    entry = registry_entry(result)
    validate_model(name, entry, "the registry entry for --register", "user")   # before installing anything
    store = Store(home)
    refs = []
    for i, rec in enumerate(result.manifest["artifacts"]):
        report(on_progress, "register", i, len(result.manifest["artifacts"]))
        files = {Path(f["name"]).name if rec["format"] == "onnx" else f["name"]: result.out_dir / f["name"]
                 for f in rec["files"]}
        store.install_local(name, rec["key"], files, format=rec["format"], quantization=rec["quantization"],
                            model=Path(rec["model"]).name, mmproj=rec.get("mmproj"),
                            sha256={Path(f["name"]).name if rec["format"] == "onnx" else f["name"]: f["sha256"]
                                    for f in rec["files"]})
        refs.append(f"{name}:{rec['key']}")
    register_user_model(home, name, entry)
    report(on_progress, "register", len(refs), len(refs))
    return refs
