"""`vlm quantize` end to end: a real Hugging Face checkpoint of SmolLM2-135M-Instruct (rebuilt from its
GGUF, see tests/fixtures/smollm2_hf.py) to gguf:q8_0, gguf:q4_k_m, onnx:int8 and onnx:int4, verified
against the source, registered, and run through `vlm ask` on both backends. Then the bad inputs.

The four-target build runs once per module (a few minutes on 2 cores) and every test below reads it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_clean_error, vlm

TARGETS = ("gguf:q8_0", "gguf:q4_k_m", "onnx:int8", "onnx:int4")
KEYS = ("q8_0", "q4_k_m", "onnx-int8", "onnx-int4")


def _tree_digest(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


# ---------------------------------------------------------------------------------------- the build
@pytest.fixture(scope="module")
def built(smollm2_hf, tmp_path_factory):
    before = _tree_digest(smollm2_hf)
    root = tmp_path_factory.mktemp("quantize")
    out, home = root / "smol-q", root / "home"
    home.mkdir()
    args = ["quantize", str(smollm2_hf), *[a for t in TARGETS for a in ("--to", t)], "--out", str(out),
            "--name", "smol-q", "--register", "--threads", "2", "--json"]
    t0 = time.perf_counter()
    r = vlm(*args, home=home, timeout=2400)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    print(f"\nvlm quantize, 4 targets: {seconds:.0f} s", file=sys.stderr)
    return {"out": out, "home": home, "manifest": json.loads(r.stdout), "stderr": r.stderr,
            "src": smollm2_hf, "src_before": before}


pytestmark = [pytest.mark.model]


@pytest.mark.slow
def test_manifest_records_every_artifact_and_file(built):
    m, out = built["manifest"], built["out"]
    assert json.loads((out / "manifest.json").read_text()) == m          # stdout is the manifest on disk
    assert [a["key"] for a in m["artifacts"]] == list(KEYS)
    assert m["source"]["model_type"] == "llama" and m["verification"]["tokens"] >= 200
    for a in m["artifacts"]:
        assert (out / a["model"]).is_file()
        for f in a["files"]:
            p = out / f["name"]
            assert p.stat().st_size == f["size"]
            assert hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"], f["name"]
        assert 1 < a["bits_per_weight"] < 17
    sizes = {a["key"]: a["size"] for a in m["artifacts"]}
    assert sizes["q4_k_m"] < sizes["q8_0"] and sizes["onnx-int4"] < sizes["onnx-int8"]
    # nothing from the build is left beside the output
    assert _leftovers(out.parent) == ["home", "smol-q"]
    assert not (out / ".work").exists()


@pytest.mark.slow
def test_agreement_numbers_are_sane(built):
    arts = {a["key"]: a for a in built["manifest"]["artifacts"]}
    for key, a in arts.items():
        mt = a["metrics"]
        assert 0.0 <= mt["top1_agreement"] <= 1.0 and math.isfinite(mt["kl_mean"]) and mt["kl_mean"] >= 0, key
        assert mt["perplexity"] > 1 and math.isfinite(mt["perplexity"]), key
        assert a["decode_tps"] and a["decode_tps"] > 0, key
    assert arts["q8_0"]["metrics"]["top1_agreement"] >= 0.90
    assert arts["onnx-int8"]["metrics"]["top1_agreement"] >= 0.85      # blockwise int8, measured ~0.93
    # more bits, closer to the source (GGUF). ONNX int4's "offset" blocks reproduce this Q4_1-sourced model
    # as closely as blockwise int8 does (measured: KL 0.0042 vs 0.0052): both must stay near the source.
    assert arts["q8_0"]["metrics"]["kl_mean"] < arts["q4_k_m"]["metrics"]["kl_mean"]
    assert arts["onnx-int8"]["metrics"]["kl_mean"] < 0.02 and arts["onnx-int4"]["metrics"]["kl_mean"] < 0.06
    assert arts["onnx-int4"]["metrics"]["top1_agreement"] >= 0.85      # Q4_K_M's level (issue 20); measured ~0.95


@pytest.mark.slow
def test_every_artifact_completes_paris_where_the_source_does(built):
    m = built["manifest"]
    src = m["verification"]["source_completions"]["The capital of France is"]
    assert src.lstrip().startswith("Paris")
    for a in m["artifacts"]:
        row = next(c for c in a["completions"] if c["prompt"] == "The capital of France is")
        assert row["artifact"].lstrip().startswith("Paris"), (a["key"], row)


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_registered_artifacts_run_through_vlm_ask(built, key):
    r = vlm("ask", "-m", f"smol-q:{key}", "--raw", "-t", "0", "-n", "4", "--threads", "2",
            "The capital of France is", home=built["home"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.lstrip().startswith("Paris"), r.stdout


@pytest.mark.slow
def test_registered_model_is_listed_and_described(built):
    r = vlm("list", "--json", home=built["home"])
    assert r.returncode == 0, r.stderr
    refs = {x["model"] for x in json.loads(r.stdout)}
    assert {f"smol-q:{k}" for k in KEYS} <= refs, refs
    info = vlm("info", "smol-q:onnx-int4", "--json", home=built["home"])
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["format"] == "onnx" and doc["architecture"] == "LlamaForCausalLM"
    # the default int4 recipe ("offset") keeps the lm_head at 8 bits
    assert doc["quantization"] == "int4 (MatMulNBits, block 32), int8 (MatMulNBits, block 64)"
    assert doc["chat_template"] == "yes"
    assert doc["context_length"] == 8192 and doc["vision_projector"] is None
    man = {f["name"].split("/")[-1]: f["sha256"] for a in built["manifest"]["artifacts"] if a["key"] == "onnx-int4"
           for f in a["files"]}
    assert {f["name"]: f["sha256"] for f in doc["files"]} == man     # what was built, and nothing else


@pytest.mark.slow
def test_source_folder_is_never_modified(built):
    assert _tree_digest(built["src"]) == built["src_before"]


# ---------------------------------------------------------------------------------------- bad inputs
def test_list_types_shows_bits_per_weight():
    r = vlm("quantize", "--list-types", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["target"]: x for x in json.loads(r.stdout)}
    assert {"gguf:q4_k_m", "gguf:q8_0", "gguf:q4_0", "gguf:q6_k", "onnx:int4", "onnx:int8"} <= set(rows)
    assert rows["gguf:q8_0"]["bits_per_weight"] > rows["gguf:q4_k_m"]["bits_per_weight"]


def test_folder_without_config_json(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\0" * 16)
    r = vlm("quantize", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"))
    assert_clean_error(r, 4, "config.json")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_fails_before_work(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"architectures": ["FrobnicatorForCausalLM"], "model_type": "frobnicator"}))
    (ck / "model.safetensors").write_bytes(b"\0" * 16)
    for target in ("gguf:q4_k_m", "onnx:int4"):
        r = vlm("quantize", str(ck), "--to", target, "--out", str(tmp_path / "o"))
        assert_clean_error(r, 2, "frobnicator")
        assert "llama" in r.stderr.lower()          # lists what is supported
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target,needle", [("gguf:q9_z", "q9_z"), ("onnx:int3", "int3"), ("tflite:int8", "tflite")])
def test_unknown_target(tmp_path, target, needle):
    r = vlm("quantize", str(tmp_path), "--to", target)
    assert_clean_error(r, 2, needle)


def test_pickle_checkpoint_refused_without_flag(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (ck / "pytorch_model.bin").write_bytes(b"\0" * 16)
    r = vlm("quantize", str(ck), "--to", "gguf:q8_0", "--out", str(tmp_path / "o"))
    assert_clean_error(r, 2, "--allow-pickle")


@pytest.mark.slow
def test_read_only_output_folder(smollm2_hf, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        args = [str(Path(sys.executable).with_name("vlm")), "quantize", str(smollm2_hf), "--to", "gguf:q8_0",
                "--out", str(parent / "o")]
        if os.access(parent, os.W_OK):      # root: drop the capability that ignores permissions
            if not shutil.which("capsh"):
                pytest.skip("root ignores permissions and capsh is missing to drop CAP_DAC_OVERRIDE")
            args = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(args)]
        env = {k: v for k, v in os.environ.items() if k != "VLM_DEBUG"}
        env.update(VLM_HOME=str(tmp_path / "home"), NO_COLOR="1")
        r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)
        assert_clean_error(r, 2, str(parent))
        assert not any(parent.iterdir())
    finally:
        parent.chmod(0o755)


@pytest.mark.slow
def test_ctrl_c_mid_conversion_leaves_nothing(smollm2_hf, tmp_path):
    """SIGINT while the build runs: exit 130, no output folder, no staging folder, source untouched."""
    before = _tree_digest(smollm2_hf)
    out = tmp_path / "o"
    env = {k: v for k, v in os.environ.items() if k != "VLM_DEBUG"}
    env.update(VLM_HOME=str(tmp_path / "home"), NO_COLOR="1")
    exe = Path(sys.executable).with_name("vlm")
    p = subprocess.Popen([str(exe), "quantize", str(smollm2_hf), "--to", "gguf:q8_0", "--out", str(out)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # wait until llama.cpp's converter is writing into the staging folder, then interrupt it
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and p.poll() is None:
        if any(x.is_dir() for x in tmp_path.glob(".o.*/.work/.gguf.*")):
            break
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, (p.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr
    assert stdout == ""
    assert not any(x.name.startswith((".o", "o")) for x in tmp_path.iterdir()), list(tmp_path.iterdir())
    assert _tree_digest(smollm2_hf) == before
