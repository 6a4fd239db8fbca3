"""`vlm bench` next to llama.cpp's own llama-bench, same GGUF, same threads, in one run; ratios.

llama-bench is built from the llama.cpp sources inside the source distribution of the *installed*
llama-cpp-python version (same commit), with the same CMAKE_ARGS you built llama-cpp-python with:

    CMAKE_ARGS="..." python benchmarks/vs_llama_bench.py MODEL.gguf [MODEL2.gguf ...] [--threads 2]

The build is cached under ~/.cache/edgevlm-bench/llama.cpp-<version>.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

CACHE = Path(os.environ.get("VLM_BENCH_CACHE", Path.home() / ".cache" / "edgevlm-bench"))


def build_llama_bench() -> Path:
    ver = version("llama-cpp-python")
    root = CACHE / f"llama.cpp-{ver}"
    exe = root / "build" / "bin" / "llama-bench"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", td], check=True, stdout=sys.stderr)
        sdist = next(Path(td).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(td, filter="data")
        src = next(Path(td).glob("llama_cpp_python-*/vendor/llama.cpp"))
        tmp_root = root.with_name(root.name + ".tmp")
        subprocess.run(["rm", "-rf", str(tmp_root)], check=True)
        subprocess.run(["cp", "-r", str(src), str(tmp_root)], check=True)
    flags = shlex.split(os.environ.get("CMAKE_ARGS", ""))
    subprocess.run(["cmake", "-S", str(tmp_root), "-B", str(tmp_root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags],
                   check=True, stdout=sys.stderr)
    subprocess.run(["cmake", "--build", str(tmp_root / "build"), "--target", "llama-bench", "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=sys.stderr)
    os.replace(tmp_root, root)
    return exe


def llama_bench(exe: Path, model: Path, threads: int, pp: int, tg: int, reps: int, tg_depth: int) -> dict:
    """pp at an empty cache, and tg after ``tg_depth`` tokens already in the cache: `vlm bench` decodes
    after its prompt, and attention over 256 cached tokens costs SmolLM2 ~14% of its decode speed, so
    llama-bench's default tg (empty cache) is not the same measurement."""
    # the build was renamed into the cache, so point the loader at its shared libraries
    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parent))
    out = {}
    for kind, args in (("pp", ["-p", str(pp), "-n", "0"]), ("tg", ["-p", "0", "-n", str(tg), "-d", str(tg_depth)])):
        r = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), *args, "-r", str(reps), "-o", "json"],
                           capture_output=True, text=True, check=True, env=env)
        out[kind] = json.loads(r.stdout)[0]["avg_ts"]
    return out


def vlm_bench(model: Path, threads: int, pp: int, tg: int, reps: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "bench", str(model), "--threads", str(threads),
                        "--prompt-tokens", str(pp), "--gen-tokens", str(tg), "--repeat", str(reps), "--json"],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)["results"][0]
    return {"pp": res["prefill_tps"]["mean"], "tg": res["decode_tps"]["mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternate the two tools this many times")
    ap.add_argument("--tg-depth", type=int, default=None,
                    help="tokens in the cache before llama-bench's tg (default: --prompt-tokens, as vlm bench)")
    a = ap.parse_args()
    depth = a.prompt_tokens if a.tg_depth is None else a.tg_depth
    exe = build_llama_bench()
    print(f"llama-bench: {exe}  threads={a.threads} pp={a.prompt_tokens} tg={a.gen_tokens} @ depth {depth}; "
          f"medians of {a.rounds} interleaved rounds of {a.repeat} repeats")
    print(f"{'model':<34}{'':>6}{'llama-bench':>13}{'vlm bench':>12}{'ratio':>8}")
    for m in a.models:
        lb, vb = {"pp": [], "tg": []}, {"pp": [], "tg": []}
        for _ in range(a.rounds):                      # interleave so drift hits both alike
            x = llama_bench(exe, m, a.threads, a.prompt_tokens, a.gen_tokens, a.repeat, depth)
            y = vlm_bench(m, a.threads, a.prompt_tokens, a.gen_tokens, a.repeat)
            for k in ("pp", "tg"):
                lb[k].append(x[k])
                vb[k].append(y[k])
        for k, name in (("tg", "decode"), ("pp", "prefill")):
            l, v = statistics.median(lb[k]), statistics.median(vb[k])
            print(f"{m.name[:33]:<34}{name:>6}{l:>13.1f}{v:>12.1f}{v / l:>7.2f}x")


if __name__ == "__main__":
    main()
