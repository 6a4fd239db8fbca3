"""Image encode time of one 12 MP photo for every small-VLM family, on random weights of the real vision
towers (tests/fixtures/tiny_vlms.py, variant "real": real encoder shapes, a tiny text model), through
today's path: `vlm ask --json` in a new process, libmtmd's own preprocessing at full resolution (no
detail budget outside Idefics3 yet). The reference in the same run is SmolVLM-256M's shape
(benchmarks/random_smolvlm.py) at --detail high and auto, the current default family.

Rows are interleaved round by round (the family order rotates), so a busy machine slows all of them
alike; reported are the median encode seconds, the ratio to the reference's --detail high, the image
tokens libmtmd made, and the encoder GFLOPs of that many tokens (counted from the tower's shapes, see
``encoder_gflops``) with the GFLOP/s achieved.

    python benchmarks/vlm_families.py [--families lfm2_vl,qwen3_vl] [--rounds 2] [--photo P.jpg] [--json out.json]

The fixtures are built on first use (minutes for the 400M-parameter towers) and cached in
$VLM_TEST_CACHE/fixtures (~/.cache/edgevlm-tests/fixtures), like the test fixtures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CACHE = Path(os.environ.get("VLM_TEST_CACHE", Path.home() / ".cache" / "edgevlm-tests"))

# Vision tower shapes (hidden, layers, MLP width, patch, patches per attention window or None for one
# window over the whole image, merge factor) of the real models; the same numbers as tiny_vlms.py.
TOWERS = {
    "smolvlm-256m": dict(d=768, layers=12, mlp=3072, patch=16, window=1024, merge=4),
    "lfm2_vl": dict(d=768, layers=12, mlp=3072, patch=16, window=1024, merge=2),
    "lfm2_vl_16": dict(d=1152, layers=27, mlp=4304, patch=16, window=1024, merge=2),
    "qwen3_vl": dict(d=1024, layers=24, mlp=4096, patch=16, window=None, merge=2),
    "qwen35_vl": dict(d=768, layers=12, mlp=3072, patch=16, window=None, merge=2),
    "internvl": dict(d=1024, layers=24, mlp=4096, patch=14, window=1024, merge=2),
    "gemma3": dict(d=1152, layers=27, mlp=4304, patch=14, window=4096, merge=4),
}


def encoder_gflops(family: str, image_tokens: int) -> float:
    """Forward GFLOPs (2 per multiply-add) of the vision tower for ``image_tokens`` output tokens: patches =
    tokens x merge^2; per layer 2n(4d^2 + 2dm) for the projections and MLP, plus 4 n w d for attention
    (QK^T and AV over windows of w patches: a tile, or the whole image for Qwen-VL); plus the patch embedding.
    Projector and merger are left out (under 2% for these shapes)."""
    t = TOWERS[family]
    n = image_tokens * t["merge"] ** 2
    w = n if t["window"] is None else min(n, t["window"])
    d, m = t["d"], t["mlp"]
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * w * d
    return (t["layers"] * per_layer + 2 * n * 3 * t["patch"] ** 2 * d) / 1e9


def photo_12mp(path: Path, w: int = 4032, h: int = 3024) -> Path:
    """A 4032 x 3024 photo-like JPEG (gradients, shapes, noise): what a phone camera makes."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(7)
    rgb = np.stack([x / w * 200 + 30, y / h * 180 + 40, (x + y) / (w + h) * 160 + 60], axis=-1)
    rgb += rng.normal(0, 12, rgb.shape)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype("uint8"))
    d = ImageDraw.Draw(img)
    for i in range(40):
        cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(w // 100, w // 10)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.save(path, quality=90)
    return path


def smolvlm_reference(smollm2_gguf: Path) -> dict:
    """SmolVLM-256M's shapes on random weights (random_smolvlm.py), built by vlm quantize, cached."""
    import hashlib

    src = (ROOT / "benchmarks" / "random_smolvlm.py").read_bytes() + (ROOT / "tests/fixtures/tiny_idefics3.py").read_bytes()
    root = CACHE / "fixtures" / f"smolvlm-256m-random-{hashlib.sha256(src).hexdigest()[:12]}"
    gguf, mmproj = root / "out" / "smolvlm-256m-random-Q8_0.gguf", root / "out" / "mmproj-smolvlm-256m-random-F16.gguf"
    if not gguf.is_file():
        root.mkdir(parents=True, exist_ok=True)
        py = sys.executable
        subprocess.run([py, str(ROOT / "benchmarks" / "random_smolvlm.py"), str(root / "hf"),
                        "--smollm2-gguf", str(smollm2_gguf)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([str(Path(py).with_name("vlm")), "quantize", str(root / "hf"), "--out", str(root / "out"),
                        "--name", "smolvlm-256m-random", "--to", "gguf:q8_0", "--threads", "2"], check=True,
                       env=dict(os.environ, VLM_HOME=str(root / ".home")), stdout=subprocess.DEVNULL)
    return {"gguf": gguf, "mmproj": mmproj}


def smollm2() -> Path:
    from edgevlm.runtime.models.registry import Registry
    from edgevlm.runtime.models.store import Store

    home = CACHE / "home"
    spec, art = Registry.load(home).resolve("smollm2-135m")
    store = Store(home)
    if not store.is_installed(spec.alias, art.key):
        store.pull(spec, art)
    return store.artifact(spec, art).path


def ask(fx: dict, photo: Path, threads: int, timeout: float, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as home:                # an empty embedding cache every time
        exe = Path(sys.executable).with_name("vlm")
        t0 = time.perf_counter()
        try:
            r = subprocess.run([str(exe), "ask", "-m", str(fx["gguf"]), "--mmproj", str(fx["mmproj"]), "-t", "0",
                                "-n", "1", "--threads", str(threads), "--json", str(photo), "Describe it.", *extra],
                               capture_output=True, text=True, env=dict(os.environ, VLM_HOME=home, NO_COLOR="1"),
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"over {timeout:.0f} s"}
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else f"exit {r.returncode}"}
        doc = json.loads(r.stdout)
        return {"encode_s": doc["timings"]["image_encode_s"], "ttft_s": doc["timings"]["ttft_s"],
                "image_tokens": doc["usage"]["image_tokens"], "wall_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    from fixtures.tiny_vlms import FAMILIES, family_fixture

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="lfm2_vl,qwen35_vl,lfm2_vl_16,internvl,gemma3,qwen3_vl")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per `vlm ask` before it counts as failed")
    ap.add_argument("--photo", type=Path, help="default: a generated 4032 x 3024 JPEG")
    ap.add_argument("--photo-size", default="4032x3024", help="WxH of the generated photo")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the SmolVLM rows (no ratios; GFLOP/s only): for a quick run on a busy machine")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()

    families = [f for f in a.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    work = Path(tempfile.mkdtemp(prefix="vlm-families-"))
    pw, ph = (int(v) for v in a.photo_size.lower().split("x"))
    photo = a.photo or photo_12mp(work / f"photo-{pw}x{ph}.jpg", pw, ph)
    gguf = smollm2()
    rows = {} if a.no_reference else {
        "smolvlm-256m high": (smolvlm_reference(gguf), ("--detail", "high"), "smolvlm-256m"),
        "smolvlm-256m auto": (smolvlm_reference(gguf), ("--detail", "auto"), "smolvlm-256m")}
    for f in families:
        print(f"building {f} (real vision tower) ...", file=sys.stderr, flush=True)
        rows[f] = (family_fixture(f, CACHE / "fixtures", gguf, variant="real"), (), f)
    results: dict[str, list] = {k: [] for k in rows}
    names = list(rows)
    for rnd in range(a.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            fx, extra, _ = rows[name]
            res = ask(fx, photo, a.threads, a.timeout, *extra)
            print(f"round {rnd + 1}: {name}: {res}", file=sys.stderr, flush=True)
            results[name].append(res)

    ref = statistics.median([r["encode_s"] for r in results.get("smolvlm-256m high", []) if "encode_s" in r]
                            or [float("nan")])
    out = []
    print(f"\n{photo.name}, {a.threads} threads, {a.rounds} round(s); encode = libmtmd's image encode in `vlm ask`")
    print(f"{'family':20} {'real model':28} {'tokens':>6} {'encode s':>9} {'x ref':>6} {'GFLOPs':>8} {'GFLOP/s':>8}")
    for name, (fx, _, tower) in rows.items():
        ok = [r for r in results[name] if "encode_s" in r]
        real = "SmolVLM-256M (reference)" if tower == "smolvlm-256m" else FAMILIES[name]["real"]
        if not ok:
            err = results[name][0].get("error") if results[name] else "not run"
            print(f"{name:20} {real:28} {'-':>6} {'failed':>9}   {err}")
            out.append({"family": name, "real_model": real, "error": err})
            continue
        enc = statistics.median(r["encode_s"] for r in ok)
        tokens = ok[0]["image_tokens"]
        gf = encoder_gflops(tower, tokens)
        print(f"{name:20} {real:28} {tokens:>6} {enc:>9.2f} {enc / ref:>6.2f} {gf:>8.0f} {gf / enc:>8.0f}")
        out.append({"family": name, "real_model": real, "image_tokens": tokens, "encode_s": round(enc, 3),
                    "ratio_to_reference_high": round(enc / ref, 3), "encoder_gflops": round(gf, 1),
                    "rounds": results[name]})
    if a.json:
        a.json.write_text(json.dumps({"photo": str(photo), "threads": a.threads, "rows": out}, indent=2))


if __name__ == "__main__":
    main()
