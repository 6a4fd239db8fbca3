"""vlm serve: an OpenAI-compatible HTTP server (and Ollama's native API) over models on this device."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console
from .common.console import boundary
from .common.options import GpuLayers, Guard, GuardCategories, GuardModel, Threads
from .common.options import KvType


def _size(text: Optional[str], flag: str) -> Optional[int]:
    if text is None:
        return None
    from edgevlm.runtime.device.hardware import parse_size
    from edgevlm.runtime.errors import UsageError

    try:
        return parse_size(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a size.", hint="Use e.g. 4G, 512M or a number of bytes.") from None


def _duration(text: str) -> Optional[float]:
    from edgevlm.runtime.errors import UsageError
    from edgevlm.runtime.serving.apierror import APIError
    from edgevlm.runtime.serving.translate import keep_alive

    try:
        v = keep_alive(float(text) if text.lstrip("-").replace(".", "", 1).isdigit() else text)
    except APIError:
        raise UsageError(f"--keep-alive {text!r} is not a duration.", hint="Use e.g. 30s, 5m, 1h, or -1 for never.") from None
    return v


@boundary
def serve(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="Models to load at start and keep loaded (registry names or .gguf paths). Requests may also name "
             "any installed model, loaded on first use.", show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="VLM_API_KEY", show_envvar=True,
                                                   help="Require `Authorization: Bearer KEY` (not on /health).")] = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", min=128, help="Context length of every loaded model.")] = 4096,
    threads: Threads = None,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1,
                                          help="Conversations served at once per GGUF model (llama.cpp sequences, "
                                               "decoded together; each its own --ctx of KV cache). ONNX: 1.")] = 1,
    memory_budget: Annotated[Optional[str], typer.Option("--memory-budget",
                                                         help="Memory all loaded models may use (e.g. 3G; default: what is available at start).")] = None,
    prompt_cache: Annotated[str, typer.Option("--prompt-cache",
                                              help="RAM per model for conversations set aside when their slot "
                                                   "serves another one, restored when they continue (0: off).")] = "256M",
    keep_alive: Annotated[str, typer.Option("--keep-alive", help="Unload a model loaded on demand after this long idle (5m, 1h; -1: never).")] = "5m",
    max_models: Annotated[int, typer.Option("--max-models", min=0, help="Most models loaded at once (0: the memory budget decides).")] = 0,
    queue: Annotated[int, typer.Option("--queue", min=0, help="Requests that may wait per model; beyond: 503 + Retry-After.")] = 8,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Default and upper limit of max_tokens.")] = 2048,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body (images included).")] = "32M",
    max_images: Annotated[int, typer.Option("--max-images", min=0, help="Most images in one request.")] = 8,
    max_image_pixels: Annotated[Optional[int], typer.Option("--max-image-pixels", min=1,
                                                            help="Downscale larger images (default: config, else 4 MP).")] = None,
    allow_image_urls: Annotated[bool, typer.Option("--allow-image-urls", help="Fetch http(s) image URLs (public addresses only).")] = False,
    allow_private_urls: Annotated[bool, typer.Option("--allow-private-urls", help="... also from loopback, private and link-local addresses.")] = False,
    media_dir: Annotated[Optional[Path], typer.Option("--media-dir", help="Allow image paths / file:// URLs under this folder.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", help="Allow browser requests from this origin (repeatable; * for any).")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option("--allowed-host", help="Also answer requests whose Host header is this name (repeatable; * for any). Default: the --host address, and localhost names on loopback.")] = None,
    max_decode_pixels: Annotated[int, typer.Option("--max-decode-pixels", min=1_000_000, help="Pixels one request's images may take to decode (JPEGs count at their reduced decode size); all requests together: twice this.")] = 36_000_000,
    grace: Annotated[float, typer.Option("--grace", min=0, help="Seconds in-flight requests get to finish after SIGTERM.")] = 10.0,
    ignore_memory: Annotated[bool, typer.Option("--ignore-memory", help="Load even if the memory estimate says it will not fit.")] = False,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request on stderr.")] = False,
    guard: Guard = None,
    guard_model: GuardModel = None,
    guard_categories: GuardCategories = None,
    gpu_layers: GpuLayers = None,
    kv_type: KvType = None,
) -> None:
    """Serve models over HTTP: OpenAI's /v1/chat/completions and /v1/models, Ollama's /api/chat,
    /api/generate and /api/tags, /health and /metrics.

    Examples: vlm serve smolvlm-256m ; vlm serve smollm2-135m --host 0.0.0.0 --api-key "$KEY"
    """
    import logging
    import signal

    from edgevlm.runtime.errors import MissingExtra, UsageError

    try:
        import uvicorn

        from edgevlm.runtime.serving.app import create_app
        from edgevlm.runtime.serving.pool import ModelPool
        from edgevlm.runtime.serving.settings import ServeSettings
    except ImportError as e:
        raise MissingExtra(f"{e.name or 'the server stack'} is not installed.", hint="pip install 'edgevlm[serve]'") from None

    if allow_private_urls and not allow_image_urls:
        raise UsageError("--allow-private-urls needs --allow-image-urls.")
    prompt_cache_bytes = _size(prompt_cache, "--prompt-cache") or 0
    if prompt_cache_bytes < 0:
        raise UsageError(f"--prompt-cache {prompt_cache!r} is negative.", hint="Give a size (e.g. 512M), or 0 to turn it off.")
    if media_dir is not None and not media_dir.expanduser().is_dir():
        raise UsageError(f"--media-dir {media_dir} is not a folder.")
    settings = ServeSettings(
        models=list(models or []), host=host, port=port, api_key=api_key or None, cors_origins=list(cors_origin or []),
        ctx=ctx, threads=threads, parallel=parallel, memory_budget=_size(memory_budget, "--memory-budget"),
        keep_alive_s=_duration(keep_alive), prompt_cache_bytes=prompt_cache_bytes, max_models=max_models, queue_size=queue, ignore_memory=ignore_memory,
        max_body_bytes=_size(max_body, "--max-body"), max_images=max_images, max_image_pixels=max_image_pixels,
        max_tokens=max_tokens, allow_image_urls=allow_image_urls, allow_private_urls=allow_private_urls,
        media_dir=media_dir.expanduser().resolve() if media_dir else None, grace_s=grace,
        allowed_hosts=list(allowed_host or []), max_decode_pixels=max_decode_pixels,
        decode_pixels_total=2 * max_decode_pixels)
    from edgevlm.runtime.reports.gpu import parse_gpu_layers

    from .common.guard import plan_guard

    settings.gpu_layers = parse_gpu_layers(gpu_layers)      # a bad value fails before anything loads
    from .common.acquire import resolve_kv_type

    settings.kv_type = resolve_kv_type(kv_type)

    gplan = plan_guard(guard, guard_model, guard_categories, main_ctx=ctx, yes=False)
    if gplan is not None:     # the guard is one more pinned model of the pool (its ref: the resolved file)
        settings.guard_mode, settings.guard_policy = gplan.mode, gplan.policy
        settings.guard_model = str(gplan.resolved.artifact.path)
    pool = ModelPool(settings)
    from edgevlm.runtime.reports.gpu import plan as gpu_plan

    for resolved in pool.prepare():     # unknown / missing / too-large models and a --gpu-layers the build
        gpu_plan(resolved, ctx, settings.gpu_layers)     # cannot honour fail here, before binding
    if not settings.loopback_only and not settings.api_key:
        console.warn(f"listening on {host} without an API key: anyone who can reach this address can use the "
                     "models. Pass --api-key or set VLM_API_KEY.")
    app = create_app(settings, pool)

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log = logging.getLogger("edgevlm.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    from edgevlm.runtime.serving.access import http_protocol

    # the HTTP parser caps the request line and headers while they arrive (431), httptools or h11 alike
    protocol = http_protocol(settings.max_header_bytes) or "h11"
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=grace, server_header=False, http=protocol,
                            h11_max_incomplete_event_size=settings.max_header_bytes)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            drain = getattr(app.state, "drain", None)
            if not self.should_exit and drain is not None:
                drain()         # answers still streaming when --grace runs out end with an error event
            super().handle_exit(sig, frame)

    server = Server(config)
    app.state.stop = lambda: setattr(server, "should_exit", True)
    what = ", ".join(settings.models) or "installed models on demand"
    console.info(f"Serving {what} on http://{host if ':' not in host else f'[{host}]'}:{port} "
                 "(OpenAI /v1, Ollama /api; /health, /metrics)")
    # uvicorn re-raises the SIGTERM it caught once it has drained; a drained server has done its job: exit 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    fatal = app.state.serve_state["fatal"]
    if fatal:
        from edgevlm.runtime.errors import BackendError

        raise BackendError(fatal)
    if not server.started:
        raise UsageError(f"Could not listen on {host}:{port} (in use, or not an address of this machine).",
                         hint="Pick another --port or --host.")
    console.info("[dim]Stopped.[/]")
