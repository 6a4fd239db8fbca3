"""Backends, registered in one table and chosen by the artifact's file format."""
from __future__ import annotations

import importlib

from ..device.memory import KV_TYPES
from ..errors import UsageError
from ..protocol import Backend, Capabilities

# format -> "module:Class"; imported only when used, so `vlm --help` never loads llama.cpp.
BACKENDS: dict[str, str] = {
    "gguf": "edgevlm.runtime.backends.gguf:GGUFBackend",
    "onnx": "edgevlm.runtime.backends.onnx:ONNXBackend",
}

# format -> what its backend can do (answered without importing it)
CAPABILITIES: dict[str, Capabilities] = {
    "gguf": Capabilities(parallel_slots=True, rpc=True, gpu_offload=True, projector_vision=True,
                         kv_types=tuple(KV_TYPES)),
    "onnx": Capabilities(),
}


def capabilities(fmt: str) -> Capabilities:
    """What the backend of ``fmt`` can do; an unknown format can do nothing beyond generating."""
    return CAPABILITIES.get(fmt, Capabilities())


def kv_type_for(fmt: str, kv_type: str) -> str:
    """The KV cache type a ``fmt`` model runs with when ``kv_type`` is asked for all models (`vlm serve
    --kv-type`, doctor's table): that type where its backend takes it, else f16."""
    return kv_type if kv_type in capabilities(fmt).kv_types else "f16"


def check_kv_type(fmt: str, kv_type: str) -> None:
    """Refuse a --kv-type the backend of ``fmt`` cannot store its KV cache in, in one line."""
    if kv_type in capabilities(fmt).kv_types:
        return
    takers = " or ".join(f.upper() for f, c in sorted(CAPABILITIES.items()) if kv_type in c.kv_types) or "other"
    raise UsageError(f"--kv-type {kv_type} is for {takers} models: a{'n' if fmt[:1] in 'aeiou' else ''} "
                     f"{fmt.upper()} model keeps its KV cache in the dtype it was exported with.",
                     hint=f"Drop --kv-type, or use the model's {takers} artifact.")


def backend_for(fmt: str) -> Backend:
    target = BACKENDS.get(fmt)
    if target is None:
        raise UsageError(
            f"No backend for model format {fmt!r}.",
            hint=f"Supported formats: {', '.join(sorted(BACKENDS))}.",
        )
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()
