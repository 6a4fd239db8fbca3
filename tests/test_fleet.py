"""One captioning job on many machines: shards (--shard), the merge and its check (--merge), remote models
(--server against real `vlm serve` processes, and stub servers that die, fail or stall), and Ray Data."""
from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import MODELS_HOME, assert_clean_error, vlm
from edgevlm.runtime.errors import UsageError
from edgevlm.runtime.inputs.shards import Shard, merge, parse_shard, select, shard_of


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _vm_args(vm):
    return ["-m", str(vm["gguf"]), "--mmproj", str(vm["mmproj"])]


# -- shard assignment ------------------------------------------------------------------------------

def test_assignment_complete_stable_and_even():
    shas = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(3000)]
    for n in (1, 2, 3, 5, 8, 13):
        owners = [[k for k in range(n) if Shard(k, n).owns(s, "p")] for s in shas]
        assert all(len(o) == 1 for o in owners)                     # every input in exactly one shard
        sizes = [sum(1 for o in owners if o[0] == k) for k in range(n)]
        assert min(sizes) > 0.8 * len(shas) / n                     # and the shards are about equal
    # adding inputs moves none of the old ones; the split is a function of the bytes, not of the list
    before = {s: shard_of(s, "x", 8) for s in shas[:2000]}
    assert all(shard_of(s, "y", 8) == k for s, k in before.items())
    # an unreadable input (no hash) still has one owner, by its path
    assert sum(Shard(k, 4).owns(None, "/gone.jpg") for k in range(4)) == 1


def test_select_hashes_each_input_once(tmp_path):
    files = []
    for i in range(30):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(os.urandom(64))
        files.append(str(p))
    calls = []

    def h(p):
        calls.append(p)
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    parts = [select(files, Shard(k, 3), h) for k in range(3)]
    assert sorted(p for part in parts for p, _ in part) == sorted(files)
    assert len(calls) == 3 * len(files)                 # each shard hashes every input once, no more
    assert all(sha == hashlib.sha256(Path(p).read_bytes()).hexdigest() for part in parts for p, sha in part)


@pytest.mark.parametrize("env,want", [
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (0, 4)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, (3, 4)),   # --array=1-4
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "2",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 5)),                                                             # --array=2-10:2
    ({"JOB_COMPLETION_INDEX": "2"}, None),                      # Kubernetes: needs auto/N
])
def test_shard_from_slurm_and_kubernetes(env, want):
    if want is None:
        with pytest.raises(UsageError, match="completions"):
            parse_shard("auto", env)
        s = parse_shard("auto/3", env)
        assert (s.index, s.count) == (2, 3) and "JOB_COMPLETION_INDEX" in s.source
        return
    s = parse_shard("auto", env)
    assert (s.index, s.count) == want and "SLURM" in s.source


@pytest.mark.parametrize("text,env,needle", [
    ("4/4", {}, "K must be from 0 to 3"),
    ("1/0", {}, "1 or more"),
    ("half", {}, "not K/N"),
    ("auto", {}, "neither a Slurm"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}, "not one of"),
    ("auto/5", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, "has 4 tasks"),
    ("auto/4", {"JOB_COMPLETION_INDEX": "4"}, "not below"),
])
def test_bad_shards_are_usage_errors(text, env, needle):
    with pytest.raises(UsageError, match=needle):
        parse_shard(text, env)


