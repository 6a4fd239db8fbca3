"""`vlm serve` against hostile and careless clients: a real server process on 127.0.0.1, real HTTP.

Every class of request that used to crash a handler (500 with a traceback), hold the event loop, pin
memory or reach the server from a web page: each now gets a 4xx with one clear message, /health keeps
answering, and the server log holds no traceback. Load goes to 127.0.0.1 only (the slow image peer too).
"""
from __future__ import annotations

import base64
import io
import json
import signal
import socket
import socketserver
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from test_serve import Server, png_data_uri

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

DECODE_MP = 12_000_000          # --max-decode-pixels of the server below (all requests together: twice)


@pytest.fixture(scope="module")
def hs(smollm2_gguf, vision_gguf, tmp_path_factory):
    """SmolLM2 and the vision fixture; image URLs allowed, loopback too (the slow peer is on 127.0.0.1)."""
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    s = Server(["smollm2-135m", vision_gguf, "--allow-image-urls", "--allow-private-urls", "--max-images", "8",
                "--max-decode-pixels", str(DECODE_MP), "--max-image-pixels", "250000",
                "--allowed-host", "models.example.test"], log)
    s.vision = Path(vision_gguf).name
    yield s
    assert s.stop() == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and " 500 " not in text, text


def _raw(s: Server, path: str, body: bytes, *, headers=None, timeout=60) -> httpx.Response:
    return httpx.post(s.url + path, content=body, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=timeout)


def _chat(model: str, content="hi", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def _no_500(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    doc = r.json()                                       # always JSON, even for what cannot be encoded
    assert doc["error"], doc
    if code and isinstance(doc["error"], dict):
        assert doc["error"]["code"] == code, doc


# --------------------------------------------------------------------------------------------
# request bytes: depth, surrogates, numbers, schemas
# --------------------------------------------------------------------------------------------

def test_deep_bodies_are_400(hs):
    deep_array = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    inside = json.dumps(_chat("smollm2-135m"))[:-1].encode() + b', "unknown": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    schema = {"type": "string"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"a": schema}}
    deep_schema = json.dumps(_chat("smollm2-135m", response_format={"type": "json_schema",
                                                                      "json_schema": {"name": "x", "schema": schema}}))
    for path in ("/v1/chat/completions", "/api/chat", "/api/generate"):
        for body in (deep_array, deep_object, inside, deep_schema.encode()):
            r = _raw(hs, path, body)
            _no_500(r, 400, None if path.startswith("/api/") else "invalid_json")
            assert "nested too deeply" in r.text
    fmt = {"model": "smollm2-135m", "prompt": "hi", "stream": False, "format": schema}
    _no_500(_raw(hs, "/api/generate", json.dumps(fmt).encode()), 400)


def test_lone_surrogates_and_non_finite_numbers_are_400(hs):
    bodies = [b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
              b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
              b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "\\ud83d": 1}',
              b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
              b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
              b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "seed": Infinity}']
    for body in bodies:
        for path in ("/v1/chat/completions", "/api/chat"):
            r = _raw(hs, path, body)
            _no_500(r, 400)
    r = _raw(hs, "/v1/chat/completions", bodies[0])
    assert r.json()["error"]["code"] == "invalid_unicode" and "U+D800" in r.json()["error"]["message"]
    # a surrogate in the URL path (percent-encoded UTF-8 of U+D800) is a plain 404
    assert httpx.get(hs.url + "/v1/models/%ED%A0%80").status_code == 404


def test_huge_keep_alive_is_bounded_and_ps_keeps_answering(hs):
    for ka in (1e308, 1e18, "99999999999999999999h", -1, "5m"):
        r = _raw(hs, "/api/generate", json.dumps({"model": "smollm2-135m", "keep_alive": ka}).encode())
        assert r.status_code == 200, (ka, r.text)
        ps = httpx.get(hs.url + "/api/ps")
        assert ps.status_code == 200, (ka, ps.text)
        assert all(m["expires_at"] for m in ps.json()["models"])
    for raw in (b"Infinity", b"-Infinity", b"NaN", b"1e999"):
        r = _raw(hs, "/api/generate", b'{"model": "smollm2-135m", "keep_alive": ' + raw + b"}")
        _no_500(r, 400)
    assert httpx.get(hs.url + "/api/ps").status_code == 200


def test_unsatisfiable_recursive_schema_is_400(hs):
    schema = {"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}},
              "$ref": "#/$defs/a"}
    body = _chat("smollm2-135m", max_tokens=256, temperature=0,
                 response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    r = _raw(hs, "/v1/chat/completions", json.dumps(body).encode(), timeout=300)
    _no_500(r, 400, "invalid_schema")
    assert "cannot be satisfied" in r.json()["error"]["message"]
    # streamed: the same 400 (the engine gives up before the first token is sent)
    r = _raw(hs, "/v1/chat/completions", json.dumps(dict(body, stream=True)).encode(), timeout=300)
    _no_500(r, 400, "invalid_schema")


class _Probe:
    """/health asked every 50 ms on its own thread; the slowest answer is what the loop was held for."""

    def __init__(self, url: str):
        self.url, self.times, self.errors = url, [], []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    assert c.get(self.url + "/health").status_code == 200
                except Exception as e:  # noqa: BLE001 - reported by the test
                    self.errors.append(repr(e))
                self.times.append(time.perf_counter() - t0)
                time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def test_huge_schema_does_not_hold_the_event_loop(hs):
    props = {f"property_{i:05d}": {"type": "string", "description": "x" * 30} for i in range(40_000)}
    body = json.dumps(_chat("smollm2-135m", response_format={"type": "json_schema", "json_schema": {
        "name": "big", "schema": {"type": "object", "properties": props}}})).encode()
    assert len(body) > 2_500_000
    with _Probe(hs.url) as quiet:
        time.sleep(1.0)
    with _Probe(hs.url) as busy:
        time.sleep(0.2)
        rs = []
        ts = [threading.Thread(target=lambda: rs.append(_raw(hs, "/v1/chat/completions", body))) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        time.sleep(0.2)
    for r in rs:
        _no_500(r, 400, "invalid_schema")
    assert not busy.errors, busy.errors
    print(f"/health: slowest {max(busy.times) * 1000:.0f} ms during three 2.7 MB schemas "
          f"({max(quiet.times) * 1000:.0f} ms when idle)")
    # the bar is 1 s (it took 7.7 s); on a loaded 2-core machine allow the quiet baseline's noise
    assert max(busy.times) < max(1.0, 3 * max(quiet.times)), (max(busy.times), max(quiet.times))
    # a schema within the limits still works
    ok = _chat("smollm2-135m", max_tokens=20, response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(200)}}}})
    assert _raw(hs, "/v1/chat/completions", json.dumps(ok).encode(), timeout=300).status_code == 200


