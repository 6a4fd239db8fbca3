"""vlm cache: the image-embedding cache under $VLM_HOME -- what it holds, and clearing it."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import console
from .common.console import boundary

app = typer.Typer(help="The image-embedding cache: encoder output reused by later questions about the same image.",
                  no_args_is_help=False, invoke_without_command=True, add_completion=False)


def _show(as_json: bool) -> None:
    from edgevlm.runtime.device.memory import fmt_bytes
    from edgevlm.runtime.inputs.embed_cache import EmbedCache

    st = EmbedCache.default().stats()
    if as_json:
        console.write_out(json.dumps(st) + "\n")
        return
    console.write_out(f"{st['path']}\n{st['entries']} entries, {fmt_bytes(st['bytes'])} of "
                      f"{fmt_bytes(st['max_bytes'])} (config key image_cache_max_bytes)\n")


@app.callback()
@boundary
def cache(ctx: typer.Context,
          as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False) -> None:
    """Show the image-embedding cache (entries, size, cap); `vlm cache clear` empties it."""
    if ctx.invoked_subcommand is None:
        _show(as_json)


@app.command("show")
@boundary
def show(as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False) -> None:
    """Entries, bytes and the cap of the image-embedding cache."""
    _show(as_json)


@app.command("clear")
@boundary
def clear() -> None:
    """Remove every cached image embedding (the measured encode speeds stay)."""
    from edgevlm.runtime.device.memory import fmt_bytes
    from edgevlm.runtime.inputs.embed_cache import EmbedCache

    n, b = EmbedCache.default().clear()
    console.info(f"Removed {n} cached image embedding{'s' if n != 1 else ''} ({fmt_bytes(b)}).")
