"""How long `vlm` takes to start: `vlm --help`, and `vlm ask` from process start to the first byte of
its answer on stdout (imports, argument parsing, resolve, memory check, model load, prefill, first
token), and to the start of its prompt's prefill. Medians of several runs; each run is a fresh
process, as a shell script would start it.

    python benchmarks/startup.py [-m smollm2-135m] [--runs 9]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time


def first_byte(cmd: list[str], out: list | None = None) -> float:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    head = p.stdout.read(1)
    dt = time.perf_counter() - t
    rest, _ = p.communicate()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {p.returncode}")
    if out is not None:
        out.append(head + rest)
    return dt


def before_prefill(cmd: list[str]) -> float:
    """Process start to the prompt's prefill: `vlm ask --json` prints its one line right after the answer,
    and its timings.total_s runs from the answer's start (prompt rendered, prefill, decode) to its end."""
    out: list = []
    t = first_byte(cmd + ["--json"], out)
    return t - json.loads(out[0])["timings"]["total_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--runs", type=int, default=9)
    a = ap.parse_args()
    vlm = shutil.which("vlm") or sys.exit("vlm is not on PATH: install edgevlm first")
    first_byte([vlm, "ask", "-m", a.model, a.prompt, "-n", "8"])        # page cache warm, like a second call
    rows = {
        "vlm --help": [first_byte([vlm, "--help"]) for _ in range(a.runs)],
        f"vlm ask -m {a.model} (first answer byte)": [first_byte([vlm, "ask", "-m", a.model, a.prompt, "-n", "8"])
                                                      for _ in range(a.runs)],
        f"vlm ask -m {a.model} (before the prompt's prefill)": [
            before_prefill([vlm, "ask", "-m", a.model, a.prompt, "-n", "8"]) for _ in range(a.runs)],
    }
    for name, xs in rows.items():
        print(f"{name:<48} median {statistics.median(xs) * 1000:6.0f} ms   min {min(xs) * 1000:6.0f} ms")


if __name__ == "__main__":
    main()