# --------------------------------------------------------------------------------------------
# images: slow peers, the pixel budget, memory given back
# --------------------------------------------------------------------------------------------

class _SlowPeer(socketserver.ThreadingTCPServer):
    """An HTTP server on 127.0.0.1 that trickles: the headers (``/head``) or the body (``/body``) a byte at a time."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Trickle)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Trickle(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        req = self.request.recv(4096)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        try:
            if b"GET /head" in req:
                for i in range(len(head)):
                    self.request.sendall(head[i:i + 1])
                    time.sleep(0.5)
            else:
                self.request.sendall(head)
                for _ in range(100000):
                    self.request.sendall(b"\x89")
                    time.sleep(0.5)
        except OSError:
            pass


def _image_chat(model: str, *urls: str, **extra) -> dict:
    parts = [{"type": "text", "text": "What is it?"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 1, **extra}


def test_slow_image_peers_delay_only_their_own_requests(hs):
    peer = _SlowPeer()
    try:
        results: dict = {}

        def slow(i: int) -> None:
            t0 = time.monotonic()
            kind = "head" if i % 2 else "body"
            r = _raw(hs, "/v1/chat/completions", json.dumps(_image_chat(
                hs.vision, f"http://127.0.0.1:{peer.port}/{kind}/{i}.png")).encode())
            results[i] = (r, time.monotonic() - t0)

        threads = [threading.Thread(target=slow, args=(i,)) for i in range(8)]
        probe = _Probe(hs.url).__enter__()
        for t in threads:
            t.start()
        time.sleep(1.0)                                    # all eight are trickling now
        t0 = time.monotonic()
        r = _raw(hs, "/v1/chat/completions", json.dumps(_image_chat(hs.vision, png_data_uri())).encode())
        data_uri_s = time.monotonic() - t0
        for t in threads:
            t.join()
        probe.__exit__()
        print(f"/health at most {max(probe.times) * 1000:.0f} ms beside the trickling fetches")
        assert not probe.errors and max(probe.times) < 2.0, (probe.errors, max(probe.times))
        assert r.status_code == 200, r.text
        print(f"data: URI answered in {data_uri_s:.2f} s beside 8 trickling fetches; those ended after "
              f"{max(t for _, t in results.values()):.1f} s at most")
        assert data_uri_s < 8.0, data_uri_s               # it waited ~26 s behind them before
        for r, took in results.values():
            _no_500(r, 400, "invalid_image_url")
            assert "timed out after 10 s" in r.json()["error"]["message"]
            assert took < 14.0, took                      # one deadline for connect + headers + body: 10 s
    finally:
        peer.shutdown()
        peer.server_close()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 40)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_near_limit_images_are_bounded_and_memory_comes_back(hs):
    proc = psutil.Process(hs.proc.pid)
    near = "data:image/png;base64," + base64.b64encode(_png(3400, 3400)).decode()     # 11.6 MP, under 12
    bomb = "data:image/png;base64," + base64.b64encode(_png(14000, 14000)).decode()   # 196 MP, under 200
    r = _raw(hs, "/v1/chat/completions", json.dumps(_image_chat(hs.vision, near)).encode(), timeout=300)
    assert r.status_code == 200, r.text                    # warm: the first decode's arenas exist
    before = proc.memory_info().rss
    peak, stop = [before], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rs: list = []
    bodies = [_image_chat(hs.vision, near)] * 6 + [_image_chat(hs.vision, bomb)] * 3 + [_image_chat(hs.vision, near, near)]
    ts = [threading.Thread(target=lambda b=b: rs.append(_raw(hs, "/v1/chat/completions", json.dumps(b).encode(),
                                                             timeout=300))) for b in bodies]
    with _Probe(hs.url) as probe:                        # decoding happens off the loop: /health keeps answering
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    stop.set()
    assert not probe.errors and max(probe.times) < 2.0, (probe.errors, max(probe.times))
    sampler.join()
    time.sleep(0.5)
    after = proc.memory_info().rss
    codes = sorted(r.status_code for r in rs)
    assert codes == [200] * 6 + [413] * 4, [(r.status_code, r.text[:200]) for r in rs]
    for r in rs:
        if r.status_code == 413:
            assert r.json()["error"]["code"] == "image_too_large"
    budget = 2 * DECODE_MP * 6                               # all decodes together, at 6 bytes a pixel
    print(f"RSS before {before / 1e6:.0f} MB, peak {max(peak) / 1e6:.0f} MB, after {after / 1e6:.0f} MB "
          f"(decode budget {budget / 1e6:.0f} MB); /health at most {max(probe.times) * 1000:.0f} ms meanwhile")
    assert max(peak) - before < budget + 150e6, (before, max(peak))
    assert after - before < 200e6, (before, after)


# --------------------------------------------------------------------------------------------
# browsers: rebinding, simple cross-origin requests, big headers
# --------------------------------------------------------------------------------------------

def test_host_must_name_this_server(hs):
    body = json.dumps(_chat("smollm2-135m")).encode()
    for host in ("attacker.example", "attacker.example:%d" % hs.port, "127.0.0.1.nip.io", "localhost.evil.test"):
        r = _raw(hs, "/v1/chat/completions", body, headers={"Host": host})
        _no_500(r, 403, "host_not_allowed")
        assert "--allowed-host" in r.json()["error"]["message"]
        assert httpx.get(hs.url + "/api/tags", headers={"Host": host}).status_code == 403
        assert httpx.get(hs.url + "/health", headers={"Host": host}).status_code == 403
    for host in (f"127.0.0.1:{hs.port}", f"localhost:{hs.port}", "localhost", "[::1]", "models.example.test",
                 "app.localhost"):
        assert httpx.get(hs.url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_cross_origin_simple_posts_are_refused(hs):
    body = json.dumps(_chat("smollm2-135m")).encode()
    evil = {"Origin": "http://evil.example"}
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", ""):
        for path in ("/v1/chat/completions", "/api/chat"):
            r = httpx.post(hs.url + path, content=body, headers={"Content-Type": ctype, **evil}, timeout=60)
            _no_500(r, 415, None if path.startswith("/api/") else "unsupported_media_type")
    r = httpx.post(hs.url + "/v1/chat/completions", content=body, headers={"Content-Type": "text/plain"}, timeout=60)
    _no_500(r, 415, "unsupported_media_type")
    # what `curl -d` sends (form type, no Origin) still works; JSON with any origin reaches the route
    r = httpx.post(hs.url + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _raw(hs, "/v1/chat/completions", body, headers={"Content-Type": "application/json; charset=utf-8"}
                ).status_code == 200


def test_big_headers_are_refused(hs):
    r = httpx.get(hs.url + "/health", headers={"X-Big": "a" * 100_000})
    assert r.status_code == 431
    rss0 = psutil.Process(hs.proc.pid).memory_info().rss
    with socket.create_connection(("127.0.0.1", hs.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent, reply = 0, b""
        try:
            while sent < 20 * 2**20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass                                          # the server closed the connection: good
        try:
            reply = sock.recv(4096)
        except OSError:
            pass
    assert sent < 20 * 2**20 or reply.startswith(b"HTTP/1.1 431"), (sent, reply[:100])
    assert not reply or reply.startswith(b"HTTP/1.1 431"), reply[:100]
    assert psutil.Process(hs.proc.pid).memory_info().rss - rss0 < 16 * 2**20
    assert httpx.get(hs.url + "/health").status_code == 200


# --------------------------------------------------------------------------------------------
# SIGTERM: the grace period runs out mid-stream
# --------------------------------------------------------------------------------------------

def test_grace_expiry_ends_the_stream_with_an_error_event(smollm2_gguf, tmp_path):
    s = Server(["smollm2-135m", "--grace", "1"], tmp_path / "server.log")
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1000}
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "List numbers."}], "max_tokens": 2000,
            "temperature": 0, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        first = next(it)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        events = [first] + [line for line in it if line]
        took = time.monotonic() - t0
    assert s.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "Cancel" not in log, log
    last = json.loads(events[-1][6:])
    assert last["error"]["code"] == "shutting_down", events[-3:]
    assert "data: [DONE]" not in events and 0.5 < took < 10, took
    assert len(events) >= 3              # the role, the first token (sent before the headers are), the error


# --------------------------------------------------------------------------------------------
# the pieces on their own (no server)
# --------------------------------------------------------------------------------------------

def test_host_policy_per_bind():
    from edgevlm.runtime.serving.access import HostPolicy
    from edgevlm.runtime.serving.settings import ServeSettings

    loop = HostPolicy(ServeSettings(host="127.0.0.1"))
    assert all(loop.allows(h) for h in ("127.0.0.1:8080", "localhost", "LOCALHOST:1", "[::1]:8080", "a.localhost",
                                        "127.0.0.2"))
    assert not any(loop.allows(h) for h in ("evil.example", "10.0.0.1", "localhost.evil.example", "", "[::1"))
    lan = HostPolicy(ServeSettings(host="192.168.1.5", allowed_hosts=["pi.example", "Proxy.Example:443"]))
    assert lan.allows("proxy.example")
    assert lan.allows("192.168.1.5:8080") and lan.allows("pi.example") and lan.allows("PI.EXAMPLE.:80")
    assert not lan.allows("localhost") and not lan.allows("192.168.1.6") and not lan.allows("evil.example")
    anywhere = HostPolicy(ServeSettings(host="0.0.0.0"))
    assert anywhere.allows("10.1.2.3:8080") and anywhere.allows("[fe80::1]") and anywhere.allows("localhost")
    assert not anywhere.allows("evil.example")
    assert HostPolicy(ServeSettings(host="0.0.0.0", allowed_hosts=["*"])).allows("evil.example")


def test_bodies_bounds():
    from edgevlm.runtime.serving.apierror import APIError
    from edgevlm.runtime.serving.bodies import MAX_DEPTH, parse_json

    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    for bad in (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), b'{"a": "\\ud800"}', b'{"\\udc00": 1}', b'"\\ud800"',
                b"[NaN]", b"[1e400]", b"[-Infinity]", b"\xff\xfe\x00", b"{"):
        with pytest.raises(APIError) as e:
            parse_json(bad)
        assert e.value.status == 400 and e.value.message.encode("utf-8")
    assert parse_json('{"a": "\\ud83d\\ude00 é"}'.encode()) == {"a": "😀 é"}      # a proper pair is fine


def test_pixel_budget_is_first_come_first_served():
    import asyncio

    from edgevlm.runtime.serving.workers import PixelBudget

    async def main():
        b, order = PixelBudget(10), []

        async def take(name, n, hold):
            got = await b.acquire(n)
            order.append(name)
            await asyncio.sleep(hold)
            b.release(got)

        first = asyncio.ensure_future(take("a", 8, 0.05))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(take("b", 5, 0)), asyncio.ensure_future(take("c", 1, 0))]
        cancelled = asyncio.ensure_future(take("x", 9, 0))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(first, *rest)
        assert order == ["a", "b", "c"] and b.used == 0   # c (small) did not jump ahead of b
        assert await b.acquire(50) == 10                   # more than the whole: the whole, alone
        b.release(10)

    asyncio.run(main())


def test_images_to_a_text_model_are_refused_before_decoding(hs):
    bomb = "data:image/png;base64," + base64.b64encode(_png(14000, 14000)).decode()
    t0 = time.monotonic()
    r = _raw(hs, "/v1/chat/completions", json.dumps(_image_chat("smollm2-135m", bomb)).encode())
    _no_500(r, 422, "unprocessable")
    assert "no vision projector" in r.json()["error"]["message"] and time.monotonic() - t0 < 10


def test_memory_check_counts_the_image_decoding_bound(vision_gguf, smollm2_gguf):
    from edgevlm.runtime.errors import InsufficientMemory
    from edgevlm.runtime.serving.pool import ModelPool
    from edgevlm.runtime.serving.settings import ServeSettings
    from edgevlm.runtime.serving.workers import decode_reserve

    from conftest import MODELS_HOME

    def pool(models, budget):
        return ModelPool(ServeSettings(models=models, memory_budget=budget, home=MODELS_HOME))

    need = pool([vision_gguf], 1 << 40).estimate(pool([vision_gguf], 1 << 40).prepare()[0])
    reserve = decode_reserve(ServeSettings())
    assert reserve == 72_000_000 * 6
    with pytest.raises(InsufficientMemory, match="image decoding"):
        pool([vision_gguf], need + reserve - 1).prepare()
    pool([vision_gguf], need + reserve).prepare()
    text = pool(["smollm2-135m"], 1 << 40)
    assert pool(["smollm2-135m"], text.estimate(text.prepare()[0])).prepare()   # a text model: no reserve


def test_large_bodies_at_once_are_bounded_and_a_client_leaving_mid_body_is_no_error(hs):
    """--max-body bounds one body (32 MiB here); all bodies held at once are bounded too (4 x 32 MiB):
    a fifth client sending 29 MiB while four others hold theirs gets 503 + Retry-After, not more memory.
    The four then leave mid-body: no 500, no traceback."""
    body = b"x" * (29 << 20)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (30 << 20))
    rss0 = psutil.Process(hs.proc.pid).memory_info().rss
    held = []
    try:
        for _ in range(4):
            c = socket.create_connection(("127.0.0.1", hs.port), timeout=60)
            c.sendall(head + body)
            held.append(c)
        time.sleep(1.0)                                   # the server has read all four
        with socket.create_connection(("127.0.0.1", hs.port), timeout=60) as c:
            try:
                c.sendall(head + body)
            except OSError:
                pass                                       # it answered and closed before reading it all
            reply = c.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower(), reply[:300]
        assert b"server_busy" in reply
        assert psutil.Process(hs.proc.pid).memory_info().rss - rss0 < 300 << 20
    finally:
        for c in held:
            c.close()
    time.sleep(0.5)
    assert httpx.get(hs.url + "/health").status_code == 200