def test_shard_usage_errors_from_the_cli(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    r = vlm("caption", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--shard", "3/3")
    assert_clean_error(r, 2, "K must be from 0 to 2")
    r = vlm("caption", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--shard", "auto",
            env={"SLURM_ARRAY_TASK_ID": "", "JOB_COMPLETION_INDEX": ""})
    assert_clean_error(r, 2, "neither a Slurm")
    r = vlm("caption", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--server", "http://127.0.0.1:9",
            "--rpc", "h:1")
    assert_clean_error(r, 2, "--rpc", "not to --server")


# -- merge -----------------------------------------------------------------------------------------

def _rec(path, sha, shard=None, error=None, answer="a cat"):
    r = {"path": path, "sha256": sha, "prompt": "P", "model": "m", "key": f"k-{path}-{sha}"}
    if shard:
        r["shard"] = shard
    if error:
        r["error"] = error
    else:
        r["answer"] = answer
    return r


def _write(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return str(path)


@pytest.fixture
def job(tmp_path):
    """Eight real files, their hashes, and the shard (of 3) of each."""
    d = tmp_path / "in"
    d.mkdir()
    files = []
    for i in range(8):
        p = d / f"{i}.jpg"
        p.write_bytes(f"picture {i}".encode())
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        files.append((str(p), sha, shard_of(sha, str(p), 3)))
    return d, files


def test_merge_library_report(tmp_path, job):
    d, files = job
    parts = []
    for k in range(3):
        recs = [_rec(p, s, f"{k}/3") for p, s, sk in files if sk == k]
        parts.append(_write(tmp_path / f"p{k}.jsonl", recs))
    rep = merge(parts, str(tmp_path / "all.jsonl"), [(p, s) for p, s, _ in files])
    assert rep.records == 8 and not rep.missing and not rep.failed and rep.duplicates == 0
    assert [r["path"] for r in _lines(tmp_path / "all.jsonl")] == [p for p, _, _ in files]    # input order


def test_merge_cli_missing_failed_duplicates(tmp_path, job):
    d, files = job
    by_shard = {k: [(p, s) for p, s, sk in files if sk == k] for k in range(3)}
    assert all(by_shard.values()), "the fixture needs inputs in every shard"
    lost_shard = 1
    # shard 0 complete, and run twice (a re-run without --resume: every record again = duplicates);
    # shard 1 lost one record (a torn last line); shard 2 has a failed image and one that failed then worked
    p0 = _write(tmp_path / "p0.jsonl", [_rec(p, s, "0/3") for p, s in by_shard[0]])
    p0b = _write(tmp_path / "p0-again.jsonl", [_rec(p, s, "0/3", answer="other") for p, s in by_shard[0]])
    s1 = by_shard[lost_shard]
    p1 = _write(tmp_path / "p1.jsonl", [_rec(p, s, "1/3") for p, s in s1[:-1]], tail='{"path": "torn')
    s2 = by_shard[2]
    recs2 = [_rec(s2[0][0], s2[0][1], "2/3", error="not an image")]
    recs2 += [_rec(p, s, "2/3", error="server gone") for p, s in s2[1:]] + [_rec(p, s, "2/3") for p, s in s2[1:]]
    p2 = _write(tmp_path / "p2.jsonl", recs2)
    out = tmp_path / "all.jsonl"

    r = vlm("caption", "--merge", str(out), p0, p0b, p1, p2, "--inputs", str(d))
    assert r.returncode == 14, r.stderr                           # something is missing
    assert r.stdout == "" and "Traceback" not in r.stderr
    merged = _lines(out)
    keys = [(x["path"], x["sha256"]) for x in merged]
    assert len(keys) == len(set(keys)) == 7                       # each input once; the lost one absent
    assert s1[-1][0] not in {x["path"] for x in merged}
    assert all(x["answer"] == "a cat" for x in merged if x["path"] in {p for p, _ in by_shard[0]})   # the first kept
    assert "error" in next(x for x in merged if x["path"] == s2[0][0])
    assert all("error" not in x for x in merged if x["path"] in {p for p, _ in s2[1:]})   # the retry won
    err = " ".join(r.stderr.split())
    assert f"{len(by_shard[0])} duplicate" in err and "1 line did not parse" in err
    assert "Missing (1" in err and os.path.basename(s1[-1][0]) in err
    assert "Failed (1" in err
    assert "Run shards 1,2 of 3 again with --resume" in err

    # shard 1 re-run: nothing missing, one failed -> 12; without --inputs the same files say the same
    p1 = _write(tmp_path / "p1.jsonl", [_rec(p, s, "1/3") for p, s in s1])
    r = vlm("caption", "--merge", str(out), p0, p1, p2, "--inputs", str(d))
    assert r.returncode == 12, r.stderr
    assert "Run shard 2 of 3 again" in " ".join(r.stderr.split())
    r = vlm("caption", "--merge", str(out), p0, p1, p2)
    assert r.returncode == 12, r.stderr
    # all good -> 0
    p2 = _write(tmp_path / "p2.jsonl", [_rec(p, s, "2/3") for p, s in s2])
    r = vlm("caption", "--merge", str(out), p0, p1, p2, "--inputs", str(d))
    assert r.returncode == 0, r.stderr
    assert len(_lines(out)) == 8


def test_merge_usage_errors(tmp_path):
    part = _write(tmp_path / "p.jsonl", [_rec("a", "0" * 64)])
    assert_clean_error(vlm("caption", "--merge", part, part), 2, "both a part and the merged output")
    assert_clean_error(vlm("caption", "--merge", str(tmp_path / "o.jsonl"), str(tmp_path / "nope.jsonl")), 2,
                       "Cannot read")
    assert_clean_error(vlm("caption", "--merge", str(tmp_path / "o.jsonl"), part, "--out", "x"), 2, "--merge")
    assert_clean_error(vlm("caption", str(tmp_path), "--inputs", str(tmp_path), "--out", "x.jsonl"), 2, "--inputs")


# -- shards with a real model ----------------------------------------------------------------------

@pytest.fixture
def pics(tmp_path):
    d = tmp_path / "pics"
    d.mkdir()
    for i in range(12):
        Image.new("RGB", (64 + 4 * i, 48), (20 * i, 240 - 20 * i, (97 * i) % 256)).save(d / f"{i:02d}.png")
    (d / "notes.txt").write_text("not an image")
    return d


_SAME = ("path", "sha256", "prompt", "model", "key", "answer", "finish_reason", "usage", "error")


def _comparable(recs):
    """What must not depend on how the job was split. prompt_eval_tokens does: an image evaluates less of
    its prompt when the one before it in the same process left the prompt's head in the KV cache."""
    out = []
    for r in recs:
        c = {k: r.get(k) for k in _SAME}
        if c["usage"]:
            c["usage"] = {k: v for k, v in c["usage"].items() if k != "prompt_eval_tokens"}
        out.append(c)
    return sorted(out, key=lambda r: r["path"])


def _caption_cmd(*args):
    exe = Path(sys.executable).with_name("vlm")
    return [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "edgevlm.cli.main"]),
            "caption", *args]


def _env():
    e = {k: v for k, v in os.environ.items() if k not in ("VLM_DEBUG", "VLM_API_KEY")}
    e.update(VLM_HOME=str(MODELS_HOME), NO_COLOR="1")
    return e


@pytest.mark.model
def test_two_shards_side_by_side_merge_to_one_process(vision_model, pics, tmp_path):
    common = ["-n", "6", "-t", "0", "--threads", "1", *_vm_args(vision_model)]
    one = tmp_path / "one.jsonl"
    r = vlm("caption", str(pics), "--out", str(one), *common)
    assert r.returncode == 12, r.stderr                    # notes.txt is an error record
    parts = [tmp_path / f"part{k}.jsonl" for k in range(2)]
    # shard 0 named on the command line; shard 1 found in a Slurm array's variables (--array=1-2, task 2)
    slurm = dict(_env(), SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_COUNT="2")
    procs = [subprocess.Popen(_caption_cmd(str(pics), "--out", str(parts[k]), "--shard", ["0/2", "auto"][k], *common),
                              env=[_env(), slurm][k], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert {p.returncode for p in procs} <= {0, 12}, outs
    sizes = [len(_lines(p)) for p in parts]
    assert sum(sizes) == 13 and min(sizes) > 0, sizes          # every input in exactly one part
    assert f"Shard 0/2 (--shard): {sizes[0]} of 13 inputs" in " ".join(outs[0][1].split())
    assert f"Shard 1/2 (SLURM_ARRAY_TASK_ID=2): {sizes[1]} of 13 inputs" in " ".join(outs[1][1].split())
    assert all(rec["shard"] == f"{k}/2" for k in range(2) for rec in _lines(parts[k]))
    merged = tmp_path / "merged.jsonl"
    r = vlm("caption", "--merge", str(merged), *map(str, parts), "--inputs", str(pics))
    assert r.returncode == 12, r.stderr                    # nothing missing; notes.txt failed
    assert "Failed (1" in r.stderr and "Missing" not in r.stderr
    assert _comparable(_lines(merged)) == _comparable(_lines(one))     # the same records as one process

    # each shard resumes on its own: shard 0 loses its last two records, shard 1 is whole
    lines = parts[0].read_text().splitlines(keepends=True)
    kept = [json.loads(x) for x in lines[:-2]]
    parts[0].write_text("".join(lines[:-2]))
    errors = [sum("error" in x for x in _lines(p)) for p in parts]
    r0 = vlm("caption", str(pics), "--out", str(parts[0]), "--shard", "0/2", "--resume", *common)
    r1 = vlm("caption", str(pics), "--out", str(parts[1]), "--shard", "1/2", "--resume", *common)
    assert r0.returncode in (0, 12) and r1.returncode in (0, 12), (r0.stderr, r1.stderr)
    done0 = sum("error" not in x for x in kept)
    assert f"{done0} already done" in " ".join(r0.stderr.split())
    assert f"{sizes[1] - errors[1]} already done" in " ".join(r1.stderr.split())     # error records are retried
    assert len(_lines(parts[0])) == len(kept) + (sizes[0] - done0) and len(_lines(parts[1])) == sizes[1] + errors[1]
    r = vlm("caption", "--merge", str(merged), *map(str, parts), "--inputs", str(pics))
    assert r.returncode == 12 and _comparable(_lines(merged)) == _comparable(_lines(one)), r.stderr


# -- --server: real `vlm serve` processes, and stubs that fail in the ways servers fail ----------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """A real `vlm serve` process on a free port of 127.0.0.1."""

    def __init__(self, model: str, log: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "wb")
        self.log = log
        exe = Path(sys.executable).with_name("vlm")
        self.proc = subprocess.Popen([str(exe), "serve", model, "--port", str(self.port), "--threads", "1", *args],
                                     env=_env(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


class Stub:
    """A stand-in server for failure injection only: ``mode`` "error" answers 500, "slow" holds each
    request ``delay`` seconds before answering 500; it lists one model and reports ``slots`` at /props."""

    def __init__(self, mode: str, slots: int = 2, delay: float = 60.0):
        stub = self
        self.hits = 0
        self.bodies: list[dict] = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, code, doc):
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/props":
                    self._json(200, {"total_slots": slots})
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "stub-model"}]})
                else:
                    self._json(404, {"error": {"message": "no"}})

            def do_POST(self):
                stub.bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                stub.hits += 1
                if mode == "slow":
                    time.sleep(delay)
                self._json(500, {"error": {"message": "engine exploded", "type": "server_error"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_probe_reads_slots_and_models():
    from edgevlm.runtime.inputs.remote import Endpoint, parse_servers, probe

    stub = Stub("error", slots=3)
    try:
        assert probe(Endpoint(stub.url)) == (3, ["stub-model"])
        assert parse_servers(f"{stub.url}/v1/, {stub.url},localhost:9") == [stub.url, "http://localhost:9"]
        assert probe(Endpoint("http://127.0.0.1:9"), timeout=2) == (None, [])       # nothing listens there
    finally:
        stub.close()


@pytest.fixture
def serve_vision(vision_model, tmp_path):
    servers = []

    def start(*args):
        s = Serve(str(vision_model["gguf"]), tmp_path / f"serve{len(servers)}.log", *args)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.kill()


@pytest.mark.model
def test_server_records_match_local_and_resume_and_merge(vision_model, serve_vision, pics, tmp_path):
    common = ["-n", "6", "-t", "0"]
    local = tmp_path / "local.jsonl"
    r = vlm("caption", str(pics), "--out", str(local), "--threads", "1", *common, *_vm_args(vision_model))
    assert r.returncode == 12, r.stderr
    srv = serve_vision("--parallel", "2")
    out = tmp_path / "remote.jsonl"
    r = vlm("caption", str(pics), "--out", str(out), "--server", srv.url, "--server-slots", "2", *common)
    assert r.returncode == 12, r.stderr                       # notes.txt: refused by the server, an error record
    assert r.stdout == "" and "(2 at once)" in r.stderr
    recs = _lines(out)
    assert len(recs) == 13 and len({x["path"] for x in recs}) == 13
    bad = next(x for x in recs if x["path"].endswith("notes.txt"))
    assert "error" in bad and "400" in bad["error"]
    good = [x for x in recs if "error" not in x]
    assert all(x["server"] == srv.url and x["usage"]["completion_tokens"] > 0 and x["timings"]["total_s"] > 0
               for x in good)
    loc = {x["path"]: x for x in _lines(local)}
    # --parallel 2 decodes two images together: a greedy answer may differ there (docs/http-api.md), so the
    # answers are compared with a one-slot server below; here the records' shape and identity
    assert all(set(loc[x["path"]]) - {"timings"} <= set(x) for x in good)
    assert all(x["sha256"] == loc[x["path"]]["sha256"] for x in recs)

    # resume: a cut-off job continues where it stopped, through the server
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]))
    r = vlm("caption", str(pics), "--out", str(out), "--server", srv.url, "--resume", *common)
    n_done = sum("error" not in json.loads(x) for x in lines[:5])
    assert f"{n_done} already done" in " ".join(r.stderr.split()), r.stderr
    assert {x["path"] for x in _lines(out)} == {x["path"] for x in recs}

    # one slot: the same answers as `vlm caption` here (same model file, greedy)
    one = serve_vision()
    out1 = tmp_path / "remote1.jsonl"
    r = vlm("caption", str(pics), "--out", str(out1), "--server", one.url, "-m", Path(vision_model["gguf"]).name,
            *common)
    assert r.returncode == 12, r.stderr
    rem = {x["path"]: x for x in _lines(out1)}
    assert {p: x.get("answer") for p, x in rem.items()} == {p: x.get("answer") for p, x in loc.items()}
    assert all(rem[p]["key"] == loc[p]["key"] for p in rem)        # same model name: resume/merge interchangeable
    merged = tmp_path / "m.jsonl"
    r = vlm("caption", "--merge", str(merged), str(local), str(out1), "--inputs", str(pics))
    assert r.returncode == 12 and "12 duplicates dropped" in " ".join(r.stderr.split()), r.stderr


