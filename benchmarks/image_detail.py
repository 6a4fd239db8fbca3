"""Time to first token of `vlm ask PHOTO` per detail level, cold and cached, both backends, fresh processes;
and decode speed after the image prompt.

Every row is one new `vlm ask --json` process (what a user runs), with its own $VLM_HOME so that the
embedding cache starts empty; rows are interleaved round by round so that a busy machine slows all of
them alike. Reported: TTFT, image encode, tiles / image tokens, what auto chose and why, and the ratios
the issue sets as targets (auto vs high cold; cached vs cold).

    python benchmarks/image_detail.py --gguf M.gguf --mmproj P.gguf --onnx DIR --photo photo.jpg [--rounds 2]

The encode speed is measured once per VLM_HOME (its first auto run); a warm-up run on another image does
that before the rounds, so "cold" means "empty embedding cache", not "first run ever".

``--decode N`` adds decode tokens/s after the image prompt (the photo at ``--decode-detail``, default high:
the longest context), N tokens greedy, the image's embeddings cached so only the decode is compared; every
backend in turn, round by round, and each ONNX model's median as a ratio of GGUF's. ``--onnx`` may be given
more than once (e.g. the same checkpoint's decoder built two ways); ``--no-ttft`` runs the decode part only.
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


def ask(model_args: list[str], photo: str, home: Path, *extra: str, n: int = 8) -> dict:
    env = dict(os.environ, VLM_HOME=str(home), NO_COLOR="1")
    exe = Path(sys.executable).with_name("vlm")
    r = subprocess.run([str(exe), "ask", *model_args, "-t", "0", "-n", str(n), "--json", photo, "What is in this photo?",
                        *extra], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"vlm ask failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)


def decode_speeds(backends: dict, photo: str, level: str, n: int, rounds: int, extra: list[str],
                  home: Path | None = None) -> None:
    """Decode tokens/s after the image prompt, each backend once a round (cache warmed first). One VLM_HOME
    for all: its embedding cache keys name the encoder, so ONNX decoders sharing a vision encoder share entries."""
    home = home or Path(tempfile.mkdtemp(prefix="vlm-decode-"))
    homes = {name: home for name in backends}
    for name, margs in backends.items():                  # encodes the photo once (unless cached already)
        ask(margs, photo, homes[name], "--detail", level, *extra, n=2)
    got: dict = {name: [] for name in backends}
    info: dict = {}
    for _ in range(rounds):
        for name, margs in backends.items():
            doc = ask(margs, photo, homes[name], "--detail", level, *extra, n=n)
            t = doc["timings"]
            got[name].append(t["decode_tokens_per_s"] or 0.0)
            print(f"  {name}: {got[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
            info[name] = (doc["usage"].get("prompt_tokens"), doc["usage"].get("completion_tokens"),
                          doc["usage"].get("image_tokens"))
    print(f"\ndecode after the image prompt: detail {level}, {n} tokens asked, {rounds} rounds, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"{'model':28} {'prompt':>6} {'image':>6} {'gen':>4} {'decode tok/s (median)':>22}  per round")
    med = {name: statistics.median(v) for name, v in got.items()}
    for name, v in got.items():
        p, c, im = info[name]
        print(f"{name:28} {p:>6} {im:>6} {c:>4} {med[name]:>22.1f}  {', '.join(f'{x:.1f}' for x in v)}")
    if "gguf" in med and med["gguf"] > 0:
        for name in med:
            if name != "gguf":
                # paired: each round's ratio, then the median (both ran back to back in that round)
                pairs = [o / g for o, g in zip(got[name], got["gguf"]) if g > 0]
                print(f"{name} / gguf decode: median {med[name] / med['gguf']:.3f}x, "
                      f"paired per round median {statistics.median(pairs):.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf")
    ap.add_argument("--mmproj")
    ap.add_argument("--onnx", action="append", default=[], help="an ONNX model (folder or decoder file); repeatable")
    ap.add_argument("--photo", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--levels", default="auto,high,low")
    ap.add_argument("--threads", type=int, help="passed to vlm ask")
    ap.add_argument("--decode", type=int, default=0, metavar="N", help="also measure decode of N tokens after the image")
    ap.add_argument("--decode-detail", default="high")
    ap.add_argument("--no-ttft", action="store_true", help="only the decode measurement")
    ap.add_argument("--decode-home", type=Path, help="VLM_HOME for the decode part (reuse a warm embedding cache)")
    a = ap.parse_args()
    backends = {}
    if a.gguf:
        backends["gguf"] = ["-m", a.gguf] + (["--mmproj", a.mmproj] if a.mmproj else [])
    for i, m in enumerate(a.onnx):
        label = "onnx" if len(a.onnx) == 1 else f"onnx:{Path(m).resolve().parent.parent.name if Path(m).is_file() else Path(m).name}"
        backends[label if label not in backends else f"{label}#{i}"] = ["-m", m]
    extra = ["--threads", str(a.threads)] if a.threads else []
    levels = a.levels.split(",")
    if not a.no_ttft:
        ttft_table(backends, a.photo, levels, a.rounds, extra)
    if a.decode:
        decode_speeds(backends, a.photo, a.decode_detail, a.decode, a.rounds, extra, a.decode_home)


def ttft_table(backends: dict, photo: str, levels: list[str], rounds: int, extra: list[str]) -> None:
    from PIL import Image

    warm = Path(tempfile.mkdtemp()) / "warm.png"
    Image.new("RGB", (64, 48), (90, 120, 200)).save(warm)
    rows: dict = {}
    for rnd in range(rounds):
        for name, margs in backends.items():
            for level in levels:
                home = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
                ask(margs, str(warm), home, "--detail", "auto", *extra)          # measures the encode speed here
                cold = ask(margs, photo, home, "--detail", level, *extra)
                hot = ask(margs, photo, home, "--detail", level, *extra)
                for kind, doc in (("cold", cold), ("cached", hot)):
                    im = doc["timings"]["images"][0]
                    r = rows.setdefault((name, level, kind), {"ttft": [], "enc": [], "im": im})
                    r["ttft"].append(doc["timings"]["ttft_s"])
                    r["enc"].append(doc["timings"]["image_encode_s"])
    print(f"photo {photo}; {os.cpu_count()} CPUs; rounds {rounds}; load avg {os.getloadavg()[0]:.1f}")
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
