"""One file over HTTP(S): resumable, streamed, verified, and atomic (stdlib urllib only), for ``url``
sources and PyPI wheels; Hugging Face files go through huggingface_hub (sources.py). Also the checks
both share: offline mode, disk space, disk full.

``dest.part`` holds the bytes so far and ``dest.part.json`` records which URL and checksum they belong
to, so a stale part for another file is thrown away instead of being resumed. A resumed download
sends ``Range: bytes=N-``; a server that ignores it (200 instead of 206) restarts it from zero. The
final file appears at ``dest`` only after its size and sha256 are checked, via fsync + os.replace.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlparse

from ..config import fsync_dir
from ..digest import sha256_file
from ..errors import ChecksumMismatch, DownloadError, OfflineError
from ..protocol import ProgressCallback

CHUNK = 1 << 20
MB = 1024 * 1024
DISK_MARGIN = 32 * 1024 * 1024          # keep this much free beyond what a download needs
OFFLINE_VARS = ("VLM_OFFLINE", "HF_HUB_OFFLINE")
REPORT_HINT = "Run the command again; if it fails the same way, the file changed upstream: please report it."
RESUME_HINT = "Run the same command again: the download resumes where it stopped."

_NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ECONNREFUSED, errno.ETIMEDOUT,
               errno.EHOSTDOWN, errno.ECONNRESET, errno.ECONNABORTED}


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str


def offline_var() -> Optional[str]:
    """The name of the environment variable that asks for offline mode, if one does."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def check_online(what: str) -> None:
    """Raise OfflineError before any network access when VLM_OFFLINE / HF_HUB_OFFLINE is set."""
    var = offline_var()
    if var:
        raise OfflineError(f"Offline mode is on ({var}=1), so {what} cannot be downloaded.",
                           hint=f"Unset {var} to download, or copy the model files in and use `-m PATH`.")


def mb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / MB:,.1f} MB"


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk_space(where: Path, need: int, what: str) -> None:
    """DownloadError before any byte is fetched when ``where`` cannot hold ``need`` more bytes."""
    from ..device.memory import fmt_bytes

    if need <= 0:
        return
    free = disk_free(where)
    if free < need + DISK_MARGIN:
        raise DownloadError(f"Not enough disk space for {what}: it needs {fmt_bytes(need)}, "
                            f"but only {fmt_bytes(free)} is free in {where}.",
                            hint="Free some space, or set VLM_HOME to a directory on a bigger disk.")


