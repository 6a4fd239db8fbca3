"""The backend seam: the few types every backend speaks, and the Backend protocol itself.

Everything above a backend (sessions, history, media, JSON schema, bench) is written once against
these types. See docs/backend-interface.md for why the surface is this narrow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Protocol

if TYPE_CHECKING:
    import numpy

# on_progress(stage, done, total): total may be None when unknown.
ProgressCallback = Callable[[str, int, Optional[int]], None]


def report(cb: Optional[ProgressCallback], stage: str, done: int, total: Optional[int]) -> None:
    """Call ``cb`` when there is one: long work reports progress without caring who listens."""
    if cb is not None:
        cb(stage, done, total)


def prefixed(cb: Optional[ProgressCallback], prefix: str) -> Optional[ProgressCallback]:
    """``cb`` with every stage name prefixed (a step inside a bigger one)."""
    if cb is None:
        return None
    return lambda stage, done, total: cb(f"{prefix} {stage}", done, total)


@dataclass(frozen=True)
class ImageInput:
    """A decoded, normalised image ready for a backend: raw RGB pixels plus provenance."""

    rgb: bytes               # raw RGB8 pixels, row-major, width*height*3 (no re-encoding needed)
    width: int
    height: int
    source: str              # path, URL or "-" as the user gave it
    sha256: str              # of the original bytes the user gave us
    label: str = ""          # optional text placed before the image (e.g. a video timestamp)


@dataclass
class Message:
    role: str                                   # "system" | "user" | "assistant" | "tool"
    content: str
    images: list[ImageInput] = field(default_factory=list)
    # tool calling (generation/tools.py): an assistant turn's calls, in OpenAI's shape ({"id", "type",
    # "function": {"name", "arguments"}}); a "tool" turn's call id and function name
    tool_calls: list[dict] = field(default_factory=list)
    tool_call_id: Optional[str] = None
    name: Optional[str] = None


@dataclass(frozen=True)
class ImageDetail:
    """How much of each image the vision encoder sees, and whether its output may come from (and go to)
    the persistent image-embedding cache. ``level``: "high" is the model's own full tiling, "low" the
    smallest input it accepts (Idefics3/SmolVLM: the whole image as one tile), "auto" the most detail
    whose encode fits ``budget_s`` on this device (from its measured encode speed). ``max_tokens`` caps
    one image's tokens whatever the level. An image is never upscaled past the tiles it fills."""

    level: str = "auto"                      # "low" | "auto" | "high"
    max_tokens: Optional[int] = None         # --image-tokens
    budget_s: Optional[float] = None         # --image-budget (None: the default, see inputs/detail.py)
    cache: bool = True                       # False: --no-cache (neither read nor write)


@dataclass
class GenerationOptions:
    """How to generate: sampling, limits, stop strings, output constraint. The one options type: the CLI
    builds it, a session holds it, every request carries it."""

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
    draft: str = "auto"                          # --draft: auto | off | ngram (generation/draft.py)
    image_detail: ImageDetail = field(default_factory=ImageDetail)   # images: detail and cache
    tools: Optional[object] = None               # a generation.tools.ToolPlan: constrain to its call syntax


@dataclass
class ChatRequest:
    messages: list[Message]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    tools: Optional[list[dict]] = None           # OpenAI tool list for the chat template's `tools` variable


@dataclass
class Prefill:
    """What ``Backend.prefill`` did: the counts and the time that the answer's first chunk reports."""

    prompt_tokens: int            # tokens in the whole prompt (incl. reused and image positions)
    eval_tokens: int              # positions evaluated now (prompt minus the reused KV prefix)
    image_tokens: int = 0         # image embedding positions in the prompt
    image_encode_s: float = 0.0


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
    token_ids: Optional[list[int]] = None  # last chunk only: the generated ids (no end-of-generation token)
    draft_tokens: int = 0         # last chunk only: drafted tokens checked against the model (--draft)
    draft_accepted: int = 0       # ... and how many of them it accepted


# The context when none is asked for (capped at the model's trained context), everywhere.
DEFAULT_CTX = 4096


@dataclass
class LoadOptions:
    n_ctx: int = DEFAULT_CTX
    n_threads: Optional[int] = None     # None: physical cores
    n_batch: int = 512
    seed: int = -1
    mmproj: Optional[Path] = None
    n_gpu_layers: int = 0
    # Conversations one context serves at once (GGUF: llama.cpp sequences, each with its own n_ctx
    # positions of KV cache; see Backend.slots). 1 everywhere but `vlm serve --parallel N`.
    n_seq: int = 1
    # Bytes of RAM for conversations saved when their KV cache is needed for another one and restored
    # when they continue (backends/prompt_cache.py; `vlm serve --prompt-cache`). 0: none.
    prompt_cache_bytes: int = 0
    # llama.cpp RPC (GGUF): workers' HOST:PORT, the layers kept on this host, the others' shares per worker
    rpc: list[str] = field(default_factory=list)
    host_layers: Optional[int] = None
    worker_shares: Optional[list[float]] = None
    # What the KV cache stores K and V in (--kv-type; device/memory.py KV_TYPES): "f16", or llama.cpp's
    # "q8_0" / "q4_0" (GGUF only; a quantized V cache runs with flash attention).
    kv_type: str = "f16"


