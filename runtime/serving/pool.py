"""Loaded models: one backend per model file, a worker thread and a bounded queue each, kept within a
memory budget (least recently used unloads first) and unloaded after ``keep_alive`` idle.

A backend is not thread-safe and keeps its KV cache between calls (a request that continues a
conversation evaluates only its new tokens), so each model has its own threads and nothing else
touches it: loading and generating run there, closing runs after them. The event loop only hands
requests to them and reads chunks back. Requests to one model run one at a time, or ``--parallel N``
at a time on a GGUF model (``Backend.slots``: N sequences of one context, each on a thread of its own,
their decode steps batched by the backend); at most ``queue_size`` more wait (beyond that: 503 with
Retry-After). A request goes to the free slot whose last conversation shares the longest prefix with
it, so a follow-up turn finds its KV cache (and its images) still there. A request whose client went
away stops its generation after the current token: its slot is free for the next one at once.
"""
from __future__ import annotations

import asyncio
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import InsufficientMemory, ModelNotFound
from ..protocol import ChatRequest, LoadOptions
from .apierror import APIError
from .settings import ServeSettings
from .streams import _END, ChunkStream, _Failure

if TYPE_CHECKING:
    from ..loader import ResolvedModel
    from ..protocol import Backend

@dataclass
class Entry:
    """One model file: its backend (once loaded), its thread, its queue."""

    key: str                                   # the model file's path: aliases of one file share the entry
    id: str                                    # the name /v1/models shows
    resolved: "ResolvedModel"
    estimate: int                              # bytes, from our memory estimate
    pinned: bool                               # named on the command line: no idle unload
    keep_alive_s: Optional[float]
    executor: ThreadPoolExecutor
    n_slots: int = 1                           # conversations at once (--parallel for GGUF, else 1)
    prompt_cache_bytes: int = 0                # RAM for saved conversations (counted in estimate)
    backend: Optional["Backend"] = None
    slots: list = field(default_factory=list)  # backend.slots(), once loaded
    free: list = field(default_factory=list)   # indexes of slots no request holds
    sem: Optional[asyncio.Semaphore] = None
    closer: Optional[threading.Thread] = None
    load_future: Optional[asyncio.Future] = None
    admitted: int = 0                          # requests holding a place: waiting or running
    running: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float = 0.0
    load_s: float = 0.0

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    @property
    def loading(self) -> bool:
        return self.load_future is not None and not self.load_future.done()

    @property
    def idle(self) -> bool:
        return self.admitted == 0 and not self.loading


