"""vlm bench and vlm doctor on real models: well-formed output, and the memory estimate checked
against measured peak RSS (never lower than the measurement by more than 10%)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from conftest import vlm
from edgevlm.runtime.reports.bench import REPORT_SCHEMA

pytestmark = pytest.mark.model


def test_doctor_json(smollm2_gguf):
    r = vlm("doctor", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["cpu"]["physical_cores"] >= 1 and doc["memory"]["available"] > 0
    assert doc["default_threads"] >= 1
    assert doc["llama_cpp"]["version"] and "CPU" in (doc["llama_cpp"]["system_info"] or "")
    rows = {m["model"]: m for m in doc["models"]}
    assert rows["smollm2-135m:q4_1"]["fits"] is True and rows["smollm2-135m:q4_1"]["installed"] is True
    assert doc["recommended"]["text"]


def test_doctor_table():
    r = vlm("doctor")
    assert r.returncode == 0, r.stderr
    assert "CPU" in r.stdout and "smollm2-135m:q4_1" in r.stdout and "Recommended" in r.stdout


def test_bench_two_models_json_and_plot(smollm2_gguf, gemma_gguf, tmp_path):
    png = tmp_path / "chart.png"
    r = vlm("bench", "smollm2-135m", str(gemma_gguf), "--json", "--repeat", "2", "--prompt-tokens", "48",
            "--gen-tokens", "12", "--threads", "2", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, REPORT_SCHEMA)
    a, b = doc["results"]
    assert a["model"] == "smollm2-135m:q4_1" and b["format"] == "gguf"
    for res in (a, b):
        assert res["decode_tps"]["mean"] > 0 and res["prefill_tps"]["mean"] > 0
        assert res["ttft_s"]["min"] > 0 and res["threads"] == 2
        assert res["peak_rss_bytes"] > res["weights_bytes"] * 0.3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_table_on_stdout(smollm2_gguf):
    r = vlm("bench", str(smollm2_gguf), "--repeat", "1", "--prompt-tokens", "16", "--gen-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "decode" in r.stdout and "SmolLM2" in r.stdout


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_memory_estimate_not_below_measured_rss(alias, smollm2_gguf, gemma_gguf, models_home, monkeypatch):
    from edgevlm.runtime.reports.bench import run_isolated

    monkeypatch.setenv("VLM_HOME", str(models_home))
    for ctx in (512, 4096):
        res = run_isolated(alias, prompt_tokens=64, gen_tokens=8, repeat=1, n_ctx=ctx)
        est, rss = res["estimate_bytes"], res["peak_rss_bytes"]
        assert est is not None
        assert est >= 0.9 * rss, f"{alias} ctx={ctx}: estimate {est / 2**20:.0f} MiB < 90% of peak RSS {rss / 2**20:.0f} MiB"


def test_bench_unknown_model():
    r = vlm("bench", "no-such-model")
    assert r.returncode == 3 and "Traceback" not in r.stderr


def test_bench_vision_gguf_and_onnx(vision_model, tmp_path):
    """The vision fixture through both backends in one report: image-encode time, image tokens (the same
    count from libmtmd and from our Idefics3 preprocessing), a follow-up question's TTFT, memory."""
    from PIL import Image

    img = tmp_path / "photo.png"
    Image.new("RGB", (200, 120), (30, 140, 220)).save(img)
    r = vlm("bench", str(vision_model["gguf"]), str(vision_model["onnx"] / "decoder_model_merged_int8.onnx"),
            "--image", str(img), "--json", "--repeat", "1", "--prompt-tokens", "24", "--gen-tokens", "4",
            "--threads", "2", "--detail", "high")      # auto follows each encoder's measured speed here
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, REPORT_SCHEMA)
    gguf, onnx = doc["results"]
    assert (gguf["format"], onnx["format"]) == ("gguf", "onnx")
    for res in (gguf, onnx):
        im = res["image"]
        assert im["width"] == 200 and im["height"] == 120
        assert im["tokens"] > 0 and im["encode_ms"]["mean"] > 0 and im["followup_ttft_s"]["mean"] > 0
        assert res["estimate_bytes"] >= 0.9 * res["peak_rss_bytes"]
    assert gguf["image"]["tokens"] == onnx["image"]["tokens"]
    # the KV cache at each one's context (llama.cpp rounds it up): f16 in llama.cpp, fp32 in this ONNX export
    assert onnx["kv_cache_bytes"] * gguf["n_ctx"] == 2 * gguf["kv_cache_bytes"] * onnx["n_ctx"] > 0
    # the projector is counted with the weights it is loaded with
    assert gguf["weights_bytes"] == vision_model["gguf"].stat().st_size + vision_model["mmproj"].stat().st_size
