"""The chunks of a generation on their way from the model's thread to the event loop (``ChunkStream``):
the model's thread puts, the request's task reads; a generation ends with ``_END`` or a ``_Failure``."""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Optional

from ..protocol import Chunk

_END = object()


@dataclass
class _Failure:
    error: BaseException


class _Mailbox:
    """Chunks on their way from the models' threads to one event loop, many per wake-up.

    Each ``call_soon_threadsafe`` writes the loop's self-pipe and wakes it (with the socket write, the
    largest share of the loop's work per streamed token). Under ``--parallel`` N slots hand in their
    tokens moments apart after each shared decode step; the first schedules one delivery, the others
    ride along with it."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False

    def post(self, stream: "ChunkStream", item) -> None:       # on a model's thread
        with self._lock:
            self._items.append((stream, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:                  # the loop is gone (shutdown): nobody reads any more
            with self._lock:
                items, self._items, self._scheduled = self._items, [], False
            for s, _item in items:
                s.cancelled.set()

    def _deliver(self) -> None:               # on the event loop
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for stream, item in items:
            stream._arrive(item)


_mailboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()


class ChunkStream:
    """The chunks of one generation, read on the event loop while the model's thread produces them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        box = _mailboxes.get(loop)
        if box is None:
            box = _mailboxes[loop] = _Mailbox(loop)
        self._box = box
        self._items: deque = deque()
        self._waiter: Optional[asyncio.Future] = None
        self.cancelled = threading.Event()
        self.done = False

    def put(self, item) -> None:              # on the model's thread
        self._box.post(self, item)

    def _arrive(self, item) -> None:          # on the event loop
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def cancel(self) -> None:
        self.cancelled.set()

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` now (on the event loop): the reader gets what already arrived,
        then the error; the generation stops after its current token."""
        if not self.done:
            self.cancel()
            self._arrive(_Failure(error))

    def __aiter__(self) -> "ChunkStream":
        return self

    async def __anext__(self) -> Chunk:
        if self.done:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except BaseException:
                self.cancel()
                raise
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self.done = True
            raise item.error
        return item


__all__ = ["ChunkStream"]
