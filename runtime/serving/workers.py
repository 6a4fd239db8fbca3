"""The server's work that must not run on the event loop, in bounded pools of its own, and the budget of
pixels image decoding may hold.

- ``checks``: parsing large bodies and checking JSON schemas (pure Python; the thread hands the GIL back
  every few milliseconds, so the loop keeps answering, /health included).
- ``decoder``: base64 and image decoding (Pillow releases the GIL while it decodes).
- ``fetcher``: image URLs, which mostly wait on their peer; every fetch of a request ends by one
  deadline (10 s, ``url_timeout_s``: connect, headers and body together), so a slow peer delays only the
  request that named it. Nothing here uses the loop's default executor, which other work shares.

Memory: before any image is decoded, its header says how many pixels the decode will hold (JPEGs
that are to be downscaled decode at a reduced DCT scale, 1/2 to 1/8 a side). A request may hold
``max_decode_pixels`` (36 M by default), all requests together ``decode_pixels_total`` (72 M):
beyond the first a 413, beyond the second the request waits its turn (first come, first served). At
the peak a decode holds about ``DECODE_BYTES_PER_PIXEL`` bytes a pixel (the decoded image, 4 bytes
a pixel in Pillow, plus the downscale's work), so the defaults bound decoding to ~430 MB for the whole
server; the pool's memory check reserves that much beside the models that take images. glibc keeps
freed blocks of a big decode in its arenas (RSS stayed gigabytes high after a burst): after one,
``malloc_trim`` gives them back.
"""
from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Optional

from .apierror import APIError
from .settings import ServeSettings

if TYPE_CHECKING:
    from ..protocol import ImageInput
    from .translate import Parsed

DECODE_BYTES_PER_PIXEL = 6
"""Peak bytes a pixel while decoding and downscaling (measured: RGB / palette / RGBA PNGs 5.5-5.6)."""

FETCH_THREADS = 16
_INLINE_REF = 64 * 1024            # data URIs this small are decoded from base64 on the loop (microseconds)
_TRIM_ABOVE = 4_000_000            # give memory back to the system after decodes this large


def decode_reserve(settings: ServeSettings) -> int:
    """Bytes all image decodes together may hold at once (what the memory check sets aside)."""
    return settings.decode_pixels_total * DECODE_BYTES_PER_PIXEL


class PixelBudget:
    """A counting semaphore in pixels, on the event loop, first come first served."""

    def __init__(self, total: int):
        self.total = max(1, total)
        self.used = 0
        self._waiters: deque = deque()

    async def acquire(self, n: int) -> int:
        n = min(max(0, n), self.total)
        if not self._waiters and self.used + n <= self.total:
            self.used += n
            return n
        fut = asyncio.get_running_loop().create_future()
        item = (n, fut)
        self._waiters.append(item)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)                 # granted as the request went away
            else:
                try:
                    self._waiters.remove(item)
                except ValueError:
                    pass
                self._wake()
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.used += n
            fut.set_result(None)


_LIBC: object = None


def trim_memory() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; a no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


class Workers:
    def __init__(self, settings: ServeSettings):
        cpus = os.cpu_count() or 1
        n = max(1, min(4, cpus // 2))
        self.settings = settings
        self.checks = ThreadPoolExecutor(n, thread_name_prefix="vlm-check")
        self.decoder = ThreadPoolExecutor(n, thread_name_prefix="vlm-decode")
        self.fetcher = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="vlm-fetch")
        self.budget = PixelBudget(settings.decode_pixels_total)

    async def check(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.checks, fn, *args)

    async def images(self, parsed: "Parsed", max_pixels: Optional[int]) -> list[list["ImageInput"]]:
        """Every image of ``parsed``, per message: read (fetched by one deadline), admitted against the
        pixel budgets from their headers, then decoded."""
        from ..inputs.media_budget import decode_cost
        from .images import image_bytes, is_url

        s = self.settings
        loop = asyncio.get_running_loop()
        refs = [ref for m in parsed.messages for ref in m.images]
        deadline = time.monotonic() + s.url_timeout_s

        async def source(ref):
            read = functools.partial(image_bytes, ref.ref, s, ref.param, base64_only=ref.base64_only,
                                     deadline=deadline)
            if is_url(ref.ref, ref.base64_only):
                try:
                    return await asyncio.wait_for(loop.run_in_executor(self.fetcher, read),
                                                  max(0.0, deadline - time.monotonic()) + 0.5)
                except asyncio.TimeoutError:
                    raise APIError(400, f"{ref.param}: fetching the image timed out after {s.url_timeout_s:g} s.",
                                   param=ref.param, code="invalid_image_url") from None
            if len(ref.ref) <= _INLINE_REF:
                return read()
            return await loop.run_in_executor(self.decoder, read)

        sources = await asyncio.gather(*(source(r) for r in refs))
        costs = await loop.run_in_executor(self.decoder, lambda: [decode_cost(d, max_pixels) for d, _, _ in sources])
        total = sum(costs)
        if total > s.max_decode_pixels:
            big = max(range(len(costs)), key=costs.__getitem__)
            raise APIError(413, f"{refs[big].param}: decoding the request's images would take {total / 1e6:.0f} "
                                f"megapixels; this server decodes at most {s.max_decode_pixels / 1e6:.0f} per request. "
                                "Send smaller images (the model sees a few megapixels at most).",
                           param=refs[big].param, code="image_too_large")
        granted = await self.budget.acquire(total)
        try:
            jobs = [loop.run_in_executor(self.decoder, _decode, data, display, max_pixels, ctype, cost)
                    for (data, ctype, display), cost in zip(sources, costs)]
            done = await asyncio.gather(*jobs, return_exceptions=True)   # all finished before the budget is freed
        finally:
            self.budget.release(granted)
        for r in done:
            if isinstance(r, BaseException):
                raise r
        out, it = [], iter(done)
        for m in parsed.messages:
            out.append([next(it) for _ in m.images])
        return out

    def close(self) -> None:
        for pool in (self.checks, self.decoder, self.fetcher):
            pool.shutdown(wait=False, cancel_futures=True)


def _decode(data: bytes, display: str, max_pixels: Optional[int], ctype: Optional[str], cost: int) -> "ImageInput":
    from .images import image_from_bytes

    try:
        return image_from_bytes(data, display, max_pixels, ctype)
    finally:
        if cost >= _TRIM_ABOVE:
            trim_memory()


__all__ = ["Workers", "PixelBudget", "decode_reserve", "trim_memory", "DECODE_BYTES_PER_PIXEL"]
