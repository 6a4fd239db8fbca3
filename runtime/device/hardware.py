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
    board: str | None = None          # "Raspberry Pi 5 Model B Rev 1.0", "NVIDIA Jetson Orin Nano ... (L4T R36.3.0)"


_INTERESTING = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_vbmi", "avx512vbmi", "bmi2", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni",
    # arm64 (/proc/cpuinfo "Features")
    "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp", "asimdhp", "sme",
)

# arm64 hardware capability bits (Linux arch/arm64/include/uapi/asm/hwcap.h), read from the auxiliary
# vector when /proc/cpuinfo has no "Features" line (qemu-user shows the host's /proc/cpuinfo).
_HWCAP = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve"}
_HWCAP2 = {1: "sve2", 13: "i8mm", 14: "bf16", 23: "sme"}
# CPU implementer 0x41 (Arm Ltd) part numbers of the cores edge boards carry.
_ARM_PARTS = {
    0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57", 0xd08: "Cortex-A72",
    0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76", 0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77",
    0xd40: "Neoverse-V1", 0xd41: "Cortex-A78", 0xd42: "Cortex-A78AE", 0xd44: "Cortex-X1", 0xd46: "Cortex-A510",
    0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd49: "Neoverse-N2", 0xd4b: "Cortex-A78C", 0xd4d: "Cortex-A715",
    0xd4e: "Cortex-X3", 0xd4f: "Neoverse-V2", 0xd80: "Cortex-A520", 0xd81: "Cortex-A720", 0xd82: "Cortex-X4",
}


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


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """/proc/cpuinfo text -> (model, feature flags). x86 names its model; arm64 gives implementer/part
    numbers per core, turned into e.g. "Cortex-A76" or "4x Cortex-A76 + 4x Cortex-A55"."""
    model, hardware, feats, parts = None, None, set(), []
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip().lower(), val.strip()
        if key in ("model name", "cpu model") and val and model is None:
            model = val
        elif key == "hardware" and val:
            hardware = val
        elif key in ("flags", "features"):
            feats.update(val.split())
        elif key == "cpu part" and val:
            try:
                parts.append(int(val, 16))
            except ValueError:
                pass
    if parts and (model is None or model.startswith("ARMv")) and any(p in _ARM_PARTS for p in parts):
        counts: dict[str, int] = {}
        for p in parts:
            name = _ARM_PARTS.get(p, f"ARM part {p:#x}")
            counts[name] = counts.get(name, 0) + 1
        model = " + ".join(f"{n}x {name}" if len(counts) > 1 else name for name, n in counts.items())
    return model or hardware, feats


def arm_hwcap_features(hwcap: int, hwcap2: int) -> set[str]:
    """AT_HWCAP / AT_HWCAP2 bits -> the names /proc/cpuinfo would use."""
    return ({name for bit, name in _HWCAP.items() if hwcap >> bit & 1}
            | {name for bit, name in _HWCAP2.items() if hwcap2 >> bit & 1})


def _auxv_arm_features() -> set[str]:
    try:
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        return arm_hwcap_features(getauxval(16), getauxval(26))       # AT_HWCAP, AT_HWCAP2
    except (OSError, AttributeError):
        return set()


def board_model(device_tree_model: str = "", tegra_release: str = "") -> str | None:
    """The board: the device tree's model ("Raspberry Pi 5 Model B Rev 1.0", "NVIDIA Jetson Orin Nano
    Developer Kit") and, on a Jetson, the L4T release from /etc/nv_tegra_release ("# R36 (release),
    REVISION: 3.0, ...")."""
    name = device_tree_model.replace("\x00", "").strip() or None
    if tegra_release.strip():
        import re

        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", tegra_release)
        l4t = f"L4T R{m.group(1)}.{m.group(2)}" if m else "L4T"
        name = f"{name or 'NVIDIA Jetson'} ({l4t})"
    return name


