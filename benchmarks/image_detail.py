"""Time to first token of `vlm ask PHOTO` per detail level, cold and cached, both backends, fresh processes.

Every row is one new `vlm ask --json` process (what a user runs), with its own $VLM_HOME so that the
embedding cache starts empty; rows are interleaved round by round so that a busy machine slows all of
them alike. Reported: TTFT, image encode, tiles / image tokens, what auto chose and why, and the ratios
the issue sets as targets (auto vs high cold; cached vs cold).

    python benchmarks/image_detail.py --gguf M.gguf --mmproj P.gguf --onnx DIR --photo photo.jpg [--rounds 2]

The encode speed is measured once per VLM_HOME (its first auto run); a warm-up run on another image does
that before the rounds, so "cold" means "empty embedding cache", not "first run ever".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def ask(model_args: list[str], photo: str, home: Path, *extra: str) -> dict:
    env = dict(os.environ, VLM_HOME=str(home), NO_COLOR="1")
    exe = Path(sys.executable).with_name("vlm")
    r = subprocess.run([str(exe), "ask", *model_args, "-t", "0", "-n", "8", "--json", photo, "What is in this photo?",
                        *extra], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"vlm ask failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf")
    ap.add_argument("--mmproj")
    ap.add_argument("--onnx")
    ap.add_argument("--photo", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--levels", default="auto,high,low")
    a = ap.parse_args()
    backends = {}
    if a.gguf:
        backends["gguf"] = ["-m", a.gguf] + (["--mmproj", a.mmproj] if a.mmproj else [])
    if a.onnx:
        backends["onnx"] = ["-m", a.onnx]
    levels = a.levels.split(",")
    from PIL import Image

    warm = Path(tempfile.mkdtemp()) / "warm.png"
    Image.new("RGB", (64, 48), (90, 120, 200)).save(warm)
    rows: dict = {}
    for rnd in range(a.rounds):
        for name, margs in backends.items():
            for level in levels:
                home = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
                ask(margs, str(warm), home, "--detail", "auto")          # measures the encode speed here
                cold = ask(margs, a.photo, home, "--detail", level)
                hot = ask(margs, a.photo, home, "--detail", level)
                for kind, doc in (("cold", cold), ("cached", hot)):
                    im = doc["timings"]["images"][0]
                    r = rows.setdefault((name, level, kind), {"ttft": [], "enc": [], "im": im})
                    r["ttft"].append(doc["timings"]["ttft_s"])
                    r["enc"].append(doc["timings"]["image_encode_s"])
    print(f"photo {a.photo}; {os.cpu_count()} CPUs; rounds {a.rounds}; load avg {os.getloadavg()[0]:.1f}")
    print(f"{'backend':7} {'detail':6} {'cache':7} {'tiles':>5} {'tokens':>6} {'encode s':>9} {'TTFT s':>8}  choice")
    med = {k: statistics.median(v["ttft"]) for k, v in rows.items()}
    for (name, level, kind), r in rows.items():
        im = r["im"]
        print(f"{name:7} {level:6} {kind:7} {im['tiles']:>5} {im['tokens']:>6} {statistics.median(r['enc']):>9.2f} "
              f"{med[(name, level, kind)]:>8.2f}  {im.get('reason', '')}")
    for name in backends:
        if "auto" in levels and "high" in levels:
            print(f"{name}: auto/high TTFT (cold) = {med[(name, 'auto', 'cold')] / med[(name, 'high', 'cold')]:.3f}")
        for level in levels:
            print(f"{name}: {level} cached/cold TTFT = {med[(name, level, 'cached')] / med[(name, level, 'cold')]:.3f}")


if __name__ == "__main__":
    main()
