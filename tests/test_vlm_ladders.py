"""Each vision family's detail ladder and embedding cache (inputs/ladders.py, backends/gguf_units.py), on the
random-weight fixtures of real shapes (fixtures/tiny_vlms.py): the token counts per level, --image-tokens,
cached = uncached greedy answers (M-RoPE positions from the cached chunk grid for Qwen-VL), a follow-up turn
after a cache hit, our per-image path = libmtmd's whole-prompt path at --detail high, and `vlm info` naming
a fixed input. No assertion depends on timing: ``auto`` runs with a budget that no encode exceeds.
"""
from __future__ import annotations

import pytest

from conftest import CACHE, vlm

pytestmark = [pytest.mark.model, pytest.mark.slow]

FAMILIES = ["lfm2_vl", "qwen3_vl", "qwen25_vl", "internvl", "gemma3"]
# image tokens of a 1600 x 1200 photo per level (low, high), from libmtmd's preprocessing of each family:
EXPECTED = {
    # LFM2: low = the image resized to <= 64 tokens (288 x 192), raised by libmtmd to its 64-token minimum
    # (320 x 224 -> 10 x 7 = 70); high = its own tiling: 3 x 2 tiles of 512 px (256 each) + a 234-token thumbnail
    "lfm2_vl": (70, 6 * 256 + 234),
    # Qwen3-VL: image_max_tokens 64 -> 288 x 192 px -> 9 x 6 = 54; high: 1600/32 x 1200/32 = 50 x 38 = 1900
    "qwen3_vl": (54, 1900),
    # Qwen2.5-VL: 14-px patches, 28 px a token: image_max_tokens 64 -> 252 x 168 px -> 9 x 6 = 54; high:
    # 1600/28 x 1200/28 rounded = 57 x 43 = 2451
    "qwen25_vl": (54, 2451),
    # InternVL: low = the 448-px thumbnail alone; high = a 3 x 4 grid of 448-px tiles + the thumbnail, 256 each
    "internvl": (256, 13 * 256),
    # Gemma 3: one 896-px input, 256 tokens, whatever the level
    "gemma3": (256, 256),
}


