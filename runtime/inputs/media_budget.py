"""What decoding an image may cost: the pixel cap images are downscaled to, the hard limit above which
a file is refused as a possible decompression bomb (from its header, before any pixel is decoded), the
byte cap, the size an image is downscaled to, Pillow's limits for one decode, and ``decode_cost``: the
pixels a decode holds at once, read from the header, which a server admits against its pixel budget.
"""
from __future__ import annotations

import io
import math
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

from PIL import Image, ImageFile

from ..errors import UsageError
from .media_sniff import is_heif, register_heif

DEFAULT_MAX_PIXELS = 4_000_000
"""Images with more pixels are downscaled (aspect kept) before they reach the vision encoder."""

HARD_LIMIT_PIXELS = 200_000_000
"""Images claiming more pixels are refused as a possible decompression bomb, before decoding."""

DEFAULT_MAX_BYTES = 100 * 1024 * 1024


def check_max_pixels(max_pixels: Optional[int]) -> None:
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"max_pixels must be a positive number of pixels, not {max_pixels}.")


def target_size(w: int, h: int, max_pixels: Optional[int]) -> Tuple[int, int]:
    """The largest (w', h') with the same aspect ratio and w' * h' <= max_pixels."""
    if max_pixels is None or w * h <= max_pixels:
        return w, h
    scale = math.sqrt(max_pixels / (w * h))
    tw, th = max(1, int(w * scale)), max(1, int(h * scale))
    while tw * th > max_pixels:       # float rounding, or a 1-pixel-thin extreme aspect
        if tw >= th and tw > 1:
            tw -= 1
        elif th > 1:
            th -= 1
        else:
            break
    return tw, th


_DECODE_LOCK = threading.RLock()


@contextmanager
def decode_limits() -> Iterator[None]:
    """Set Pillow's bomb limit to ours and keep truncated files an error, for this decode only.

    Pillow keeps both settings as module globals, so they are changed under a lock and restored;
    decodes through ``load_image`` are therefore serialised within a process.
    """
    with _DECODE_LOCK:
        saved_max, saved_trunc = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = HARD_LIMIT_PIXELS
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings():
                # Pillow's other warnings about damaged files (with a site-packages path) are chatter: the
                # file decodes or our one-line error says why not.
                warnings.simplefilter("ignore")
                # Pillow warns above MAX_IMAGE_PIXELS and errors only above twice that: refuse both.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved_max
            ImageFile.LOAD_TRUNCATED_IMAGES = saved_trunc


def decode_cost(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> int:
    """The pixels decoding ``data`` holds at once, from its header alone: the full size, or for a JPEG
    that will be downscaled the reduced DCT scale it is decoded at. What a server admits against its
    pixel budget before decoding (peak memory is ~4-6 bytes a pixel). 0 when the header cannot be read
    (the decode then says why)."""
    if is_heif(data):
        register_heif()
    try:
        with decode_limits():
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if max_pixels is not None and 0 < w * h <= HARD_LIMIT_PIXELS and w * h > max_pixels:
                img.draft(None, target_size(w, h, max_pixels))
            w, h = img.size
            return max(0, w) * max(0, h)
    except Exception:       # noqa: BLE001 - not an image, a bomb, a damaged header: decoding reports it
        return 0