def core_groups(sysfs: Path | str = "/sys", cpus: set[int] | None = None, by_frequency: bool = True) -> dict[int, list[int]]:
    """Cores grouped by what they can do: the kernel's cpu_capacity (arm big.LITTLE), else (arm) each
    core's cpufreq/cpuinfo_max_freq. {value: [cpu numbers]}, empty when the kernel says neither."""
    base = Path(sysfs) / "devices/system/cpu"
    groups: dict[int, list[int]] = {}
    for source in ("cpu_capacity", "cpufreq/cpuinfo_max_freq") if by_frequency else ("cpu_capacity",):
        groups = {}
        for d in base.glob("cpu[0-9]*"):
            n = int(d.name[3:])
            if cpus is not None and n not in cpus:
                continue
            v = _read(str(d / source)).strip()
            if v.isdigit():
                groups.setdefault(int(v), []).append(n)
        if groups:
            break
    return {k: sorted(v) for k, v in sorted(groups.items(), reverse=True)}


def split_performance(groups: dict[int, list[int]]) -> tuple[int | None, int | None]:
    """(performance, efficiency) core counts from ``core_groups``: cores within 15% of the fastest are
    performance cores (clusters of one core type often differ by a few %); (None, None) when all are alike."""
    if len(groups) < 2:
        return None, None
    top = max(groups)
    perf = sum(len(v) for k, v in groups.items() if k >= 0.85 * top)
    eff = sum(len(v) for k, v in groups.items() if k < 0.85 * top)
    return (perf, eff) if eff else (None, None)


def _hybrid_linux(sysfs: Path | str = "/sys", arm: bool = False, cpus: set[int] | None = None) -> tuple[int | None, int | None]:
    """Intel hybrid parts expose cpu_core / cpu_atom PMUs; arm big.LITTLE exposes cpu_capacity (else the
    clusters' max frequencies differ). x86 cores' max frequencies differ by a few bins (preferred cores),
    so frequency is not used there."""
    core = _read(f"{sysfs}/devices/cpu_core/cpus").strip()
    atom = _read(f"{sysfs}/devices/cpu_atom/cpus").strip()
    if core and atom:
        return _count_cpulist(core), _count_cpulist(atom)
    return split_performance(core_groups(sysfs, cpus, by_frequency=arm))


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
    board = None
    system = platform.system()
    if system == "Linux":
        parsed_model, feats = parse_cpuinfo(_read("/proc/cpuinfo"))
        arm = arch in ("aarch64", "arm64")
        if arm and not feats & {"asimd", "fp"}:
            feats = _auxv_arm_features()        # no arm "Features" line (qemu-user shows the host's cpuinfo)
            parsed_model = None if parsed_model and "Cortex" not in parsed_model else parsed_model
        model = parsed_model or model
        if arm:
            board = board_model(_read("/proc/device-tree/model"), _read("/etc/nv_tegra_release"))
        physical = _physical_cores_linux()
        try:
            allowed = os.sched_getaffinity(0)
        except AttributeError:  # pragma: no cover
            allowed = None
        perf, eff = _hybrid_linux("/sys", arm=arm, cpus=allowed)
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
        features=frozenset(f for f in feats if f in _INTERESTING), board=board,
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


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """llama.cpp's system info ("CUDA : ARCHS = 870 | USE_GRAPHS = 1 | CPU : NEON = 1 | DOTPROD = 1 | ...")
    -> {backend: {feature: value}}."""
    out: dict[str, dict[str, str]] = {}
    cur = None
    for seg in text.split("|"):
        seg = seg.strip()
        if " : " in seg:
            cur, seg = (x.strip() for x in seg.split(" : ", 1))
            out.setdefault(cur, {})
        if cur is not None and "=" in seg:
            k, _, v = seg.partition("=")
            out[cur][k.strip()] = v.strip()
    return out