class Lease:
    """A request's turn on a model: ``stream(request)`` runs the generation on the model's thread and
    yields its chunks; the model is released when that generation ends (or never starts)."""

    def __init__(self, pool: "ModelPool", entry: Entry):
        self.pool = pool
        self.entry = entry
        self._released = False
        self._slot: Optional[int] = None

    @property
    def backend(self) -> "Backend":
        assert self.entry.backend is not None
        return self.entry.backend

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        e = self.entry
        e.running -= 1
        e.admitted -= 1
        e.last_used = time.monotonic()
        if self._slot is not None:
            e.free.append(self._slot)
        e.sem.release()
        self.pool._changed(e)

    def _take_slot(self, request: Optional[ChatRequest]) -> "Backend":
        """The free slot whose last conversation shares the longest prefix with ``request``'s prompt; on a
        tie the lowest (llama.cpp splits a step whose sequence ids are not consecutive into ubatches)."""
        e = self.entry
        best = min(e.free)
        if request is not None and len(e.free) > 1:        # only --parallel slots (gguf_slots) get here
            import os.path

            try:
                text = self.backend.render(request)
            except Exception:                  # noqa: BLE001 - the prefill reports a template error
                text = ""
            best = max(e.free, key=lambda i: (len(os.path.commonprefix([e.slots[i].last_text, text])), -i))
        e.free.remove(best)
        self._slot = best
        return e.slots[best]

    def run(self, fn: Callable, request: Optional[ChatRequest] = None):
        """Run ``fn(slot)`` on one of the model's threads with a free slot of it (the backend itself
        unless --parallel), releasing the lease when it returns."""
        loop = asyncio.get_running_loop()
        slot = self._take_slot(request)
        fut = loop.run_in_executor(self.entry.executor, fn, slot)
        fut.add_done_callback(lambda _f: self.release())
        return fut

    def stream(self, request: ChatRequest, whole: bool = False) -> "ChunkStream":
        """Start ``generate(backend, request)`` on the model's thread; its chunks come back through the
        returned stream. ``ChunkStream.cancel()`` (client gone, task cancelled) stops the generation
        after the current token. ``whole``: an answer that is not streamed comes back as two chunks,
        the first token's (errors and TTFT as before) and the rest in one: the event loop is not woken
        per token for nothing (on a busy 2-core machine that did not measurably change decode speed; it
        saves the loop ~0.1 ms of work per token)."""
        import dataclasses

        from ..generation.core import generate

        stream = ChunkStream(asyncio.get_running_loop())
        self.pool.streams.add(stream)

        def work(backend) -> None:
            gen = generate(backend, request)
            held: list[str] = []
            first = True
            try:
                for chunk in gen:
                    if stream.cancelled.is_set():
                        break
                    if whole and not first and chunk.finish_reason is None:
                        held.append(chunk.text)
                        continue
                    if held:
                        chunk = dataclasses.replace(chunk, text="".join(held) + chunk.text)
                    first = False
                    stream.put(chunk)
            except BaseException as e:       # noqa: BLE001 - handed to the request, which maps it
                stream.put(_Failure(e))
                return
            finally:
                gen.close()                  # GeneratorExit inside generate: finish "cancelled"
                backend.end_generation()     # the other slots stop waiting for this one's tokens
            stream.put(_END)

        self.run(work, request)
        return stream


def _warm_up(slot: "Backend") -> None:
    """One token through a freshly loaded model before any request (llama-server warms up too): the
    first answer otherwise paid for the chat template's compile, lazy imports and llama.cpp's first
    graph on the thread that computes (SmolLM2-135M: ~0.15 s). Leaves no trace: the KV cache
    is cleared and the slot remembers no conversation. A model that cannot answer a chat message (no
    template, say) still loads: its requests report their own errors."""
    from ..generation.core import complete
    from ..protocol import GenerationOptions, Message

    try:
        complete(slot, ChatRequest([Message("user", "Hi")], GenerationOptions(max_tokens=1, temperature=0)))
    except Exception:                 # noqa: BLE001 - a warm-up only saves time
        pass
    finally:
        slot.end_generation()
        slot.reset()
        if hasattr(slot, "last_text"):
            slot.last_text = ""


