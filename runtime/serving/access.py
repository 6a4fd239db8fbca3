"""Who may use the server, checked before any route runs: the API key, and what a web page may not
make the server do.

A browser sends some requests cross-origin without asking first (no CORS preflight): GETs, and POSTs
whose body is ``text/plain``, form data or has no type. CORS only keeps the page from *reading* the
answer; the request itself runs. And a page on an attacker's domain that resolves to 127.0.0.1 (DNS
rebinding) is, to the browser, same-origin with the server: it can read everything. Hence:

- ``Host`` must name this server: the address it listens on, the localhost names for a loopback bind, any
  IP literal and this machine's host name (also ``NAME.local``) for a wildcard bind (0.0.0.0, ::), or a
  name given with ``--allowed-host`` (``*``: any).
  Else 403 ``host_not_allowed``. A rebinding page's requests carry its own domain as Host.
- The JSON routes take JSON: ``Content-Type: application/json`` (or ``+json``). A body with no type or
  form encoding (what ``curl -d`` sends) is accepted only without an ``Origin`` header, which browsers
  add to every POST and other clients do not; anything else is 415 ``unsupported_media_type``.
- Request line and headers together are capped (``max_header_bytes``, 64 KiB): 431. The HTTP parser
  counts them while they arrive (``http_protocol``), before they can pile up in memory.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Optional

from starlette.responses import JSONResponse

from .apierror import APIError
from .settings import ServeSettings, is_loopback_host

_LOCAL_NAMES = ("localhost", "localhost.", "ip6-localhost")
_JSON_ROUTES = ("/v1/chat/completions", "/chat/completions", "/api/chat", "/api/generate")


def _ip(text: str) -> Optional[ipaddress._BaseAddress]:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def host_name(header: str) -> str:
    """The host part of a Host header value, lower case: ``[::1]:8080`` -> ``::1``."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h


class HostPolicy:
    def __init__(self, settings: ServeSettings):
        self.listen = settings.host.strip("[]").lower()
        self.listen_ip = _ip(self.listen)
        self.wildcard = self.listen_ip is not None and self.listen_ip.is_unspecified
        self.loopback = is_loopback_host(self.listen) or self.wildcard
        self.names = {host_name(h).rstrip(".") for h in settings.allowed_hosts}      # (a port given is ignored)
        self.any = "*" in self.names
        if self.wildcard:           # this machine's own names: how LAN clients (Open WebUI, ...) reach it
            import socket

            me = socket.gethostname().lower().rstrip(".")
            if me:
                self.names |= {me, me.split(".", 1)[0], me.split(".", 1)[0] + ".local"}

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        name = host_name(host)
        if name.startswith("["):             # an unclosed IPv6 literal
            return False
        if name.rstrip(".") in self.names or name == self.listen:
            return True
        if self.loopback and (name in _LOCAL_NAMES or name.endswith(".localhost")):
            return True
        ip = _ip(name)
        if ip is None:
            return False
        if self.wildcard:          # an address of some interface: rebinding needs a name, not an address
            return True
        return ip == self.listen_ip or (self.loopback and ip.is_loopback)


def _refuse(scope, err: APIError) -> JSONResponse:
    body = err.ollama_body() if scope["path"].startswith("/api/") else err.openai_body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _is_json(ctype: str) -> bool:
    main = ctype.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


class BrowserGuardMiddleware:
    """Host allow-list, JSON-only bodies, header size (see the module docstring)."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.hosts = HostPolicy(settings)
        self.max_header_bytes = settings.max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = ctype = origin = None
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        for name, value in scope["headers"]:
            size += len(name) + len(value) + 4
            if name == b"host":
                host = value
            elif name == b"content-type":
                ctype = value
            elif name == b"origin":
                origin = value
        err = None
        if size > self.max_header_bytes:
            err = APIError(431, f"The request's headers are larger than this server's limit of "
                                f"{self.max_header_bytes} bytes.", code="headers_too_large")
        elif host is not None and not self.hosts.allows(host.decode("latin-1")):
            shown = host.decode("latin-1")[:100]
            err = APIError(403, f"The Host header `{shown}` does not name this server (DNS rebinding is refused); "
                                f"start it with --allowed-host {host_name(shown) or 'NAME'} to answer to that name.",
                           type="permission_error", code="host_not_allowed")
        elif scope["method"] == "POST" and scope["path"] in _JSON_ROUTES:
            c = (ctype or b"").decode("latin-1")
            plain = not c.strip() or c.split(";", 1)[0].strip().lower() == "application/x-www-form-urlencoded"
            if not _is_json(c) and (origin is not None or not plain):
                err = APIError(415, f"The request body must be JSON (send `Content-Type: application/json`; "
                                    f"got `{c[:80] or 'none'}`).", code="unsupported_media_type")
        if err is not None:
            return await _refuse(scope, err)(scope, receive, send)
        return await self.app(scope, receive, send)


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but /health (and CORS preflights, which browsers send
    without credentials). Compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                auth = value
                break
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if token and hmac.compare_digest(token, self.key):
            return await self.app(scope, receive, send)
        err = APIError(401, "Missing or invalid API key (send `Authorization: Bearer KEY`).",
                       type="authentication_error", code="invalid_api_key")
        body = err.ollama_body() if scope["path"].startswith("/api/") else err.openai_body()
        resp = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


def http_protocol(max_header_bytes: int):
    """uvicorn's httptools protocol with a cap on the request line and headers while they arrive (431 and
    the connection closed past it); None without httptools (uvicorn's h11 takes
    ``h11_max_incomplete_event_size`` instead)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class CappedHeaders(HttpToolsProtocol):
        _head = 0
        _in_head = True

        def on_message_begin(self) -> None:
            self._head, self._in_head = 0, True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head += len(data)
            super().data_received(data)
            if self._in_head and self._head > max_header_bytes and not self.transport.is_closing():
                msg = f"The request's headers are larger than this server's limit of {max_header_bytes} bytes."
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
                                     b"charset=utf-8\r\nconnection: close\r\ncontent-length: "
                                     + str(len(msg)).encode() + b"\r\n\r\n" + msg.encode())
                self.transport.close()

    return CappedHeaders


__all__ = ["APIKeyMiddleware", "BrowserGuardMiddleware", "HostPolicy", "http_protocol", "host_name"]
