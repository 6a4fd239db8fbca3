"""Image detail: the choice of tiles per image (no model needed) and libmtmd's geometry as we predict it."""
from __future__ import annotations

import pytest

from edgevlm.runtime.inputs.detail import EncodeSpeed, Option, choose, idefics3_ladder
from edgevlm.runtime.inputs.idefics3 import hf_grid, mtmd_capped_grid, mtmd_full_grid
from edgevlm.runtime.protocol import ImageDetail

SEQ = 64


def _ladder(w: int, h: int):
    def tiles_at(n: int):
        c, r = hf_grid(w, h, n * 512, 512)
        return (c * r + 1 if c else 1), f"le={n * 512}"
    return idefics3_ladder(w, h, 512, 2048, tiles_at, SEQ)


def test_ladder_of_a_photo_goes_from_one_tile_to_the_full_tiling():
    ladder = _ladder(4000, 3000)
    assert [o.tiles for o in ladder] == [1, 5, 10, 13]      # 1, 2x2+1, 3x3+1, 4x3+1 (edges round up)
    assert ladder[-1].tokens == 13 * SEQ


def test_ladder_never_upscales_a_small_image():
    assert [o.tiles for o in _ladder(512, 384)] == [1]
    assert [o.tiles for o in _ladder(1050, 788)][-1] == 10    # 3 x 3 + 1 at most, never 4 x 3
    assert [o.tiles for o in _ladder(1, 1)] == [1]


def test_levels_and_the_budget():
    ladder = _ladder(4000, 3000)
    high = ladder[-1]
    pick = lambda **kw: choose(ladder, high, ImageDetail(**{k: v for k, v in kw.items() if k != "spt"}),
                               s_per_tile=kw.get("spt", 1.0), budget_s=kw.get("budget_s") or 2.0)
    assert pick(level="high").option.tiles == 13 and not pick(level="high").cut
    assert pick(level="low").option.tiles == 1 and pick(level="low").cut
    assert pick(level="auto", spt=0.1).option.tiles == 13          # fast device: all of it
    assert pick(level="auto", spt=0.3).option.tiles == 5           # 7 x 0.3 > 2 s
    slow = pick(level="auto", spt=5.0)
    assert slow.option.tiles == 1 and slow.cut and "smallest" in slow.reason
    assert pick(level="high", max_tokens=12 * SEQ).option.tiles == 10   # the most that fits the cap
    assert pick(level="auto", spt=0.01, max_tokens=100).option.tiles == 1


def test_a_cached_full_detail_costs_nothing():
    ladder = _ladder(4000, 3000)
    ch = choose(ladder, ladder[-1], ImageDetail(), s_per_tile=5.0, budget_s=2.0, cached=lambda o: o.tiles == 13)
    assert ch.option.tiles == 13 and ch.reason == "cached"


def test_unknown_level_is_a_usage_error():
    from edgevlm.runtime.errors import UsageError

    with pytest.raises(UsageError):
        choose([Option("a", 1, 64)], Option("a", 1, 64), ImageDetail(level="medium"), s_per_tile=1, budget_s=1)


def test_libmtmd_grids():
    assert mtmd_full_grid(4000, 3000, 2048, 512) == (4, 3)
    assert mtmd_full_grid(512, 384, 2048, 512) == (4, 3)           # libmtmd upscales small images
    assert mtmd_full_grid(30, 3000, 2048, 512) == (1, 4)
    assert mtmd_capped_grid(4000, 3000, 2048, 512, 1) == (1, 1)
    assert mtmd_capped_grid(4000, 3000, 2048, 512, 6) == (2, 2)
    assert mtmd_capped_grid(4000, 3000, 2048, 512, 12) == (4, 3)


def test_encode_speed_is_kept_per_key(tmp_path):
    sp = EncodeSpeed(tmp_path / "speed.json")
    assert sp.get("a") is None
    sp.record("a", 4, 2.0)
    sp.record("a", 1, 1.0)
    assert sp.get("a") == pytest.approx(0.75)
    assert sp.get("b") is None
    (tmp_path / "speed.json").write_text("not json")
    assert sp.get("a") is None                                     # a damaged file is measured again


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_images_of_any_shape_are_answered(vision_model, home, fmt):
    """Tiny, huge and extreme aspect ratios, at every level: an answer, never an engine error (libmtmd fails
    on a 3000x1 strip by itself; the GGUF backend letterboxes such images first)."""
    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, ImageInput, LoadOptions, Message

    art = artifact_from_path(vision_model["gguf"], vision_model["mmproj"], True) if fmt == "gguf" \
        else artifact_from_path(vision_model["onnx"], None, True)
    b = load_backend(art, LoadOptions(n_ctx=4096))
    try:
        for w, h in [(1, 1), (2, 1), (1, 3000), (3000, 1), (4000, 3), (5, 7), (65, 1), (3000, 2000)]:
            img = ImageInput(rgb=bytes([100]) * (w * h * 3), width=w, height=h, source=f"{w}x{h}", sha256=f"{w}x{h}")
            for level in ("low", "auto", "high"):
                b.reset()
                _, last = complete(b, ChatRequest([Message("user", "What?", [img])], GenerationOptions(
                    temperature=0, max_tokens=2, image_detail=ImageDetail(level=level, cache=False))))
                assert last.image_tokens > 0, (w, h, level)
    finally:
        b.close()


def test_auto_counts_the_prefill_of_the_image_tokens():
    """auto's cost is the encode plus the text model's prefill of the option's tokens once that speed is
    known; a cached option still costs its prefill, so a cached full detail is not taken when its tokens
    alone would blow the budget."""
    ladder = _ladder(4000, 3000)
    high = ladder[-1]
    pick = lambda spt, sptok, **kw: choose(ladder, high, ImageDetail(), s_per_tile=spt, budget_s=2.0,
                                           s_per_token=sptok, **kw)
    assert pick(0.1, None).option.tiles == 13                       # encode only: 1.3 s
    with_prefill = pick(0.1, 2.0 / (13 * SEQ))                     # 13 tiles: 1.3 s + 2.0 s of prefill
    assert with_prefill.option.tiles < 13 and "prefill" in with_prefill.reason
    n = with_prefill.option.tiles
    assert n * 0.1 + n * SEQ * 2.0 / (13 * SEQ) <= 2.0
    cached = pick(5.0, 2.5 / (13 * SEQ), cached=lambda o: o.tiles == 13)
    assert cached.option.tiles == 1 and "smallest" in cached.reason     # 13 tiles' prefill alone: 2.5 s
    cheap = pick(5.0, 0.5 / (13 * SEQ), cached=lambda o: o.tiles == 13)
    assert cheap.option.tiles == 13 and cheap.reason.startswith("cached")
