"""From what the user typed after -m (an alias, alias:artifact, or a path) to a loaded backend."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import BadModelFile, ModelNotFound
from .formats.gguf_file import read_gguf
from .device.memory import (ONNX_EXTRA_OVERHEAD, ONNX_REPACK_FRACTION, ONNX_SINGLE_FILE_FRACTION, MemoryEstimate, check_fits,
                     estimate)
from .device.memory import KV_TYPES
from .protocol import Artifact, Backend, LoadOptions, ProgressCallback

if TYPE_CHECKING:
    from .models.registry import ArtifactSpec, ModelSpec


@dataclass
class ResolvedModel:
    """What -m names: either a registry entry (maybe not yet installed) or files on disk."""

    name: str
    artifact: Optional[Artifact]          # None while a registry artifact is not installed
    model: Optional[ModelSpec] = None               # when from the registry
    artifact_spec: Optional[ArtifactSpec] = None

    @property
    def installed(self) -> bool:
        return self.artifact is not None

    @property
    def alias_ref(self) -> str:
        if self.model is None:
            return self.name
        return f"{self.model.alias}:{self.artifact_spec.key}"

    @property
    def download_size(self) -> Optional[int]:
        return None if self.artifact_spec is None else self.artifact_spec.total_size


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(".gguf") or ref.endswith(".onnx") or "/" in ref or ref.startswith((".", "~"))


def _find_mmproj(model_path: Path) -> Optional[Path]:
    """The projector beside a model file: the only one there, or, of several (an F16 and a Q8_0, say),
    the one named after the model (`mmproj-<model file>`, as `vlm quantize` and many GGUF repos write)."""
    cands = [p for p in model_path.parent.glob("*.gguf") if "mmproj" in p.name.lower() and p != model_path]
    if len(cands) > 1:
        cands = [p for p in cands if p.name.lower() == f"mmproj-{model_path.name.lower()}"]
    return cands[0] if len(cands) == 1 else None


def artifact_from_path(path: Path, mmproj: Optional[Path], want_vision: bool) -> Artifact:
    path = path.expanduser()
    if not path.exists():
        raise ModelNotFound(f"No such model file: {path}", hint="Check the path, or use a registry name (`vlm list --available`).")
    if path.is_dir():
        ggufs = sorted(p for p in path.glob("*.gguf") if "mmproj" not in p.name.lower())
        onnx = sorted(path.rglob("*.onnx"))
        if len(ggufs) == 1:
            return artifact_from_path(ggufs[0], mmproj or _find_mmproj(ggufs[0]), want_vision)
        if onnx:
            return Artifact(format="onnx", path=path, name=path.name)
        raise BadModelFile(f"{path} holds no single .gguf model file.", hint="Pass the .gguf file itself with -m.")
    if path.suffix == ".onnx":       # this very file (model_q4.onnx, decoder_model_merged_int8.onnx, ...)
        return Artifact(format="onnx", path=path, name=f"{path.parent.name}/{path.name}")
    if mmproj is None and want_vision:
        mmproj = _find_mmproj(path)
    return Artifact(format="gguf", path=path, name=path.name, mmproj=mmproj.expanduser() if mmproj else None)


def resolve(ref: Optional[str], *, want_vision: bool, mmproj: Optional[Path] = None, home: Optional[Path] = None) -> ResolvedModel:
    if ref and (_looks_like_path(ref) or Path(ref).expanduser().exists()):
        art = artifact_from_path(Path(ref), mmproj, want_vision)
        return ResolvedModel(name=art.name, artifact=art)
    from .models.registry import Registry
    from .models.store import Store

    registry = Registry.load(home)
    if not ref:
        ref = registry.default_ref("vision" if want_vision else "text")
    spec, aspec = registry.resolve(ref)
    store = Store(home)
    art = store.artifact(spec, aspec) if store.is_installed(spec.alias, aspec.key) else None
    if art is not None and mmproj is not None:
        art.mmproj = mmproj.expanduser()
    return ResolvedModel(name=spec.alias, artifact=art, model=spec, artifact_spec=aspec)


_BITS_PER_WEIGHT = {"q4": 11.0, "int4": 11.0, "q4f16": 7.5, "bnb4": 10.5, "int8": 8.5, "uint8": 8.5,
                    "quantized": 8.5, "fp16": 16.0, "bf16": 16.0, "f16": 16.0, "fp32": 32.0, "f32": 32.0}


def estimate_memory(resolved: ResolvedModel, n_ctx: int, kv_type: str = "f16") -> MemoryEstimate:
    """Weights + projector + KV cache for n_ctx + runtime overhead, from files when we have them. ``kv_type``
    (--kv-type) sizes a GGUF model's KV cache; ONNX decoders keep theirs in their own dtype."""
    kv_bpe = KV_TYPES[kv_type]
    art = resolved.artifact
    if art is not None and art.format == "gguf":
        info = read_gguf(art.path)
        mm = art.mmproj.stat().st_size if art.mmproj and art.mmproj.exists() else 0
        ctx = min(n_ctx, info.context_length or n_ctx)
        return estimate(info.file_size, ctx, info.kv_shape, mm, kv_bytes_per_elem=kv_bpe)
    if art is not None and art.format == "onnx":
        from .formats.onnx_files import kv_shape_from_config, weight_files

        # the files that load (not every variant in the folder), and an fp32 KV cache (what exports use)
        files = weight_files(Path(art.path))
        size = sum(p.stat().st_size for p in files)
        single = sum(p.stat().st_size for p in files if p.suffix == ".onnx")      # weights inside graph files
        est = estimate(size, n_ctx, kv_shape_from_config(Path(art.path)), kv_bytes_per_elem=4)
        return replace(est, overhead=est.overhead + ONNX_EXTRA_OVERHEAD + int(size * ONNX_REPACK_FRACTION)
                       + int(single * (ONNX_SINGLE_FILE_FRACTION - ONNX_REPACK_FRACTION)))
    if art is not None:
        size = sum(p.stat().st_size for p in Path(art.path).rglob("*") if p.is_file())
        return estimate(size, n_ctx, None, kv_bytes_per_elem=kv_bpe)
    spec, aspec = resolved.model, resolved.artifact_spec
    weights = mm = 0
    for f in aspec.files:
        if aspec.mmproj and f.name == aspec.mmproj:
            mm += f.size or 0
        else:
            weights += f.size or 0
    ctx = min(n_ctx, spec.context_length or n_ctx)
    if spec.parameters and any(f.size is None for f in aspec.files if f.name.endswith((".onnx", ".onnx_data", ".gguf"))):
        # sizes the registry does not know yet (the hub's metadata fills them in at pull time): count
        # from the parameters, at the bits per weight such exports really have (onnx-community's q4
        # Llama 3.2 1B is 1.66 GB for 1.24 B parameters: the embeddings stay fp32)
        bits = _BITS_PER_WEIGHT.get((aspec.quantization or "").lower(), 16.0)
        weights = max(weights + mm, int(spec.parameters * bits / 8))
        mm = 0
    if aspec.format == "onnx":
        # the listed files are one variant plus small sidecars; same onnxruntime terms as an installed one
        weights += mm
        est = estimate(weights, ctx, spec.kv, kv_bytes_per_elem=4)
        single = any(f.name.endswith(".onnx") for f in aspec.files) and not any(
            f.name.endswith((".onnx_data", ".onnx.data")) for f in aspec.files)
        frac = ONNX_SINGLE_FILE_FRACTION if single else ONNX_REPACK_FRACTION
        return replace(est, overhead=est.overhead + ONNX_EXTRA_OVERHEAD + int(weights * frac))
    return estimate(weights, ctx, spec.kv, mm, kv_bytes_per_elem=kv_bpe)


