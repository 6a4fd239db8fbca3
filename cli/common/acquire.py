"""Resolve -m, make sure the model is on disk (asking before a download), check memory, load it."""
from __future__ import annotations

from typing import Optional

import typer

from edgevlm.runtime.errors import ModelNotInstalled
from edgevlm.runtime.device.memory import fmt_bytes
from edgevlm.runtime.protocol import Backend, LoadOptions

from . import console
from .options import DEFAULT_CTX, Loading


def ensure_installed(resolved, *, yes: bool) -> None:
    """Pull a registry model that is not installed, asking first when a person is there to answer."""
    if resolved.installed:
        return
    from edgevlm.runtime.models.store import Store

    size = resolved.download_size
    what = f"{resolved.model.name} ({resolved.alias_ref}, {fmt_bytes(size) if size else 'size unknown'})"
    if not yes:
        if not console.interactive():
            raise ModelNotInstalled(
                f"This needs {what}, which is not installed.",
                hint=f"Run `vlm pull {resolved.alias_ref}` first, or pass --yes to download it.",
            )
        if not typer.confirm(f"This needs {what}, which is not installed. Download it now?", default=True, err=True):
            raise typer.Exit(1)
    store = Store()
    with console.progress("Downloading") as cb:
        store.pull(resolved.model, resolved.artifact_spec, on_progress=cb)
    console.info(f"[green]Installed[/] {resolved.alias_ref}")
    licence(resolved.model)
    resolved.artifact = store.artifact(resolved.model, resolved.artifact_spec)


def licence(spec) -> None:
    """Say a downloaded model's licence once, when it is not a plain open-source one (models/licences.py)."""
    from edgevlm.runtime.models.licences import licence_notice

    note = licence_notice(spec.alias, spec.license, spec.homepage)
    if note:
        console.notice(note)


def open_model(loading: Loading, *, want_vision: bool, with_model=None) -> tuple[Backend, object]:
    """The model --model and the other loading flags name, installed, checked against memory and loaded.
    ``with_model``: (resolved, n_ctx) of a model loaded beside this one (--guard), counted by the memory check."""
    from edgevlm.runtime import loader
    from edgevlm.runtime.backends import capabilities
    from edgevlm.runtime.reports.gpu import parse_gpu_layers, plan as gpu_plan

    model, mmproj, ctx, threads = loading.model, loading.mmproj, loading.ctx, loading.threads
    yes, ignore_memory, rpc = loading.yes, loading.ignore_memory, loading.rpc
    requested_gpu = parse_gpu_layers(loading.gpu_layers)         # a bad --gpu-layers fails before anything loads
    kv = resolve_kv_type(loading.kv_type)                       # a bad --kv-type too
    resolved = loader.resolve(model, want_vision=want_vision, mmproj=mmproj)
    n_ctx = ctx or DEFAULT_CTX
    endpoints, split = cluster_args(rpc, loading.tensor_split)
    if not ignore_memory and not endpoints:
        loader.check_memory(resolved, n_ctx, with_model=with_model, kv_type=kv)     # before downloading: refuse early
    ensure_installed(resolved, yes=yes)
    if endpoints and rpc is None and not capabilities(resolved.artifact.format).rpc:
        endpoints = []                  # the config's standing cluster serves GGUF models; others run here
    opts = LoadOptions(n_ctx=n_ctx, n_threads=threads, mmproj=mmproj, kv_type=kv)
    if endpoints:                                   # the memory check plans across this host and the workers
        plan = loader.plan_cluster(resolved, n_ctx, endpoints, split, check=not ignore_memory, kv_type=kv)
        opts.rpc, opts.host_layers, opts.worker_shares = endpoints, plan.host_layers, plan.worker_shares
        console.info("[dim]Layers: " + ", ".join(f"{d.name} {d.fraction:.0%}" for d in plan.shares) + "[/]")
    elif not ignore_memory:
        loader.check_memory(resolved, n_ctx, with_model=with_model, kv_type=kv)     # again with the real files' metadata
    if not endpoints:                               # --gpu-layers N|auto: 0 on a CPU-only llama.cpp build
        gpu = gpu_plan(resolved, n_ctx, requested_gpu)
        opts.n_gpu_layers = gpu.layers if gpu is not None else 0
    # No progress callback: loading takes well under a second, and each call of a Python callback makes
    # llama.cpp take the GIL.
    backend = loader.load_backend(resolved.artifact, opts)
    return backend, resolved


def resolve_kv_type(value: Optional[str]) -> str:
    """--kv-type, else the config's `kv_type`, else f16; a bad value is one line."""
    from edgevlm.runtime.config import load_config
    from edgevlm.runtime.device.memory import kv_type

    return kv_type(value if value is not None else load_config().kv_type)


def resolve_draft(value: Optional[str]) -> str:
    """--draft, else the config's `draft`, else auto; a bad value is one line."""
    from edgevlm.runtime.config import load_config
    from edgevlm.runtime.generation.draft import check_mode

    return check_mode(value if value is not None else (load_config().draft or "auto"))


def cluster_args(rpc: Optional[str], tensor_split: Optional[str]) -> tuple[list[str], Optional[list[float]]]:
    """--rpc / --tensor-split (or the config's `rpc` key for a standing cluster) -> endpoints, shares."""
    from edgevlm.runtime.backends import ggml_rpc
    from edgevlm.runtime.config import load_config
    from edgevlm.runtime.errors import UsageError

    endpoints = ggml_rpc.parse_endpoints(rpc if rpc is not None else load_config().rpc)
    if tensor_split is None:
        return endpoints, None
    if not endpoints:
        raise UsageError("--tensor-split needs --rpc.", hint="Name the workers with --rpc HOST:PORT,...")
    try:
        split = [float(x) for x in tensor_split.split(",")]
    except ValueError as e:
        raise UsageError(f"--tensor-split {tensor_split!r} is not a list of numbers.", hint="For example 1,2,2.") from e
    if any(x < 0 for x in split):
        raise UsageError("--tensor-split shares must be 0 or more.", hint="For example 1,2,2.")
    return endpoints, split


def warn_unenforced(backend: Backend, json_schema: Optional[dict]) -> None:
    """Compile the schema for this model now (cached for the answer) and say once on stderr which of
    its keywords the constraint engine cannot enforce while generating; the answer is validated
    against all of them afterwards."""
    if json_schema is None:
        return
    from edgevlm.runtime.generation.constrain import compile_schema

    _, unenforced = compile_schema(json_schema, backend.constraint_tokenizer())
    if unenforced:
        more = f" (+{len(unenforced) - 2} more)" if len(unenforced) > 2 else ""
        console.warn("--schema: not enforced while generating, checked afterwards: " + "; ".join(unenforced[:2]) + more)
