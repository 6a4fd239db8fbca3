"""The `vlm` application: registers the commands; each lives in its own module."""
from __future__ import annotations

import typer

from . import ask as _ask
from . import bench as _bench
from . import caption as _caption
from . import chat as _chat
from . import doctor as _doctor
from . import models as _models
from . import quantize as _quantize
from . import cache as _cache
from . import serve as _serve
from . import worker as _worker
from .common.console import install_signal_handlers

app = typer.Typer(
    name="vlm",
    help="Run small language and vision-language models on this device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("chat")(_chat.chat)
app.command("ask")(_ask.ask)
app.command("caption")(_caption.caption)
app.command("pull")(_models.pull)
app.command("list")(_models.list_models)
app.command("rm")(_models.rm)
app.command("info")(_models.info)
app.command("doctor")(_doctor.doctor)
app.command("bench")(_bench.bench)
app.command("quantize")(_quantize.quantize)
app.command("serve")(_serve.serve)
app.add_typer(_cache.app, name="cache")
app.command("worker")(_worker.worker)


def version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"edgevlm {version('edgevlm')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Run small language and vision-language models on this device."""


def run() -> None:
    install_signal_handlers()
    app()


if __name__ == "__main__":  # pragma: no cover
    run()
