"""The real llama.cpp image path (libmtmd) on the tiny SmolVLM-architecture fixture, through `vlm`."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import assert_clean_error, vlm

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    a = d / "red.png"
    Image.new("RGB", (96, 64), (220, 30, 30)).save(a)
    b = d / "photo.jpg"
    Image.radial_gradient("L").convert("RGB").resize((200, 120)).save(b, quality=90)
    return a, b


def _ask(vm, *args, **kw):
    # --no-cache: these tests run in the shared models home, where an earlier run's embeddings would make
    # image_encode_s 0 (the cache has tests of its own: test_image_cache.py)
    return vlm("ask", "-m", str(vm["gguf"]), "--mmproj", str(vm["mmproj"]), "-t", "0", "--no-cache", *args, **kw)


def test_image_is_encoded_and_answered(vision_model, images):
    r = _ask(vision_model, "--json", "-n", "6", str(images[0]), "What color is this?")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    u = doc["usage"]
    assert u["image_tokens"] > 0                          # the image really went through the projector
    assert u["prompt_tokens"] > u["image_tokens"]
    assert u["completion_tokens"] >= 1 and doc["timings"]["image_encode_s"] > 0
    assert doc["images"][0]["width"] == 96


def test_two_images_and_stdin(vision_model, images):
    one = json.loads(_ask(vision_model, "--json", "-n", "2", str(images[0]), "Describe.").stdout)["usage"]
    two = json.loads(_ask(vision_model, "--json", "-n", "2", str(images[0]), str(images[1]), "Compare.").stdout)["usage"]
    assert two["image_tokens"] > one["image_tokens"]
    data = images[1].read_bytes()
    r = _ask(vision_model, "--json", "-n", "2", "-", "Describe.", input=data)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["usage"]["image_tokens"] > 0 and doc["images"][0]["source"] == "-"


def test_follow_up_about_same_image_reuses_cache(vision_model, images, monkeypatch):
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.inputs.media import load_image
    from edgevlm.runtime.protocol import LoadOptions
    from edgevlm.runtime.generation.session import ChatSession, GenerationOptions

    b = load_backend(artifact_from_path(vision_model["gguf"], vision_model["mmproj"], True), LoadOptions(n_ctx=4096))
    try:
        from edgevlm.runtime.protocol import ImageDetail

        s = ChatSession(b, "fixture", options=GenerationOptions(temperature=0, max_tokens=4,
                                                               image_detail=ImageDetail(level="high", cache=False)))
        img = load_image(images[1])
        first = s.ask("What is this?", [img])
        preprocessed = []
        real = b._mtmd_cpp.mtmd_tokenize
        monkeypatch.setattr(b._mtmd_cpp, "mtmd_tokenize", lambda *a: preprocessed.append(1) or real(*a))
        second = s.ask("And its colour?")
        assert first.final.image_tokens > 0 and first.final.image_encode_s > 0
        assert second.final.image_tokens == first.final.image_tokens    # image still in the conversation
        assert second.final.image_encode_s == 0                          # ...but not encoded again
        assert second.final.prompt_eval_tokens < first.final.image_tokens
        assert preprocessed == []                                        # ...nor preprocessed again
        # and the tokens are exactly those of a full tokenization of the whole conversation
        last = b._last_prompt
        text, keys = last.text, last.keys
        full_keys, _, _, n_image = b._images.tokenize_units(text, [img], s.options.image_detail)
        b._images.free_all()
        assert keys == full_keys and n_image == first.final.image_tokens and len(preprocessed) == 1
        b.reset()                                                        # a new conversation re-encodes
        third = s.ask("And now?")
        assert third.final.image_encode_s > 0 and len(preprocessed) == 2
    finally:
        b.close()


def test_projector_that_does_not_belong(vision_model, smollm2_gguf, images):
    r = vlm("ask", "-m", str(smollm2_gguf), "--mmproj", str(vision_model["mmproj"]), str(images[0]), "hi")
    assert_clean_error(r, 4, "does not belong")
    r = vlm("ask", "-m", str(vision_model["mmproj"]), "hi")
    assert_clean_error(r, 4, "vision projector")


def test_image_to_text_only_model(smollm2_gguf, images):
    r = vlm("ask", "-m", str(smollm2_gguf), str(images[0]), "What is this?")
    assert_clean_error(r, 2, "vision projector")


def test_not_an_image(vision_model, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    r = _ask(vision_model, str(bad), "What is this?")
    assert_clean_error(r, 5, "not an image")


def test_chat_with_image_command(vision_model, images, tmp_path):
    save = tmp_path / "c.json"
    script = f"Describe it.\n/image {images[1]}\nAnd this one?\n/save {save}\n"
    r = vlm("chat", "-m", str(vision_model["gguf"]), "--mmproj", str(vision_model["mmproj"]), "-t", "0", "-n", "3",
            str(images[0]), input=script)
    assert r.returncode == 0, r.stderr
    msgs = json.loads(save.read_text())["messages"]
    assert msgs[0]["images"][0]["path"] == str(images[0].resolve())
    assert msgs[2]["images"][0]["sha256"] and msgs[2]["images"][0]["path"].endswith("photo.jpg")


def test_info_reports_projector(vision_model):
    r = vlm("info", str(vision_model["gguf"]), "--mmproj", str(vision_model["mmproj"]), "--json", "--no-hash")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert "matches the model" in doc["vision_projector"]
    assert doc["chat_template"] == "yes" and len(doc["files"]) == 2
