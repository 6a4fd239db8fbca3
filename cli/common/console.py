"""The CLI's one place for output and errors: stdout carries only answers; all else goes to stderr."""
from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console

from edgevlm.runtime.errors import Cancelled, EdgeVLMError

# One console for everything that is not the answer. NO_COLOR is honoured by rich itself.
err = Console(stderr=True, highlight=False, soft_wrap=True)
QUIET = False

EXIT_OK = 0
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_PIPE = 141


from edgevlm.runtime.env import debug  # noqa: E402  (re-exported: the CLI's one switch)


def set_quiet(q: bool) -> None:
    global QUIET
    QUIET = q


def info(msg: str) -> None:
    if not QUIET:
        err.print(msg)


def warn(msg: str) -> None:
    from rich.markup import escape     # plain text: library messages hold brackets (["not"], [quantize])

    err.print(f"[yellow]Warning:[/] {escape(msg)}")


def notice(msg: str) -> None:
    """A line on stderr that --quiet does not hide (a model's licence terms)."""
    from rich.markup import escape

    err.print(escape(msg))


def interactive() -> bool:
    """True only when a person can answer a question: stdin and stderr are terminals, not CI."""
    return sys.stdin.isatty() and sys.stderr.isatty() and not os.environ.get("CI")


def _sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise Cancelled("Terminated.", hint="", terminated=True)


def install_signal_handlers() -> None:
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except (ValueError, OSError):  # not the main thread
        pass


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def fail(e: EdgeVLMError) -> "typer.Exit":
    from rich.markup import escape     # messages are plain text: "[quantize]" is not a style tag

    err.print(f"[bold red]Error:[/] {escape(e.message)}", markup=True) if not isinstance(e, Cancelled) else None
    if e.hint:
        err.print(f"[dim]Hint:[/] {escape(e.hint)}")
    return typer.Exit(e.exit_code)


def boundary(fn: Callable) -> Callable:
    """One error boundary for every command: known errors -> one line + hint + exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except typer.Abort:                 # Ctrl-C (or end of input) at a yes/no question
            err.print("\n[dim]Interrupted.[/]")
            raise typer.Exit(EXIT_INTERRUPTED)
        except EdgeVLMError as e:
            if debug():
                traceback.print_exc()
            if isinstance(e, Cancelled):
                err.print("[dim]Stopped.[/]")
                raise typer.Exit(EXIT_TERMINATED if e.terminated else EXIT_INTERRUPTED)
            raise fail(e)
        except KeyboardInterrupt:
            err.print("[dim]Interrupted.[/]")
            raise typer.Exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(EXIT_PIPE)
        except Exception as e:  # anything unexpected: one line, traceback only with VLM_DEBUG=1
            if debug():
                traceback.print_exc()
            else:
                err.print(f"[bold red]Error:[/] unexpected {type(e).__name__}: {e}")
                err.print("[dim]Hint:[/] run again with VLM_DEBUG=1 for the traceback, and report it.")
            raise typer.Exit(1)

    return wrapper


def write_out(text: str) -> None:
    """Write answer text to stdout immediately (streaming)."""
    sys.stdout.write(text)
    sys.stdout.flush()


@contextmanager
def progress(description: str, unit: str = "bytes") -> Iterator[Callable]:
    """The one progress display: a callback ``cb(stage, done, total)`` for runtime/quantize work.

    ``unit``: "bytes" (downloads: sizes and speed), "items" (images: n of m), "steps" (long stages one
    after another: n of m and time; off a terminal one line per stage, so logs still show where the
    time went). Bars go to stderr on a terminal only; nothing with --quiet."""
    if QUIET:
        yield lambda stage, done, total: None
        return
    if not sys.stderr.isatty():
        if unit != "steps":
            yield lambda stage, done, total: None
            return
        seen: set[str] = set()

        def line(stage: str, done: int, total: Optional[int]) -> None:
            if stage not in seen:
                seen.add(stage)
                info(f"[dim]{stage} ...[/]")

        yield line
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    if unit == "bytes":
        columns = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    else:
        columns = (MofNCompleteColumn(), TimeElapsedColumn() if unit == "steps" else TimeRemainingColumn())
    with Progress(TextColumn("{task.description}"), BarColumn(), *columns, console=err, transient=True) as prog:
        tasks: dict[str, int] = {}

        def cb(stage: str, done: int, total: Optional[int]) -> None:
            if stage not in tasks:
                if unit == "steps":
                    for other in tasks.values():               # one stage at a time: finish the last one
                        t = prog.tasks[other] if other < len(prog.tasks) else None
                        if t is not None and t.total:
                            prog.update(other, completed=t.total)
                tasks[stage] = prog.add_task(f"{description} {stage}".strip(), total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield cb