@pytest.fixture(scope="module")
def photo():
    """A 1600 x 1200 photo-like image (gradients and a disc), as decoded pixels."""
    import hashlib

    import numpy as np
    from PIL import Image, ImageDraw

    from edgevlm.runtime.protocol import ImageInput

    y, x = np.mgrid[0:1200, 0:1600]
    rgb = np.stack([x * 255 // 1599, y * 255 // 1199, (x + y) * 255 // 2798], axis=-1).astype("uint8")
    img = Image.fromarray(rgb)
    ImageDraw.Draw(img).ellipse((500, 300, 1000, 800), fill=(240, 200, 30))
    data = img.tobytes()
    return ImageInput(rgb=data, width=1600, height=1200, source="photo", sha256=hashlib.sha256(data).hexdigest())


_built: dict = {}


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, smollm2_gguf, tmp_path_factory):
    """(family, fixture paths, backend) with its own VLM_HOME (an empty embedding cache)."""
    import os

    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions
    from fixtures.tiny_vlms import family_fixture

    name = request.param
    if name not in _built:
        _built[name] = family_fixture(name, CACHE / "fixtures", smollm2_gguf)
    fx = _built[name]
    old = os.environ.get("VLM_HOME")
    os.environ["VLM_HOME"] = str(tmp_path_factory.mktemp(f"home-{name}"))
    b = load_backend(artifact_from_path(fx["gguf"], fx["mmproj"], True), LoadOptions(n_ctx=8192, n_threads=2))
    yield name, fx, b
    b.close()
    if old is None:
        os.environ.pop("VLM_HOME", None)
    else:
        os.environ["VLM_HOME"] = old


def _ask(b, img, level="auto", *, cache=True, max_tokens=None, follow_up=None):
    """(answer, image tokens, the image's report, follow-up's final or None) of one greedy question."""
    from edgevlm.runtime.generation.session import ChatSession
    from edgevlm.runtime.protocol import GenerationOptions, ImageDetail

    det = ImageDetail(level=level, cache=cache, max_tokens=max_tokens, budget_s=1e6)
    b.reset()
    s = ChatSession(b, "m", options=GenerationOptions(temperature=0, max_tokens=5, image_detail=det))
    r = s.ask("Describe the photo.", [img])
    rep = (b.image_report or {}).get("images") or [{}]
    second = s.ask(follow_up).final if follow_up else None
    return r.text, r.final.image_tokens, rep[0], second, r.final


def test_token_counts_per_level(loaded, photo):
    """low < auto <= high (low = auto = high for a fixed input), the counts libmtmd gives, and the ladder's
    predicted counts are the ones libmtmd produces."""
    name, _, b = loaded
    low_n, high_n = EXPECTED[name]
    _, n_low, r_low, _, _ = _ask(b, photo, "low", cache=False)
    _, n_auto, _, _, _ = _ask(b, photo, "auto", cache=False)
    _, n_high, r_high, _, _ = _ask(b, photo, "high", cache=False)
    assert (n_low, n_high) == (low_n, high_n), (n_low, n_auto, n_high)
    ladder, high = b._images.ladder(photo)
    assert (ladder[0].tokens, high.tokens) == (n_low, n_high)
    assert n_auto in {o.tokens for o in ladder} | {high.tokens}
    if name == "gemma3":
        assert n_low == n_auto == n_high and r_low["reason"].startswith("fixed input")
    else:
        assert n_low < n_auto <= n_high and r_low["cut"] and not r_high["cut"]


def test_image_tokens_cap(loaded, photo):
    """--image-tokens caps one image's tokens at any level (down to the family's smallest input)."""
    name, _, b = loaded
    low_n, high_n = EXPECTED[name]
    cap = max(low_n, high_n // 3)
    _, n, rep, _, _ = _ask(b, photo, "auto", cache=False, max_tokens=cap)
    assert n <= cap and rep["tokens"] == n
    _, n_high, _, _, _ = _ask(b, photo, "high", cache=False, max_tokens=low_n)
    assert n_high == low_n


@pytest.mark.parametrize("level", ["low", "high"])
def test_cached_answer_is_the_uncached_one(loaded, photo, level):
    """The same greedy answer and tokens from the encoder, from a cache write and from a cache read, and
    a follow-up after the cache hit evaluates only its new tokens."""
    name, _, b = loaded
    plain, n_plain, _, _, _ = _ask(b, photo, level, cache=False)
    first, n_first, r1, _, _ = _ask(b, photo, level)
    second, n_second, r2, f2, f1 = _ask(b, photo, level, follow_up="And the colours?")
    # (a fixed input is one entry for every level: Gemma 3's "high" reads what its "low" wrote)
    assert r1["cache"] == ("hit" if name == "gemma3" and level == "high" else "miss")
    assert r2["cache"] == "hit" and r2["encode_s"] == 0
    assert plain == first == second and n_plain == n_first == n_second
    assert f2.image_encode_s == 0 and 0 < f2.prompt_eval_tokens <= 30, (f2.prompt_eval_tokens, f2.prompt_tokens)
    assert f2.prompt_tokens > f1.prompt_tokens


def test_units_equal_libmtmds_whole_prompt(loaded, photo):
    """--detail high through the per-image path: the tokens and greedy answer of libmtmd's own path."""
    name, _, b = loaded
    ours, n_ours, _, _, _ = _ask(b, photo, "high", cache=False)
    images = b._images
    fam = images.family
    try:
        images.family = None                 # libmtmd's whole-prompt tokenization and evaluation
        images.free_context()
        images.use(None)
        b._last_prompt = None
        theirs, n_theirs, _, _, _ = _ask(b, photo, "high", cache=False)
    finally:
        images.family = fam
        b._last_prompt = None
    assert (ours, n_ours) == (theirs, n_theirs)


def test_info_names_the_ladder_or_the_fixed_input(loaded, photo):
    """`vlm info`: the family's ladder (or "fixed input"), and once an `auto` answer has measured the
    encoder here, its estimated encode seconds per level."""
    import json
    import os
    from pathlib import Path

    name, fx, b = loaded
    _ask(b, photo, "auto", cache=False)                    # measures the encoder's speed (not for a fixed input)
    r = vlm("info", str(fx["gguf"]), "--mmproj", str(fx["mmproj"]), "--no-hash", "--json",
            home=Path(os.environ["VLM_HOME"]))
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    detail = doc["image_detail"]
    if name == "gemma3":
        assert detail.startswith("fixed input (Gemma 3: one 896-px image, 256 tokens")
        assert "image_encode_estimate" not in doc
    else:
        assert "low " in detail and "high " in detail and "fixed input" not in detail and "embedding cache" in detail
        assert "low ~" in doc["image_encode_estimate"] and "high ~" in doc["image_encode_estimate"]


def test_context_counts_kv_cells_not_positions(loaded, photo):
    """An M-RoPE image (Qwen-VL) fills a KV cell per token but takes fewer positions: kv_used counts the
    cells, and a prompt whose positions fit the context but whose cells do not is a clean ContextOverflow
    (it was a failed llama_decode, a 500 on the server)."""
    from edgevlm.runtime.errors import ContextOverflow
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    name, fx, b = loaded
    _, n_img, _, _, final = _ask(b, photo, "high", cache=False)
    positions = len(b.kv_keys())
    if name not in ("qwen3_vl", "qwen25_vl"):          # one position per image token
        assert b.kv_used() == positions
        return
    unit = b._images.units[0]                   # its marker tokens, and the image: ~2,000 tokens on fewer positions
    extra = unit.n_cells - unit.n_pos
    assert unit.n_tokens == n_img and extra > n_img // 2 and b.kv_used() == positions + extra
    prompt_pos = final.prompt_tokens - extra                 # the reported prompt counts tokens (cells)
    assert positions <= prompt_pos + final.completion_tokens <= positions + 1     # (the last token is not fed back)
    small = load_backend(artifact_from_path(fx["gguf"], fx["mmproj"], True), LoadOptions(n_ctx=1024, n_threads=2))
    try:
        assert prompt_pos + 16 < small.n_ctx < final.prompt_tokens
        with pytest.raises(ContextOverflow):
            _ask(small, photo, "high", cache=False)
    finally:
        small.close()


REGISTRY_NAME = {"lfm2_vl": "lfm2.5-vl-450m:q4_0", "qwen3_vl": "qwen3-vl-2b:q4_k_m", "qwen25_vl": "qwen2.5-vl-3b:q4_k_m",
                 "internvl": "internvl3.5-1b:q4_k_m", "gemma3": "gemma3-4b:q4_k_m"}


def test_doctor_shows_each_installed_vision_models_levels(loaded, tmp_path):
    """`vlm doctor`: per installed vision model, the image tokens at each level for a 12 MP photo, and the
    encode seconds once an `auto` answer has measured this encoder here ("not measured" before)."""
    import json

    from PIL import Image

    from edgevlm.runtime.models.store import Store

    name, fx, _ = loaded
    home = tmp_path / "home"
    alias, key = REGISTRY_NAME[name].split(":")
    Store(home).install_local(alias, key, {fx["gguf"].name: fx["gguf"], fx["mmproj"].name: fx["mmproj"]},
                              format="gguf", quantization="Q8_0", model=fx["gguf"].name, mmproj=fx["mmproj"].name)

    def levels():
        r = vlm("doctor", "--json", home=home)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = [m for m in json.loads(r.stdout)["models"] if m["images"]]
        assert [m["model"] for m in rows] == [REGISTRY_NAME[name]]
        return rows[0]["images"]

    before = levels()
    assert before["encode_s"] is None and before["fixed_input"] == (name == "gemma3")
    assert before["tokens"]["low"] <= before["tokens"]["high"]
    Image.new("RGB", (1600, 1200), (90, 140, 200)).save(tmp_path / "p.png")
    r = vlm("ask", "-m", REGISTRY_NAME[name], "-t", "0", "-n", "2", str(tmp_path / "p.png"), "What is it?", home=home)
    assert r.returncode == 0, r.stderr[-2000:]
    after = levels()
    if name == "gemma3":
        assert after["encode_s"] is None and after["tokens"] == {"low": 256, "auto": [256], "high": 256}
    else:
        est = after["encode_s"]
        assert 0 < est["low"] <= est["auto"] <= est["high"] and isinstance(after["tokens"]["auto"], int)
    text = vlm("doctor", home=home).stdout
    assert "Images at each --detail level" in text and REGISTRY_NAME[name] in text
