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
