"""What the operator chose for `vlm serve`: one value object the app, the pool and the translators read."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..protocol import DEFAULT_CTX

MiB = 1024 * 1024


@dataclass
class ServeSettings:
    models: list[str] = field(default_factory=list)      # loaded at start, stay loaded (LRU may still evict)
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered besides the listen address
    max_header_bytes: int = 64 * 1024                    # request line + headers
    # models
    ctx: int = DEFAULT_CTX
    threads: Optional[int] = None
    parallel: int = 1
    gpu_layers: Optional[int] = None                     # GGUF layers on the GPU; None: all that fit (reports.gpu)
    kv_type: str = "f16"                                 # --kv-type of GGUF models (ONNX keep their own dtype)
    draft: str = "auto"                                  # --draft: a request's default (its `draft` overrides it)
    memory_budget: Optional[int] = None                  # bytes; None: memory available at start
    keep_alive_s: Optional[float] = 300.0                # idle unload of models loaded on demand; None: never
    max_models: int = 0                                  # 0: the memory budget alone decides
    queue_size: int = 8                                  # waiting requests per model beyond the one running
    ignore_memory: bool = False
    # conversations saved in RAM when their slot is needed for another, per model (backends/prompt_cache.py)
    prompt_cache_bytes: int = 256 * MiB
    home: Optional[Path] = None
    # inputs
    max_body_bytes: int = 32 * MiB
    max_images: int = 8                                  # per request
    max_image_pixels: Optional[int] = None               # downscale above this; None: config / media default
    max_tokens: int = 2048                               # cap and default for max_tokens
    allow_image_urls: bool = False                       # http(s) image URLs
    allow_private_urls: bool = False                     # ... to loopback / private / link-local addresses
    media_dir: Optional[Path] = None                     # local paths allowed only under this folder
    url_timeout_s: float = 10.0                          # one deadline for all of a request's fetches
    # images decoded at once (workers.py): pixels held by decodes, per request and for all requests together
    max_decode_pixels: int = 36_000_000
    decode_pixels_total: int = 72_000_000
    # the safety filter (Llama Guard 3, runtime/generation/guard.py): input | output | both, or None
    guard_mode: Optional[str] = None
    guard_model: Optional[str] = None                    # a model reference, resolved like the models above
    guard_policy: Optional[object] = None                # generation.guard.Policy; None: the default categories
    # lifecycle
    grace_s: float = 10.0                                # SIGTERM: in-flight requests get this long
    retry_after_s: int = 2                               # sent with 503 when a queue is full

    @property
    def loopback_only(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
