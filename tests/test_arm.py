"""ARM boards (Raspberry Pi 5, Jetson Orin, big.LITTLE SoCs): what `vlm doctor` reads from /proc, the device
tree and sysfs, which llama.cpp rebuild it proposes, and the --gpu-layers plan. The detection functions
take their inputs as arguments, so these run on any host; the text below is what those boards print
(Raspberry Pi OS bookworm on a Pi 5 4GB, JetPack 6.0 / L4T R36.3 on an Orin Nano developer kit).
scripts/test-aarch64.sh also runs this file on aarch64 (emulated), where the last tests check the live
values."""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import pytest

from edgevlm.runtime.reports.gpu import parse_gpu_layers
from edgevlm.runtime.device.hardware import (arm_hwcap_features, board_model, core_groups, gpu_backend,
                                             llama_system_info, parse_cpuinfo, parse_system_info, rebuild_advice, split_performance)
from edgevlm.runtime.device.memory import estimate, plan_gpu_layers
from edgevlm.runtime.errors import InsufficientMemory, UsageError

from conftest import REPO, vlm

PI5_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
PI5_CPUINFO = "\n".join(PI5_CORE.format(n=n) for n in range(4)) + """
Revision\t: d04170
Serial\t\t: 2e1f7c3a9b5d0e11
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
PI5_DT_MODEL = "Raspberry Pi 5 Model B Rev 1.0\x00"

ORIN_CORE = """processor\t: {n}
model name\t: ARMv8 Processor rev 1 (v8l)
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd42
CPU revision\t: 1
"""
ORIN_CPUINFO = "\n".join(ORIN_CORE.format(n=n) for n in range(6))
ORIN_DT_MODEL = "NVIDIA Jetson Orin Nano Developer Kit\x00"
ORIN_TEGRA_RELEASE = ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
                      "DATE: Fri Jul 19 23:24:25 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
                      "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")

# llama.cpp's system info from three builds: generic armv8-a (a wheel built for any arm64), the README's
# Pi 5 line (armv8.2-a+fp16+dotprod), and a CUDA build on a Jetson.
GENERIC_ARM = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
PI5_BUILD = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
JETSON_CUDA = ("CUDA : ARCHS = 870 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : NEON = 1 | ARM_FMA = 1 | "
               "FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
X86_NO_AVX2 = "CPU : SSE3 = 1 | SSSE3 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
ZEN3_FLAGS = {"avx", "avx2", "fma", "f16c", "bmi2"}


def readme_pi_cmake_args() -> str:
    text = (REPO / "README.md").read_text()
    block = text[text.index("# Raspberry Pi 5"):]
    return re.search(r'CMAKE_ARGS="([^"]+)"', block).group(1)


# ------------------------------------------------------------------------------------------- parsing
def test_pi5_cpuinfo_and_board():
    model, feats = parse_cpuinfo(PI5_CPUINFO)
    assert model == "Cortex-A76"
    assert {"asimd", "asimddp", "fphp", "asimdhp"} <= feats and not {"i8mm", "sve"} & feats
    assert board_model(PI5_DT_MODEL, "") == "Raspberry Pi 5 Model B Rev 1.0"


def test_jetson_orin_cpuinfo_and_board():
    model, feats = parse_cpuinfo(ORIN_CPUINFO)
    assert model == "Cortex-A78AE"                  # not the kernel's "ARMv8 Processor rev 1 (v8l)"
    assert "asimddp" in feats and "sve" not in feats
    assert board_model(ORIN_DT_MODEL, ORIN_TEGRA_RELEASE) == "NVIDIA Jetson Orin Nano Developer Kit (L4T R36.3.0)"
    assert board_model("", ORIN_TEGRA_RELEASE) == "NVIDIA Jetson (L4T R36.3.0)"
    assert board_model("", "") is None


def test_big_little_cpuinfo_names_both_core_types():
    a55 = PI5_CORE.replace("0xd0b", "0xd05")
    text = "\n".join((a55 if n < 4 else PI5_CORE).format(n=n) for n in range(8))
    assert parse_cpuinfo(text)[0] == "4x Cortex-A55 + 4x Cortex-A76"


def test_x86_cpuinfo():
    model, feats = parse_cpuinfo("processor : 0\nmodel name : AMD EPYC 7B13\nflags : fpu sse avx avx2 fma f16c\n")
    assert model == "AMD EPYC 7B13" and {"avx2", "fma"} <= feats


def test_hwcaps_when_cpuinfo_has_no_arm_features():
    # HWCAP: fp(0) asimd(1) fphp(9) asimdhp(10) asimddp(20) sve(22); HWCAP2: i8mm(13) bf16(14)
    hw = 1 | 1 << 1 | 1 << 9 | 1 << 10 | 1 << 20 | 1 << 22
    assert arm_hwcap_features(hw, 1 << 13 | 1 << 14) == {"asimd", "fphp", "asimdhp", "asimddp", "sve", "i8mm", "bf16"}
    assert arm_hwcap_features(1 << 1, 0) == {"asimd"}


def _sysfs(tmp_path: Path, per_cpu: dict[int, dict[str, str]]) -> Path:
    for n, files in per_cpu.items():
        for rel, value in files.items():
            f = tmp_path / f"devices/system/cpu/cpu{n}" / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(value + "\n")
    return tmp_path


def test_big_little_by_capacity(tmp_path):
    # RK3588 (Orange Pi 5): four Cortex-A55 (capacity 530) and four Cortex-A76 in two clusters at
    # 2.256 / 2.352 GHz (capacity 1019 / 1024): the A76s are the performance cores.
    caps = {0: 530, 1: 530, 2: 530, 3: 530, 4: 1019, 5: 1019, 6: 1024, 7: 1024}
    root = _sysfs(tmp_path, {n: {"cpu_capacity": str(c)} for n, c in caps.items()})
    groups = core_groups(root)
    assert groups == {1024: [6, 7], 1019: [4, 5], 530: [0, 1, 2, 3]}
    assert split_performance(groups) == (4, 4)
    assert split_performance(core_groups(root, cpus={0, 1, 6})) == (1, 2)      # the process's affinity


def test_big_little_by_max_frequency(tmp_path):
    freqs = {0: 1800000, 1: 1800000, 2: 2400000, 3: 2400000}
    root = _sysfs(tmp_path, {n: {"cpufreq/cpuinfo_max_freq": str(f)} for n, f in freqs.items()})
    assert split_performance(core_groups(root)) == (2, 2)
    assert core_groups(root, by_frequency=False) == {}          # x86: preferred cores differ by a few bins


def test_pi5_cores_are_all_alike(tmp_path):
    root = _sysfs(tmp_path, {n: {"cpu_capacity": "1024", "cpufreq/cpuinfo_max_freq": "2400000"} for n in range(4)})
    assert split_performance(core_groups(root)) == (None, None)
    assert split_performance(core_groups(tmp_path / "nothing")) == (None, None)


def test_system_info_parsing():
    info = parse_system_info(JETSON_CUDA)
    assert info["CUDA"]["ARCHS"] == "870" and info["CPU"]["DOTPROD"] == "1"
    assert gpu_backend(JETSON_CUDA) == "CUDA"
    assert gpu_backend("MTL : EMBED_LIBRARY = 1 | CPU : NEON = 1 | ") == "Metal"
    assert gpu_backend(PI5_BUILD) is None


# ------------------------------------------------------------------------------------------- rebuild
def test_generic_arm_build_on_a_pi5_gets_the_readme_line():
    _, feats = parse_cpuinfo(PI5_CPUINFO)
    a = rebuild_advice("aarch64", feats, GENERIC_ARM)
    assert set(a.missing) == {"DOTPROD", "FP16_VA"}
    assert a.cmake_args == readme_pi_cmake_args()          # what doctor says is what the README says
    assert a.command == f'CMAKE_ARGS="{readme_pi_cmake_args()}" pip install --force-reinstall --no-cache-dir llama-cpp-python'


def test_readme_pi_build_on_a_pi5_is_complete():
    _, feats = parse_cpuinfo(PI5_CPUINFO)
    assert rebuild_advice("aarch64", feats, PI5_BUILD) is None
    assert rebuild_advice("aarch64", feats, "") is None           # no build report: nothing to say


def test_newer_arm_cpu_asks_for_i8mm_and_sve():
    feats = {"asimd", "fphp", "asimdhp", "asimddp", "i8mm", "sve", "sve2", "bf16"}      # Graviton3 / Grace
    a = rebuild_advice("aarch64", feats, PI5_BUILD, keep_rpc=True)
    assert a.missing == ("MATMUL_INT8", "SVE")
    assert a.cmake_args == "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+fp16+dotprod+i8mm+sve -DGGML_RPC=ON"


def test_jetson_without_cuda_build():
    _, feats = parse_cpuinfo(ORIN_CPUINFO)
    gpus = ["Jetson: " + ORIN_TEGRA_RELEASE.splitlines()[0]]
    a = rebuild_advice("aarch64", feats, PI5_BUILD, gpus, cuda_home="/usr/local/cuda")
    assert a.missing == ("CUDA",)
    assert a.command == ('CUDACXX=/usr/local/cuda/bin/nvcc CMAKE_ARGS="-DGGML_CUDA=ON" '
                         'pip install --force-reinstall --no-cache-dir llama-cpp-python')
    assert rebuild_advice("aarch64", feats, JETSON_CUDA, gpus) is None


def test_mac_without_metal_and_x86_without_avx2():
    a = rebuild_advice("arm64", {"asimd", "asimddp", "fphp", "asimdhp"}, PI5_BUILD, system="Darwin")
    assert a.missing == ("Metal",) and a.cmake_args == "-DGGML_METAL=ON"
    a = rebuild_advice("x86_64", ZEN3_FLAGS, X86_NO_AVX2)
    assert a.cmake_args == "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    assert rebuild_advice("x86_64", ZEN3_FLAGS, "CPU : AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 |",
                          ["CUDA: NVIDIA RTX 4090, 24564 MiB"]).cmake_args == "-DGGML_CUDA=ON"


def test_readme_install_lines_say_no_cache_dir():
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Install"):]
    block = block[: block.index("Optional extras")]
    lines = [ln for ln in block.splitlines() if re.match(r"^(CMAKE_ARGS=\"[^\"]*\" )?pip install", ln)]
    assert len(lines) >= 5 and all("--no-cache-dir" in ln for ln in lines), lines


# ------------------------------------------------------------------------------------------- --gpu-layers
def test_gpu_layers_option_parsing():
    assert parse_gpu_layers(None) is None and parse_gpu_layers("auto") is None and parse_gpu_layers("AUTO") is None
    assert parse_gpu_layers("0") == 0 and parse_gpu_layers("20") == 20
    for bad in ("-1", "x", "2.5"):
        with pytest.raises(UsageError):
            parse_gpu_layers(bad)


def test_gpu_layer_plan():
    est = estimate(4 << 30, 4096, (32, 8, 128))          # an 8B-class Q4: 4 GiB of weights, 32 layers
    per_layer = (est.weights + est.kv_cache) / 32
    full = plan_gpu_layers(est, 32, None, "CUDA", 8 << 30)
    assert full.all and full.layers == 33 and full.host_bytes == est.overhead
    part = plan_gpu_layers(est, 32, None, "CUDA", 2 << 30)          # a 2 GiB card: as many as fit
    assert part.layers == int(((2 << 30) - est.overhead) // per_layer) and not part.all
    assert part.device_bytes <= 2 << 30 < part.device_bytes + per_layer
    assert plan_gpu_layers(est, 32, 10, "CUDA", 8 << 30).layers == 10
    assert plan_gpu_layers(est, 32, 0, "CUDA", 8 << 30).layers == 0
    assert plan_gpu_layers(est, 32, 99, "CUDA", 8 << 30).layers == 33               # capped at all
    with pytest.raises(InsufficientMemory, match="--gpu-layers 30"):
        plan_gpu_layers(est, 32, 30, "CUDA", 1 << 30)
    # unified memory (Jetson, Apple Silicon): the host's memory check already covers it, so all of them
    jet = plan_gpu_layers(est, 32, None, "CUDA", 1 << 30, unified=True)
    assert jet.all and jet.host_bytes == est.total
    # a CPU-only build: 0, and an explicit number is refused with the way out
    assert plan_gpu_layers(est, 32, None, None, None).layers == 0
    with pytest.raises(UsageError, match="no GPU offload"):
        plan_gpu_layers(est, 32, 5, None, None)


def test_gpu_layers_on_the_cli(smollm2_gguf, home):
    r = vlm("bench", str(smollm2_gguf), "--gpu-layers", "4", "--repeat", "1", home=home)
    assert r.returncode != 0 and "no GPU offload" in r.stderr and "Traceback" not in r.stderr
    r = vlm("bench", str(smollm2_gguf), "--gpu-layers", "lots", "--repeat", "1", home=home)
    assert r.returncode == 2 and "not a number of layers" in r.stderr
    for cmd in (["ask", "-m", str(smollm2_gguf), "hi"], ["chat", "-m", str(smollm2_gguf)]):
        r = vlm(*cmd, "--gpu-layers", "lots", home=home, input="hi\n")
        assert r.returncode == 2 and "not a number of layers" in r.stderr, (cmd, r.stderr)
    if gpu_backend(llama_system_info()) is None:            # a CPU-only build: auto is 0, a number is refused
        r = vlm("ask", "-m", str(smollm2_gguf), "--gpu-layers", "3", "hi", home=home)
        assert r.returncode == 2 and "no GPU offload" in r.stderr
        r = vlm("ask", "-m", str(smollm2_gguf), "--gpu-layers", "auto", "--raw", "-t", "0", "-n", "3",
                "The capital of France is", home=home, check=True)
        assert "Paris" in r.stdout


# ------------------------------------------------------------------------------------------- this machine
def test_doctor_reports_arm_or_x86_features_of_this_machine(home):
    r = vlm("doctor", "--json", home=home, check=True)
    d = json.loads(r.stdout)
    feats, lc = d["cpu"]["features"], d["llama_cpp"]
    assert d["default_threads"] >= 1
    assert lc["gpu_offload"] == gpu_backend(lc["system_info"] or "")
    if platform.machine() in ("aarch64", "arm64"):
        assert set(feats) == {"neon", "dotprod", "i8mm", "sve", "sve2", "bf16", "fp16"} and feats["neon"]
        # the build this machine runs: the README's Pi line, so NEON + fp16 + dotprod are in it
        info = parse_system_info(lc["system_info"])["CPU"]
        assert info.get("NEON") == "1"
        if "armv8.2-a+fp16+dotprod" in readme_pi_cmake_args():
            assert info.get("DOTPROD") == "1" and info.get("FP16_VA") == "1"
        if lc["rebuild"]:        # an emulated CPU offers more (qemu's "max" has i8mm and SVE): named exactly
            assert lc["rebuild"]["command"].endswith("pip install --force-reinstall --no-cache-dir llama-cpp-python")
            assert set(lc["rebuild"]["missing"]) <= {"MATMUL_INT8", "SVE"}
    else:
        assert "avx2" in feats
