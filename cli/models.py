"""vlm pull / list / rm / info: the model store from the command line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgevlm.runtime.device.memory import fmt_bytes

from .common import console
from .common.console import boundary
from .common.options import DEFAULT_CTX

ModelRef = Annotated[str, typer.Argument(help="Registry name (alias or alias:quant).", show_default=False)]


@boundary
def pull(
    model: ModelRef,
    force: Annotated[bool, typer.Option("--force", help="Download again even if installed.")] = False,
    ignore_memory: Annotated[bool, typer.Option("--ignore-memory", help="Download even if it will not fit in memory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Download a model from the registry (resumable, checksum-verified)."""
    from edgevlm.runtime import loader
    from edgevlm.runtime.models.registry import Registry
    from edgevlm.runtime.models.store import Store

    console.set_quiet(quiet)
    spec, aspec = Registry.load().resolve(model)
    resolved = loader.ResolvedModel(name=spec.alias, artifact=None, model=spec, artifact_spec=aspec)
    if not ignore_memory:
        loader.check_memory(resolved, min(DEFAULT_CTX, spec.context_length or DEFAULT_CTX))
    store = Store()
    if store.is_installed(spec.alias, aspec.key) and not force:
        console.info(f"{spec.alias}:{aspec.key} is already installed.")
        return
    size = resolved.download_size
    console.info(f"Pulling {spec.alias}:{aspec.key} ({fmt_bytes(size) if size else 'size unknown'})")
    with console.progress("") as cb:
        path = store.pull(spec, aspec, on_progress=cb, force=force)
    console.info(f"[green]Installed[/] {spec.alias}:{aspec.key} in {path}")
    from .common.acquire import licence

    licence(spec)


@boundary
def list_models(
    available: Annotated[bool, typer.Option("--available", "-a", help="List the registry instead of what is installed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """List installed models (or the registry with --available)."""
    from edgevlm.runtime.models.registry import Registry
    from edgevlm.runtime.models.store import Store

    store = Store()
    if available:
        reg = Registry.load()
        rows = []
        for m in reg.models():
            for key, a in m.artifacts.items():
                sizes = [f.size for f in a.files]
                rows.append({"model": f"{m.alias}:{key}", "name": m.name, "kind": m.kind, "format": a.format,
                             "quantization": a.quantization,
                             "size": sum(sizes) if all(s is not None for s in sizes) else None,
                             "default": key == m.default, "installed": store.is_installed(m.alias, key)})
        if as_json:
            console.write_out(json.dumps(rows, indent=2) + "\n")
            return
        _table(["MODEL", "KIND", "FORMAT", "QUANT", "SIZE", "INSTALLED"],
               [[r["model"] + (" *" if r["default"] else ""), r["kind"], r["format"], r["quantization"] or "",
                 fmt_bytes(r["size"]) if r["size"] else "?", "yes" if r["installed"] else ""] for r in rows])
        return
    items = store.installed()
    if as_json:
        console.write_out(json.dumps([{"model": f"{i.alias}:{i.key}", "path": str(i.path), "size": i.size}
                                      for i in items], indent=2) + "\n")
        return
    if not items:
        console.info("No models installed. `vlm list --available` shows the registry; `vlm pull NAME` installs one.")
        return
    _table(["MODEL", "SIZE", "PATH"], [[f"{i.alias}:{i.key}", fmt_bytes(i.size), str(i.path)] for i in items])


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """Plain aligned columns on stdout: readable by people and by `awk`."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers, *rows]:
        console.write_out("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() + "\n")


@boundary
def rm(
    model: ModelRef,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Remove an installed model (all its quantizations, or alias:quant for one)."""
    from edgevlm.runtime.models.store import Store

    alias, _, key = model.partition(":")
    if not yes and console.interactive():
        if not typer.confirm(f"Remove {model}?", default=False, err=True):
            raise typer.Exit(1)
    removed = Store().remove(alias, key or None)
    for p in removed:
        console.info(f"Removed {p}")


@boundary
def info(
    model: Annotated[str, typer.Argument(help="Registry name, or a path to a .gguf file, an .onnx file or an ONNX model folder.", show_default=False)],
    mmproj: Annotated[Optional[Path], typer.Option("--mmproj", help="Vision projector to check against the model.")] = None,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip sha256 (fast on big files).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Show a model's architecture, parameters, quantization, context, projector, template and files."""
    from edgevlm.runtime.reports.inspect import describe

    doc = describe(model, mmproj=mmproj, hash_files=not no_hash)
    if as_json:
        console.write_out(json.dumps(doc, indent=2) + "\n")
        return
    width = max(len(k) for k in doc) + 2
    for k, v in doc.items():
        if k == "files":
            continue
        console.write_out(f"{k:<{width}}{v if v is not None else '-'}\n")
    console.write_out("files\n")
    for f in doc["files"]:
        console.write_out(f"  {f['name']}  {fmt_bytes(f['size'])}  {f.get('sha256') or ''}\n".rstrip() + "\n")
