"""The persistent image-embedding cache: entries verified on read, LRU cap, atomic writes, concurrent
processes, an unwritable folder; and on both backends, a cached answer equal to the uncached one."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgevlm.runtime.inputs.embed_cache import EmbedCache, entry_key


def _arrays(seed: int = 0, n: int = 3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(n)]


def test_round_trip_with_meta(tmp_path):
    c = EmbedCache(tmp_path)
    k = entry_key("enc", "pix", "low")
    assert c.get(k) is None and not c.has(k)
    assert c.put(k, _arrays(), {"parts": [["t", [1, 2]], ["e", 64]]}) is None
    arrays, meta = c.get(k)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, _arrays()))
    assert meta == {"parts": [["t", [1, 2]], ["e", 64]]}
    assert c.stats()["entries"] == 1
    assert entry_key("enc", "pix", "high") != k and entry_key("enc2", "pix", "low") != k


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign"])
def test_damaged_entries_are_ignored_and_removed(tmp_path, damage):
    c = EmbedCache(tmp_path)
    k = entry_key("enc", "pix", "s")
    c.put(k, _arrays())
    p = c._path(k)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif damage == "empty":
        p.write_bytes(b"")
    else:                                   # another key's (valid) entry under this name
        other = entry_key("enc", "pix", "other")
        c.put(other, _arrays(1))
        p.write_bytes(c._path(other).read_bytes())
    assert c.get(k) is None
    assert not p.exists()                   # the next write replaces it
    assert c.put(k, _arrays()) is None and c.get(k) is not None


def test_lru_cap(tmp_path):
    one = sum(a.nbytes for a in _arrays()) + 300
    c = EmbedCache(tmp_path, max_bytes=int(one * 2.5))
    keys = [entry_key("e", str(i), "s") for i in range(4)]
    for i, k in enumerate(keys[:2]):
        c.put(k, _arrays(i))
        os.utime(c._path(k), (time.time() - 100 + i, time.time() - 100 + i))
    assert c.get(keys[0]) is not None       # a use: keys[1] is now the least recently used
    c.put(keys[2], _arrays(2))
    assert c.has(keys[0]) and not c.has(keys[1]) and c.has(keys[2])
    assert c.stats()["bytes"] <= c.max_bytes


def test_unwritable_cache_gives_a_reason_not_an_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "embeddings").write_text("a file where the folder should be")
    c = EmbedCache(ro)
    why = c.put(entry_key("e", "p", "s"), _arrays())
    assert why and isinstance(why, str)
    assert c.get(entry_key("e", "p", "s")) is None


_WRITER = """
import sys, numpy as np
from edgevlm.runtime.inputs.embed_cache import EmbedCache, entry_key
c = EmbedCache(sys.argv[1], max_bytes=200_000)
rng = np.random.default_rng(int(sys.argv[2]))
for i in range(40):
    k = entry_key("e", str(i % 7), "s")
    c.put(k, [np.full((64, 32), i % 7, np.float32)])
    got = c.get(entry_key("e", str(rng.integers(7)), "s"))
    if got is not None:
        a = got[0][0]
        assert (a == a.flat[0]).all(), "torn entry"
print("ok")
"""


def test_both_backends_open_the_cache_one_way(tmp_path, monkeypatch):
    """cache_for: None under --no-cache, one object per cache folder in a process, a new $VLM_HOME its own."""
    from edgevlm.runtime.inputs.embed_cache import cache_for
    from edgevlm.runtime.protocol import ImageDetail

    monkeypatch.setenv("VLM_HOME", str(tmp_path / "a"))
    assert cache_for(ImageDetail(cache=False)) is None
    first = cache_for(ImageDetail())
    assert first is cache_for(ImageDetail(level="high")) and first.root == tmp_path / "a" / "cache"
    monkeypatch.setenv("VLM_HOME", str(tmp_path / "b"))
    assert cache_for(ImageDetail()).root == tmp_path / "b" / "cache"


def test_concurrent_processes(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == "ok"
    assert EmbedCache(tmp_path, max_bytes=200_000).stats()["bytes"] <= 200_000 + 9_000


# ------------------------------------------------------------------------------- both backends, real models
@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(3)
    p = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(p)
    return p


def _backend(vm, fmt: str):
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    art = artifact_from_path(vm["gguf"], vm["mmproj"], True) if fmt == "gguf" else artifact_from_path(vm["onnx"], None, True)
    return load_backend(art, LoadOptions(n_ctx=2048))


def _answer(b, img, level: str, cache: bool):
    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, ImageDetail, Message

    b.reset()
    req = ChatRequest([Message("user", "What is in this picture?", [img])],
                      GenerationOptions(temperature=0, max_tokens=12, image_detail=ImageDetail(level=level, cache=cache)))
    _, last = complete(b, req)
    return last.token_ids, last.image_tokens, b.image_report


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("level", ["low", "high"])
def test_cached_answer_equals_uncached(vision_model, photo, home, fmt, level):
    from edgevlm.runtime.inputs.media import load_image

    img = load_image(str(photo))
    b = _backend(vision_model, fmt)
    try:
        plain, n_plain, rep = _answer(b, img, level, cache=False)
        assert rep["images"][0]["cache"] == "off"
        first, n_first, rep = _answer(b, img, level, cache=True)
        assert rep["images"][0]["cache"] in ("miss", "memory")
    finally:
        b.close()
    b = _backend(vision_model, fmt)            # a new backend: only the persistent cache can hold the image
    try:
        second, n_second, rep = _answer(b, img, level, cache=True)
        assert rep["images"][0]["cache"] == "hit" and rep["images"][0]["encode_s"] == 0.0
    finally:
        b.close()
    assert plain == first == second and n_plain == n_first == n_second
    assert (n_plain == rep["images"][0]["tokens"]) and (level != "low" or rep["images"][0]["tiles"] == 1)


@pytest.mark.model
@pytest.mark.slow
def test_gguf_units_equal_libmtmds_own_prompt(vision_model, photo, home):
    """--detail high through our per-image path gives the tokens libmtmd's whole-prompt path gives."""
    from edgevlm.runtime.inputs.media import load_image

    img = load_image(str(photo))
    b = _backend(vision_model, "gguf")
    try:
        ours, n_ours, _ = _answer(b, img, "high", cache=False)
        b._images.family = None                      # libmtmd's own tokenization and evaluation
        b._images.use(None)
        theirs, n_theirs, _ = _answer(b, img, "high", cache=False)
    finally:
        b.close()
    assert ours == theirs and n_ours == n_theirs


