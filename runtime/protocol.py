"""The backend seam: the few types every backend speaks, and the Backend protocol itself.

Everything above a backend (sessions, history, media, JSON schema, bench) is written once against
these types. See docs/backend-interface.md for why the surface is this narrow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Protocol

# on_progress(stage, done, total): total may be None when unknown.
ProgressCallback = Callable[[str, int, Optional[int]], None]


@dataclass(frozen=True)
class ImageInput:
    """A decoded, normalised image ready for a backend: raw RGB pixels plus provenance."""

    rgb: bytes               # raw RGB8 pixels, row-major, width*height*3 (no re-encoding needed)
    width: int
    height: int
    source: str              # path, URL or "-" as the user gave it
    sha256: str              # of the original bytes the user gave us
    label: str = ""          # optional text placed before the image (e.g. a video timestamp)

    def encode(self, fmt: str = "PNG") -> bytes:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.frombytes("RGB", (self.width, self.height), self.rgb).save(buf, format=fmt)
        return buf.getvalue()


@dataclass
class Message:
    role: str                                   # "system" | "user" | "assistant"
    content: str
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class ChatRequest:
    messages: list[Message]
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    json_schema: Optional[dict] = None           # constrain output to this schema
    raw: bool = False                            # plain completion: no chat template


@dataclass
class Chunk:
    """One piece of a streamed answer. The last chunk has ``finish_reason`` set and final counts."""

    text: str
    prompt_tokens: int = 0        # tokens in the whole prompt this turn (incl. cached and image tokens)
    prompt_eval_tokens: int = 0   # tokens actually evaluated this turn (prompt minus reused KV prefix)
    image_tokens: int = 0         # image embedding positions in this turn's prompt
    completion_tokens: int = 0
    prefill_s: float = 0.0        # time to evaluate the prompt (incl. image encode)
    image_encode_s: float = 0.0
    decode_s: float = 0.0         # time spent generating after the first token
    ttft_s: float = 0.0           # from stream() call to first token
    finish_reason: Optional[str] = None   # "stop" | "length" | "cancelled"


@dataclass
class LoadOptions:
    n_ctx: int = 4096
    n_threads: Optional[int] = None     # None: physical cores
    n_batch: int = 512
    seed: int = -1
    mmproj: Optional[Path] = None
    n_gpu_layers: int = 0


@dataclass
class Artifact:
    """A model artifact on disk, whatever its origin (registry, quantize output, user path)."""

    format: str                      # "gguf" | "onnx"
    path: Path                       # the model file (gguf) or directory (onnx)
    name: str                        # registry alias or file name
    mmproj: Optional[Path] = None
    chat_format: Optional[str] = None    # None: use the template embedded in the model
    context_length: Optional[int] = None
    vision: bool = False


class Backend(Protocol):
    format: ClassVar[str]
    supports_images: ClassVar[bool]

    def load(self, artifact: Artifact, opts: LoadOptions, on_progress: Optional[ProgressCallback] = None) -> None: ...

    def stream(self, request: ChatRequest) -> Iterator[Chunk]: ...

    def count_tokens(self, text: str) -> int: ...

    def kv_cache_bytes(self) -> Optional[int]: ...

    def close(self) -> None: ...
