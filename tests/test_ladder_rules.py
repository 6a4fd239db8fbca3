"""The per-family ladder rules (inputs/ladders.py) without a model: every projector type the registry's
vision models declare has a family, the predicted token counts follow libmtmd's preprocessing (the
slow tests in test_vlm_ladders.py check them against libmtmd itself), and the licence line a download
prints (models/licences.py)."""
from __future__ import annotations

import pytest

from edgevlm.runtime.inputs.ladders import dyn_size, family_of

from test_registry import PROJECTOR_TYPES

# minimal mmproj metadata per projector type: (patch, image size, merge key, merge)
META = {
    "idefics3": {"clip.vision.patch_size": 16, "clip.vision.image_size": 512, "clip.vision.projector.scale_factor": 4,
                 "clip.vision.preproc_image_size": 1536},
    "lfm2": {"clip.vision.patch_size": 16, "clip.vision.image_size": 256, "clip.vision.projector.scale_factor": 2},
    "qwen3vl_merger": {"clip.vision.patch_size": 16, "clip.vision.image_size": 768, "clip.vision.spatial_merge_size": 2},
    "qwen2.5vl_merger": {"clip.vision.patch_size": 14, "clip.vision.image_size": 560, "clip.vision.spatial_merge_size": 2},
    "internvl": {"clip.vision.patch_size": 14, "clip.vision.image_size": 448, "clip.vision.projector.scale_factor": 2},
    "gemma3": {"clip.vision.patch_size": 14, "clip.vision.image_size": 896},
    "gemma4v": {"clip.vision.patch_size": 16, "clip.vision.image_size": 224},
    "mlp": {"clip.vision.patch_size": 14, "clip.vision.image_size": 336},
}
KINDS = {"idefics3": "tiles", "lfm2": "lfm2", "qwen3vl_merger": "dynamic", "qwen2.5vl_merger": "dynamic",
         "internvl": "grid", "gemma3": "fixed", "gemma4v": "dynamic", "mlp": "fixed"}


def fam(proj):
    return family_of({"clip.projector_type": proj, **META[proj]})


@pytest.mark.parametrize("proj", sorted(set(PROJECTOR_TYPES.values())))
def test_every_registry_projector_has_a_ladder(proj):
    f = fam(proj)
    assert f is not None and f.kind == KINDS[proj]
    for w, h in ((4032, 3024), (640, 480), (3000, 200), (1, 1)):
        ladder, high = f.ladder(w, h)
        assert ladder and all(o.tokens > 0 for o in ladder) and high.tokens > 0
        assert [o.tokens for o in ladder] == sorted(o.tokens for o in ladder)
        assert ladder[-1].tokens <= high.tokens          # never more than the model's own full detail
        if f.fixed:
            assert ladder == [high]
    assert ("fixed input" in f.summary()) == f.fixed


def test_dynamic_counts_follow_libmtmd():
    q = fam("qwen3vl_merger")
    assert dyn_size(640, 480, 32, 8 * 1024, 4096 * 1024) == (640, 480)        # 20 x 15 = 300 tokens
    ladder, high = q.ladder(640, 480)
    assert high.tokens == 300 and ladder[0].tokens == 54 and ladder[0].settings == "max64"
    assert q.ladder(4032, 3024)[1].tokens <= 4096
    lfm = fam("lfm2")
    ladder, high = lfm.ladder(4032, 3024)
    assert high.tokens == 6 * 256 + 234 and high.tiles == 7                 # 3 x 2 tiles of 512 px + thumbnail
    assert [o.tokens for o in ladder] == [70, 117, 234, 1770]
    assert ladder[0].settings.startswith("fit")                             # resized, never tiled
    iv = fam("internvl")
    ladder, high = iv.ladder(1600, 1200)
    assert high.tokens == 13 * 256 and ladder[0].tokens == 256 and ladder[0].settings == "fit448x448"


def test_licence_lines():
    from edgevlm.runtime.models.licences import licence_notice
    from edgevlm.runtime.models.registry import Registry

    assert licence_notice("m", "apache-2.0", None) is None and licence_notice("m", "MIT", None) is None
    line = licence_notice("lfm2.5-vl-450m", "lfm1.0", "https://huggingface.co/LiquidAI/LFM2.5-VL-450M")
    assert "LFM Open License v1.0" in line and "USD 10M" in line and "https://" in line
    for m in Registry.load().models():                  # every shipped licence tag reads as a name and a URL
        line = licence_notice(m.alias, m.license, m.homepage)
        assert line is None or ("https://" in line and m.alias in line), (m.alias, m.license)
