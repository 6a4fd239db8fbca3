"""`vlm quantize` on a vision-language model: the tiny random-weight Idefics3 (SmolVLM architecture)
checkpoint becomes a text GGUF + vision projector and the three-part ONNX layout, each verified by the
pipeline with an image; the registered artifacts answer questions about an image through `vlm ask`.

The fixture every vision test uses (conftest ``vision_model``) is this command's output, so the
foundation's vision tests run on artifacts `vlm quantize` built.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import assert_clean_error, vlm

pytestmark = [pytest.mark.model, pytest.mark.slow]

KEYS = {"f16", "q8_0", "onnx-fp32", "onnx-int8", "onnx-int4"}


def test_manifest_records_every_artifact_with_an_image_check(vision_model):
    out = Path(vision_model["out"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "vision"
    arts = {a["key"]: a for a in m["artifacts"]}
    assert set(arts) == KEYS
    for key, a in arts.items():
        for f in a["files"]:          # every file is there, with the recorded digest
            assert hashlib.sha256((out / f["name"]).read_bytes()).hexdigest() == f["sha256"], (key, f["name"])
        assert a["vision"]["image_tokens"] > 0, key          # an image went through the encoder
        assert 0 <= a["metrics"]["top1_agreement"] <= 1 and a["metrics"]["kl_mean"] >= 0, key
    assert arts["f16"]["mmproj"] and arts["f16"]["mmproj"] in {f["name"] for f in arts["f16"]["files"]}
    for key, suffix in (("onnx-fp32", ""), ("onnx-int8", "_int8"), ("onnx-int4", "_q4")):
        names = {f["name"] for f in arts[key]["files"]}
        assert {f"onnx/{p}{suffix}.onnx" for p in ("vision_encoder", "embed_tokens", "decoder_model_merged")} <= names
        assert {"onnx/preprocessor_config.json", "onnx/tokenizer.json", "onnx/config.json"} <= names
        assert arts[key]["model"] == f"onnx/decoder_model_merged{suffix}.onnx"
    # the fp32 export is the source, numerically; fewer bits cost size, not sanity
    assert arts["onnx-fp32"]["metrics"]["top1_agreement"] >= 0.99
    assert arts["onnx-int4"]["size"] < arts["onnx-int8"]["size"] < arts["onnx-fp32"]["size"]


@pytest.fixture(scope="module")
def registered(vision_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("q") / "tiny"
    r = vlm("quantize", str(vision_model["hf_dir"]), "--to", "gguf:q8_0", "--to", "onnx:int8", "--name", "tiny",
            "--out", str(out), "--register", "--threads", "2", home=home, timeout=900)
    assert r.returncode == 0, r.stderr
    img = home / "red.png"
    Image.new("RGB", (200, 150), (200, 30, 30)).save(img)
    return home, img


@pytest.mark.parametrize("key", ["q8_0", "onnx-int8"])
def test_registered_vision_artifacts_answer_about_an_image(registered, key):
    home, img = registered
    r = vlm("ask", "-m", f"tiny:{key}", str(img), "Describe this image.", "-n", "6", "-t", "0", "--json", home=home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["usage"]["image_tokens"] > 0 and doc["usage"]["completion_tokens"] > 0
    assert doc["timings"]["image_encode_s"] > 0


def test_info_describes_the_onnx_vision_artifact(registered):
    home, _ = registered
    r = vlm("info", "tiny:onnx-int8", "--json", home=home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "onnx" and doc["architecture"] == "Idefics3ForConditionalGeneration"
    assert doc["quantization"].startswith("int8") and doc["chat_template"] == "yes"
    assert "vision_encoder_int8.onnx" in doc["vision_projector"]
    names = {f["name"] for f in doc["files"]}
    assert {"decoder_model_merged_int8.onnx", "vision_encoder_int8.onnx", "embed_tokens_int8.onnx",
            "preprocessor_config.json"} <= names
    assert all(len(f["sha256"]) == 64 for f in doc["files"])


def test_unsupported_vision_architecture_for_onnx(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        "vision_config": {"model_type": "clip_vision_model"}}))
    (ck / "model.safetensors").write_bytes(b"\0" * 16)
    r = vlm("quantize", str(ck), "--to", "onnx:int8", "--out", str(tmp_path / "o"))
    assert_clean_error(r, 2, "idefics3")
    assert not (tmp_path / "o").exists()


def test_image_check_fits_models_whose_images_take_many_tokens(vision_model, tmp_path):
    """SmolVLM scales every image to a 2048-px edge (up to 17 tiles, ~1100 tokens): the pipeline's image
    check must give the model the context for that. Same checkpoint, processor edge raised to 1024 px:
    the check image becomes 177 tiles, 708 tokens -- more than a 512-token context holds."""
    import shutil

    src = tmp_path / "big"
    shutil.copytree(vision_model["hf_dir"], src)
    cfg = json.loads((src / "preprocessor_config.json").read_text())
    cfg["size"] = {"longest_edge": 1024}
    (src / "preprocessor_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = vlm("quantize", str(src), "--to", "gguf:q8_0", "--to", "onnx:int8", "--name", "big", "--out", str(out),
            "--threads", "2", home=tmp_path / "home", timeout=900)
    assert r.returncode == 0, r.stderr
    arts = {a["key"]: a for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    assert arts["q8_0"]["vision"]["image_tokens"] > 512
    assert arts["onnx-int8"]["vision"]["image_tokens"] == arts["q8_0"]["vision"]["image_tokens"]