def download_file(url: str, dest: Path, *, expected_sha256: Optional[str] = None,
                  expected_size: Optional[int] = None, on_progress: Optional[ProgressCallback] = None,
                  headers: Optional[Mapping[str, str]] = None, timeout: float = 30, label: Optional[str] = None,
                  retries: int = 2) -> Downloaded:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify size/sha256; returns the path with
    the size and sha256 computed while streaming.

    ``retries``: how many times an interrupted transfer is resumed within this call before giving up
    (the ``.part`` is kept either way, so a later call resumes too).
    """
    dest = Path(dest)
    label = label or dest.name
    want_sha = expected_sha256.lower() if expected_sha256 else None
    if dest.is_file() and want_sha and (expected_size is None or dest.stat().st_size == expected_size):
        if sha256_file(dest) == want_sha:
            return Downloaded(dest, dest.stat().st_size, want_sha)
    check_online(label)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dl = _Transfer(url, dest, label, want_sha, expected_size, on_progress, dict(headers or {}), timeout)
    attempt = 0
    while True:
        try:
            return dl.run()
        except _Interrupted as e:
            if attempt >= retries:
                raise DownloadError(str(e), hint=RESUME_HINT) from e.__cause__
            attempt += 1
            time.sleep(min(0.25 * 2 ** attempt, 4.0))


class _Interrupted(Exception):
    """The transfer stopped midway; what arrived is in the .part and can be resumed."""


class _Restart(Exception):
    """The server will not resume this .part: drop it and start from zero."""


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never send credentials to another host (e.g. the hub's CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlparse(newurl).hostname != urlparse(req.full_url).hostname:
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_RedirectHandler)


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        return f"edgevlm/{version('edgevlm')}"
    except Exception:  # pragma: no cover - not installed as a distribution
        return "edgevlm"


class _Transfer:
    def __init__(self, url, dest: Path, label, sha, size, on_progress, headers, timeout):
        self.url, self.dest, self.label, self.sha, self.size = url, dest, label, sha, size
        self.on_progress, self.headers, self.timeout = on_progress, headers, timeout
        self.part = dest.with_name(dest.name + ".part")
        self.meta = dest.with_name(dest.name + ".part.json")
        self.host = urlparse(url).hostname or url

    # -- the .part and its sidecar ------------------------------------------------------------
    def _state(self) -> Optional[dict]:
        try:
            state = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict):
            return None
        if (state.get("url"), state.get("sha256"), state.get("size")) != (self.url, self.sha, self.size):
            return None
        return state

    def _write_state(self, etag: Optional[str]) -> None:
        data = {"url": self.url, "sha256": self.sha, "size": self.size, "etag": etag}
        self.meta.write_text(json.dumps(data), encoding="utf-8")

    def discard(self) -> None:
        for p in (self.part, self.meta):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _progress(self, done: int, total: Optional[int]) -> None:
        if self.on_progress is not None:
            self.on_progress(self.label, done, total)

    # -- one attempt ----------------------------------------------------------------------------
    def run(self) -> Downloaded:
        for _ in range(3):
            try:
                return self._attempt()
            except _Restart:
                self.discard()
        raise DownloadError(f"{self.host} keeps sending a different file for {self.label}.", hint=REPORT_HINT)

    def _attempt(self) -> Downloaded:
        state = self._state() if self.part.exists() else None
        if self.part.exists() and state is None:
            self.discard()                          # a part for another URL/checksum, or of unknown origin
        offset = self.part.stat().st_size if self.part.exists() else 0
        if self.size is not None and offset > self.size:
            raise _Restart()
        hasher = hashlib.sha256()
        if offset:
            sha256_file(self.part, hasher)          # resume: the existing bytes count towards the hash
            self._progress(offset, self.size)
            if self.size is not None and offset == self.size:
                return self._finish(hasher)         # complete already; only the rename was missing
        req = urllib.request.Request(self.url, headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity",
                                                        **self.headers})
        etag = state.get("etag") if state else None
        if offset:
            req.add_header("Range", f"bytes={offset}-")
            if etag and not etag.startswith("W/"):
                req.add_header("If-Range", etag)
        try:
            resp = _OPENER.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and offset:
                raise _Restart() from e
            raise self._http_error(e) from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise network_error(e, self.url) from e
        with resp:
            status = resp.status
            length = _int(resp.headers.get("Content-Length"))
            if offset and status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    raise _Restart()
                total = total if total is not None else (offset + length if length is not None else None)
                mode = "ab"
            else:                                   # 200: the whole file (Range ignored, or If-Range failed)
                if offset:
                    hasher = hashlib.sha256()
                    offset = 0
                total = length
                mode = "wb"
            if total is not None and self.size is not None and total != self.size:
                self.discard()
                raise ChecksumMismatch(
                    f"{self.host} has {total:,} bytes for {self.label}, but {self.size:,} were expected.",
                    hint=REPORT_HINT)
            self._write_state(resp.headers.get("ETag"))
            done = self._stream(resp, mode, hasher, offset, total if total is not None else self.size)
        if total is not None and done < total:
            raise _Interrupted(f"The download of {self.label} was interrupted after {mb(done)} of {mb(total)}.")
        if self.size is not None and done < self.size:
            raise _Interrupted(f"The download of {self.label} stopped after {mb(done)} of {mb(self.size)}.")
        return self._finish(hasher)

    def _stream(self, resp, mode: str, hasher, done: int, total: Optional[int]) -> int:
        with open(self.part, mode, buffering=0) as f:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException, ValueError) as e:
                    raise _Interrupted(f"The download of {self.label} was interrupted after {mb(done)}"
                                       f"{' of ' + mb(total) if total else ''}: {_reason(e)}.") from e
                if not chunk:
                    break
                _write_all(f, chunk, self.label, total, done)
                hasher.update(chunk)
                done += len(chunk)
                self._progress(done, total)
            try:
                os.fsync(f.fileno())
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise disk_full(self.label, total, done) from e
                raise
        return done

    def _finish(self, hasher) -> Downloaded:
        size = self.part.stat().st_size
        got = hasher.hexdigest()
        if self.size is not None and size != self.size:
            self.discard()
            raise ChecksumMismatch(f"{self.label} is {size:,} bytes, but {self.size:,} were expected.", hint=REPORT_HINT)
        if self.sha and got != self.sha:
            self.discard()
            raise ChecksumMismatch(f"Checksum mismatch for {self.label}: expected sha256 {self.sha}, got {got}.",
                                   hint=REPORT_HINT)
        os.replace(self.part, self.dest)
        fsync_dir(self.dest.parent)
        try:
            self.meta.unlink()
        except FileNotFoundError:
            pass
        return Downloaded(self.dest, size, got)

    def _http_error(self, e: urllib.error.HTTPError) -> DownloadError:
        code = e.code
        if code in (401, 403):
            return DownloadError(f"{self.host} refused access to {self.label} (HTTP {code}).",
                                 hint="If the model is gated, accept its licence on its model page and log in with "
                                      "`hf auth login` (or set HF_TOKEN).")
        if code == 404:
            return DownloadError(f"{self.label} was not found at {self.url} (HTTP 404).",
                                 hint="The registry entry may be out of date: upgrade edgevlm, or report it.")
        return DownloadError(f"{self.host} answered HTTP {code} ({e.reason}) for {self.label}.",
                             hint="Try again later; the download resumes where it stopped.")


def _write_all(f, data: bytes, label: str, total: Optional[int], done: int) -> None:
    view = memoryview(data)
    while view:
        try:
            n = f.write(view)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(label, total, done) from e
            raise
        view = view[n:]
        done += n


def disk_full(label: str, total: Optional[int], done: int) -> DownloadError:
    need = f" (needs {max(total - done, 0) / MB:,.0f} MB more)" if total else ""
    return DownloadError(f"Disk full while downloading {label}{need}.",
                         hint="Free some space (or set VLM_HOME to a bigger disk), then run the same command again: "
                              "it resumes.")


def _int(v: Optional[str]) -> Optional[int]:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _content_range(v: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    m = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", v or "")
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.gaierror):
        return "name lookup failed"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def network_error(e: BaseException, url: str) -> DownloadError:
    """Map a connection-time failure to OfflineError (can't reach the host) or DownloadError."""
    host = urlparse(url).hostname or url
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ssl.SSLError):
        return DownloadError(f"Secure connection to {host} failed: {reason}.",
                             hint="Check the system clock and CA certificates (SSL_CERT_FILE), or your proxy settings.")
    if isinstance(reason, (socket.gaierror, socket.timeout, TimeoutError, ConnectionError)) or (
            isinstance(reason, OSError) and reason.errno in _NET_ERRNOS):
        return OfflineError(f"Cannot reach {host}: {_reason(reason)}.")
    if isinstance(reason, str):
        return OfflineError(f"Cannot reach {host}: {reason}.")
    return DownloadError(f"Cannot download from {host}: {_reason(reason)}.", hint=RESUME_HINT)