def check_memory(resolved: ResolvedModel, n_ctx: int, available: Optional[int] = None,
                 with_model: Optional[tuple[ResolvedModel, int]] = None, kv_type: str = "f16") -> MemoryEstimate:
    """Refuse when the model will not fit; ``with_model`` = (resolved, n_ctx) of a second model loaded
    beside it (the --guard model): both are counted."""
    from .device.hardware import memory_info

    est = estimate_memory(resolved, n_ctx, kv_type)
    what = f"{resolved.alias_ref} with a {n_ctx:,}-token context" + (f" ({kv_type} KV cache)" if kv_type != "f16" else "")
    if with_model is not None:
        other, other_ctx = with_model
        o = estimate_memory(other, other_ctx)
        est = MemoryEstimate(weights=est.weights + o.weights, mmproj=est.mmproj + o.mmproj,
                             kv_cache=est.kv_cache + o.kv_cache, overhead=est.overhead + o.overhead)
        what += f" plus {other.alias_ref} with {other_ctx:,} tokens"
    check_fits(est, memory_info().available if available is None else available, what)
    return est


@dataclass
class ClusterPlan:
    """How a model is spread over this host and RPC workers (``vlm worker``)."""

    endpoints: list[str]
    host_layers: int               # layers that stay on this host
    worker_shares: list[float]     # relative shares of the other layers, one per worker
    shares: list                   # device.memory.DeviceShare per device, this host first


def plan_cluster(resolved: ResolvedModel, n_ctx: int, endpoints: list[str], split: Optional[list[float]] = None,
                 check: bool = True, kv_type: str = "f16") -> ClusterPlan:
    """Layers per device for a GGUF model spread over workers; asks each worker for its free memory and
    refuses (InsufficientMemory, with a per-device breakdown) when a share does not fit."""
    from .backends import ggml_rpc
    from .device.hardware import memory_info
    from .device.memory import plan_split
    from .errors import UsageError

    from .backends import capabilities

    art = resolved.artifact
    if art is None or not capabilities(art.format).rpc:
        raise UsageError("--rpc works with GGUF models (llama.cpp's RPC backend).", hint="Use a GGUF artifact.")
    ggml_rpc.require()
    ggml_rpc.check_reachable(endpoints)
    info = read_gguf(art.path)
    n_layers = info.kv_shape[0] if info.kv_shape else int(info.get(f"{info.architecture}.block_count") or 0)
    if not n_layers:
        raise BadModelFile(f"{art.path.name} does not say how many layers it has.", hint="Run it without --rpc.")
    est = estimate_memory(resolved, n_ctx, kv_type)
    hosts = [("this host", memory_info().available)] + [(ep, ggml_rpc.worker_memory(ep)[0]) for ep in endpoints]
    if not check:
        hosts = [(name, 1 << 62) if split is not None else (name, avail) for name, avail in hosts]
    host_layers, shares = plan_split(est, n_layers, hosts, split)
    worker_layers = [round(d.fraction * n_layers) for d in shares[1:]]
    return ClusterPlan(endpoints=endpoints, host_layers=host_layers,
                       worker_shares=[float(x) for x in worker_layers], shares=shares)


def load_backend(artifact: Artifact, opts: LoadOptions, on_progress: Optional[ProgressCallback] = None) -> Backend:
    from .backends import backend_for, check_kv_type

    check_kv_type(artifact.format, opts.kv_type)        # before anything loads (the backend table says)
    if opts.mmproj is not None and artifact.mmproj is None:
        artifact.mmproj = opts.mmproj
    backend = backend_for(artifact.format)
    try:
        backend.load(artifact, opts, on_progress)
    except BaseException:
        backend.close()
        raise
    return backend
