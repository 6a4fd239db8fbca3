"""Caption through `vlm serve` (or any OpenAI-compatible server) instead of a model loaded here.

Each endpoint gets as many requests at once as it has slots (llama-server says how many at ``/props``;
otherwise ``slots`` as given, default 1), all endpoints take work from one queue, so a fast board takes
more images than a slow one. A request that fails for a reason of the server's (no connection, a 5xx,
503 queue full, 429, a timeout) goes back to the queue for another endpoint, and that endpoint rests for
a while (1 s, doubling to 30 s); when every endpoint has been failing for the request timeout, the job
stops (resume continues it) rather than turning the archive into error records. An answer about the
image itself (400 not an image, 413 too big) becomes the image's error record. When the queue is empty
and an image has been out for more than twice the usual answer time, an idle endpoint asks too and the
first answer wins, so one slow board does not hold the end of the job. Only the standard library: no
client package to install on a board.
"""
from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from ..errors import BackendError, UsageError

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_FATAL_STATUS = {401, 403, 404}         # wrong key or no such model: this endpoint is no use for the job


class ServerFailed(Exception):
    """The endpoint, not the image, failed this request: try another one."""

    def __init__(self, message: str, fatal: bool = False, retry_after: Optional[float] = None):
        super().__init__(message)
        self.fatal = fatal
        self.retry_after = retry_after


class ImageRefused(Exception):
    """The server answered, about this image: 4xx for the input. It becomes the image's error record."""


@dataclass
class Endpoint:
    url: str                              # base URL, without /v1
    slots: int = 1
    api_key: Optional[str] = None
    down_until: float = 0.0
    backoff: float = 0.0
    dead: Optional[str] = None            # why it is no use for this job (bad key, unknown model)
    failing_since: Optional[float] = None # start of the current run of failures (None after a success)
    last_error: str = ""
    answered: int = 0
    failures: int = 0


def parse_servers(text: str) -> list[str]:
    urls = []
    for u in (x.strip() for x in text.split(",")):
        if not u:
            continue
        if "://" not in u:
            u = "http://" + u
        if not u.startswith(("http://", "https://")):
            raise UsageError(f"--server {u}: only http:// and https:// URLs.", hint="e.g. --server http://pi1:8080")
        u = u.rstrip("/")
        if u.endswith("/v1"):
            u = u[:-3]
        urls.append(u)
    if not urls:
        raise UsageError("--server needs at least one URL.", hint="e.g. --server http://pi1:8080,http://pi2:8080")
    return list(dict.fromkeys(urls))


