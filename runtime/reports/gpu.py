"""GPU offload for GGUF models (llama.cpp built with CUDA or Metal): which device this build can use, how
much memory it has free, and how many layers `--gpu-layers N|auto` puts there (device/memory.py plans it).

Nothing here runs without such a build: a CPU-only llama.cpp gets 0 layers and the plan says why."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

from ..device.memory import GpuPlan, plan_gpu_layers


def parse_gpu_layers(text: Optional[str]) -> Optional[int]:
    """--gpu-layers value: a number of layers (0 = CPU only), or 'auto'/None (all that fit)."""
    if text is None or text.strip().lower() in ("auto", ""):
        return None
    t = text.strip()
    if t.isdigit():
        return int(t)
    from ..errors import UsageError

    raise UsageError(f"--gpu-layers {text!r} is not a number of layers or 'auto'.",
                     hint="For example --gpu-layers 20, --gpu-layers 0 (CPU only) or --gpu-layers auto.")


def _nvidia_free() -> Optional[int]:
    """Free memory of the first CUDA device, from nvidia-smi (MiB)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=5)
        first = r.stdout.split()[0] if r.stdout.split() else ""
        return int(float(first)) * 1024 * 1024 if first.replace(".", "", 1).isdigit() else None
    except (OSError, subprocess.SubprocessError):
        return None


def offload_device(system_info: Optional[str] = None) -> tuple[Optional[str], Optional[int], bool]:
    """(GPU backend of this llama.cpp build or None, its free memory or None when unknown, unified memory):
    Metal (Apple Silicon) and CUDA on a Jetson share this host's memory; a discrete CUDA card has its own."""
    from ..device.hardware import gpu_backend, llama_system_info, memory_info

    backend = gpu_backend(llama_system_info() if system_info is None else system_info)
    if backend is None:
        return None, None, False
    unified = backend == "Metal" or Path("/etc/nv_tegra_release").exists()
    if unified:
        return backend, memory_info().available, True
    return backend, _nvidia_free() if backend == "CUDA" else None, False


def plan(resolved, n_ctx: int, requested: Optional[int]) -> Optional[GpuPlan]:
    """The layers a model puts on the GPU (None for a backend without offload): ``requested`` layers, or with
    None as many as fit in the device's free memory (all of them on unified memory)."""
    from ..backends import capabilities

    art = resolved.artifact
    if art is None or not capabilities(art.format).gpu_offload:
        return None
    device, free, unified = offload_device()
    if device is None and not requested:            # a CPU-only build: nothing to plan (the common case)
        return GpuPlan(0, 0, None, 0, 0)
    from ..formats.gguf_file import read_gguf
    from ..loader import estimate_memory

    info = read_gguf(art.path)
    n_layers = info.kv_shape[0] if info.kv_shape else int(info.get(f"{info.architecture}.block_count") or 0)
    return plan_gpu_layers(estimate_memory(resolved, n_ctx), n_layers, requested, device, free, unified)