# What the CPU offers (its /proc/cpuinfo name) -> the feature llama.cpp's CPU backend reports when built for
# it, and the CMake switch that builds it (x86; on arm one -march names them all). AMX is left out on
# purpose: its kernels crash on some CPUs (see avoid_amx_buffers).
_BUILD_FEATURE = {
    "asimd": "NEON", "asimddp": "DOTPROD", "asimdhp": "FP16_VA", "i8mm": "MATMUL_INT8", "sve": "SVE",
    "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
    "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16",
}
_ARM_MARCH_TAG = {"asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve"}   # SME: KleidiAI only
GPU_BACKENDS = ("CUDA", "Metal", "MTL", "Vulkan", "HIP", "ROCm", "SYCL", "MUSA", "CANN", "OpenCL")


def gpu_backend(system_info: str) -> str | None:
    """The GPU backend this llama.cpp build has (CUDA, Metal, Vulkan, ...), or None for a CPU-only build."""
    for name in parse_system_info(system_info):
        if name in GPU_BACKENDS:
            return "Metal" if name == "MTL" else name
    return None


@dataclass(frozen=True)
class BuildAdvice:
    missing: tuple[str, ...]      # what the CPU/GPU offers and the build lacks: "DOTPROD", "CUDA", ...
    cmake_args: str
    command: str                  # the exact line that rebuilds llama-cpp-python with them


def rebuild_advice(arch: str, cpu_features, system_info: str, gpus=(), *, system: str = "Linux",
                   keep_rpc: bool = False, cuda_home: str | None = None) -> BuildAdvice | None:
    """When the installed llama.cpp build lacks what this CPU offers (dotprod, i8mm, SVE, fp16 on arm;
    AVX2, AVX-512, ... on x86) or a GPU is present but the build has no GPU backend: the CMAKE_ARGS and the
    `pip install --force-reinstall --no-cache-dir llama-cpp-python` line that fixes it. None otherwise, or
    when the build report is unknown. ``gpus``: doctor's GPU lines ("CUDA: ...", "Jetson: ...", "Metal: ...");
    ``cuda_home``: where nvcc lives when it is not on PATH (Jetson's /usr/local/cuda)."""
    info = parse_system_info(system_info)
    cpu = info.get("CPU")
    if cpu is None:
        return None
    feats = set(cpu_features)
    arm = arch in ("aarch64", "arm64")
    offered = [f for f in _BUILD_FEATURE if f in feats and (f in _ARM_MARCH_TAG or f == "asimd") == arm]
    if arm and "fphp" not in feats:
        offered = [f for f in offered if f != "asimdhp"]
    missing = [_BUILD_FEATURE[f] for f in offered if cpu.get(_BUILD_FEATURE[f]) != "1"]
    args: list[str] = []
    if missing:
        args.append("-DGGML_NATIVE=OFF")
        if arm:
            tags = "".join(f"+{_ARM_MARCH_TAG[f]}" for f in _ARM_MARCH_TAG if f in offered)
            args.append(f"-DGGML_CPU_ARM_ARCH={'armv8.2-a' if tags else 'armv8-a'}{tags}")
        else:
            args += [f"-DGGML_{_BUILD_FEATURE[f]}=ON" for f in offered]
    env = ""
    if gpu_backend(system_info) is None:
        kinds = {g.split(":", 1)[0] for g in gpus}
        if kinds & {"CUDA", "Jetson"}:
            missing.append("CUDA")
            args.append("-DGGML_CUDA=ON")
            if cuda_home:
                env = f"CUDACXX={cuda_home}/bin/nvcc "
        elif "Metal" in kinds or system == "Darwin" and arm:
            missing.append("Metal")
            args.append("-DGGML_METAL=ON")
    if not missing:
        return None
    if keep_rpc:
        args.append("-DGGML_RPC=ON")
    cmake = " ".join(args)
    return BuildAdvice(tuple(missing), cmake,
                       f'{env}CMAKE_ARGS="{cmake}" pip install --force-reinstall --no-cache-dir llama-cpp-python')
