"""Time to first token of `vlm ask PHOTO` per detail level, cold and cached, both backends, fresh processes;
and decode speed after the image prompt.

Every row is one new `vlm ask --json` process (what a user runs), with its own $VLM_HOME so that the
embedding cache starts empty; rows are interleaved round by round so that a busy machine slows all of
them alike. Reported: TTFT, image encode, tiles / image tokens, what auto chose and why, and the ratios
the issue sets as targets (auto vs high cold; cached vs cold).

    python benchmarks/image_detail.py --gguf M.gguf --mmproj P.gguf --onnx DIR --photo photo.jpg [--rounds 2]

The encode speed is measured once per VLM_HOME (its first auto run); a warm-up run on another image does
that before the rounds, so "cold" means "empty embedding cache", not "first run ever".

``--families lfm2_vl,qwen3_vl,...`` measures every llama.cpp vision family instead, on random weights of
its real vision tower (tests/fixtures/tiny_vlms.py, variant "real"; the text model is tiny, so TTFT is the
image's cost; ``smolvlm-256m`` is SmolVLM-256M's shape from benchmarks/random_smolvlm.py, whose encoder
the previous default smolvlm-500m shares): per family, --detail auto and high, each from an empty embedding cache (cold) and again
with it (cached), in rounds that rotate the family order; then the ratios auto/high and cached/cold.
Every run gets a new VLM_HOME holding only the encoder's calibrated speed (measured once per family on a
blank input, as the first `auto` run on a device does):

    python benchmarks/image_detail.py --families lfm2_vl,qwen35_vl,qwen3_vl,internvl,gemma3 \
        --photo-size 1024x768 [--rounds 1]

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
    """One `vlm ask --json` process; its document, with the process's peak RSS in bytes as ``_peak_rss``
    (Linux; None elsewhere)."""
    env = dict(os.environ, VLM_HOME=str(home), NO_COLOR="1")
    exe = Path(sys.executable).with_name("vlm")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([str(exe), "ask", *model_args, "-t", "0", "-n", str(n), "--json", photo,
                              "What is in this photo?", *extra], stdout=out, stderr=err, env=env)
        peak = _watch_peak_rss(p)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise SystemExit(f"vlm ask failed: {err.read().decode(errors='replace')[-2000:]}")
        doc = json.loads(out.read())
    doc["_peak_rss"] = peak
    return doc


def _watch_peak_rss(p: subprocess.Popen) -> int | None:
    """The child's VmHWM (its peak resident set since exec), read every 20 ms until it exits. Not the
    rusage's ru_maxrss: a child started by vfork/fork folds the parent's resident set into that at exec
    (this script's, ~1 GB after building a fixture), which would drown the figure."""
    import time

    status, peak = Path(f"/proc/{p.pid}/status"), None
    while p.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak or 0, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return peak


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
    ap.add_argument("--photo", help="the photo (required without --families, which can generate one)")
    ap.add_argument("--families", help="comma-separated tests/fixtures/tiny_vlms.py families (real vision towers)")
    ap.add_argument("--photo-size", default="4032x3024", help="with --families and no --photo: WxH of a generated photo")
    ap.add_argument("--variant", default="real", choices=("real", "full"),
                    help="with --families: real vision towers on a tiny text model, or (lfm2_vl only) the full "
                         "model's shapes, text model included, quantized as the registry's default")
    ap.add_argument("--prebuilt", type=Path, help="with --families: use FAMILY-real-*/quantized/ builds found here "
                    "(e.g. from an earlier recipe key) instead of building the fixtures")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--levels", default="auto,high,low")
    ap.add_argument("--threads", type=int, help="passed to vlm ask")
    ap.add_argument("--decode", type=int, default=0, metavar="N", help="also measure decode of N tokens after the image")
    ap.add_argument("--decode-detail", default="high")
    ap.add_argument("--no-ttft", action="store_true", help="only the decode measurement")
    ap.add_argument("--decode-home", type=Path, help="VLM_HOME for the decode part (reuse a warm embedding cache)")
    a = ap.parse_args()
    if a.families:
        levels = [x for x in a.levels.split(",") if x in ("auto", "high")] or ["auto", "high"]
        families_table([f for f in a.families.split(",") if f], a.photo, a.photo_size, a.rounds, a.threads or 2,
                       a.prebuilt, levels, a.variant)
        return
    if not a.photo:
        raise SystemExit("--photo is required (or --families)")
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


def families_table(families: list[str], photo: str | None, size: str, rounds: int, threads: int,
                   prebuilt: Path | None = None, levels: list[str] = ("auto", "high"), variant: str = "real") -> None:
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures.tiny_vlms import FAMILIES, family_fixture
    from vlm_families import CACHE, photo_12mp, smollm2, smolvlm_reference

    work = Path(tempfile.mkdtemp(prefix="vlm-detail-families-"))
    if not photo:
        w, h = (int(v) for v in size.lower().split("x"))
        photo = str(photo_12mp(work / f"photo-{w}x{h}.jpg", w, h))
    gguf = smollm2()
    extra = ["--threads", str(threads)]
    fx, speed = {}, {}
    blank = work / "blank.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 200)).save(blank)
    for f in families:
        found = sorted(prebuilt.glob(f"{f}-real-*/quantized/real-*-Q8_0.gguf")) if prebuilt else []
        if f == "smolvlm-256m":                                 # the previous default's shape (Idefics3)
            fx[f] = smolvlm_reference(gguf)
        elif found:
            fx[f] = {"gguf": found[-1], "mmproj": next(found[-1].parent.glob("mmproj-*.gguf"))}
        else:
            fx[f] = family_fixture(f, CACHE / "fixtures", gguf, variant=variant)
        home = work / f"speed-{f}"
        from edgevlm.runtime.formats.gguf_file import read_gguf
        from edgevlm.runtime.inputs.ladders import family_of

        kind = family_of(read_gguf(fx[f]["mmproj"]).metadata)
        speed[f] = home / "cache" / "encode-speed.json"
        if kind is None or kind.fixed:
            continue                                         # one input: nothing to calibrate
        ask(["-m", str(fx[f]["gguf"]), "--mmproj", str(fx[f]["mmproj"])], str(blank), home, "--detail", "auto",
            "--no-cache", *extra, n=1)                       # calibrates this encoder's speed here
        print(f"{f}: calibrated", file=sys.stderr, flush=True)
    rows: dict = {}
    for rnd in range(rounds):
        order = families[rnd % len(families):] + families[:rnd % len(families)]
        for f in order:
            margs = ["-m", str(fx[f]["gguf"]), "--mmproj", str(fx[f]["mmproj"])]
            for level in levels:
                home = work / f"r{rnd}-{f}-{level}"
                if speed[f].is_file():
                    (home / "cache").mkdir(parents=True, exist_ok=True)
                    shutil.copy(speed[f], home / "cache" / "encode-speed.json")
                cold = ask(margs, photo, home, "--detail", level, *extra, n=1)
                hot = ask(margs, photo, home, "--detail", level, *extra, n=1)
                for kind, doc in (("cold", cold), ("cached", hot)):
                    im = doc["timings"]["images"][0]
                    r = rows.setdefault((f, level, kind), {"ttft": [], "enc": [], "im": im, "rss": []})
                    r["ttft"].append(doc["timings"]["ttft_s"])
                    r["enc"].append(doc["timings"]["image_encode_s"])
                    r["rss"].append(doc["_peak_rss"])
                    print(f"round {rnd + 1}: {f} {level} {kind}: {im['tokens']} tokens, TTFT {r['ttft'][-1]:.2f} s "
                          f"({im.get('reason', '')})", file=sys.stderr, flush=True)
    print(f"photo {Path(photo).name}; {threads} threads; {rounds} round(s); load avg {os.getloadavg()[0]:.1f}")
    memory_table(families, fx, rows)
    print("| family (real model) | tokens low / auto / high | TTFT auto s | TTFT high s | auto / high | "
          "cached auto s | cached / cold (auto) | cached / cold (high) | auto chose |")
    print("(TTFT: medians over rounds; ratios: the median of each round's ratio)", file=sys.stderr)
    print("|---|---|---|---|---|---|---|---|---|")
    med = {k: statistics.median(v["ttft"]) for k, v in rows.items()}
    for f in families:
        from edgevlm.runtime.formats.gguf_file import read_gguf
        from edgevlm.runtime.inputs.ladders import family_of

        w, h = Image.open(photo).size
        fam = family_of(read_gguf(fx[f]["mmproj"]).metadata)
        low = fam.ladder(w, h)[0][0].tokens if fam else "-"
        real = FAMILIES[f]["real"] if f in FAMILIES else "SmolVLM-256M's shape, the previous default's encoder"

        def get(level, kind, what="ttft"):
            r = rows.get((f, level, kind))
            return None if r is None else (r["im"]["tokens"] if what == "tokens" else med[(f, level, kind)])

        def paired(a, b):
            """Median of the per-round ratios (each round ran both back to back)."""
            ra, rb = rows.get((f, *a)), rows.get((f, *b))
            if ra is None or rb is None:
                return None
            return statistics.median(x / y for x, y in zip(ra["ttft"], rb["ttft"]) if y > 0)

        def num(x, fmt=".2f"):
            return "-" if x is None else format(x, fmt)

        ac, hc, acc = get("auto", "cold"), get("high", "cold"), get("auto", "cached")
        reason = rows[(f, "auto", "cold")]["im"].get("reason", "") if (f, "auto", "cold") in rows else ""
        print(f"| {f} ({real}) | {low} / {num(get('auto', 'cold', 'tokens'), 'd')} / {num(get('high', 'cold', 'tokens'), 'd')} "
              f"| {num(ac)} | {num(hc)} | {num(paired(('auto', 'cold'), ('high', 'cold')), '.3f')} | {num(acc)} "
              f"| {num(paired(('auto', 'cached'), ('auto', 'cold')), '.3f')} "
              f"| {num(paired(('high', 'cached'), ('high', 'cold')), '.3f')} | {reason} |")



def memory_table(families: list[str], fx: dict, rows: dict) -> None:
    """Peak RSS of the cold `auto` answer against weights + projector + KV cache (f16, the 4096-token context
    `vlm ask` opens for a question with an image) + 150 MB, the bound the issue sets; and our own estimate."""
    from edgevlm.runtime.device.memory import estimate
    from edgevlm.runtime.protocol import DEFAULT_CTX
    from edgevlm.runtime.formats.gguf_file import read_gguf

    print("| family | weights + projector | KV cache | peak RSS, cold auto | bound (+150 MB) | peak / bound | our estimate |")
    print("|---|---|---|---|---|---|---|")
    mib = 2 ** 20
    for f in families:
        r = rows.get((f, "auto", "cold"))
        if r is None:
            continue
        info = read_gguf(fx[f]["gguf"])
        mm = Path(fx[f]["mmproj"]).stat().st_size
        n_ctx = min(DEFAULT_CTX, info.context_length or DEFAULT_CTX)       # `vlm ask` with an image
        est = estimate(info.file_size, n_ctx, info.kv_shape, mm)
        bound = est.weights + est.mmproj + est.kv_cache + 150 * mib
        if None in r["rss"]:
            continue
        peak = max(r["rss"])
        print(f"| {f} | {(est.weights + est.mmproj) / mib:.0f} MiB | {est.kv_cache / mib:.1f} MiB (ctx {n_ctx}) "
              f"| {peak / mib:.0f} MiB | {bound / mib:.0f} MiB | {peak / bound:.2f} | {est.total / mib:.0f} MiB |")


if __name__ == "__main__":
    main()
