"""vlm worker: offer this device to other hosts through ggml's RPC server (--rpc on the main host)."""
from __future__ import annotations

import ipaddress
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console
from .common.console import boundary

DEFAULT_PORT = 50052


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@boundary
def worker(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback exposes an "
                                                     "unauthenticated service: use a private link or an SSH tunnel.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="TCP port.")] = DEFAULT_PORT,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: physical cores).")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Keep received weights here, so a restarted main "
                                                                  "host loads faster (llama.cpp's RPC tensor cache).")] = None,
) -> None:
    """Offer this device's CPU to other hosts: they spread a model's layers over it with --rpc.

    Example: on a second board `vlm worker --host 10.0.0.2`, then on the main one
    `vlm ask -m llama3.2-3b --rpc 10.0.0.2:50052 "Hello"`. The protocol has no authentication.
    """
    import socket

    from edgevlm.runtime.backends import ggml_rpc
    from edgevlm.runtime.device.hardware import default_threads, memory_info
    from edgevlm.runtime.errors import UsageError

    ggml_rpc.require()
    n_threads = threads or default_threads()
    try:                                        # fail with one line, not ggml's abort, when the port is taken
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UsageError(f"Cannot listen on {host}:{port}: {e.strerror or e}.",
                         hint="Choose another --port, or stop what is using it.") from e
    if not _is_loopback(host):
        console.err.print(f"[bold red]WARNING:[/] listening on {host}:{port}. ggml's RPC protocol has no "
                          "authentication or encryption: anyone who reaches this port can run code-sized "
                          "workloads on this device and read what it computes. Use it only on a private link "
                          "or behind an SSH tunnel (see the README).")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    free = memory_info().available
    console.err.print(f"Worker on {host}:{port}: CPU, {n_threads} threads, {free / 1e9:.1f} GB free"
                      f"{f', cache {cache}' if cache else ''}. Ctrl-C to stop.")
    done = threading.Event()
    t = threading.Thread(target=ggml_rpc.serve, args=(host, port, n_threads, cache), daemon=True)
    t.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: done.set() or setattr(done, "signum", s))
    while not done.wait(0.5):
        if not t.is_alive():
            raise UsageError(f"The RPC server on {host}:{port} stopped.", hint="VLM_DEBUG=1 shows ggml's log.")
    console.err.print("[dim]Worker stopped.[/]")
    # ggml's server thread blocks in accept(); nothing is in flight that needs cleaning up
    os._exit(0 if getattr(done, "signum", signal.SIGINT) == signal.SIGTERM else console.EXIT_INTERRUPTED)
