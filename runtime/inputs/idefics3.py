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
    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        if "longest_edge" in self.size:
            h, w = _rescale_to_max_len(height, width, int(self.size["longest_edge"]))
            return _scale_below(h, w, MAX_IMAGE_SIZE)
        return int(self.size["height"]), int(self.size["width"])

    def plan(self, width: int, height: int) -> ImagePlan:
        """How an image of this size is cut (no pixels touched)."""
        h, w = self._resized(height, width)
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
    def _tiles(self, image: ImageInput):
        """The image's tiles as uint8 HWC arrays, and its plan."""
        import numpy as np
        from PIL import Image

        if len(image.rgb) != image.width * image.height * 3 or image.width < 1 or image.height < 1:
            raise BadMedia(f"Image {image.source} has {len(image.rgb)} bytes of pixels for "
                           f"{image.width}x{image.height} RGB.", hint="This is a bug in image loading; report it.")
        img = Image.frombytes("RGB", (image.width, image.height), image.rgb)

        def resize(im, h: int, w: int):
            return im.resize((w, h), resample=self.resample)

        h, w = self._resized(image.height, image.width)
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

    def preprocess(self, images: Sequence[ImageInput]) -> ProcessedImages:
        """All tiles of ``images`` (in order; each image's global tile last) as one batch of one sample:
        ``pixel_values`` [1, n_tiles, 3, H, W] float32 and ``pixel_attention_mask`` [1, n_tiles, H, W] bool."""
        import numpy as np

        tiles, plans = [], []
        for image in images:
            t, plan = self._tiles(image)
            tiles.extend(self._normalize(x) for x in t)
            plans.append(plan)
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