@dataclass
class Artifact:
    """A model artifact on disk, whatever its origin (registry, quantize output, user path)."""

    format: str                      # "gguf" | "onnx"
    path: Path                       # the model file (gguf) or directory (onnx)
    name: str                        # registry alias or file name
    mmproj: Optional[Path] = None
    context_length: Optional[int] = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, known without loading it: the backend table answers
    (``backends.capabilities(format)``), so nothing outside the backends asks "is this GGUF?"."""

    parallel_slots: bool = False     # LoadOptions.n_seq > 1: one context serving N conversations (vlm serve --parallel)
    rpc: bool = False                # LoadOptions.rpc: layers spread over `vlm worker` hosts
    gpu_offload: bool = False        # LoadOptions.n_gpu_layers on a CUDA / Metal build
    projector_vision: bool = False   # reads images exactly when a projector file comes with the model (GGUF's
                                     # mmproj): known before loading
    kv_types: tuple = ("f16",)       # what LoadOptions.kv_type (--kv-type) may ask its KV cache to store; f16
                                     # alone: the engine keeps the KV cache in the dtype the model was exported with
    drafting: bool = False           # verifies drafted tokens (--draft; per model: Backend.draft_rows)


class TextStream(Protocol):
    """Generated token ids -> text, correct across multi-byte characters split between tokens."""

    def feed(self, token: int) -> str: ...

    def flush(self) -> str: ...


class Backend(Protocol):
    """What differs between engines: loading, evaluating tokens and images into a KV cache, and reading
    the logits. The decode loop, sampling, constraints, stop strings and timings are written once above
    it (``runtime/generation/core.py``)."""

    format: ClassVar[str]
    artifact: Optional[Artifact]
    chat_template: Optional[str]     # the model's own template, None for plain-completion models
    n_ctx: int                       # positions the KV cache holds
    n_threads: int
    load_s: float
    # What the last prefill did with its images (None without images): per image the detail chosen,
    # tiles, tokens, encode seconds and cache hit; "cut" when auto chose less than the model's full
    # tiling; "warning" when the embedding cache could not be written.
    image_report: Optional[dict]

    @property
    def has_vision(self) -> bool: ...

    def load(self, artifact: Artifact, opts: LoadOptions, on_progress: Optional[ProgressCallback] = None) -> None: ...

    # --- the generation seam
    def prefill(self, request: ChatRequest) -> Prefill:
        """Render and tokenize the request's prompt, keep the KV prefix it shares with the cache, encode
        its images and evaluate the rest; afterwards ``logits()`` is the next token's distribution.
        Raises ContextOverflow when the prompt does not fit."""
        ...

    def logits(self) -> "numpy.ndarray":
        """float32 [n_vocab] for the position after the last evaluated one; the caller may modify it in
        place; valid until the next ``eval``."""
        ...

    def eval(self, token: int) -> None:
        """Append ``token`` to the KV cache and evaluate it."""
        ...

    def eval_tokens(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the KV cache and evaluate them in one batch (tokens a constraint forces);
        afterwards ``logits()`` is the distribution after the last one, as after ``eval`` of each (up to
        the float rounding of a batched matrix product)."""
        ...

    def draft_rows(self) -> int:
        """The most tokens ``eval_rows`` evaluates in one call, each with its logits row exactly as a step by
        step evaluation would give it (the drafted tokens one verification checks, plus one); 0 when this
        backend cannot verify drafts (ONNX exports that return the last row only, a recurrent memory that
        cannot cut back, a ``--parallel`` slot)."""
        ...

    def eval_rows(self, tokens: list[int]) -> "numpy.ndarray":
        """Append ``tokens`` (at most ``draft_rows()``) to the KV cache and evaluate them in one batch;
        returns float32 [n, n_vocab]: row i is the distribution after ``tokens[i]`` (rows modifiable in place,
        valid until the next evaluation). ``logits()`` is then the last row."""
        ...

    def drop_last(self, n: int) -> None:
        """Forget the last ``n`` positions of the KV cache (drafted tokens the model did not accept)."""
        ...

    def kv_keys(self) -> list:
        """What each KV position holds, in order: a token id (an int), or a key of another type for an image
        position. The caller only reads it."""
        ...

    def kv_used(self) -> int: ...

    def is_eog(self, token: int) -> bool: ...

    def eog_ids(self) -> set[int]: ...

    def text_stream(self) -> TextStream:
        """A detokenizer for the tokens generated after the last prefill."""
        ...

    def constraint_tokenizer(self):
        """An ``llguidance.LLTokenizer`` for this model's vocabulary (built once, cached)."""
        ...

    def score(self, token_ids: list[int], *, batched: bool = True) -> "numpy.ndarray":
        """Logits [n, n_vocab] after each of ``token_ids``, from an empty cache: in one batch, as a prompt
        is evaluated, or (``batched=False``) one token at a time, as tokens are generated. Leaves the
        KV cache empty."""
        ...

    # --- tokens and state
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        ...

    def kv_cache_bytes(self) -> Optional[int]: ...

    def describe(self) -> dict: ...

    def slots(self) -> list["Backend"]:
        """Views of this backend that generate concurrently, one conversation each, on threads of the
        caller's (``vlm serve --parallel``): each is a Backend for ``generate``, and its caller calls
        ``end_generation`` when a generation on it ends, however it ends (the others stop waiting for its
        next token). ``[self]`` for a backend that serves one at a time."""
        ...

    def end_generation(self) -> None:
        """See ``slots``: a no-op for a backend that serves one conversation at a time."""
        ...

    def close(self) -> None: ...
