"""`vlm doctor`: what this device is, what our engines were built with, and which models fit."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..errors import first_line
from ..protocol import DEFAULT_CTX
from ..device.memory import KV_TYPES
from ..device.hardware import (cpu_info, default_threads, gpu_backend, llama_build_has_amx, llama_system_info, memory_info,
                       rebuild_advice)

FEATURES_SHOWN = {
    "x86": ["avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "avx_vnni"],
    "arm": ["asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp"],
}
FEATURE_NAMES = {"asimd": "neon", "asimddp": "dotprod", "fphp": "fp16"}


def _gpus() -> list[str]:
    out = []
    if shutil.which("nvidia-smi"):
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=5)
            out += [f"CUDA: {line.strip()}" for line in r.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    tegra = Path("/etc/nv_tegra_release")
    if tegra.exists():
        out.append("Jetson: " + first_line(tegra.read_text(errors="replace"))[:80])
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        out.append("Metal: Apple Silicon GPU (unified memory)")
    return out


def _cuda_home() -> Optional[str]:
    """Where nvcc is when it is not on PATH (JetPack puts it in /usr/local/cuda/bin)."""
    if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def _onnx_providers() -> Optional[list[str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return list(ort.get_available_providers())


def _rosetta() -> bool:
    if platform.system() != "Darwin":
        return False
    try:
        r = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=2)
        return r.stdout.strip() == "1"
    except (OSError, subprocess.SubprocessError):
        return False


def model_fits(n_ctx: int = DEFAULT_CTX, available: Optional[int] = None, kv_type: str = "f16") -> list[dict]:
    """Every registry artifact with its memory estimate (GGUF: KV cache in ``kv_type``) and whether it fits in
    available memory now; a GGUF one that does not fit but would with a smaller KV cache type gets that type
    in ``fits_with_kv_type`` (q8_0 before q4_0)."""
    from ..backends import capabilities, kv_type_for
    from ..loader import ResolvedModel, estimate_memory
    from ..models.registry import Registry
    from ..models.store import Store

    avail = memory_info().available if available is None else available
    store = Store()
    rows = []
    for m in Registry.load().models():
        for key, a in m.artifacts.items():
            r = ResolvedModel(name=m.alias, artifact=None, model=m, artifact_spec=a)
            if any(f.size is None for f in a.files):
                est = None
            else:
                est = estimate_memory(r, min(n_ctx, m.context_length or n_ctx), kv_type_for(a.format, kv_type)).total
            smaller = None
            if est is not None and est > avail and len(capabilities(a.format).kv_types) > 1:
                smaller = next((t for t in ("q8_0", "q4_0") if KV_TYPES[t] < KV_TYPES[kv_type]
                                and estimate_memory(r, min(n_ctx, m.context_length or n_ctx), t).total <= avail), None)
            weights = sum(f.size for f in a.files if f.size) or None
            installed = store.is_installed(m.alias, key)
            rows.append({"model": f"{m.alias}:{key}", "kind": m.kind, "format": a.format,
                         "params": m.parameters, "estimate": est, "weights": weights,
                         "fits": None if est is None else est <= avail, "fits_with_kv_type": smaller,
                         "installed": installed,
                         "images": _image_levels(store, m, a) if installed and a.mmproj else None})
    return rows


def _image_levels(store, model, aspec) -> Optional[dict]:
    """An installed GGUF vision model's image tokens and estimated encode seconds per detail level here
    (reports/inspect.py ``image_levels``); None when its projector cannot be read."""
    from ..formats.gguf_file import read_gguf
    from .inspect import image_levels

    try:
        art = store.artifact(model, aspec)
        if art.format != "gguf" or art.mmproj is None:
            return None
        return image_levels(read_gguf(art.mmproj), art.mmproj, art.path)
    except Exception:            # a damaged install: `vlm info` and loading say what is wrong with it
        return None


# What "answers in time" means for a recommendation: a reply that reads at least as fast as people read
# (~5 tokens/s), and a photo question whose image encode (at --detail auto's smallest input) fits the
# default image budget of inputs/detail.py.
MIN_DECODE_TPS = 5.0


def memory_bandwidth() -> Optional[float]:
    """Bytes/s this process can stream through memory (numpy copy of 128 MiB, best of 3): what bounds
    decode, which reads every weight once per token."""
    try:
        import time

        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    a = np.ones(16 * 2 ** 20, dtype=np.float64)
    b = np.empty_like(a)
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        s = time.perf_counter() - t0
        best = s if best is None else min(best, s)
    return 2 * a.nbytes / best if best else None       # read + write


def decode_estimate(weight_bytes: Optional[int], bandwidth: Optional[float]) -> Optional[float]:
    """Tokens/s a model of ``weight_bytes`` can decode here: each token streams the weights once; llama.cpp
    reaches about half the copy bandwidth on small CPUs."""
    if not weight_bytes or not bandwidth:
        return None
    return 0.5 * bandwidth / weight_bytes


def recommend(rows: list[dict], bandwidth: Optional[float] = None) -> dict[str, Optional[str]]:
    """The biggest default-format (gguf) model of each kind that fits (a quarter of RAM left free) and, when
    the memory bandwidth is known, decodes at ``MIN_DECODE_TPS`` or more here (rows get ``decode_tps``)."""
    best: dict[str, Optional[str]] = {"text": None, "vision": None}
    size: dict[str, int] = {}
    for r in rows:
        r["decode_tps"] = decode_estimate(r.get("weights"), bandwidth)
        if r["format"] != "gguf" or not r["fits"] or r["kind"] not in best:
            continue
        if r["decode_tps"] is not None and r["decode_tps"] < MIN_DECODE_TPS:
            continue
        p = r["params"] or 0
        if p > size.get(r["kind"], -1):
            best[r["kind"]], size[r["kind"]] = r["model"], p
    return best


def rpc_report(endpoints: Optional[list[str]] = None) -> dict:
    """Whether this llama.cpp build has the RPC backend, and each given worker's state and free memory."""
    from ..backends import ggml_rpc
    from ..errors import EdgeVLMError

    ok = ggml_rpc.available()
    workers = []
    for ep in endpoints or []:
        w = {"endpoint": ep, "reachable": False, "free": None, "total": None}
        try:
            ggml_rpc.check_reachable([ep])
            w["reachable"] = True
            if ok:
                w["free"], w["total"] = ggml_rpc.worker_memory(ep)
        except EdgeVLMError as e:
            w["error"] = e.message
        workers.append(w)
    return {"available": ok, "install": None if ok else ggml_rpc.INSTALL_HINT, "workers": workers}


