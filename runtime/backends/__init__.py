"""Backends, registered in one table and chosen by the artifact's file format."""
from __future__ import annotations

import importlib

from ..errors import UsageError
from ..protocol import Backend, Capabilities

# format -> "module:Class"; imported only when used, so `vlm --help` never loads llama.cpp.
BACKENDS: dict[str, str] = {
    "gguf": "edgevlm.runtime.backends.gguf:GGUFBackend",
    "onnx": "edgevlm.runtime.backends.onnx:ONNXBackend",
}

# format -> what its backend can do (answered without importing it)
CAPABILITIES: dict[str, Capabilities] = {
    "gguf": Capabilities(parallel_slots=True, rpc=True, gpu_offload=True, projector_vision=True, drafting=True),
    "onnx": Capabilities(),
}


def capabilities(fmt: str) -> Capabilities:
    """What the backend of ``fmt`` can do; an unknown format can do nothing beyond generating."""
    return CAPABILITIES.get(fmt, Capabilities())


def backend_for(fmt: str) -> Backend:
    target = BACKENDS.get(fmt)
    if target is None:
        raise UsageError(
            f"No backend for model format {fmt!r}.",
            hint=f"Supported formats: {', '.join(sorted(BACKENDS))}.",
        )
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()
