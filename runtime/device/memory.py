"""Honest memory checks: estimate what loading a model will take, and refuse early when it won't fit."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InsufficientMemory

MiB = 1024 * 1024
# Compute buffers, the runtime itself (Python, llama.cpp, tokenizer) and allocator slack. Measured
# against peak RSS on the test models (see tests/test_memory_estimate.py); kept generous on purpose:
# the estimate must never be much lower than what the process really uses.
RUNTIME_OVERHEAD = 160 * MiB
COMPUTE_PER_CTX_TOKEN = 2 * 1024         # llama.cpp's compute buffer grows with n_ctx (logits, scratch)
# onnxruntime on top of that: it repacks MatMul weights for its kernels at session creation, and its
# arenas and library are larger. A single-file model costs more: it is read into memory and the
# protobuf and the tensors made from it are held at once while the session is built; external data
# (``<file>_data``, what `vlm quantize` writes) avoids that copy. Measured on SmolLM2-135M exports,
# peak RSS for fp32 / int8 / int4 (623 / 173 / 101 MiB of weights): single file 929..1119 / 386 / 292
# MiB, external data 703 / 296 / 231 MiB.
ONNX_EXTRA_OVERHEAD = 48 * MiB
ONNX_REPACK_FRACTION = 0.25             # external data
ONNX_SINGLE_FILE_FRACTION = 0.75        # weights inside the .onnx file


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    mmproj: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.mmproj + self.kv_cache + self.overhead

    def describe(self) -> str:
        parts = [f"weights {fmt_bytes(self.weights)}"]
        if self.mmproj:
            parts.append(f"vision projector {fmt_bytes(self.mmproj)}")
        parts.append(f"KV cache {fmt_bytes(self.kv_cache)}")
        parts.append(f"runtime {fmt_bytes(self.overhead)}")
        return f"{fmt_bytes(self.total)} ({', '.join(parts)})"


# What llama.cpp can keep its KV cache in (``--kv-type``), as bytes per element: f16, or ggml's block
# types of 32 elements (q8_0: 32 int8 + one f16 scale = 34 bytes; q4_0: 16 bytes of nibbles + the scale).
KV_TYPES: dict[str, float] = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
KV_BLOCK = 32          # a quantized type's block: each head's K and V must be a whole number of them


def kv_type(value: str | None) -> str:
    """A ``--kv-type`` / config value checked and normalised (None: f16); ``UsageError`` in one line."""
    if value is None:
        return "f16"
    v = str(value).strip().lower()
    if v not in KV_TYPES:
        from ..errors import UsageError

        raise UsageError(f"--kv-type {value!r} is not a KV cache type: use {', '.join(KV_TYPES)}.",
                         hint="q8_0 halves the KV cache at almost no quality cost; q4_0 quarters it.")
    return v


def kv_cache_bytes(n_ctx: int, layers: int, kv_heads: int, head_dim: int, bytes_per_elem: float = 2) -> int:
    """K and V, f16 by default: 2 * layers * ctx * kv_heads * head_dim * 2 bytes (``KV_TYPES`` for others)."""
    return int(2 * layers * n_ctx * kv_heads * head_dim * bytes_per_elem)


def estimate(weights: int, n_ctx: int, kv_shape: tuple[int, int, int] | None, mmproj: int = 0,
             kv_bytes_per_elem: float = 2) -> MemoryEstimate:
    if kv_shape:
        kv = kv_cache_bytes(n_ctx, *kv_shape, bytes_per_elem=kv_bytes_per_elem)
    else:
        # Unknown shape: assume the KV cache is about a quarter of the weights at 4k context (f16).
        kv = int(weights * 0.25 * n_ctx / 4096 * kv_bytes_per_elem / 2)
    # mmproj: weights plus the vision encoder's activations (roughly as large again for small ViTs).
    vision = int(mmproj * 2) if mmproj else 0
    overhead = RUNTIME_OVERHEAD + COMPUTE_PER_CTX_TOKEN * n_ctx
    return MemoryEstimate(weights=weights, mmproj=vision, kv_cache=kv, overhead=overhead)


def check_fits(est: MemoryEstimate, available: int, what: str) -> None:
    if est.total > available:
        raise InsufficientMemory(
            f"{what} needs about {est.describe()}, but only {fmt_bytes(available)} of memory is available.",
            hint="Use a smaller quantization or model, lower --ctx, close other programs, or pass --ignore-memory to try anyway.",
        )


@dataclass(frozen=True)
class DeviceShare:
    name: str             # "this host" or the worker's HOST:PORT
    fraction: float       # of the model's layers (and their KV cache)
    needs: int
    available: int


def plan_split(est: MemoryEstimate, n_layers: int, hosts: list[tuple[str, int]],
               weights: list[float] | None = None) -> tuple[int, list[DeviceShare]]:
    """Spread ``n_layers`` over this host and RPC workers: ``hosts`` is [(name, available bytes)], this
    host first. Shares follow ``weights`` (--tensor-split) or else each device's free memory (as llama.cpp
    splits over GPUs). Each device needs its share of the weights and the KV cache; this host also keeps
    the vision projector and the runtime overhead. Returns (layers kept on this host, the plan); refuses
    with a per-device breakdown when any device is short."""
    if weights is not None and len(weights) != len(hosts):
        from ..errors import UsageError

        raise UsageError(f"--tensor-split has {len(weights)} values for {len(hosts)} devices (this host first).",
                         hint="Give one share for this host and one per --rpc worker, e.g. 1,1,1.")
    w = list(weights) if weights is not None else [max(1, avail) for _, avail in hosts]
    total_w = sum(w)
    if total_w <= 0:
        from ..errors import UsageError

        raise UsageError("--tensor-split shares must not all be zero.", hint="For example 1,2,2.")
    layers = [round(n_layers * x / total_w) for x in w]
    layers[0] = n_layers - sum(layers[1:])              # rounding goes to this host
    plan = []
    for i, ((name, avail), n) in enumerate(zip(hosts, layers)):
        frac = n / n_layers if n_layers else 0.0
        need = int((est.weights + est.kv_cache) * frac)
        if i == 0:
            need += est.mmproj + est.overhead
        plan.append(DeviceShare(name, frac, need, avail))
    short = [d for d in plan if d.needs > d.available]
    if short:
        lines = "; ".join(f"{d.name}: {d.fraction:.0%} of the layers needs {fmt_bytes(d.needs)}, "
                          f"{fmt_bytes(d.available)} free" for d in plan)
        raise InsufficientMemory(
            f"The model does not fit across these devices ({lines}).",
            hint="Add a worker, move shares with --tensor-split, use a smaller quantization, lower --ctx, "
                 "or pass --ignore-memory to try anyway.")
    return layers[0], plan


def fmt_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@dataclass(frozen=True)
class GpuPlan:
    """How many layers go to the GPU (llama.cpp's n_gpu_layers: ``n_layers + 1`` also takes the output
    layer, i.e. everything) and what that costs on the device and on this host."""
    layers: int
    n_layers: int
    device: str | None       # "CUDA", "Metal", ... (None: the build has no GPU offload)
    device_bytes: int
    host_bytes: int

    @property
    def all(self) -> bool:
        return self.layers > self.n_layers

    def describe(self) -> str:
        if not self.device or not self.layers:
            return "0 (CPU only)" if self.device else "0 (this llama.cpp build has no GPU offload)"
        shown = "all" if self.all else f"{self.layers}/{self.n_layers}"
        return f"{shown} on {self.device} ({fmt_bytes(self.device_bytes)} there)"


def plan_gpu_layers(est: MemoryEstimate, n_layers: int, requested: int | None, device: str | None,
                    device_free: int | None, unified: bool = False) -> GpuPlan:
    """--gpu-layers N|auto (``requested`` None = auto) for a build with GPU offload on ``device``.

    auto: every layer when the build has a GPU backend and they fit in the device's free memory, else as
    many as fit; 0 without GPU offload. Each layer costs its share of the weights and of the KV cache; the
    device also holds compute buffers (the estimate's runtime share). With unified memory (Jetson, Apple
    Silicon) the device's memory is this host's, which the ordinary memory check already covers: all
    layers. An explicit N above what fits is refused here, before llama.cpp fails to allocate."""
    n_layers = max(1, n_layers)
    if device is None:
        if requested:
            from ..errors import UsageError

            raise UsageError(f"--gpu-layers {requested}: this llama.cpp build has no GPU offload.",
                             hint="Rebuild llama-cpp-python with CUDA or Metal (`vlm doctor` prints the line), "
                                  "or drop --gpu-layers.")
        return GpuPlan(0, n_layers, None, 0, est.total)
    per_layer = (est.weights + est.kv_cache) / n_layers
    if unified or device_free is None:
        layers = n_layers + 1 if requested is None else min(requested, n_layers + 1)
    elif requested is None:
        fit = int(max(0, device_free - est.overhead) // per_layer) if per_layer else n_layers
        layers = n_layers + 1 if fit >= n_layers else fit
    else:
        layers = min(requested, n_layers + 1)
    on_device = min(layers, n_layers)
    device_bytes = int(per_layer * on_device) + (est.overhead if layers else 0)
    if not unified and device_free is not None and requested is not None and device_bytes > device_free:
        raise InsufficientMemory(
            f"--gpu-layers {requested} needs about {fmt_bytes(device_bytes)} on the {device} device, "
            f"which has {fmt_bytes(device_free)} free.",
            hint="Lower --gpu-layers, or use --gpu-layers auto (as many as fit).")
    host = est.total if unified else est.total - int(per_layer * on_device)
    return GpuPlan(layers, n_layers, device, device_bytes, host)