@pytest.mark.model
@pytest.mark.slow
def test_corrupt_entry_is_reencoded_and_unwritable_cache_warns(vision_model, photo, home):
    import json

    from conftest import vlm

    args = ("ask", "-m", str(vision_model["gguf"]), "--mmproj", str(vision_model["mmproj"]), "-t", "0", "-n", "4",
            "--json", "--detail", "low", str(photo), "What?")
    r1 = vlm(*args, home=home)
    assert r1.returncode == 0, r1.stderr
    entries = list((home / "cache" / "embeddings").rglob("*.emb"))
    assert len(entries) == 1
    entries[0].write_bytes(entries[0].read_bytes()[:100])          # truncated
    r2 = vlm(*args, home=home)
    assert r2.returncode == 0, r2.stderr
    a1, a2 = json.loads(r1.stdout), json.loads(r2.stdout)
    assert a2["timings"]["images"][0]["cache"] == "miss" and a1["answer"] == a2["answer"]
    r3 = vlm(*args, home=home)
    assert json.loads(r3.stdout)["timings"]["images"][0]["cache"] == "hit"
    import shutil

    shutil.rmtree(home / "cache" / "embeddings")
    (home / "cache" / "embeddings").write_text("not a folder")      # unwritable: answer anyway, one warning
    r4 = vlm(*args, home=home)
    assert r4.returncode == 0 and json.loads(r4.stdout)["answer"] == a1["answer"]
    assert r4.stderr.count("image cache could not be written") == 1, r4.stderr


@pytest.mark.model
@pytest.mark.slow
def test_two_images_at_two_details_in_one_prompt(vision_model, photo, home, tmp_path):
    """A small image (one tile, its own libmtmd context) and a big one (the model's full tiling, another
    context) in one prompt: each encoded by the context that cut it, the same answer from the cache."""
    from PIL import Image

    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.inputs.media import load_image
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, ImageDetail, Message

    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(small)
    imgs = [load_image(str(small)), load_image(str(photo))]
    out = []
    for cache in (False, True, True):
        b = _backend(vision_model, "gguf")
        try:
            req = ChatRequest([Message("user", "Compare.", imgs)], GenerationOptions(
                temperature=0, max_tokens=8, image_detail=ImageDetail(level="auto", budget_s=1e6, cache=cache)))
            _, last = complete(b, req)
            out.append((last.token_ids, [(i["tiles"], i["cache"]) for i in b.image_report["images"]]))
        finally:
            b.close()
    assert out[0][0] == out[1][0] == out[2][0]
    assert out[0][1][0][0] == 1 and out[0][1][1][0] > 1          # the small image is one tile, the photo more
    assert [c for _, c in out[2][1]] == ["hit", "hit"]


def test_vlm_cache_show_and_clear(home):
    import json

    from conftest import vlm

    c = EmbedCache(home / "cache")
    c.put(entry_key("e", "p", "s"), _arrays())
    r = vlm("cache", "--json", home=home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["entries"] == 1 and doc["bytes"] > 0 and doc["max_bytes"] == 1024 ** 3
    (home / "config.yaml").write_text("image_cache_max_bytes: 5000000\n")
    assert json.loads(vlm("cache", "show", "--json", home=home).stdout)["max_bytes"] == 5_000_000
    r = vlm("cache", "clear", home=home)
    assert r.returncode == 0 and "Removed 1" in r.stderr
    assert json.loads(vlm("cache", "--json", home=home).stdout)["entries"] == 0


def test_unknown_detail_is_one_clear_line(home, tmp_path):
    from conftest import vlm

    r = vlm("ask", "--detail", "medium", "-m", str(tmp_path / "none.gguf"), "hi", home=home)
    assert r.returncode != 0 and "--detail low, auto or high" in r.stderr and "Traceback" not in r.stderr