def report(n_ctx: int = DEFAULT_CTX, rpc: Optional[list[str]] = None, kv_type: str = "f16") -> dict:
    cpu = cpu_info()
    mem = memory_info()
    family = "arm" if cpu.arch in ("arm64", "aarch64") else "x86"
    feats = {FEATURE_NAMES.get(f, f): (f in cpu.features) for f in FEATURES_SHOWN[family]}
    sysinfo = llama_system_info()
    threads = default_threads()
    warnings = []
    if "amx_tile" in cpu.features and llama_build_has_amx():
        warnings.append("This CPU has AMX and llama.cpp was built with AMX kernels, which crash on some CPUs "
                        "(llama.cpp #20824): edgevlm turns the AMX buffers off at load (VLM_LLAMA_EXTRA_BUFTS=1 forces them on).")
    if family == "arm" and any(k in sysinfo for k in ("AVX = 1", "AVX2 = 1")):
        warnings.append("llama.cpp reports x86 features on an ARM CPU: it was built with x86-only flags; rebuild it (see README).")
    if _rosetta():
        warnings.append("Python runs under Rosetta (x86-64 on Apple Silicon): install an arm64 Python for several times the speed.")
    env_threads = os.environ.get("VLM_THREADS")
    if env_threads and env_threads.isdigit() and int(env_threads) > cpu.physical_cores:
        warnings.append(f"VLM_THREADS={env_threads} exceeds the {cpu.physical_cores} physical cores: decode usually slows down.")
    if cpu.efficiency_cores:
        warnings.append(f"Hybrid CPU: defaulting to {threads} threads (performance cores only).")
    gpus = _gpus()
    rpc_doc = rpc_report(rpc)
    advice = rebuild_advice(cpu.arch, cpu.features, sysinfo, gpus, system=platform.system(),
                            keep_rpc=rpc_doc["available"], cuda_home=_cuda_home())
    if advice is not None:
        warnings.append(f"llama.cpp was built without {', '.join(advice.missing)}, which this device has: "
                        f"rebuild it with `{advice.command}`.")
    gpu = gpu_backend(sysinfo)
    try:
        fits = model_fits(n_ctx, mem.available, kv_type)
    except Exception as e:  # a broken user registry must not hide the rest of the report
        fits = []
        warnings.append(f"Could not read the model registry: {e}")
    return {
        "os": f"{platform.system()} {platform.release()}", "python": sys.version.split()[0],
        "cpu": {"model": cpu.model, "arch": cpu.arch, "logical_cores": cpu.logical_cores,
                "physical_cores": cpu.physical_cores, "performance_cores": cpu.performance_cores,
                "efficiency_cores": cpu.efficiency_cores, "features": feats, "board": cpu.board},
        "memory": {"total": mem.total, "available": mem.available},
        "gpus": gpus,
        "default_threads": threads,
        "llama_cpp": {"version": _version("llama-cpp-python"), "system_info": sysinfo.strip() or None,
                      "gpu_offload": gpu,
                      "gpu_layers": "auto: all layers that fit in the GPU's memory" if gpu else "0 (CPU only build)",
                      "rebuild": None if advice is None else {"missing": list(advice.missing),
                                                              "cmake_args": advice.cmake_args,
                                                              "command": advice.command}},
        "onnxruntime": {"version": _version("onnxruntime"), "providers": _onnx_providers()},
        "rpc": rpc_doc,
        "models": fits, "recommended": recommend(fits, bw := memory_bandwidth()), "context_for_estimates": n_ctx,
        "kv_type_for_estimates": kv_type,
        "memory_bandwidth": bw, "recommended_basis": f"fits in memory and decodes >= {MIN_DECODE_TPS:g} tok/s "
                                                    "(estimated from memory bandwidth and weight bytes)",
        "warnings": warnings,
    }


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
