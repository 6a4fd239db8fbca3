"""``vlm serve --guard``: Llama Guard 3 judges each question before the model sees it and/or each answer
before the client does. The guard is one more pooled model (loaded at start, never unloaded while
serving, one conversation at a time); its verdict costs one prefill on its own thread, and the
backend's KV-prefix reuse keeps the fixed preamble (task line + categories) evaluated across checks.

A blocked request is not an error: it is answered with ``finish_reason: "content_filter"`` (OpenAI's
own value for it) and an empty message, and the verdict rides in an extra ``guard`` field. With the
output check on, a streamed answer is held until it has been judged (as `vlm ask --guard output`):
nothing unsafe ever reaches the client.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from ..protocol import Message
    from .pool import ModelPool


class ServerGuard:
    def __init__(self, pool: "ModelPool", mode: str, model: str, policy=None) -> None:
        from ..generation.guard import checks_input, checks_output

        self.pool, self.model, self.policy = pool, model, policy
        self.checks_input, self.checks_output = checks_input(mode), checks_output(mode)
        self._guards: dict[int, object] = {}           # id(backend) -> generation.guard.Guard

    async def check(self, messages: Sequence["Message"], answer: Optional[str] = None):
        """The verdict on the last question (``answer`` None) or on ``answer`` to it."""
        from ..generation.guard import Guard

        lease = await self.pool.acquire(self.model)
        name = lease.entry.id

        def work(backend):
            try:
                g = self._guards.get(id(backend))
                if g is None or g.backend is not backend:
                    g = self._guards[id(backend)] = Guard(backend, self.policy, name=name)
                return g.check_input(messages) if answer is None else g.check_output(messages, answer)
            finally:
                backend.end_generation()

        return await lease.run(work)


def record(verdicts: dict) -> dict:
    """The ``guard`` field of an answer: each check's label, the categories named, seconds."""
    out = {"input": None, "output": None, "categories": [], "seconds": {}}
    for which, v in verdicts.items():
        out[which] = v.label
        out["seconds"][which] = round(v.seconds, 4)
        out["categories"] += [c for c in v.categories if c not in out["categories"]]
    return out


__all__ = ["ServerGuard", "record"]
