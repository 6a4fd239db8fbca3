"""Idefics3 / SmolVLM image preprocessing and prompt expansion, with Pillow and numpy only.

This is transformers' ``Idefics3ImageProcessor`` and ``Idefics3Processor`` (SmolVLM's are the same
for images) without torch, driven by the model's ``preprocessor_config.json`` and
``processor_config.json``:

1. resize so the longest edge is ``size.longest_edge`` (the other edge rounded to an even number),
   capped at 4096 px;
2. with ``do_image_splitting``: resize both edges up to multiples of the tile size
   ``max_image_size.longest_edge``, cut the image into rows x cols tiles and add the whole image
   resized to one tile (the "global" image); without it: resize the image to one square tile;
3. rescale (``rescale_factor``) and normalize (``image_mean`` / ``image_std``), channels first;
4. pad every tile to the largest tile of the batch, with a ``pixel_attention_mask`` of the real pixels.

Every resize is Pillow's ``Image.resize`` on 8-bit RGB with the configured filter (LANCZOS by default),
exactly the call transformers makes, so the pixels match it bit for bit.

The prompt: each ``<image>`` in the rendered chat becomes, for a split image,
``<fake_token_around_image><row_i_col_j><image>*seq`` per tile (a newline after each row), then
``\\n<fake_token_around_image><global-img><image>*seq<fake_token_around_image>``; for an unsplit image just
the global part. ``seq`` (image_seq_len) is ``processor_config.json``'s ``image_seq_len`` or
``(image_size / patch_size)**2 / scale_factor**2`` from ``config.json``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..errors import BadMedia, BadModelFile
from ..protocol import ImageInput

SUPPORTED_IMAGE_PROCESSORS = (
    "Idefics3ImageProcessor", "Idefics3ImageProcessorFast", "SmolVLMImageProcessor", "SmolVLMImageProcessorFast",
)
MAX_IMAGE_SIZE = 4096          # transformers' absolute cap on the resized image's longest edge
IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


@dataclass(frozen=True)
class ImagePlan:
    """How one image is cut: ``rows`` x ``cols`` tiles plus a global image (0 x 0: the global image only)."""

    rows: int
    cols: int
    size: tuple[int, int]        # (height, width) after the resizes, before splitting

    @property
    def tiles(self) -> int:
        return self.rows * self.cols + 1 if self.rows else 1


@dataclass
class ProcessedImages:
    pixel_values: "object"          # float32 [1, n_tiles, 3, H, W]
    pixel_attention_mask: "object"  # bool [1, n_tiles, H, W]
    plans: list[ImagePlan]


def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _multiple_of_tile(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect)
        width = math.ceil(width / tile) * tile
    return height, width


class Idefics3Preprocessor:
    """Images -> pixel tiles, and a rendered prompt's ``<image>`` markers -> the model's image tokens."""

    def __init__(self, preprocessor: dict, processor: Optional[dict] = None, model_config: Optional[dict] = None,
                 source: str = "preprocessor_config.json") -> None:
        kind = preprocessor.get("image_processor_type") or preprocessor.get("processor_class")
        if kind not in SUPPORTED_IMAGE_PROCESSORS:
            raise BadModelFile(
                f"{source} asks for image processor {kind or '(none)'}; this runtime implements "
                f"{', '.join(SUPPORTED_IMAGE_PROCESSORS)}.",
                hint="Use an Idefics3 / SmolVLM model, or its GGUF build for other vision models.",
            )
        self.kind = kind
        processor = processor or {}
        model_config = model_config or {}
        self.do_resize = bool(preprocessor.get("do_resize", True))
        self.size = preprocessor.get("size") or {"longest_edge": 4 * 364}
        self.do_image_splitting = bool(preprocessor.get("do_image_splitting", True))
        max_size = preprocessor.get("max_image_size") or {"longest_edge": 364}
        self.do_rescale = bool(preprocessor.get("do_rescale", True))
        self.rescale_factor = float(preprocessor.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(preprocessor.get("do_normalize", True))
        self.image_mean = preprocessor.get("image_mean", [0.5, 0.5, 0.5])
        self.image_std = preprocessor.get("image_std", [0.5, 0.5, 0.5])
        self.do_pad = bool(preprocessor.get("do_pad", True))
        try:
            self.tile = int(max_size["longest_edge"])
            if "longest_edge" not in self.size and not ("height" in self.size and "width" in self.size):
                raise KeyError("size")
            from PIL import Image

            self.resample = Image.Resampling(int(preprocessor.get("resample", Image.Resampling.LANCZOS)))
        except (KeyError, TypeError, ValueError) as e:
            raise BadModelFile(f"{source} has an unusable size, max_image_size or resample entry ({e}).",
                               hint="Fetch the model's preprocessor_config.json again.") from e

        seq = processor.get("image_seq_len")
        if not isinstance(seq, int) or seq <= 0:
            vision = model_config.get("vision_config") or {}
            try:
                seq = int(((int(vision["image_size"]) // int(vision["patch_size"])) ** 2)
                          / (float(model_config.get("scale_factor", 2)) ** 2))
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                raise BadModelFile("Cannot tell how many tokens an image tile takes: neither processor_config.json's "
                                   "image_seq_len nor config.json's vision_config says.",
                                   hint="Copy the model's processor_config.json and config.json beside it.") from e
        self.image_seq_len = seq
        self.image_token = processor.get("image_token") or IMAGE_TOKEN
        self.fake_token = FAKE_TOKEN
        self.global_token = GLOBAL_TOKEN

    @classmethod
    def from_dirs(cls, dirs: Iterable[Path], model_config: Optional[dict] = None) -> "Idefics3Preprocessor":
        """Read ``preprocessor_config.json`` (required) and ``processor_config.json`` from the first of
        ``dirs`` that holds them."""
        dirs = [Path(d) for d in dirs]

        def find(name: str) -> Optional[Path]:
            return next((d / name for d in dirs if (d / name).is_file()), None)

        from ..formats.model_json import read_json_object as read

        pre = find("preprocessor_config.json")
        if pre is None:
            raise BadModelFile(
                f"No preprocessor_config.json next to the model in {dirs[0] if dirs else '.'}: "
                "without it images cannot be prepared.",
                hint="Copy the model's preprocessor_config.json (and processor_config.json) beside its config.json.",
            )
        proc = find("processor_config.json")
        return cls(read(pre), read(proc) if proc else None, model_config, source=str(pre))

    # ------------------------------------------------------------------ geometry
    @property
    def longest_edge(self) -> int:
        """The model's own resize target (its full detail): ``size.longest_edge``, or the fixed size's edge."""
        if "longest_edge" in self.size:
            return int(self.size["longest_edge"])
        return max(int(self.size["height"]), int(self.size["width"]))

    def settings(self, longest_edge: Optional[int] = None) -> str:
        """The preprocessing that decides an image's tiles and pixels, as a string (an embedding-cache key part)."""
        return (f"idefics3:le={longest_edge or self.longest_edge}:tile={self.tile}:split={int(self.do_image_splitting)}"
                f":rs={int(self.do_resize)}:{int(self.resample)}:{self.rescale_factor}:{self.image_mean}:{self.image_std}")

    def _resized(self, height: int, width: int, longest_edge: Optional[int] = None) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        if longest_edge or "longest_edge" in self.size:
            h, w = _rescale_to_max_len(height, width, int(longest_edge or self.size["longest_edge"]))
            return _scale_below(h, w, MAX_IMAGE_SIZE)
        return int(self.size["height"]), int(self.size["width"])

    def plan(self, width: int, height: int, longest_edge: Optional[int] = None) -> ImagePlan:
        """How an image of this size is cut (no pixels touched); ``longest_edge`` overrides the model's
        resize target (a detail level: N x tile)."""
        h, w = self._resized(height, width, longest_edge)
        if not self.do_image_splitting:
            return ImagePlan(0, 0, (self.tile, self.tile))
        h, w = _multiple_of_tile(h, w, self.tile)
        if h > self.tile or w > self.tile:
            return ImagePlan(math.ceil(h / self.tile), math.ceil(w / self.tile), (h, w))
        return ImagePlan(0, 0, (h, w))

    def n_positions(self, width: int, height: int) -> int:
        """Image-token positions the image takes in the prompt (tiles x image_seq_len)."""
        return self.plan(width, height).tiles * self.image_seq_len

    # ------------------------------------------------------------------ pixels
    def _tiles(self, image: ImageInput, longest_edge: Optional[int] = None):
        """The image's tiles as uint8 HWC arrays, and its plan."""
        import numpy as np
        from PIL import Image

        if len(image.rgb) != image.width * image.height * 3 or image.width < 1 or image.height < 1:
            raise BadMedia(f"Image {image.source} has {len(image.rgb)} bytes of pixels for "
                           f"{image.width}x{image.height} RGB.", hint="This is a bug in image loading; report it.")
        img = Image.frombytes("RGB", (image.width, image.height), image.rgb)

        def resize(im, h: int, w: int):
            return im.resize((w, h), resample=self.resample)

        h, w = self._resized(image.height, image.width, longest_edge)
        if self.do_resize:
            img = resize(img, h, w)
        if not self.do_image_splitting:
            return [np.asarray(resize(img, self.tile, self.tile))], ImagePlan(0, 0, (self.tile, self.tile))
        h, w = _multiple_of_tile(h, w, self.tile)
        img = resize(img, h, w)
        arr = np.asarray(img)
        t = self.tile
        if not (h > t or w > t):
            return [arr], ImagePlan(0, 0, (h, w))
        rows, cols = math.ceil(h / t), math.ceil(w / t)
        oh, ow = math.ceil(h / rows), math.ceil(w / cols)
        tiles = []
        for r in range(rows):
            for c in range(cols):
                y0, x0 = r * oh, c * ow
                tiles.append(arr[y0: min(y0 + oh, h), x0: min(x0 + ow, w)])
        tiles.append(np.asarray(resize(img, t, t)) if (h, w) != (t, t) else arr)
        return tiles, ImagePlan(rows, cols, (h, w))

    def _normalize(self, tile):
        import numpy as np

        x = tile
        if self.do_rescale:   # as transformers: in float64, then down to float32
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        elif not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            mean = np.array(self.image_mean, dtype=x.dtype)
            std = np.array(self.image_std, dtype=x.dtype)
            x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def preprocess(self, images: Sequence[ImageInput], longest_edge: Optional[int] = None) -> ProcessedImages:
        """All tiles of ``images`` (in order; each image's global tile last) as one batch of one sample:
        ``pixel_values`` [1, n_tiles, 3, H, W] float32 and ``pixel_attention_mask`` [1, n_tiles, H, W] bool."""
        tiles, plans = [], []
        for image in images:
            t, plan = self._tiles(image, longest_edge)
            tiles.extend(t)
            plans.append(plan)
        return self._batch(tiles, plans)

    def tile_batches(self, image: ImageInput, longest_edge: Optional[int] = None, batch: int = 1):
        """(plan, iterator of ProcessedImages of at most ``batch`` tiles each): one image's tiles in bounded
        batches, normalized one batch at a time, so an encoder's activations and the float32 tiles scale
        with ``batch``, not with the image's tile count."""
        tiles, plan = self._tiles(image, longest_edge)
        step = max(1, batch)

        def gen():
            for s in range(0, len(tiles), step):
                yield self._batch(tiles[s: s + step], [plan])
        return plan, gen()

    def _batch(self, tiles: list, plans: list) -> ProcessedImages:
        import numpy as np

        tiles = [self._normalize(x) for x in tiles]
        if not tiles:
            return ProcessedImages(np.zeros((1, 0, 3, self.tile, self.tile), np.float32),
                                   np.zeros((1, 0, self.tile, self.tile), bool), plans)
        if self.do_pad:
            ph = max(x.shape[1] for x in tiles)
            pw = max(x.shape[2] for x in tiles)
        else:
            ph, pw = tiles[0].shape[1:]
            if any(x.shape[1:] != (ph, pw) for x in tiles):
                raise BadModelFile("The image tiles differ in size and preprocessor_config.json turns padding off.",
                                   hint="Set do_pad to true in preprocessor_config.json.")
        pv = np.zeros((1, len(tiles), 3, ph, pw), dtype=np.float32)
        mask = np.zeros((1, len(tiles), ph, pw), dtype=bool)
        for i, x in enumerate(tiles):
            pv[0, i, :, : x.shape[1], : x.shape[2]] = x
            mask[0, i, : x.shape[1], : x.shape[2]] = True
        return ProcessedImages(pv, mask, plans)

    # ------------------------------------------------------------------ prompt
    def image_prompt(self, plan: ImagePlan) -> str:
        """The text that stands for one image in the prompt (transformers' ``get_image_prompt_string``)."""
        seq = self.image_token * self.image_seq_len
        glob = f"{self.fake_token}{self.global_token}{seq}{self.fake_token}"
        if not plan.rows:
            return glob
        text = ""
        for r in range(plan.rows):
            for c in range(plan.cols):
                text += f"{self.fake_token}<row_{r + 1}_col_{c + 1}>{seq}"
            text += "\n"
        return text + "\n" + glob

    def expand(self, text: str, plans: Sequence[ImagePlan]) -> str:
        """Replace the i-th ``<image>`` marker of ``text`` with image i's tokens."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(plans):
            raise ValueError(f"the prompt has {len(pieces) - 1} {self.image_token} markers for {len(plans)} images")
        out = pieces[0]
        for plan, rest in zip(plans, pieces[1:]):
            out += self.image_prompt(plan) + rest
        return out


__all__ = ["Idefics3Preprocessor", "ImagePlan", "ProcessedImages", "SUPPORTED_IMAGE_PROCESSORS"]


# ---------------------------------------------------------------------- libmtmd's Idefics3 geometry
# llama.cpp's libmtmd cuts Idefics3 images its own way (tools/mtmd/mtmd-image.cpp); the GGUF backend
# predicts its tile counts with these, and checks them against the token counts libmtmd gives.
def mtmd_full_grid(width: int, height: int, longest_edge: int, tile: int) -> tuple[int, int]:
    """(cols, rows) of libmtmd's default path: the longest edge resized to ``longest_edge`` (upscaling
    too), both edges rounded up to whole tiles; an overview tile is added."""
    aspect = width / height
    if width >= height:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * aspect)
        w += w % 2
    return -(-w // tile), -(-max(h, 1) // tile)


def mtmd_capped_grid(width: int, height: int, longest_edge: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of libmtmd's path with ``image_max_tokens`` set (max pixels = max_tiles tiles):
    ``calc_size_preserved_ratio`` aligned to the tile; an overview tile is added."""
    scale = min(longest_edge / width, longest_edge / height)
    w_bar = math.ceil(width * scale / tile) * tile
    h_bar = math.ceil(height * scale / tile) * tile
    max_pixels = max_tiles * tile * tile
    if w_bar * h_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(tile, math.floor(height / beta / tile) * tile)
        w_bar = max(tile, math.floor(width / beta / tile) * tile)
    return w_bar // tile, h_bar // tile


def hf_grid(width: int, height: int, longest_edge: int, tile: int) -> tuple[int, int]:
    """(cols, rows) transformers' Idefics3 processor cuts at ``size.longest_edge = longest_edge``
    (0, 0 when the image is one tile)."""
    h, w = _rescale_to_max_len(height, width, longest_edge)
    h, w = _scale_below(h, w, MAX_IMAGE_SIZE)
    h, w = _multiple_of_tile(h, w, tile)
    if h > tile or w > tile:
        return math.ceil(w / tile), math.ceil(h / tile)
    return 0, 0
