"""Images named by a request: data URIs and base64 always; http(s) URLs only when the operator allows
them, never to loopback / private / link-local addresses unless allowed too; local paths only under a
media folder. Every image goes through the media guards (sniffing, decompression bombs, pixel caps).

Address checks happen after DNS resolution, and the connection goes to the address that was checked
(no second lookup a rebinding DNS server could answer differently); redirects are checked hop by hop.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit

from ..protocol import ImageInput
from .apierror import APIError
from .settings import ServeSettings

_MAX_REDIRECTS = 3


def _bad(message: str, param: Optional[str]) -> APIError:
    return APIError(400, message, param=param, code="invalid_image_url")


def image_from_bytes(data: bytes, source: str, max_pixels: Optional[int], content_type: Optional[str] = None) -> ImageInput:
    """Decode bytes a client sent with the same guards as ``load_image`` (sniffing, bomb limit, pixel cap)."""
    from ..inputs import media

    return media.image_from_bytes(data, source, max_pixels=max_pixels, content_type=content_type)


def decode_base64(text: str, param: str) -> bytes:
    s = "".join(text.split())
    try:
        core = s.rstrip("=")
        s = core + "=" * (-len(core) % 4)     # padding optional
        if "-" in s or "_" in s:          # the URL-safe alphabet
            return base64.b64decode(s, altchars=b"-_", validate=True)
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{param} is not valid base64.", param) from None


def load_image_ref(ref: str, settings: ServeSettings, max_pixels: Optional[int], param: str, *,
                   base64_only: bool = False) -> ImageInput:
    """One image from a request, read and decoded (blocking: call it off the event loop)."""
    data, ctype, display = image_bytes(ref, settings, param, base64_only=base64_only)
    return image_from_bytes(data, display, max_pixels, ctype)


def is_url(ref: str, base64_only: bool = False) -> bool:
    return not base64_only and ref[:8].lower().startswith(("http://", "https://"))


def image_bytes(ref: str, settings: ServeSettings, param: str, *, base64_only: bool = False,
                deadline: Optional[float] = None) -> tuple[bytes, Optional[str], str]:
    """The bytes of one image a request names, their content type when known, and the name errors use
    (blocking). ``base64_only``: Ollama's ``images``, which are bare base64 (or data URIs), never URLs or
    paths. ``deadline`` (time.monotonic) ends a fetch: connect, headers and body together."""
    if not isinstance(ref, str) or not ref:
        raise _bad(f"{param} must be a non-empty string (a data: URI or a URL).", param)
    if base64_only and not ref.startswith("data:"):
        data = decode_base64(ref, param)
        if not data:
            raise _bad(f"{param} holds no image bytes.", param)
        return data, None, f"{param} (base64)"
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _bad(f"{param}: a data URI must be base64 (data:image/png;base64,...).", param)
        mime = head[5:-7] or None
        data = decode_base64(payload, param)
        if not data:
            raise _bad(f"{param} holds no image bytes.", param)
        return data, mime, f"{param} (data URI)"
    scheme = ref.split(":", 1)[0].lower() if "://" in ref else ""
    if scheme in ("http", "https"):
        if not settings.allow_image_urls:
            raise APIError(400, f"{param}: image URLs are off on this server; send the image as a data URI "
                                "(data:image/jpeg;base64,...).", param=param, code="image_urls_disabled")
        data, ctype = fetch(ref, allow_private=settings.allow_private_urls, timeout=settings.url_timeout_s,
                            max_bytes=settings.max_body_bytes, param=param, deadline=deadline)
        return data, ctype, ref
    if scheme == "file" or (not scheme and ref.startswith(("/", "~"))):
        return _local(ref, settings, param), None, ref
    if not scheme:
        raise _bad(f"{param} must be a data: URI, an http(s) URL or a file:// URL.", param)
    raise _bad(f"{param}: unsupported URL scheme `{scheme}`.", param)


def _local(ref: str, settings: ServeSettings, param: str) -> bytes:
    if settings.media_dir is None:
        raise APIError(400, f"{param}: local paths are off on this server (start it with --media-dir DIR).",
                       param=param, code="local_paths_disabled")
    path = unquote(urlsplit(ref).path) if ref.lower().startswith("file:") else ref
    try:                    # a NUL byte, an unknown ~user: not a path anywhere
        root = Path(settings.media_dir).expanduser().resolve()
        p = Path(path).expanduser()
        full = (p if p.is_absolute() else root / p).resolve()
    except (ValueError, RuntimeError, OSError):
        raise _bad(f"{param}: not a valid path.", param) from None
    if not full.is_relative_to(root):
        raise APIError(403, f"{param}: only files under the server's media folder can be read.", param=param,
                       code="path_not_allowed", type="permission_error")
    try:
        with open(full, "rb") as f:
            data = f.read(settings.max_body_bytes + 1)
    except OSError as e:
        raise _bad(f"{param}: cannot read {full.name} ({e.strerror or e}).", param) from None
    if len(data) > settings.max_body_bytes:
        raise APIError(413, f"{param}: the image is larger than {settings.max_body_bytes} bytes.", param=param,
                       code="image_too_large")
    if not data:
        raise _bad(f"{param}: {full.name} is empty.", param)
    return data


def is_public(ip: ipaddress._BaseAddress) -> bool:
    """An address on the public internet: not loopback, private, link-local, CGNAT, multicast, reserved."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not ip.is_multicast


