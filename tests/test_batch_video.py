"""Shell-script power: batch captioning to JSONL, resume, error records, JSON-schema output, video."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import MODELS_HOME, assert_clean_error, vlm

pytestmark = [pytest.mark.model, pytest.mark.slow]

COLOR_SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                 "big": {"type": "boolean"}},
                "required": ["color", "big"], "additionalProperties": False}


def _vm_args(vm):
    return ["-m", str(vm["gguf"]), "--mmproj", str(vm["mmproj"])]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "pics"
    (d / "sub").mkdir(parents=True)
    for i, c in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (80 + 10 * i, 60), c).save(d / ("sub" if i == 2 else "") / f"img{i}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)        # JPEG header, no image
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_text("skipped")
    return d


def test_caption_folder_with_bad_files(vision_model, folder, tmp_path):
    out = tmp_path / "caps.jsonl"
    r = vlm("caption", str(folder), "--out", str(out), "-n", "4", *_vm_args(vision_model))
    assert r.returncode == 12, r.stderr                      # some inputs failed
    recs = _lines(out)
    assert len(recs) == 5 and r.stdout == ""
    by = {os.path.basename(x["path"]): x for x in recs}
    assert "error" in by["broken.jpg"] and "error" in by["notes.txt"]
    for name in ("img0.png", "img1.png", "img2.png"):
        rec = by[name]
        assert "error" not in rec and isinstance(rec["answer"], str)
        assert len(rec["sha256"]) == 64 and rec["model"] and rec["timings"]["total_s"] > 0
        assert rec["usage"]["image_tokens"] > 0


def test_caption_only_good_images_exit_zero_and_stdout(vision_model, folder):
    r = vlm("caption", str(folder / "sub"), str(folder / "img0.png"), "--out", "-", "-n", "2", *_vm_args(vision_model))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(recs) == 2 and all("answer" in x for x in recs)


def test_file_name_not_utf8_is_recorded_not_a_crash(vision_model, tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    name = os.fsdecode(b"img-\xff.png")                  # a Latin-1 name from an old camera card
    Image.new("RGB", (64, 48), (200, 0, 0)).save(d / name, format="PNG")
    out = tmp_path / "caps.jsonl"
    r = vlm("caption", str(d), "--out", str(out), "-n", "2", *_vm_args(vision_model))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    (rec,) = _lines(out)                                  # valid JSON, the name escaped as \udcff
    assert os.fsencode(rec["path"]).endswith(b"img-\xff.png") and "answer" in rec


def test_resume_after_kill(vision_model, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(24):
        Image.new("RGB", (64, 64), (i * 10, 255 - i * 10, 128)).save(d / f"{i:02d}.png")
    out = tmp_path / "caps.jsonl"
    args = [sys.executable, "-m", "edgevlm.cli.main", "caption", str(d), "--out", str(out), "-n", "24",
            "--temperature", "0", *_vm_args(vision_model)]
    env = dict(os.environ, VLM_HOME=str(MODELS_HOME))
    p = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)                            # no chance to clean up
    p.wait()
    partial = out.read_bytes()
    assert partial.endswith(b"\n") or partial == b""         # whole lines only
    n_before = len(_lines(out))
    assert 3 <= n_before < 24
    r = vlm("caption", str(d), "--out", str(out), "--resume", "-n", "24", "--temperature", "0", *_vm_args(vision_model))
    assert r.returncode == 0, r.stderr
    recs = _lines(out)
    assert len(recs) == 24 and len({x["path"] for x in recs}) == 24          # finished, no duplicates
    assert f"{n_before} already done" in r.stderr.replace("\n", " ")
    # without --resume an existing output is refused, not overwritten
    r = vlm("caption", str(d), "--out", str(out), *_vm_args(vision_model))
    assert_clean_error(r, 2, "already exists")


def test_torn_last_line_is_repaired_on_resume(vision_model, folder, tmp_path):
    out = tmp_path / "caps.jsonl"
    out.write_text('{"path": "x", "key": "k1", "answer": "a"}\n{"path": "y", "ans')
    r = vlm("caption", str(folder / "sub"), "--out", str(out), "--resume", "-n", "2", *_vm_args(vision_model))
    assert r.returncode == 0, r.stderr
    recs = _lines(out)                                       # every line parses again
    assert [x["path"] for x in recs][0] == "x" and len(recs) == 2


def test_caption_with_schema_validates(vision_model, folder, tmp_path):
    out = tmp_path / "s.jsonl"
    r = vlm("caption", str(folder / "sub"), str(folder / "img0.png"), "--out", str(out), "-n", "40",
            "--schema", json.dumps(COLOR_SCHEMA), *_vm_args(vision_model))
    assert r.returncode == 0, r.stderr
    import jsonschema
    for rec in _lines(out):
        jsonschema.validate(rec["answer"], COLOR_SCHEMA)


def test_ask_schema_on_text_model(smollm2_gguf, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
                                  "required": ["capital"]}))
    r = vlm("ask", "-m", str(smollm2_gguf), "-t", "0", "-n", "40", "--schema", str(schema), "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc["capital"], str)
    r = vlm("ask", "-m", str(smollm2_gguf), "-t", "0", "-n", "40", "--json", "--schema", str(schema), "Capital of Italy?")
    assert isinstance(json.loads(r.stdout)["answer"]["capital"], str)


def test_invalid_schema_fails_before_loading(tmp_path):
    r = vlm("ask", "-m", "no-such-model", "--schema", '{"type": "objekt"}', "hi")
    assert_clean_error(r, 2, "not a valid JSON Schema")
    r = vlm("caption", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--schema", "{not json")
    assert_clean_error(r, 2, "not valid JSON")


def _make_video(path, seconds=3, fps=10):
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * fps):
            arr = np.zeros((48, 64, 3), np.uint8)
            arr[:, :, i * 3 // (seconds * fps)] = 200            # red, then green, then blue
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def test_video_frames_with_timestamps(vision_model, tmp_path):
    clip = tmp_path / "clip.mp4"
    _make_video(clip)
    r = vlm("ask", *_vm_args(vision_model), "-t", "0", "-n", "3", "--json", "--frames", "3", str(clip), "What happens?")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    labels = [i["label"] for i in doc["images"]]
    assert len(labels) == 3 and labels[0].startswith("Frame at [00:00.")
    assert labels[2].startswith("Frame at [00:02.")
    assert doc["usage"]["image_tokens"] >= 3
    r = vlm("ask", *_vm_args(vision_model), "-n", "2", "--json", "--fps", "1", str(clip), "What happens?")
    assert r.returncode == 0 and len(json.loads(r.stdout)["images"]) == 3


def test_unreadable_video(vision_model, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    r = vlm("ask", *_vm_args(vision_model), str(bad), "What happens?")
    assert_clean_error(r, 5, "bad.mp4")
