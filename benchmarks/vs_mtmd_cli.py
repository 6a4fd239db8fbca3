"""`vlm ask --detail high` against llama.cpp's own `llama-mtmd-cli`: the same GGUF + mmproj, image and
threads, rounds interleaved, each run a fresh process; medians and the ratio.

Both encode the model's full tiling (Idefics3 / SmolVLM: the longest edge scaled to 4 x 512 px, cut into
512-px tiles, plus the overview tile) with the same libmtmd encoder. What is compared:

* encode: libmtmd's "image slice encoded in N ms" lines summed (mtmd-cli) against our
  ``timings.image_encode_s`` (``--no-cache``: every round encodes);
* wall: the whole process (load, preprocessing, encode, evaluating the prompt, one token), each side.

    python benchmarks/vs_mtmd_cli.py --gguf M.gguf --mmproj P.gguf --image photo.jpg \
        --mtmd-cli llama.cpp/build/bin/llama-mtmd-cli [--threads 2] [--rounds 3]

Build llama-mtmd-cli from the llama.cpp sources vendored in the installed llama-cpp-python's sdist, with
the same CMAKE_ARGS as the wheel (scripts/test.sh prints them), so the two share kernels and flags.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# libmtmd's helper logs "... slice encoded in N ms"; newer mtmd-cli encodes in batches of its own and
# logs "mtmd batch encoding done in N ms" per batch
_SLICE = re.compile(r"(?:slice encoded|mtmd batch encoding done) in (\d+) ms")


def theirs(args) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([args.mtmd_cli, "-m", args.gguf, "--mmproj", args.mmproj, "--image", args.image,
                        "-p", "Describe the image.", "-n", "1", "-t", str(args.threads), "--temp", "0"],
                       capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    log = r.stdout + r.stderr
    slices = [int(x) for x in _SLICE.findall(log)]
    if r.returncode != 0 or not slices:
        sys.exit(f"llama-mtmd-cli failed ({r.returncode}):\n{log[-3000:]}")
    return {"encode_s": sum(slices) / 1000, "tiles": len(slices), "wall_s": wall}


def ours(args, home: str) -> dict:
    exe = Path(sys.executable).with_name("vlm")
    t0 = time.perf_counter()
    r = subprocess.run([str(exe), "ask", "-m", args.gguf, "--mmproj", args.mmproj, args.image, "Describe the image.",
                        "-n", "1", "--threads", str(args.threads), "--detail", "high", "--no-cache", "--json", "-t", "0"],
                       capture_output=True, text=True, timeout=3600, env={**os.environ, "VLM_HOME": home})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"vlm ask failed ({r.returncode}):\n{r.stderr[-3000:]}")
    t = json.loads(r.stdout)["timings"]
    return {"encode_s": t["image_encode_s"], "tiles": sum(i["tiles"] for i in t["images"]),
            "ttft_s": t["ttft_s"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--mmproj", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--mtmd-cli", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {"ours": [], "mtmd_cli": []}
    with tempfile.TemporaryDirectory() as home:
        for i in range(args.rounds):
            for side in (("ours", "mtmd_cli") if i % 2 == 0 else ("mtmd_cli", "ours")):
                row = ours(args, home) if side == "ours" else theirs(args)
                rows[side].append(row)
                print(json.dumps({"round": i, side: row}), file=sys.stderr)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[side])

    report = {"image": args.image, "threads": args.threads, "rounds": args.rounds,
              "tiles": {"ours": rows["ours"][0]["tiles"], "mtmd_cli_batches": rows["mtmd_cli"][0]["tiles"]}}
    for key in ("encode_s", "wall_s"):
        report[key] = {"ours": round(med("ours", key), 3), "mtmd_cli": round(med("mtmd_cli", key), 3),
                       "ratio": round(med("ours", key) / med("mtmd_cli", key), 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