def _request(ep: Endpoint, method: str, path: str, body: Optional[dict], timeout: float) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(ep.url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if ep.api_key:
        req.add_header("Authorization", f"Bearer {ep.api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()                  # (IncompleteRead when the peer dies mid-body: a server failure)
    except urllib.error.HTTPError as e:
        try:
            doc = json.loads(e.read() or b"{}")
            msg = (doc.get("error") or {}).get("message") if isinstance(doc.get("error"), dict) else doc.get("error")
        except (ValueError, AttributeError, OSError):
            msg = None
        msg = f"{ep.url} answered {e.code}" + (f": {msg}" if msg else f" {e.reason}")
        if e.code in _RETRY_STATUS:
            ra = e.headers.get("Retry-After") if e.headers else None
            raise ServerFailed(msg, retry_after=float(ra) if ra and ra.isdigit() else None) from None
        if e.code in _FATAL_STATUS or (e.code == 422 and "cannot read images" in msg):
            raise ServerFailed(msg, fatal=True) from None       # (422: its model has no vision projector)
        raise ImageRefused(msg) from None
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise ServerFailed(f"{ep.url}: {reason}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ServerFailed(f"{ep.url} answered something that is not JSON.") from None
    if not isinstance(doc, dict):
        raise ServerFailed(f"{ep.url} answered something that is not a JSON object.")
    return doc


def probe(ep: Endpoint, timeout: float = 10.0) -> tuple[Optional[int], list[str]]:
    """(slots the server reports, the model ids it lists). llama-server reports ``total_slots`` at /props;
    a server that reports none leaves the count to the caller."""
    slots = None
    try:
        props = _request(ep, "GET", "/props", None, timeout)
        n = props.get("total_slots")
        slots = n if isinstance(n, int) and n > 0 else None
    except (ServerFailed, ImageRefused):
        pass
    models = []
    try:
        doc = _request(ep, "GET", "/v1/models", None, timeout)
        models = [m.get("id") for m in doc.get("data") or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    except (ServerFailed, ImageRefused):          # down now: the job still tries it (it may come back)
        pass
    return slots, models


@dataclass
class Ask:
    """What every request carries (the CLI's options)."""
    prompt: str
    model: Optional[str] = None
    max_tokens: int = 128
    temperature: float = 0.0
    seed: Optional[int] = None
    extra: dict = field(default_factory=dict)   # more sampling keys for the body (top_p, stop...), as given
    detail: Optional[str] = None          # low / auto / high, sent as OpenAI's image_url.detail
    json_schema: Optional[dict] = None
    timeout: float = 600.0


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def ask_one(ep: Endpoint, ask: Ask, path: str) -> dict:
    """One image to one endpoint: the parts of a caption record the answer gives (raises ServerFailed,
    ImageRefused, or OSError when the file cannot be read here)."""
    image = {"url": _data_uri(path)}
    if ask.detail:
        image["detail"] = ask.detail
    body: dict = {"messages": [{"role": "user", "content": [{"type": "text", "text": ask.prompt},
                                                              {"type": "image_url", "image_url": image}]}],
                  "max_tokens": ask.max_tokens, "temperature": ask.temperature, "stream": False}
    if ask.model:
        body["model"] = ask.model
    if ask.seed is not None:
        body["seed"] = ask.seed
    body.update(ask.extra)
    if ask.json_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "caption", "schema": ask.json_schema, "strict": True}}
    t0 = time.perf_counter()
    doc = _request(ep, "POST", "/v1/chat/completions", body, ask.timeout)
    wall = time.perf_counter() - t0
    try:
        choice = doc["choices"][0]
        text = choice["message"]["content"] or ""
        if not isinstance(text, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise ServerFailed(f"{ep.url} answered without a text choices[0].message.content.") from None
    u = doc.get("usage") or {}
    t = doc.get("timings") or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", t.get("cache_n", 0)) or 0
    pt, ct = u.get("prompt_tokens", 0) or 0, u.get("completion_tokens", 0) or 0
    usage = {"prompt_tokens": pt, "prompt_eval_tokens": max(0, pt - cached), "image_tokens": t.get("image_tokens"),
             "completion_tokens": ct, "total_tokens": u.get("total_tokens", pt + ct)}

    def sec(ms):
        return round(ms / 1000, 4) if isinstance(ms, (int, float)) else None
    timings = {"ttft_s": sec(t.get("ttft_ms")), "prefill_s": sec(t.get("prompt_ms")),
               "image_encode_s": sec(t.get("image_encode_ms")), "decode_s": sec(t.get("predicted_ms")),
               "prefill_tokens_per_s": t.get("prompt_per_second"), "decode_tokens_per_s": t.get("predicted_per_second"),
               "total_s": round(wall, 4)}
    return {"text": text, "finish_reason": choice.get("finish_reason"), "usage": usage, "timings": timings,
            "model": doc.get("model"), "server": ep.url}


@dataclass
class _Item:
    idx: int
    path: str
    attempts: int = 0
    out: list = field(default_factory=list)    # endpoints it is out on now
    since: float = 0.0
    hedged: bool = False
    errors: list = field(default_factory=list)


class Dispatcher:
    """Spreads images over endpoints (threads: ``slots`` per endpoint) and yields ``(idx, result)`` as
    answers arrive, on the caller's thread: ``result`` is ask_one's dict, or ``{"error": ..., "hint": ...}``
    for an image that failed (the server refused it, or no endpoint answered after ``max_attempts``)."""

    def __init__(self, endpoints: list[Endpoint], ask: Ask, *, max_attempts: int = 0, give_up_s: float = 0,
                 ask_fn: Callable[[Endpoint, Ask, str], dict] = ask_one, on_event: Optional[Callable[[str], None]] = None):
        self.endpoints = endpoints
        # every endpoint failing for this long stops the job (resume continues it): a fleet that is down
        # must not turn a whole archive into error records
        self.give_up_s = give_up_s or ask.timeout
        self.ask = ask
        self.ask_fn = ask_fn
        self.max_attempts = max_attempts or 2 + 2 * len(endpoints)
        self.on_event = on_event or (lambda msg: None)
        self._cv = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._out: dict[int, _Item] = {}
        self._results: deque[tuple[int, dict]] = deque()
        self._left = 0
        self._durations: list[float] = []
        self._stop = False

    # -- workers -------------------------------------------------------------------------------------
    def _hedge_candidate(self, ep: Endpoint) -> Optional[_Item]:
        if not self._durations:
            return None
        limit = max(2.0 * statistics.median(self._durations[-50:]), 1.0)
        now = time.monotonic()
        old = [it for it in self._out.values() if not it.hedged and ep not in it.out and now - it.since > limit]
        return min(old, key=lambda it: it.since) if old else None

    def _take(self, ep: Endpoint) -> Optional[_Item]:
        with self._cv:
            while True:
                if self._stop or self._left == 0 or ep.dead:
                    return None
                now = time.monotonic()
                if ep.down_until > now:
                    self._cv.wait(ep.down_until - now)
                    continue
                if self._queue:
                    it = self._queue.popleft()
                    it.since = now
                    it.out.append(ep)
                    self._out[it.idx] = it
                    return it
                it = self._hedge_candidate(ep)
                if it is not None:
                    it.hedged = True
                    it.out.append(ep)
                    self.on_event(f"{it.path}: slow at {it.out[0].url}; asking {ep.url} too")
                    return it
                self._cv.wait(0.5)

    def _finish(self, it: _Item, ep: Endpoint, result: dict, took: Optional[float]) -> None:
        with self._cv:
            if ep in it.out:
                it.out.remove(ep)
            if it.idx not in self._out:               # answered already (a hedged copy won)
                return
            del self._out[it.idx]
            if took is not None:
                self._durations.append(took)
            self._results.append((it.idx, result))
            self._left -= 1
            self._cv.notify_all()

    def _failed(self, it: _Item, ep: Endpoint, err: ServerFailed) -> None:
        with self._cv:
            ep.failures += 1
            ep.last_error = str(err)
            if ep.failing_since is None:
                ep.failing_since = time.monotonic()
            if err.fatal:
                ep.dead = str(err)
            else:
                ep.backoff = min(30.0, ep.backoff * 2 if ep.backoff else 1.0)
                ep.down_until = time.monotonic() + max(ep.backoff, err.retry_after or 0)
            self.on_event(str(err) + ("; not using it for this job" if err.fatal else f"; resting {ep.backoff:.0f} s"))
            if ep in it.out:
                it.out.remove(ep)
            if it.idx not in self._out:
                return
            it.attempts += 1
            it.errors.append(str(err))
            if it.out:                                  # a hedged copy is still out: let it answer
                return
            del self._out[it.idx]
            if it.attempts >= self.max_attempts or all(e.dead for e in self.endpoints):
                self._results.append((it.idx, {"error": f"No server answered: {it.errors[-1]}",
                                               "hint": "Check the servers; --resume retries this image."}))
                self._left -= 1
            else:
                it.hedged = False
                self._queue.appendleft(it)
            self._cv.notify_all()

    def _worker(self, ep: Endpoint) -> None:
        while True:
            it = self._take(ep)
            if it is None:
                return
            t0 = time.monotonic()
            try:
                res = self.ask_fn(ep, self.ask, it.path)
            except ServerFailed as e:
                self._failed(it, ep, e)
                continue
            except ImageRefused as e:
                res = {"error": str(e)}
            except OSError as e:
                res = {"error": f"Cannot read {it.path}: {e.strerror or e}"}
            except Exception as e:  # noqa: BLE001 - one bad answer must not stop the other threads
                res = {"error": f"{type(e).__name__}: {e}"}
            else:
                with self._cv:
                    ep.answered += 1
                    ep.backoff = 0.0
                    ep.failing_since = None
            self._finish(it, ep, res, time.monotonic() - t0 if "error" not in res else None)

    # -- the caller's side -----------------------------------------------------------------------------
    def _check_fleet(self) -> None:
        if all(e.dead for e in self.endpoints):       # 401/403/404 everywhere: a setting, not an outage
            raise UsageError("No server takes this job: " + "; ".join(e.dead or "" for e in self.endpoints),
                             hint="Check the URLs, --model and --api-key (or VLM_API_KEY); --resume continues "
                                  "where this stopped.")
        now = time.monotonic()
        if all(e.dead or (e.failing_since is not None and now - e.failing_since >= self.give_up_s)
               for e in self.endpoints):
            last = max((e for e in self.endpoints if not e.dead), key=lambda e: e.failing_since or 0)
            raise BackendError(f"No server has answered for {self.give_up_s:.0f} s (last: {last.last_error}).",
                               hint="Check the servers; --resume continues where this stopped.")

    def run(self, paths: list[str]) -> Iterator[tuple[int, dict]]:
        self._check_fleet()
        with self._cv:
            self._queue.extend(_Item(i, p) for i, p in enumerate(paths))
            self._left = len(paths)
        threads = [threading.Thread(target=self._worker, args=(ep,), daemon=True, name=f"caption-{ep.url}")
                   for ep in self.endpoints for _ in range(max(1, ep.slots))]
        for t in threads:
            t.start()
        try:
            while True:
                with self._cv:
                    while not self._results and self._left > 0:
                        self._check_fleet()
                        self._cv.wait(0.5)
                    batch = list(self._results)
                    self._results.clear()
                    left = self._left
                yield from batch
                if left == 0 and not batch:
                    return
        finally:
            with self._cv:
                self._stop = True                    # threads still waiting on a slow server are daemons
                self._cv.notify_all()


__all__ = ["Endpoint", "Ask", "Dispatcher", "ServerFailed", "ImageRefused", "parse_servers", "probe", "ask_one"]
