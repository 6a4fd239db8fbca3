"""The vision encoder's achieved FLOP/s against this CPU's, per backend and setting, side by side.

A SigLIP-base tile (SmolVLM-256M / -500M: 512 px, 16-px patches -> 1024 tokens, 768 hidden, 12 layers,
MLP 3072) is ~215 GFLOP (per layer: QKV + output 8*N*d^2, MLP 16*N*d^2, attention 4*N^2*d). Each row
encodes tiles in a fresh child process (so its peak RSS is its own), rows interleaved round by round:

* numpy fp32 GEMM of the encoder's own shapes (1024 x 768 x 3072): what this CPU's BLAS reaches;
* GGUF: libmtmd encodes one tile (the projector given, F16 or Q8_0), at 1 and 2 threads;
* ONNX: onnxruntime's vision encoder, one tile per run and all of a photo's tiles in one run
  (``TILE_BATCH``): seconds per tile and peak RSS.

    python benchmarks/image_encoder.py --gguf M.gguf --mmproj P.gguf [--mmproj P2.gguf] --onnx DIR [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

TILE_GFLOP = 12 * (8 * 1024 * 768 ** 2 + 16 * 1024 * 768 ** 2 + 4 * 1024 ** 2 * 768) / 1e9 + 2.1


def _child(spec: dict) -> dict:
    import time

    from edgevlm.runtime.reports.bench import peak_rss

    kind = spec["kind"]
    if kind == "numpy":
        import numpy as np

        a = np.random.rand(1024, 768).astype(np.float32)
        b = np.random.rand(768, 3072).astype(np.float32)
        a @ b
        t0 = time.perf_counter()
        n = 20
        for _ in range(n):
            a @ b
        s = time.perf_counter() - t0
        return {"gflops": 2 * 1024 * 768 * 3072 * n / s / 1e9}
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import ImageInput, LoadOptions

    if kind == "gguf":
        b = load_backend(artifact_from_path(Path(spec["model"]), Path(spec["mmproj"]), True),
                         LoadOptions(n_ctx=1024, n_threads=spec["threads"]))
        from edgevlm.runtime.inputs.detail import Option
        from edgevlm.runtime.inputs.planner import ImagePlanner
        from edgevlm.runtime.protocol import ImageDetail

        images = b._images
        t, seq = images.family.tile, images.family.seq
        img = ImageInput(rgb=bytes([128]) * (t * t * 3), width=t, height=t, source="x", sha256="")
        planner = ImagePlanner(images, ImageDetail(cache=False))
        unit = images.unit(planner.fixed(img, Option("mtmd:overview", 1, seq)), planner)
        images.encode(unit)                         # sizes the graph
        secs = []
        for _ in range(spec["tiles"]):
            unit.embd = None
            secs.append(images.encode(unit))
        images.free(unit)
        b.close()
        s = statistics.median(secs)
    else:
        from edgevlm.runtime.backends import onnx_images   # benchmarks may name a backend's modules
        from edgevlm.runtime.inputs.detail import Option
        from edgevlm.runtime.inputs.planner import ImagePlanner
        from edgevlm.runtime.protocol import ImageDetail

        onnx_images.TILE_BATCH = spec["batch"]
        b = load_backend(artifact_from_path(Path(spec["model"]), None, True), LoadOptions(n_ctx=1024, n_threads=spec["threads"]))
        images = b._images
        proc = images.processor
        w, h = 4000, 3000
        img = ImageInput(rgb=bytes([128]) * (w * h * 3), width=w, height=h, source="x", sha256="bench")
        plan = proc.plan(w, h)
        images.planner = ImagePlanner(images, ImageDetail(level="high", cache=False))
        p = images.planner.fixed(img, Option(proc.settings(), plan.tiles, plan.tiles * proc.image_seq_len))
        images.features_of(p, None, plan)           # warm: first runs plan memory
        images.features.clear()
        t0 = time.perf_counter()
        images.features_of(p, None, plan)
        s = (time.perf_counter() - t0) / plan.tiles
        b.close()
    return {"s_per_tile": s, "gflops": TILE_GFLOP / s, "peak_rss_mib": peak_rss() / 2 ** 20}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf")
    ap.add_argument("--mmproj", action="append", default=[])
    ap.add_argument("--onnx")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tiles", type=int, default=2)
    a = ap.parse_args()
    specs = [{"kind": "numpy", "name": "numpy fp32 GEMM 1024x768x3072"}]
    for mm in a.mmproj:
        for th in (1, 2):
            specs.append({"kind": "gguf", "model": a.gguf, "mmproj": mm, "threads": th, "tiles": a.tiles,
                          "name": f"gguf {os.path.basename(mm)} t{th}"})
    if a.onnx:
        for batch in (1, 13):
            specs.append({"kind": "onnx", "model": a.onnx, "threads": 2, "batch": batch,
                          "name": f"onnx vision encoder, {batch} tile(s) per run, t2"})
    rows: dict = {}
    env = dict(os.environ, VLM_HOME=os.environ.get("VLM_HOME", "/tmp/vlm-enc-bench"))
    for _ in range(a.rounds):
        for sp in specs:
            r = subprocess.run([sys.executable, __file__, "--child", json.dumps(sp)], capture_output=True, text=True,
                               env=env)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if not line:
                print(f"{sp['name']}: failed: {r.stderr[-500:]}")
                continue
            rows.setdefault(sp["name"], []).append(json.loads(line[-1]))
    print(f"load avg {os.getloadavg()[0]:.1f}; tile = {TILE_GFLOP:.0f} GFLOP")
    for name, rs in rows.items():
        g = statistics.median(r["gflops"] for r in rs)
        extra = ""
        if "s_per_tile" in rs[0]:
            extra = (f"  {statistics.median(r['s_per_tile'] for r in rs):.2f} s/tile"
                     f"  peak RSS {max(r['peak_rss_mib'] for r in rs):.0f} MiB")
        print(f"{name:55} {g:7.1f} GFLOP/s{extra}")


if __name__ == "__main__":
    main()