@pytest.mark.model
def test_server_schema_and_api_key(vision_model, serve_vision, pics, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
              "additionalProperties": False}
    srv = serve_vision("--api-key", "sesame")
    imgs = [str(pics / "00.png"), str(pics / "01.png")]
    out = tmp_path / "s.jsonl"
    r = vlm("caption", *imgs, "--out", str(out), "--server", srv.url, "--schema", json.dumps(schema), "-n", "20",
            env={"VLM_API_KEY": "sesame"})
    assert r.returncode == 0, r.stderr
    for rec in _lines(out):
        jsonschema.validate(rec["answer"], schema)           # parsed and checked here, as a local run does
    r = vlm("caption", *imgs, "--out", str(tmp_path / "k.jsonl"), "--server", srv.url, "-m", "x",
            "--api-key", "wrong")
    assert_clean_error(r, 2, "No server takes this job", "401", "--api-key")


@pytest.mark.model
def test_server_killed_mid_job_loses_nothing(vision_model, serve_vision, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(30):
        Image.new("RGB", (64, 64), (i * 8, 255 - i * 8, 60)).save(d / f"{i:02d}.png")
    a, b = serve_vision(), serve_vision()
    out = tmp_path / "caps.jsonl"
    p = subprocess.Popen(_caption_cmd(str(d), "--out", str(out), "--server", f"{a.url},{b.url}", "-n", "24",
                                      "-t", "0"), env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.05)
    a.kill()                                                  # mid-job, requests in flight
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    recs = _lines(out)
    assert sorted(x["path"] for x in recs) == sorted(str(f) for f in d.iterdir())       # nothing lost, no duplicates
    assert all("error" not in x for x in recs)
    assert {x["server"] for x in recs} == {a.url, b.url}
    assert a.url in err and "resting" in err


@pytest.mark.model
def test_server_errors_and_slow_server_do_not_hold_the_job(vision_model, serve_vision, pics, tmp_path):
    good = serve_vision()
    broken, slow = Stub("error"), Stub("slow", slots=1, delay=120)
    try:
        out = tmp_path / "caps.jsonl"
        t0 = time.monotonic()
        r = vlm("caption", str(pics), "--out", str(out), "--server", f"{broken.url},{slow.url},{good.url}",
                "-m", Path(vision_model["gguf"]).name, "-n", "6", "-t", "0", timeout=200)
        took = time.monotonic() - t0
        assert r.returncode == 12, r.stderr                     # notes.txt only
        recs = _lines(out)
        assert len(recs) == 13 and sum("error" in x for x in recs) == 1
        assert all(x["server"] == good.url for x in recs if "error" not in x)
        assert broken.hits >= 1 and slow.hits >= 1              # both were tried...
        assert took < 60, took                                  # ...and the slow one's image was asked elsewhere
        err = " ".join(r.stderr.split())
        assert "engine exploded" in err and "resting" in err and "asking" in err
    finally:
        broken.close()
        slow.close()


def test_no_server_answers(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    r = vlm("caption", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--server", "http://127.0.0.1:9")
    assert_clean_error(r, 2, "No server answered with a model")
    broken = Stub("error")
    try:
        # every server failing for --server-timeout stops the job: nothing written, resume continues later
        t0 = time.monotonic()
        r = vlm("caption", str(tmp_path / "a.png"), "--out", str(tmp_path / "o.jsonl"), "--server", broken.url,
                "--server-timeout", "3")
        assert_clean_error(r, 10, "No server has answered for 3 s", "engine exploded", "--resume")
        assert time.monotonic() - t0 < 30 and (tmp_path / "o.jsonl").read_text() == ""
    finally:
        broken.close()


def test_server_requests_carry_the_sampling_flags_given(tmp_path):
    """caption --server sends temperature, max_tokens and seed always, and the other sampling flags (top_k,
    min_p, stop...) only when the command line moved them off the engine's defaults; flags that shape a
    model loaded here are refused."""
    (tmp_path / "a.png").write_bytes(b"x")
    broken = Stub("error")
    try:
        r = vlm("caption", str(tmp_path / "a.png"), "--out", str(tmp_path / "o.jsonl"), "--server", broken.url,
                "--server-timeout", "2", "--top-k", "5", "--stop", "END", "-n", "7", "--seed", "3")
        assert r.returncode == 10, r.stderr
        body = broken.bodies[0]
        assert (body["top_k"], body["stop"], body["max_tokens"], body["temperature"], body["seed"]) == \
            (5, ["END"], 7, 0.0, 3)
        assert not {"top_p", "min_p", "repeat_penalty"} & set(body)
        r = vlm("caption", str(tmp_path / "a.png"), "--out", str(tmp_path / "o.jsonl"), "--server", broken.url,
                "--kv-type", "q8_0", "--no-cache")
        assert_clean_error(r, 2, "--kv-type, --no-cache: they apply to a model loaded here")
    finally:
        broken.close()


def test_an_image_that_fails_everywhere_becomes_an_error_record():
    """Scheduling alone (the HTTP side is tested against real servers above): an image every server
    fails on ends as an error record after its tries, and the others are answered."""
    from edgevlm.runtime.inputs.remote import Ask, Dispatcher, Endpoint, ServerFailed

    def ask_fn(ep, ask, path):
        time.sleep(0.01)
        if path == "poison":
            raise ServerFailed(f"{ep.url} answered 500: crashed")
        return {"text": path, "server": ep.url}

    eps = [Endpoint("http://a", slots=2), Endpoint("http://b", slots=1)]
    paths = ["poison"] + [f"img{i}" for i in range(20)]
    d = Dispatcher(eps, Ask(prompt="p", timeout=30), ask_fn=ask_fn)
    got = dict(d.run(paths))
    assert sorted(got) == list(range(len(paths)))                 # every image once
    assert got[0]["error"].startswith("No server answered") and "crashed" in got[0]["error"]
    assert all(got[i]["text"] == paths[i] for i in range(1, len(paths)))
    assert {got[i]["server"] for i in range(1, len(paths))} == {"http://a", "http://b"}


# -- Ray Data ----------------------------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.slow
def test_ray_data_records_equal_vlm_caption(vision_model, pics, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra (pip install '.[ray]') has no wheel for this platform")
    pytest.importorskip("ray.data", reason="ray is installed without ray.data (pip install '.[ray]')")
    from edgevlm.runtime.captioner import Captioner

    local = tmp_path / "local.jsonl"
    r = vlm("caption", str(pics), "--out", str(local), "-n", "6", "-t", "0", "--threads", "1", *_vm_args(vision_model))
    assert r.returncode == 12, r.stderr
    paths = [x["path"] for x in _lines(local)]
    # a local Ray cluster on this machine, in its own temp folder; the actors see the same model store
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="ray", dir="/tmp")     # Ray's socket paths must stay under 108 bytes
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")      # a test sends nothing anywhere
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=short,
             runtime_env={"env_vars": {"VLM_HOME": str(MODELS_HOME), "NO_COLOR": "1"}})
    try:
        ds = ray.data.from_items([{"path": p} for p in paths])
        out = ds.map_batches(Captioner, batch_size=4, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1,
                             fn_constructor_kwargs={"model": str(vision_model["gguf"]),
                                                    "mmproj": str(vision_model["mmproj"]),
                                                    "max_tokens": 6, "threads": 1})
        t0 = time.perf_counter()
        rows = list(out.iter_rows())
        print(f"ray: {len(rows)} images in {time.perf_counter() - t0:.1f} s (2 actors, model loads included)")
    finally:
        ray.shutdown()
        shutil.rmtree(short, ignore_errors=True)
    recs = [json.loads(row["record"]) for row in rows]
    assert _comparable(recs) == _comparable(_lines(local))           # the records `vlm caption` writes
    assert [row["error"] is not None for row in rows] == ["error" in x for x in recs]
    # the lines merge with vlm caption's own parts like any other part
    part = tmp_path / "ray.jsonl"
    part.write_text("".join(row["record"] + "\n" for row in rows))
    r = vlm("caption", "--merge", str(tmp_path / "all.jsonl"), str(part), "--inputs", str(pics))
    assert r.returncode == 12 and "Missing" not in r.stderr, r.stderr


def test_merge_counts_foreign_or_damaged_lines_as_bad(tmp_path):
    """Lines whose keys have the wrong types (a list for sha256, a dict for prompt, a non-hex hash) are
    counted as bad lines, never a crash; the good record still merges."""
    from edgevlm.runtime.inputs.shards import merge

    good = {"path": "a.jpg", "sha256": "a" * 64, "prompt": "p", "model": "m", "answer": "x", "shard": "0/1"}
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(json.dumps(r) for r in [
        good, {**good, "path": "b.jpg", "sha256": ["x"]}, {**good, "path": "c.jpg", "prompt": {"a": 1}},
        {**good, "path": "d.jpg", "sha256": "not-hex", "error": "boom"}]) + "\n")
    rep = merge([str(part)], str(tmp_path / "out.jsonl"))
    assert rep.bad_lines == 3
    assert [json.loads(x)["path"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ["a.jpg"]
