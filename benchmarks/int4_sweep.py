"""Where ONNX int4 loses its source's answers, setting by setting (issue 20).

Exports the Hugging Face checkpoint once with our fused builder, computes the source's reference once
(transformers fp32; ``--calibration FILE`` adds the importance matrix, as ``vlm quantize`` does), then
quantizes it with each recipe and scores it exactly as ``vlm quantize``'s verification does (top-1
agreement and mean KL over the held-out paragraph, every position in one run; bits per weight = file
bytes * 8 / source parameters). ``--speed`` then decodes with each artifact through the ONNX backend,
alternating, and reports median tok/s and the median of paired ratios against the first recipe.

    python benchmarks/int4_sweep.py HF_DIR [--calibration FILE] [--recipes rtn,int4,gptq,offset] [--speed]
        [--work DIR] [--threads 2] [--reuse]

Recipes (``quantize.onnx.quantize_onnx``'s ``recipe``): ``rtn`` = the int4 before issue 20
(onnxruntime's MatMulNBitsQuantizer, min/max rounding, asymmetric, block 32); ``int4`` = every MatMul
4-bit with the weighted least-squares block search; ``mixed`` = that plus 8-bit lm_head, q/k/v and
edge-layer down projections; ``gptq`` = GPTQ error compensation with the calibration's second moments
(see ``quantize/onnx_int4.py``); ``offset`` = every MatMul 4-bit with a float offset per block carried
by extra input rows (the block sums of the input). ``offset@qkv_proj+gate_up_proj+lm_head``: the offset
rows only for those roles (the others as ``int4``); ``offset~8:lm_head+qkv_proj``: those roles at 8 bits
instead of the recipe's own (``~8:-`` for none); ``offset-gptq``: with GPTQ on top (the second moments
``vlm quantize`` collects only for ``gptq``). ``rtn-acc0`` etc.: any recipe with ``-acc0`` computes
in fp32 instead of int8 (``accuracy_level=0``); ``-nocal``: without the importance matrix (what ``vlm
quantize`` does without ``--calibration``); ``+shared``: the tied embedding stored once with the lm_head's
blocks.
``--reuse`` keeps artifacts an earlier run left in ``--work`` (the figures are then recomputed, the
build time is not). Every quantized row is a separate file set under ``--work/<recipe>/``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("--calibration", type=Path)
    ap.add_argument("--recipes", default="rtn,int4,gptq")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgevlm-int4-sweep"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--gen", type=int, default=48)
    a = ap.parse_args()

    from edgevlm.quantize import verify as V
    from edgevlm.quantize.onnx import export_decoder, quantize_onnx

    a.work.mkdir(parents=True, exist_ok=True)
    fp32 = a.work / "fp32" / "model.onnx"
    if not fp32.is_file():
        export_decoder(a.src, fp32.parent)
    cal = a.calibration.read_text(encoding="utf-8") if a.calibration else None
    ref_file = a.work / f"reference-{'cal' if cal else 'nocal'}.pkl"
    if ref_file.is_file():
        ref = pickle.loads(ref_file.read_bytes())
    else:
        ref = V.source_reference(a.src, n_tokens=256, calibration_text=cal, hessians=True)
        ref_file.write_bytes(pickle.dumps(ref))

    rows, files = [], []
    for name in a.recipes.split(","):
        base, shared = (name[:-len("+shared")], True) if name.endswith("+shared") else (name, None)
        base, _, eight = base.partition("~8:")
        base, _, roles = base.partition("@")
        recipe, _, acc = base.partition("-acc")
        recipe, nocal, _ = recipe.partition("-nocal")
        recipe, gq, _ = recipe.partition("-gptq")
        out = a.work / name / "model_q4.onnx"
        t0 = time.perf_counter()
        build_s = None
        if not (a.reuse and out.is_file()):
            quantize_onnx(fp32, out, "int4", recipe=recipe, accuracy_level=int(acc or 4),
                          importance=(None if recipe == "rtn" or nocal else
                                      dict(ref.imatrix) if recipe == "offset" and not gq else ref.imatrix),
                          share_tied_embedding=shared, offset_roles=tuple(roles.split("+")) if roles else None,
                          eight_bit_roles=tuple(eight.split("+")) if eight else None)
            build_s = round(time.perf_counter() - t0, 1)
        r = V.compare(ref, V.onnx_logits(out, ref.token_ids, threads=a.threads))
        size = sum(p.stat().st_size for p in out.parent.iterdir() if p.name.startswith(out.name))
        row = {"recipe": name, "calibration": bool(cal and recipe != "rtn" and not nocal), "top1": r["top1_agreement"],
               "kl": r["kl_mean"], "bits_per_weight": round(8 * size / ref.n_params, 2), "build_s": build_s}
        rows.append(row)
        files.append(out)
        print(json.dumps(row), flush=True)

    if a.speed:
        sys.path.insert(0, str(Path(__file__).parent))
        from onnx_vs_genai import prompt_of, run_backend

        from edgevlm.runtime.loader import load_backend
        from edgevlm.runtime.protocol import Artifact, LoadOptions

        backends = [load_backend(Artifact(format="onnx", path=f, name=f.name), LoadOptions(n_ctx=512, n_threads=a.threads))
                    for f in files]
        prompt = prompt_of(40)
        for b in backends:
            run_backend(b, prompt, 8)
        tps: list[list[float]] = [[] for _ in backends]
        for r in range(a.rounds):                     # alternate the order each round
            order = range(len(backends)) if r % 2 == 0 else reversed(range(len(backends)))
            for i in order:
                tps[i].append(run_backend(backends[i], prompt, a.gen)[1])
        for b in backends:
            b.close()
        for row, t in zip(rows, tps):
            ratio = statistics.median(x / y for x, y in zip(t, tps[0]))
            print(json.dumps({"recipe": row["recipe"], "decode_tps": round(statistics.median(t), 1),
                              "ratio_vs_first": round(ratio, 3)}), flush=True)


if __name__ == "__main__":
    main()
