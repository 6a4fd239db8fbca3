"""vlm doctor: the device, the engines' builds, and which models fit here."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from edgevlm.runtime.device.memory import fmt_bytes

from .common import console
from .common.console import boundary
from .common.options import DEFAULT_CTX, KvType, Rpc


@boundary
def doctor(
    ctx: Annotated[int, typer.Option("--ctx", min=128, help="Context length used for the memory estimates.")] = DEFAULT_CTX,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
    rpc: Rpc = None,
    kv_type: KvType = None,
) -> None:
    """Check this device: CPU features, memory, GPUs, engine builds, which models fit, known problems."""
    from edgevlm.runtime.reports.doctor import report

    from edgevlm.runtime.backends import ggml_rpc

    from .common.acquire import resolve_kv_type

    r = report(ctx, rpc=ggml_rpc.parse_endpoints(rpc), kv_type=resolve_kv_type(kv_type))
    if as_json:
        console.write_out(json.dumps(r, indent=2) + "\n")
        return
    out = console.write_out
    c = r["cpu"]
    feats = " ".join(f"{k}{'+' if v else '-'}" for k, v in c["features"].items())
    cores = f"{c['physical_cores']} physical / {c['logical_cores']} logical"
    if c["performance_cores"]:
        cores += f" ({c['performance_cores']} performance + {c['efficiency_cores']} efficiency)"
    out(f"OS          {r['os']}  (Python {r['python']})\n")
    out(f"CPU         {c['model']} [{c['arch']}], {cores}\n")
    if c.get("board"):
        out(f"Board       {c['board']}\n")
    out(f"Features    {feats}\n")
    out(f"Memory      {fmt_bytes(r['memory']['available'])} available of {fmt_bytes(r['memory']['total'])}\n")
    out(f"GPUs        {', '.join(r['gpus']) or 'none found'}\n")
    out(f"Threads     {r['default_threads']} by default\n")
    lc = r["llama_cpp"]
    out(f"llama.cpp   llama-cpp-python {lc['version'] or 'not installed'}\n")
    if lc["system_info"]:
        out(f"            {lc['system_info']}\n")
    out(f"GPU offload {lc['gpu_offload'] or 'none in this build'}; --gpu-layers default {lc['gpu_layers']}\n")
    if lc["rebuild"]:
        out(f"Rebuild     {lc['rebuild']['command']}\n")
    rp = r["rpc"]
    out(f"RPC         {'available (vlm worker, --rpc)' if rp['available'] else 'not in this build: ' + rp['install']}\n")
    for w in rp["workers"]:
        state = f"{fmt_bytes(w['free'])} free" if w["reachable"] and w["free"] is not None else w.get("error", "unreachable")
        out(f"            worker {w['endpoint']}: {state}\n")
    ort = r["onnxruntime"]
    out(f"onnxruntime {ort['version'] or 'not installed'}" + (f"  providers: {', '.join(ort['providers'])}" if ort["providers"] else "") + "\n")
    kvt = r.get("kv_type_for_estimates", "f16")
    out(f"\nModels at a {r['context_for_estimates']}-token context{f' ({kvt} KV cache for GGUF)' if kvt != 'f16' else ''} "
        "(estimate = weights + projector + KV cache + runtime):\n")
    rows = [["MODEL", "KIND", "ESTIMATE", "FITS", "INSTALLED"]]
    for m in r["models"]:
        rows.append([m["model"], m["kind"], fmt_bytes(m["estimate"]) if m["estimate"] else "?",
                     {True: "yes", False: "no", None: "?"}[m["fits"]]
                     + (f" (yes with --kv-type {m['fits_with_kv_type']})" if m.get("fits_with_kv_type") else ""),
                     "yes" if m["installed"] else ""])
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    for row in rows:
        out("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() + "\n")
    imgs = [m for m in r["models"] if m.get("images")]
    if imgs:
        out("\nImages at each --detail level, a 12 MP photo (encode seconds: measured here by the first `auto` "
            "answer):\n")
        rows = [["MODEL", "LOW", "AUTO", "HIGH"]] + [[m["model"], *_image_cells(m["images"])] for m in imgs]
        widths = [max(len(x) for x in col) for col in zip(*rows)]
        for row in rows:
            out("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() + "\n")
    rec = r["recommended"]
    out(f"\nRecommended: text {rec['text'] or '-'}, vision {rec['vision'] or '-'}\n")
    for w in r["warnings"]:
        out(f"Warning: {w}\n")


def _image_cells(lv: dict) -> list[str]:
    """low, auto, high: image tokens and estimated encode seconds (auto: its rungs until measured)."""
    tok, est = lv["tokens"], lv["encode_s"]
    cells = []
    for level in ("low", "auto", "high"):
        n = tok[level] if isinstance(tok[level], int) else "/".join(map(str, tok[level]))
        if lv["fixed_input"]:
            cells.append(f"{n} tok (fixed input)")
        else:
            cells.append(f"{n} tok" + (f", ~{est[level]:.1f} s" if est else ", not measured"))
    return cells
