"""Admission and the memory budget of the model pool: how much a model takes loaded (our estimate, a KV
cache per --parallel slot, its prompt cache), how many conversations it serves at once, whether its
queue has room, the image-decoding reserve, and which idle models unload (least recently used first)
to make room for another.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from ..errors import InsufficientMemory
from .apierror import APIError
from .names import ModelNames
from .settings import ServeSettings

if TYPE_CHECKING:
    from ..loader import ResolvedModel
    from .lease import Entry


class MemoryBudget:
    def __init__(self, settings: ServeSettings, names: ModelNames, entries: dict[str, "Entry"]):
        self.settings = settings
        self.names = names
        self.entries = entries                  # the pool's entries (its dict: what is loaded or loading now)
        self._budget = settings.memory_budget

    def budget(self) -> int:
        if self._budget is None:
            from ..device.hardware import memory_info

            self._budget = memory_info().available
        return self._budget

    def n_slots(self, resolved: "ResolvedModel") -> int:
        """Conversations this model serves at once: --parallel where the backend has slots (GGUF: llama.cpp
        sequences), else 1."""
        if self.names.is_guard(resolved):
            return 1                          # the guard: one check at a time, each a prefill
        from ..backends import capabilities

        return max(1, self.settings.parallel) if capabilities(resolved.artifact.format).parallel_slots else 1

    def estimate(self, resolved: "ResolvedModel") -> int:
        """Bytes this model takes loaded: our memory estimate, with one KV cache per parallel slot."""
        from ..loader import estimate_memory

        est = estimate_memory(resolved, self.settings.ctx, self.kv_type(resolved))
        return est.total + est.kv_cache * (self.n_slots(resolved) - 1)

    def kv_type(self, resolved: "ResolvedModel") -> str:
        """--kv-type applies to the models whose backend takes it (the backend table); the others keep
        their KV cache in their own dtype."""
        from ..backends import kv_type_for

        art = resolved.artifact
        return kv_type_for(art.format, self.settings.kv_type) if art is not None else "f16"

    def prompt_cache_bytes(self, resolved: "ResolvedModel", need: int) -> int:
        """RAM for this model's saved conversations: --prompt-cache, or what the memory budget has left
        beside the loaded models and this one if that is less; the model's estimate includes it."""
        if self.names.is_guard(resolved):
            return 0                          # (the guard: one-off checks whose shared head stays in its slot)
        want = self.settings.prompt_cache_bytes
        if self.settings.ignore_memory:
            return want
        used = sum(e.estimate for e in self.entries.values())
        return max(0, min(want, self.budget() - self.image_reserve(resolved) - used - need))

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

    def check_pinned(self, models: list["ResolvedModel"]) -> None:
        """The command-line models fit the budget together (before the server starts)."""
        from ..device.memory import fmt_bytes

        total = sum(self.estimate(r) for r in models) + self.image_reserve(*models)
        slots = f" in each of {self.settings.parallel} slots" if self.settings.parallel > 1 else ""
        if total > self.budget() and not self.settings.ignore_memory:
            raise InsufficientMemory(
                f"{', '.join(self.settings.models)} need about {fmt_bytes(total)} together with a "
                f"{self.settings.ctx:,}-token context{slots} (image decoding included), more than the memory "
                f"budget ({fmt_bytes(self.budget())}).",
                hint=f"Serve fewer models, lower --ctx{' or --parallel' if slots else ''}, or raise --memory-budget "
                     "(or pass --ignore-memory).")

    def admit(self, entry: "Entry", metrics=None) -> None:
        """Room in this model's queue (its slots plus --queue-size waiting), or a 503 with Retry-After."""
        if entry.admitted >= entry.n_slots + self.settings.queue_size:
            if metrics:
                metrics.rejected.labels(entry.id).inc()
            raise APIError(503, f"The queue for {entry.id} is full ({self.settings.queue_size} waiting); retry later.",
                           type="server_error", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    def make_room(self, need: int, resolved: "ResolvedModel", unload: Callable[["Entry"], None]) -> None:
        """Unload idle models, least recently used first, until ``need`` more bytes fit (and --max-models
        allows one more); 503 when the busy ones leave no room, InsufficientMemory when it never fits."""
        from ..device.memory import fmt_bytes

        budget = self.budget() - self.image_reserve(resolved)
        name = self.names.model_id(resolved)
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
            unload(idle[0])