class ModelPool:
    def __init__(self, settings: ServeSettings, metrics=None):
        self.settings = settings
        self.metrics = metrics
        self.entries: dict[str, Entry] = {}
        self._named: dict[str, str] = {}        # names a command-line model answers to -> the ref given
        self._resolved: dict[str, "ResolvedModel"] = {}
        self._budget = settings.memory_budget
        self._reaper: Optional[asyncio.Task] = None
        self.closing = False
        self.expired = False                    # the shutdown grace period is over: nothing more starts
        self.streams: "weakref.WeakSet[ChunkStream]" = weakref.WeakSet()

    # -- names -------------------------------------------------------------------------------------
    def resolve(self, model_id: Optional[str]) -> "ResolvedModel":
        """The model a request names: a command-line model (by the name it was given, its alias or file
        name), or any installed registry model (alias or alias:quant). Paths from clients are refused:
        a request must not make the server open arbitrary files."""
        from ..loader import _looks_like_path, resolve

        if not model_id:
            if len(self.settings.models) == 1:
                model_id = self.settings.models[0]
            else:
                raise APIError(400, "`model` is required.", param="model", code="missing_model")
        ref = self._named.get(model_id, model_id)
        hit = self._resolved.get(ref)
        if hit is not None:
            return hit
        if _looks_like_path(ref) and ref not in self.settings.models:
            raise APIError(404, f"The model `{model_id}` does not exist.", code="model_not_found", param="model")
        try:
            resolved = resolve(ref, want_vision=True, home=self.settings.home)
        except ModelNotFound as e:
            raise APIError(404, f"The model `{model_id}` does not exist ({e.message}).", code="model_not_found",
                           param="model") from None
        if not resolved.installed:
            raise APIError(404, f"The model `{model_id}` is not installed on this server (run `vlm pull "
                                f"{resolved.alias_ref}` on it).", code="model_not_found", param="model")
        self._resolved[ref] = resolved
        return resolved

    def prepare(self) -> list["ResolvedModel"]:
        """Resolve the command-line models before the server starts (a typo fails the command, not the
        first request) and check that they fit the memory budget together."""
        from ..device.memory import fmt_bytes
        from ..errors import ModelNotInstalled
        from ..loader import resolve

        out, total = [], 0
        for ref in self.pinned_refs():
            resolved = resolve(ref, want_vision=ref != self.settings.guard_model, home=self.settings.home)
            if not resolved.installed:
                raise ModelNotInstalled(f"{resolved.alias_ref} is not installed.",
                                        hint=f"Run `vlm pull {resolved.alias_ref}` first.")
            self._resolved[ref] = resolved
            for name in {self.model_id(resolved), resolved.name, resolved.artifact.path.name}:
                self._named.setdefault(name, ref)
            total += self.estimate(resolved)
            out.append(resolved)
        total += self.image_reserve(*out)
        slots = f" in each of {self.settings.parallel} slots" if self.settings.parallel > 1 else ""
        if total > self.budget() and not self.settings.ignore_memory:
            raise InsufficientMemory(
                f"{', '.join(self.settings.models)} need about {fmt_bytes(total)} together with a "
                f"{self.settings.ctx:,}-token context{slots} (image decoding included), more than the memory "
                f"budget ({fmt_bytes(self.budget())}).",
                hint=f"Serve fewer models, lower --ctx{' or --parallel' if slots else ''}, or raise --memory-budget "
                     "(or pass --ignore-memory).")
        return out

    def pinned_refs(self) -> list[str]:
        """The command-line models, and the guard model when --guard is on: loaded at start, kept loaded."""
        guard = [self.settings.guard_model] if self.settings.guard_mode and self.settings.guard_model else []
        return list(self.settings.models) + [g for g in guard if g not in self.settings.models]

    def model_id(self, resolved: "ResolvedModel") -> str:
        return resolved.alias_ref if resolved.model is not None else resolved.name

    # -- admission, loading, eviction ---------------------------------------------------------------
    async def acquire(self, model_id: Optional[str], keep_alive_s: Optional[float] = -1.0) -> Lease:
        """Wait for this model's turn (loading it first when needed). 503 at once when its queue is full.
        ``keep_alive_s``: -1 keeps the entry's setting; None never unloads; 0 unloads after this request."""
        if self.closing:
            raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
        resolved = self.resolve(model_id)
        entry = self._entry_for(resolved)
        limit = entry.n_slots + self.settings.queue_size
        if entry.admitted >= limit:
            if self.metrics:
                self.metrics.rejected.labels(entry.id).inc()
            raise APIError(503, f"The queue for {entry.id} is full ({self.settings.queue_size} waiting); retry later.",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if keep_alive_s is None or (keep_alive_s is not None and keep_alive_s >= 0):
            entry.keep_alive_s = keep_alive_s
        entry.admitted += 1
        self._changed(entry)
        locked = False
        try:
            if entry.sem is None:                      # set on the event loop once the load is done
                await asyncio.shield(self._ensure_loading(entry))
            await entry.sem.acquire()
            locked = True
            if self.expired:
                raise APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            if entry.backend is None:                 # unloaded while we waited (cannot happen while admitted)
                raise APIError(503, f"{entry.id} was unloaded; retry.", type="server_error",
                               headers={"Retry-After": "1"})
        except BaseException:
            if locked:
                entry.sem.release()
            entry.admitted -= 1
            self._changed(entry)
            raise
        entry.running += 1
        self._changed(entry)
        return Lease(self, entry)

    def _entry_for(self, resolved: "ResolvedModel") -> Entry:
        key = str(resolved.artifact.path)
        entry = self.entries.get(key)
        if entry is not None:
            return entry
        est = self.estimate(resolved)
        self._make_room(est, resolved)
        cache = self.prompt_cache_bytes(resolved, est)
        pinned = any(self._resolved.get(r) is resolved for r in self.pinned_refs())
        n = self.n_slots(resolved)
        entry = Entry(key=key, id=self.model_id(resolved), resolved=resolved, estimate=est + cache, pinned=pinned,
                      prompt_cache_bytes=cache,
                      keep_alive_s=None if pinned else self.settings.keep_alive_s, n_slots=n,
                      executor=ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"vlm-{resolved.name}"[:24]))
        self.entries[key] = entry
        return entry

    def _is_guard(self, resolved: "ResolvedModel") -> bool:
        return bool(self.settings.guard_model) and self._resolved.get(self.settings.guard_model) is resolved

    def n_slots(self, resolved: "ResolvedModel") -> int:
        """Conversations this model serves at once: --parallel where the backend has slots (GGUF: llama.cpp
        sequences), else 1."""
        if self._is_guard(resolved):
            return 1                          # the guard: one check at a time, each a prefill
        from ..backends import capabilities

        return max(1, self.settings.parallel) if capabilities(resolved.artifact.format).parallel_slots else 1

    def estimate(self, resolved: "ResolvedModel") -> int:
        """Bytes this model takes loaded: our memory estimate, with one KV cache per parallel slot."""
        from ..loader import estimate_memory

        est = estimate_memory(resolved, self.settings.ctx, self._kv_type(resolved))
        return est.total + est.kv_cache * (self.n_slots(resolved) - 1)

    def _kv_type(self, resolved: "ResolvedModel") -> str:
        """--kv-type applies to GGUF models; an ONNX decoder keeps its KV cache in its own dtype."""
        art = resolved.artifact
        return self.settings.kv_type if art is not None and art.format == "gguf" else "f16"

    def prompt_cache_bytes(self, resolved: "ResolvedModel", need: int) -> int:
        """RAM for this model's saved conversations: --prompt-cache, or what the memory budget has left
        beside the loaded models and this one if that is less; the model's estimate includes it."""
        if self._is_guard(resolved):
            return 0                          # (the guard: one-off checks whose shared head stays in its slot)
        want = self.settings.prompt_cache_bytes
        if self.settings.ignore_memory:
            return want
        used = sum(e.estimate for e in self.entries.values())
        return max(0, min(want, self.budget() - self.image_reserve(resolved) - used - need))

    def budget(self) -> int:
        if self._budget is None:
            from ..device.hardware import memory_info

            self._budget = memory_info().available
        return self._budget

    def takes_images(self, resolved: "ResolvedModel") -> Optional[bool]:
        """Whether this model reads images: from its backend once loaded, else from its files (a GGUF
        model needs a projector beside it); None when only loading it would tell."""
        entry = self.entries.get(str(resolved.artifact.path))
        if entry is not None and entry.backend is not None:
            return bool(entry.backend.has_vision)
        from ..backends import capabilities

        if capabilities(resolved.artifact.format).projector_vision:
            return resolved.artifact.mmproj is not None
        return None

    def image_reserve(self, *models: "ResolvedModel") -> int:
        """Bytes set aside for decoding images (workers.decode_reserve) when a model that may read them is
        loaded or about to be: the memory check counts them beside the models."""
        from .workers import decode_reserve

        vision = any(self.takes_images(r) is not False for r in models) or any(
            self.takes_images(e.resolved) is not False for e in self.entries.values())
        return decode_reserve(self.settings) if vision and self.settings.max_images > 0 else 0

    def expire(self) -> None:
        """The shutdown grace period is over: every answer still streaming ends now with an error (the
        client sees an error event, not a cut connection), and nothing waiting starts."""
        self.expired = True
        err = APIError(503, "The server is shutting down: the grace period for answers in progress ended.",
                       type="server_error", code="shutting_down")
        for stream in list(self.streams):
            stream.fail(err)

    def _make_room(self, need: int, resolved: "ResolvedModel") -> None:
        from ..device.memory import fmt_bytes

        budget = self.budget() - self.image_reserve(resolved)
        name = self.model_id(resolved)
        if need > budget and not self.settings.ignore_memory:
            raise InsufficientMemory(
                f"{name} needs about {fmt_bytes(need)}, more than this server's memory budget ({fmt_bytes(budget)}).",
                hint="Start the server with a smaller --ctx or a larger --memory-budget.")

        def over() -> bool:
            used = sum(e.estimate for e in self.entries.values())
            too_many = self.settings.max_models and len(self.entries) >= self.settings.max_models
            return bool(too_many) or (not self.settings.ignore_memory and used + need > budget)

        while over():
            idle = sorted((e for e in self.entries.values() if e.idle), key=lambda e: e.last_used)
            if not idle:
                raise APIError(503, f"Not enough memory to load {name} while other models are busy; retry later.",
                               type="server_error", code="insufficient_memory", headers={"Retry-After": "5"})
            self.unload(idle[0])

    def _ensure_loading(self, entry: Entry) -> asyncio.Future:
        if entry.load_future is None:
            loop = asyncio.get_running_loop()
            entry.load_future = loop.run_in_executor(entry.executor, self._load, entry)
            entry.load_future.add_done_callback(lambda f: self._loaded(entry, f))
            self._changed(entry)
        return entry.load_future

    def _load(self, entry: Entry) -> None:
        from ..loader import load_backend

        t0 = time.perf_counter()
        from ..reports.gpu import plan as gpu_plan

        opts = LoadOptions(n_ctx=self.settings.ctx, n_threads=self.settings.threads, n_seq=entry.n_slots,
                           prompt_cache_bytes=entry.prompt_cache_bytes, kv_type=self._kv_type(entry.resolved))
        gpu = gpu_plan(entry.resolved, self.settings.ctx, self.settings.gpu_layers)   # 0 on a CPU-only build
        opts.n_gpu_layers = gpu.layers if gpu is not None else 0
        backend = load_backend(entry.resolved.artifact, opts)
        entry.slots = backend.slots()
        entry.backend = backend
        _warm_up(entry.slots[0])
        entry.load_s = time.perf_counter() - t0

    def _loaded(self, entry: Entry, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            if self.entries.get(entry.key) is entry:       # a failed load leaves nothing behind: retry loads again
                del self.entries[entry.key]
            entry.executor.shutdown(wait=False)
        else:
            entry.free = list(range(len(entry.slots)))
            entry.sem = asyncio.Semaphore(len(entry.slots))
            entry.loaded_at = time.time()
            entry.last_used = time.monotonic()
        self._changed(entry)

    async def preload(self) -> None:
        """Load the command-line models, one after another (startup; /health says 503 until done)."""
        for ref in self.pinned_refs():
            lease = await self.acquire(ref)
            lease.release()

    def unload(self, entry: Entry) -> None:
        """Forget ``entry``; its backend is closed once everything still running on its threads is done."""
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.closer is not None:
            return

        def close() -> None:
            entry.executor.shutdown(wait=True)
            if entry.backend is not None:
                entry.backend.close()
                entry.backend = None
            entry.slots = []

        entry.closer = threading.Thread(target=close, name=f"vlm-close-{entry.id}"[:24], daemon=True)
        entry.closer.start()
        self._changed(entry)

    # -- keep-alive ---------------------------------------------------------------------------------
    def start_reaper(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for e in list(self.entries.values()):
                if e.keep_alive_s is not None and e.backend is not None and e.idle and now - e.last_used >= e.keep_alive_s:
                    self.unload(e)

    def _changed(self, entry: Entry) -> None:
        if self.metrics is not None:
            self.metrics.observe_entry(entry, entry.key in self.entries)

    @property
    def loading(self) -> bool:
        return any(e.loading for e in self.entries.values())

    def loaded(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.backend is not None]

    async def close(self) -> None:
        """Shutdown: no new requests; close every backend on its thread once its work is done."""
        self.closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        entries = list(self.entries.values())
        for e in entries:
            self.unload(e)

        def join() -> None:
            for e in entries:
                if e.closer is not None:
                    e.closer.join()

        await asyncio.get_running_loop().run_in_executor(None, join)


__all__ = ["ModelPool", "Lease", "Entry", "ChunkStream"]
