"""What the device in front of us is: cores, memory, CPU features, and known-bad combinations."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    logical_cores: int
    physical_cores: int
    performance_cores: int | None     # None when the platform does not tell
    efficiency_cores: int | None
    features: frozenset[str] = field(default_factory=frozenset)


_INTERESTING = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_vbmi", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni",
    # arm64 (/proc/cpuinfo "Features")
    "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp", "asimdhp",
)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _sysctl(name: str) -> str:
    try:
        import subprocess

        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout.strip()
    except Exception:
        return ""


def _physical_cores_linux() -> int | None:
    cpus = set()
    base = Path("/sys/devices/system/cpu")
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not linux
        allowed = None
    for d in base.glob("cpu[0-9]*"):
        n = int(d.name[3:])
        if allowed is not None and n not in allowed:
            continue
        pkg = _read(str(d / "topology/physical_package_id")).strip()
        core = _read(str(d / "topology/core_id")).strip()
        if core:
            cpus.add((pkg, core))
    return len(cpus) or None


def _hybrid_linux() -> tuple[int | None, int | None]:
    """Intel hybrid parts expose cpu_core / cpu_atom PMUs; arm big.LITTLE exposes cpu_capacity."""
    core = _read("/sys/devices/cpu_core/cpus").strip()
    atom = _read("/sys/devices/cpu_atom/cpus").strip()
    if core and atom:
        return _count_cpulist(core), _count_cpulist(atom)
    caps: dict[int, int] = {}
    for d in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        c = _read(str(d / "cpu_capacity")).strip()
        if c.isdigit():
            caps[int(d.name[3:])] = int(c)
    if caps and len(set(caps.values())) > 1:
        top = max(caps.values())
        big = sum(1 for v in caps.values() if v == top)
        return big, len(caps) - big
    return None, None


def _count_cpulist(s: str) -> int:
    n = 0
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            n += int(b) - int(a) + 1
        elif part:
            n += 1
    return n


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    arch = platform.machine().lower()
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    model, feats = platform.processor() or arch, set()
    perf = eff = None
    physical = None
    system = platform.system()
    if system == "Linux":
        info = _read("/proc/cpuinfo")
        for line in info.splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and val.strip():
                model = val.strip()
            elif key in ("flags", "features"):
                feats.update(val.split())
        if "aarch64" in arch and model == arch:
            dt = _read("/proc/device-tree/model").strip("\x00\n ")
            model = dt or model
        physical = _physical_cores_linux()
        perf, eff = _hybrid_linux()
    elif system == "Darwin":
        model = _sysctl("machdep.cpu.brand_string") or model
        physical = int(_sysctl("hw.physicalcpu") or 0) or None
        p = _sysctl("hw.perflevel0.physicalcpu")
        e = _sysctl("hw.perflevel1.physicalcpu")
        perf = int(p) if p.isdigit() else None
        eff = int(e) if e.isdigit() else None
        if arch in ("arm64", "aarch64"):
            feats.update({"asimd", "asimddp", "fphp"})
            if _sysctl("hw.optional.arm.FEAT_I8MM") == "1":
                feats.add("i8mm")
    else:
        try:
            import psutil

            physical = psutil.cpu_count(logical=False)
        except Exception:
            physical = None
    physical = min(physical or logical, logical)
    return CpuInfo(
        model=model, arch=arch, logical_cores=logical, physical_cores=physical,
        performance_cores=perf, efficiency_cores=eff,
        features=frozenset(f for f in feats if f in _INTERESTING),
    )


def default_threads() -> int:
    """Physical cores (performance cores on hybrid CPUs): hyperthreads and E-cores slow decode down."""
    env = os.environ.get("VLM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    info = cpu_info()
    return max(1, info.performance_cores or info.physical_cores)


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    available: int


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GB', '2048' (bytes) -> bytes."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def memory_info() -> MemoryInfo:
    """Total and available memory, honouring cgroup limits and VLM_MEMORY_LIMIT (e.g. '4G': plan
    for a smaller device, or keep room for other programs)."""
    import psutil

    vm = psutil.virtual_memory()
    total, avail = vm.total, vm.available
    cap = os.environ.get("VLM_MEMORY_LIMIT")
    if cap:
        try:
            lim = parse_size(cap)
        except ValueError:
            from ..errors import UsageError

            raise UsageError(f"VLM_MEMORY_LIMIT={cap!r} is not a size.", hint="Use e.g. 4G or 512M.") from None
        total, avail = min(total, lim), min(avail, lim)
    # cgroup v2 limit (containers, CI runners, systemd slices) can be far below the host's RAM.
    limit = _read("/sys/fs/cgroup/memory.max").strip()
    if limit.isdigit():
        used = _read("/sys/fs/cgroup/memory.current").strip()
        lim = int(limit)
        total = min(total, lim)
        if used.isdigit():
            avail = min(avail, max(0, lim - int(used)))
    return MemoryInfo(total=total, available=avail)


def cpu_has_amx() -> bool:
    return "amx_tile" in cpu_info().features


@lru_cache(maxsize=1)
def llama_system_info() -> str:
    """llama.cpp's own build report (which SIMD paths and backends were compiled in)."""
    try:
        from ..backends.llamacpp import import_llama

        raw = import_llama()[0].llama_print_system_info()
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    except Exception:
        return ""


def llama_build_has_amx() -> bool:
    info = llama_system_info()
    return "AMX_INT8 = 1" in info or "AMX = 1" in info


def avoid_amx_buffers() -> bool:
    """True when llama.cpp's AMX matmul would run here: it segfaults on some CPUs (llama.cpp #20824).

    Turning off the extra buffer types (AMX and repacked weights) at model load avoids the crash
    whatever flags llama-cpp-python was built with. ``VLM_LLAMA_EXTRA_BUFTS=1`` forces them on.
    """
    forced = os.environ.get("VLM_LLAMA_EXTRA_BUFTS")
    if forced is not None:
        return forced.strip() in ("0", "false", "no")
    return cpu_has_amx() and llama_build_has_amx()
