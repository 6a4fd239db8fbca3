"""vlm quantize: a Hugging Face checkpoint -> verified GGUF / ONNX artifacts, a manifest, a table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgevlm.runtime.device.memory import fmt_bytes

from .common import console
from .common.console import boundary


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """Plain aligned columns on stdout: readable by people and by `awk`."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers, *rows]:
        console.write_out("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() + "\n")


def _fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


@boundary
def quantize(
    src: Annotated[Optional[str], typer.Argument(
        help="A Hugging Face checkpoint folder (config.json + *.safetensors) or a hub repo id (org/name).",
        show_default=False, metavar="SRC")] = None,
    to: Annotated[Optional[list[str]], typer.Option(
        "--to", metavar="FORMAT:TYPE", help="Artifact to build, FORMAT:TYPE (repeatable): gguf:q4_k_m, gguf:q8_0, onnx:int4, onnx:int8, ... "
                     "(default gguf:q4_k_m; --list-types shows all).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="DIR", help="Output folder (default ./NAME-quantized); must be new or empty.")] = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", metavar="NAME", help="Model name for files and --register (default: from SRC).")] = None,
    register: Annotated[bool, typer.Option(
        "--register", help="Install the artifacts so `vlm chat -m NAME` (or NAME:q8_0, NAME:onnx-int4) runs them.")] = False,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", metavar="FILE", help="Text file of typical input: GGUF types are quantized with an importance matrix "
                              "computed on it (and the IQ1/IQ2 types become available).")] = None,
    mmproj_type: Annotated[str, typer.Option(
        "--mmproj-type", metavar="TYPE", help="Vision projector type: f16, bf16, f32 or q8_0.")] = "f16",
    block_size: Annotated[int, typer.Option("--block-size", metavar="N", help="ONNX int8/int4 block size (weights per scale).")] = 32,
    onnx_int4_recipe: Annotated[str, typer.Option(
        "--onnx-int4-recipe", metavar="auto|offset|gptq|mixed|int4|rtn",
        help="ONNX int4: auto (= offset), offset (a float minimum per block, 8-bit lm_head: closest to the "
             "source, ~0.82-0.89x the decode speed of rtn), gptq (needs "
             "--calibration; 8-bit q/k/v, ~0.9x decode), mixed (8-bit sensitive tensors), int4, rtn. "
             "Measured: docs/quantize-output.md.")] = "auto",
    verify_tokens: Annotated[int, typer.Option(
        "--verify-tokens", metavar="N", help="Held-out tokens compared with the source for every artifact.")] = 256,
    revision: Annotated[Optional[str], typer.Option("--revision", metavar="REV", help="Hub revision (branch, tag or commit).")] = None,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Accept pickle weights (*.bin/*.pt), which can run code when loaded.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Run model code shipped inside the checkpoint (auto_map).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, metavar="N", help="CPU threads for verification.")] = None,
    list_types: Annotated[bool, typer.Option("--list-types", help="List the quantization types and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON instead of the table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notices on stderr; errors only.")] = False,
) -> None:
    """Quantize a Hugging Face model to GGUF and/or ONNX, verify every artifact against the source, write a manifest.

    Example: vlm quantize ./SmolLM2-135M-Instruct --to gguf:q4_k_m --to gguf:q8_0 --to onnx:int8 --register
    """
    from edgevlm.runtime.errors import UsageError

    console.set_quiet(quiet)
    if list_types:
        from edgevlm.quantize.targets import list_types as types

        rows = types(block_size)
        if as_json:
            console.write_out(json.dumps(rows, indent=2) + "\n")
            return
        _table(["TARGET", "BITS/WEIGHT", "NOTE"], [[r["target"], f"{r['bits_per_weight']:.2f}", r["note"]] for r in rows])
        return
    if not src:
        raise UsageError("Missing SRC: a checkpoint folder or a hub repo id.",
                         hint="For example: vlm quantize ./my-model --to gguf:q4_k_m")
    from edgevlm.quantize.pipeline import quantize as run
    from edgevlm.quantize.results import QuantizeOptions

    opts = QuantizeOptions(targets=list(to or []), out_dir=out, name=name, revision=revision, calibration=calibration,
                           mmproj_type=mmproj_type, block_size=block_size, verify_tokens=verify_tokens,
                           onnx_int4_recipe=onnx_int4_recipe,
                           allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, force=force,
                           register=register, threads=threads)
    with console.progress("", unit="steps") as cb:
        result = run(src, opts, on_progress=cb)
    if as_json:
        console.write_out(json.dumps(result.manifest, indent=2, ensure_ascii=False) + "\n")
    else:
        rows = []
        for a in result.manifest["artifacts"]:
            m = a.get("metrics") or {}
            rows.append([a["key"], a["format"], a["quantization"], fmt_bytes(a["size"]),
                         _fmt(a["bits_per_weight"], ".2f"), _fmt(m.get("top1_agreement"), ".1%"),
                         _fmt(m.get("kl_mean"), ".4f"), _fmt(m.get("perplexity"), ".2f"),
                         _fmt(a.get("decode_tps"), ".1f"), _fmt(a["build_seconds"], ".1f")])
        _table(["ARTIFACT", "FORMAT", "QUANT", "SIZE", "BITS/W", "TOP-1", "KL", "PPL", "TOK/S", "BUILD S"], rows)
    ver = result.manifest["verification"]
    console.info(f"[dim]Agreement and KL against the fp32 source over {ver['tokens']} held-out tokens "
                 f"(source perplexity {ver['source_perplexity']:.2f}).[/]")
    for a in result.manifest["artifacts"]:
        for w in a.get("warnings") or []:
            console.warn(f"{a['key']}: {w}")
    console.info(f"[green]Wrote[/] {len(result.artifacts)} artifact(s) and manifest.json to {result.out_dir}")
    if result.registered:
        console.info(f"[green]Registered[/] {', '.join(result.registered)}: try "
                     f"`vlm chat -m {result.registered[0]}`")
