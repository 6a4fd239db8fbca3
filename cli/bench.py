"""vlm bench: load time, TTFT, prefill and decode tok/s, image encode, peak RSS -- side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgevlm.runtime.device.memory import fmt_bytes

from .common import console
from .common.console import boundary
from .common.options import GpuLayers, Rpc, TensorSplit


def _fmt(stat: dict, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f}±{stat['stdev'] * scale:.{digits}f}{unit}"


@boundary
def bench(
    models: Annotated[list[str], typer.Argument(help="Registry names or .gguf paths; several are compared side by side.", show_default=False)],
    image: Annotated[Optional[str], typer.Option("--image", help="Also measure image encode (vision models).")] = None,
    detail: Annotated[Optional[list[str]], typer.Option("--detail", help="With --image: detail levels to measure "
                                                        "(low, auto, high; repeatable; default auto).")] = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", min=8, help="Prompt length for prefill.")] = 256,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", min=2, help="Tokens to generate for decode.")] = 128,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Repeats per model (mean and spread).")] = 3,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: physical cores).")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", min=128, help="Context length (default: just enough).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG chart of the comparison.")] = None,
    rpc: Rpc = None,
    tensor_split: TensorSplit = None,
    gpu_layers: GpuLayers = None,
    guard: Annotated[Optional[str], typer.Option(
        "--guard", metavar="MODEL", help="Also measure what --guard adds: Llama Guard 3 (registry name or .gguf) "
                                         "checking a 50-token question and the answer.")] = None,
    kv_type: Annotated[Optional[list[str]], typer.Option(
        "--kv-type", metavar="f16|q8_0|q4_0", help="KV cache types to measure, each against an f16 KV cache "
                                                  "(repeatable; speed, size, top-1 agreement and KL).")] = None,
) -> None:
    """Measure models on this device: each in its own process, so peak memory is its own."""
    from edgevlm.runtime.reports.bench import device_summary, plot as draw, run_isolated

    from .common.acquire import cluster_args

    from edgevlm.runtime.reports.gpu import parse_gpu_layers

    endpoints, split = cluster_args(rpc, tensor_split)
    cluster = {"rpc": endpoints, "tensor_split": split} if endpoints else {}
    if gpu_layers is not None:
        cluster["gpu_layers"] = parse_gpu_layers(gpu_layers)
    from edgevlm.runtime.device.memory import kv_type as check_kv_type

    kv_types = list(dict.fromkeys(check_kv_type(k) for k in kv_type)) if kv_type else [None]
    results = []
    for m in models:
        for kv in kv_types:
            if not as_json:
                console.info(f"[dim]Measuring {m}{f' ({kv} KV cache)' if kv else ''} ...[/]")
            results.append(run_isolated(m, image=image, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                        **({"detail": [d.lower() for d in detail]} if detail else {}),
                                        repeat=repeat, threads=threads, n_ctx=ctx, **cluster,
                                        **({"guard": guard} if guard else {}), **({"kv_type": kv} if kv else {})))
    report = {"device": device_summary(), "results": results}
    if plot is not None:
        draw(report, plot)
        console.info(f"[dim]Chart written to {plot}[/]")
    if as_json:
        console.write_out(json.dumps(report, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    gl = results[0].get("gpu_layers")
    gpu = f", {gl} layers on {results[0]['gpu_offload']}" if gl and results[0].get("gpu_offload") else ""
    t = Table(title=f"{report['device']['cpu']} ({results[0]['threads']} threads{gpu})", title_justify="left")
    for col in ("model", "load s", "TTFT s", "prefill tok/s", "decode tok/s", "image ms", "img tok", "peak RSS"):
        t.add_column(col, justify="left" if col == "model" else "right")
    base = results[0]
    for r in results:
        img = r["image"] or {}
        ratio = ""
        if r is not base and base["decode_tps"]["mean"] and r["decode_tps"]["mean"]:
            ratio = f" ({r['decode_tps']['mean'] / base['decode_tps']['mean']:.2f}x)"
        t.add_row(r["model"], f"{r['load_s']:.2f}", _fmt(r["ttft_s"], digits=3), _fmt(r["prefill_tps"]),
                  _fmt(r["decode_tps"]) + ratio, _fmt(img["encode_ms"], digits=0) if img else "-",
                  str(img.get("tokens") or "-"), fmt_bytes(r["peak_rss_bytes"]))
    Console(highlight=False, width=None if console.err.is_terminal else 160).print(t)
    if kv_type:
        _kv_table(results)
    if image and any((r.get("image") or {}).get("levels") for r in results):
        d = Table(title="image detail levels (no embedding cache)", title_justify="left")
        for col in ("model", "detail", "tiles", "img tok", "encode ms", "TTFT s", "choice"):
            d.add_column(col, justify="left" if col in ("model", "detail", "choice") else "right")
        for r in results:
            for level, v in ((r.get("image") or {}).get("levels") or {}).items():
                d.add_row(r["model"], level, str(v.get("tiles") or "-"), str(v.get("tokens") or "-"),
                          _fmt(v["encode_ms"], digits=0), _fmt(v["ttft_s"], digits=3), v.get("choice") or "")
        Console(highlight=False, width=None if console.err.is_terminal else 160).print(d)
    if guard:
        g = Table(title=f"--guard: {results[0]['guard']['model']}, 50-token question", title_justify="left")
        for col in ("model", "input check s (first)", "input check s (preamble reused)", "output check s", "added s"):
            g.add_column(col, justify="left" if col == "model" else "right")
        for r in results:
            d = r["guard"]
            g.add_row(r["model"], _fmt(d["input_full_s"], digits=3), _fmt(d["input_s"], digits=3),
                      _fmt(d["output_s"], digits=3), _fmt(d["added_s"], digits=3))
        Console(highlight=False, width=None if console.err.is_terminal else 160).print(g)


def _kv_table(results: list[dict]) -> None:
    """--kv-type: per model and type, the KV cache's size and decode speed against f16, and its quality."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="KV cache types (quality: next-token distributions against an f16 KV cache, held-out text)",
              title_justify="left")
    for col in ("model", "kv type", "KV bytes", "decode tok/s", "top-1 agreement", "KL mean (nats)"):
        t.add_column(col, justify="left" if col in ("model", "kv type") else "right")
    f16 = {r["model"]: r for r in results if r.get("kv_type", "f16") == "f16"}
    for r in results:
        base = f16.get(r["model"])
        kvb = fmt_bytes(r["kv_cache_bytes"]) if r.get("kv_cache_bytes") else "-"
        speed = _fmt(r["decode_tps"])
        if base is not None and base is not r:
            if r.get("kv_cache_bytes") and base.get("kv_cache_bytes"):
                kvb += f" ({r['kv_cache_bytes'] / base['kv_cache_bytes']:.2f}x)"
            if r["decode_tps"]["mean"] and base["decode_tps"]["mean"]:
                speed += f" ({r['decode_tps']['mean'] / base['decode_tps']['mean']:.2f}x)"
        q = r.get("kv_quality") or {}
        t.add_row(r["model"], r.get("kv_type", "f16"), kvb, speed,
                  f"{q['top1_agreement']:.1%}" if q else "-", f"{q['kl_mean']:.5f}" if q else "-")
    Console(highlight=False, width=None if console.err.is_terminal else 160).print(t)
