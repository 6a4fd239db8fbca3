"""Every small-VLM family the registry lists, on random weights of its real shapes (fixtures/tiny_vlms.py):
converted by our own `vlm quantize`, an image answered by `vlm ask`, a follow-up turn that evaluates only
its new tokens, and the memory estimate against the measured peak RSS.

Every family goes through the one image planner (inputs/ladders.py, backends/gguf_units.py); the counts
below are at ``--detail high`` (the model's own preprocessing, libmtmd's counts for a 640 x 480 photo), so
that no assertion depends on the encode speed ``auto`` measures. tests/test_vlm_ladders.py covers the other
levels, --image-tokens and the embedding cache.
"""
from __future__ import annotations

import json

import pytest

from conftest import CACHE, vlm

pytestmark = [pytest.mark.model, pytest.mark.slow]

# family -> image tokens libmtmd gives a 640 x 480 photo, and why:
EXPECTED_IMAGE_TOKENS = {
    # LFM2 (SigLIP2 NaFlex): fits one tile (<= 256 tokens after the 2x2 unshuffle): resized to a multiple
    # of 32 px (16-px patches x 2) keeping the aspect, 576 x 416 -> 18 x 13 = 234 tokens, no thumbnail
    "lfm2_vl": 234,
    # Qwen3-VL: dynamic resolution, 16-px patches merged 2 x 2: 640/32 x 480/32 = 20 x 15 = 300 tokens
    "qwen3_vl": 300,
    # Qwen2.5-VL: the same with 14-px patches (28 px a token), sides rounded to 28: 644/28 x 476/28 = 23 x 17
    "qwen25_vl": 391,
    # InternVL: 448-px tiles (4:3 -> a 2 x 2 grid) plus a thumbnail, 256 tokens each = 1280
    "internvl": 1280,
    # Gemma 3: one 896-px image, 4 x 4 average pool: always 256
    "gemma3": 256,
}
FAMILIES = list(EXPECTED_IMAGE_TOKENS)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 640 x 480 photo-like image (smooth gradients and shapes, JPEG)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:480, 0:640]
    rgb = np.stack([x * 255 // 639, y * 255 // 479, (x + y) * 255 // 1118], axis=-1).astype("uint8")
    img = Image.fromarray(rgb)
    d = ImageDraw.Draw(img)
    d.ellipse((200, 120, 420, 340), fill=(240, 200, 30))
    d.rectangle((40, 300, 180, 440), fill=(20, 60, 160))
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    img.save(path, quality=90)
    return path


_built: dict = {}


@pytest.fixture(params=FAMILIES)
def family(request, smollm2_gguf):
    from fixtures.tiny_vlms import family_fixture

    name = request.param
    if name not in _built:
        _built[name] = family_fixture(name, CACHE / "fixtures", smollm2_gguf)
    return name, _built[name]


def test_fixture_has_the_family_projector(family):
    """The projector type, patch size and merge factor in the converted mmproj are the real model's."""
    from edgevlm.runtime.formats.gguf_file import read_gguf
    from fixtures.tiny_vlms import FAMILIES as SPECS

    name, fx = family
    md = read_gguf(fx["mmproj"]).metadata
    assert str(md["clip.projector_type"]).lower() == SPECS[name]["projector"]
    patch = {"lfm2_vl": 16, "qwen3_vl": 16, "qwen25_vl": 14, "internvl": 14, "gemma3": 14}[name]
    assert md["clip.vision.patch_size"] == patch
    if name in ("lfm2_vl", "internvl"):
        assert md["clip.vision.projector.scale_factor"] == 2
    if name == "qwen3_vl":
        assert md["clip.vision.spatial_merge_size"] == 2
        assert md["clip.vision.is_deepstack_layers"] == [False, True, True, False]
    if name == "qwen25_vl":       # window attention, full attention every 2nd block (the real model's every 8th)
        assert md["clip.vision.n_wa_pattern"] == 2 and md["clip.use_silu"]   # (its merge of 2 is implied by the type)
    text = read_gguf(fx["gguf"]).metadata
    assert "tokenizer.chat_template" in text


def test_ask_about_an_image(family, photo, tmp_path):
    name, fx = family
    r = vlm("ask", "-m", str(fx["gguf"]), "--mmproj", str(fx["mmproj"]), str(photo), "What is in this photo?",
            "-t", "0", "-n", "6", "--threads", "2", "--detail", "high", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["usage"]["image_tokens"] == EXPECTED_IMAGE_TOKENS[name], doc["usage"]
    assert doc["usage"]["completion_tokens"] >= 1 and doc["finish_reason"] in ("length", "stop")
    assert doc["timings"]["image_encode_s"] > 0
    # greedy answers are repeatable from a new process
    again = vlm("ask", "-m", str(fx["gguf"]), "--mmproj", str(fx["mmproj"]), str(photo), "What is in this photo?",
                "-t", "0", "-n", "6", "--threads", "2", "--detail", "high", "--json", home=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["answer"] == doc["answer"]


def test_follow_up_evaluates_only_new_tokens(family, photo):
    """A second question about the same image neither encodes the image again nor re-evaluates the prompt
    (the embedding cache is off: the first question must encode; test_vlm_ladders.py covers the cache)."""
    from edgevlm.runtime.generation.session import ChatSession, GenerationOptions
    from edgevlm.runtime.inputs.media import load_image
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import ImageDetail, LoadOptions

    name, fx = family
    art = artifact_from_path(fx["gguf"], fx["mmproj"], True)
    backend = load_backend(art, LoadOptions(n_ctx=4096, n_threads=2))
    try:
        s = ChatSession(backend, name, options=GenerationOptions(temperature=0, max_tokens=4,
                                                                 image_detail=ImageDetail(level="high", cache=False)))
        first = s.ask("Describe the photo.", [load_image(photo)])
        f1 = first.final
        assert f1.image_tokens == EXPECTED_IMAGE_TOKENS[name]
        assert f1.prompt_eval_tokens == f1.prompt_tokens and f1.image_encode_s > 0
        second = s.ask("Which colours are in it?")
        f2 = second.final
        assert f2.prompt_tokens > f1.prompt_tokens + f1.completion_tokens - 1
        assert f2.image_encode_s == 0, "the follow-up encoded the image again"
        assert 0 < f2.prompt_eval_tokens <= 30, (f2.prompt_eval_tokens, f2.prompt_tokens)
    finally:
        backend.close()


# A model whose memory is partly recurrent (LFM2's short convolutions; Qwen3.5's Gated DeltaNet too) cannot
# drop the end of its sequence, so when a follow-up question does not extend the KV cache exactly,
# llama_memory_seq_rm fails and the whole sequence is forgotten; GGUFBackend.prefill then prepares the
# images again instead of assuming them cached ("An image of the conversation left the KV cache." before).
# Families listed here are expected to fail the bench follow-up (none now).
RECURRENT_MEMORY_BUG: set = set()   # fixed: GGUFBackend.prefill prepares the images again


def test_memory_estimate_against_peak_rss(family, photo, request):
    """`vlm bench --image` in its own process: the estimate (weights + projector + KV + overhead) is not
    below the measured peak RSS by more than 10%, with the image encoded."""
    name, fx = family
    if name in RECURRENT_MEMORY_BUG:
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError,
                                              reason="follow-up on a recurrent-memory model (see RECURRENT_MEMORY_BUG)"))
    r = vlm("bench", str(fx["gguf"]), "--image", str(photo), "--detail", "high", "--json", "--repeat", "1", "--prompt-tokens", "24",
            "--gen-tokens", "4", "--threads", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)["results"][0]
    assert res["image"]["tokens"] == EXPECTED_IMAGE_TOKENS[name]
    assert res["weights_bytes"] == fx["gguf"].stat().st_size + fx["mmproj"].stat().st_size
    est, rss = res["estimate_bytes"], res["peak_rss_bytes"]
    assert est >= 0.9 * rss, f"{name}: estimate {est / 2**20:.0f} MiB < 90% of peak RSS {rss / 2**20:.0f} MiB"


def test_images_the_preprocessing_could_refuse(family, tmp_path):
    """A 1 x 1 pixel, a 3000 x 8 strip and an 8 x 3000 one: every family answers (padded to an aspect its
    preprocessing takes, at least its smallest input) at high and auto, one process each, no engine abort."""
    from PIL import Image

    name, fx = family
    for size in ((1, 1), (3000, 8), (8, 3000)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 30, 30)).save(path)
        for level in ("high", "auto"):
            r = vlm("ask", "-m", str(fx["gguf"]), "--mmproj", str(fx["mmproj"]), str(path), "What is it?", "-t", "0",
                    "-n", "2", "--threads", "2", "--detail", level, "--json", home=tmp_path / "home")
            assert r.returncode == 0, (size, level, r.stderr[-1500:])
            usage = json.loads(r.stdout)["usage"]
            assert usage["image_tokens"] >= 1 and usage["completion_tokens"] >= 1, (size, level, usage)