def _addresses(host: str, port: int, param: str) -> list[ipaddress._BaseAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _bad(f"{param}: cannot resolve {host} ({e}).", param) from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _Watchdog:
    """Ends a connection at the fetch's deadline, whatever it is waiting for: a socket timeout bounds
    each read, not the whole (a peer trickling a byte a second never trips it)."""

    def __init__(self, conn: http.client.HTTPConnection, deadline: float):
        self.conn, self.fired = conn, False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)     # the plain socket's: wakes a blocked read
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def fetch(url: str, *, allow_private: bool, timeout: float, max_bytes: int, param: str = "url",
          deadline: Optional[float] = None) -> tuple[bytes, Optional[str]]:
    """GET ``url`` with the address checks above, ending by ``deadline`` (default: ``timeout`` from now)
    whatever the peer does: connect, headers and body share it, redirects included."""
    deadline = time.monotonic() + timeout if deadline is None else deadline

    def timed_out() -> APIError:
        return _bad(f"{param}: fetching the image timed out after {timeout:g} s.", param)

    for _ in range(_MAX_REDIRECTS + 1):
        if time.monotonic() >= deadline:
            raise timed_out()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise _bad(f"{param}: only http(s) URLs with a host can be fetched.", param)
        if parts.username or parts.password:
            raise _bad(f"{param}: URLs with credentials are refused.", param)
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise _bad(f"{param}: the URL's port is not a number from 1 to 65535.", param) from None
        ips = _addresses(parts.hostname, port, param)
        if not allow_private:
            bad = [ip for ip in ips if not is_public(ip)]
            if bad:
                raise APIError(400, f"{param}: {parts.hostname} resolves to a non-public address ({bad[0]}); "
                                    "the server refuses to fetch from loopback, private and link-local networks.",
                               param=param, code="url_not_allowed")
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(parts.hostname, port, str(ips[0]), max(0.1, deadline - time.monotonic()))
        dog = _Watchdog(conn, deadline)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers={"User-Agent": "edgevlm", "Accept": "image/*,*/*;q=0.5"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise _bad(f"{param}: fetching the image failed (HTTP {resp.status} {resp.reason}).", param)
            length = resp.getheader("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise APIError(413, f"{param}: the image is larger than {max_bytes} bytes.", param=param,
                               code="image_too_large")
            from ..inputs.media import read_bounded

            body = read_bounded(resp, max_bytes, deadline,
                                lambda: APIError(413, f"{param}: the image is larger than {max_bytes} bytes.",
                                                 param=param, code="image_too_large"), timed_out)
            if dog.fired:
                raise timed_out()
            ctype = resp.getheader("Content-Type")
            return body, ctype.split(";")[0].strip() if ctype else None
        except APIError:
            raise
        except Exception as e:      # noqa: BLE001 - whatever the watchdog's cut left behind is a timeout
            if dog.fired:
                raise timed_out() from None
            if not isinstance(e, (OSError, http.client.HTTPException, ssl.SSLError, ValueError)):
                raise
            raise _bad(f"{param}: fetching the image failed ({e}).", param) from None
        finally:
            dog.cancel()
            conn.close()
    raise _bad(f"{param}: more than {_MAX_REDIRECTS} redirects.", param)
