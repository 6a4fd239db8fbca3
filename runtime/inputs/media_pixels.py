"""Any decoded Pillow image to plain RGB8 pixels: upright (EXIF orientation), no larger than the pixel
cap (a cheap integer ``reduce`` first, a strip at a time with alpha, then Lanczos), 16-bit and float
data scaled rather than clipped, transparency over white, CMYK and embedded ICC profiles to sRGB.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

from PIL import Image

from .media_budget import target_size

_WHITE = (255, 255, 255)

# EXIF orientation -> the transpose that makes the image upright (same table as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Modes Pillow can reduce() and resize() with a real filter; everything else is converted first.
_RESIZABLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})


def to_rgb8(img: Image.Image, max_pixels: Optional[int]) -> Image.Image:
    """``img`` upright, at most ``max_pixels`` (None: any size), in RGB8; the input is not modified.
    Pillow's errors on odd data pass through (the caller turns them into one line)."""
    orientation = _orientation(img)
    icc = img.info.get("icc_profile") or None
    img, value_range = _to_resizable(img)
    img = _downscale(img, max_pixels)
    img = _to_rgb(img, icc, value_range)
    if orientation in _ORIENTATION:
        img = img.transpose(_ORIENTATION[orientation])
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if value else 1
    except Exception:       # malformed EXIF must not cost the user their image
        return 1


def _to_resizable(img: Image.Image) -> Tuple[Image.Image, Optional[Tuple[float, float]]]:
    """Convert modes that cannot be filtered properly (palette, 1-bit, 16-bit...) to ones that can.

    Returns the image and, for 16-bit data, the value range to scale to 8 bits later.
    """
    mode = img.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info or (
            img.palette is not None and "A" in img.palette.mode)
        return img.convert("RGBA" if has_alpha else "RGB"), None
    if mode in ("L", "RGB") and "transparency" in img.info:     # PNG tRNS colour key
        return img.convert("RGBA"), None
    if mode == "1":
        return img.convert("L"), None
    if mode.startswith("I;16"):
        return img.convert("I"), (0.0, 65535.0)
    if mode == "La":
        return img.convert("LA"), None
    if mode == "RGBa":
        return img.convert("RGBA"), None
    if mode == "LAB":
        from PIL import ImageCms

        return ImageCms.applyTransform(img, ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")), None
    if mode in _RESIZABLE_MODES:
        return img, None
    return img.convert("RGBA" if "A" in img.getbands() else "RGB"), None


def _downscale(img: Image.Image, max_pixels: Optional[int]) -> Image.Image:
    w, h = img.size
    tw, th = target_size(w, h, max_pixels)
    if (tw, th) == (w, h):
        return img
    # Cheap integer box reduce first, keeping >= 2x the target so Lanczos still does the real work.
    factor = int(min(w / tw, h / th) / 2)
    if img.mode in ("RGBA", "LA"):
        # A resize with alpha premultiplies a full-size copy first: reduce (a strip at a time) as far as
        # the target allows instead (a 49 MP RGBA PNG: 4.5 bytes a pixel at the peak, not 9.5).
        factor = int(min(w / tw, h / th))
        if factor >= 2:
            img = _reduce_in_strips(img, factor)
    elif factor >= 2:
        img = img.reduce(factor)
    return img.resize((tw, th), Image.Resampling.LANCZOS)


def _reduce_in_strips(img: Image.Image, factor: int) -> Image.Image:
    """``img.reduce(factor)`` for images with alpha, a strip at a time: Pillow's own premultiplies the
    whole image first (a second full-size copy)."""
    w, h = img.size
    out = Image.new(img.mode, ((w + factor - 1) // factor, (h + factor - 1) // factor))
    step = factor * max(1, (1 << 22) // max(1, w * factor))      # ~4 M pixels a strip
    for y in range(0, h, step):
        out.paste(img.crop((0, y, w, min(h, y + step))).reduce(factor), (0, y // factor))
    return out


def _to_rgb(img: Image.Image, icc: Optional[bytes], value_range: Optional[Tuple[float, float]]) -> Image.Image:
    mode = img.mode
    if mode in ("I", "F"):
        return _scale_to_8bit(img, value_range).convert("RGB")
    if mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA") if mode == "LA" else img
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, (0, 0), rgba)        # alpha blend over white, not black
        return _icc_to_srgb(flat, icc, "RGB") if mode == "RGBA" else flat
    if mode == "CMYK":
        return _icc_to_srgb(img, icc, "CMYK") if icc else img.convert("RGB")
    if mode == "RGB":
        return _icc_to_srgb(img, icc, "RGB")
    return img.convert("RGB")


def _icc_to_srgb(img: Image.Image, icc: Optional[bytes], in_mode: str) -> Image.Image:
    """Apply the embedded ICC profile; on any trouble with the profile, fall back to a plain convert."""
    if not icc:
        return img if img.mode == "RGB" else img.convert("RGB")
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if in_mode == "RGB" and "srgb" in (ImageCms.getProfileDescription(src) or "").lower():
            return img       # already sRGB: skip a no-op transform
        return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:
        return img if img.mode == "RGB" else img.convert("RGB")


def _scale_to_8bit(img: Image.Image, value_range: Optional[Tuple[float, float]]) -> Image.Image:
    """Map 32-bit int / float pixels to 8 bits by their range, instead of clipping at 255."""
    import numpy as np

    a = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(a)
    if value_range is None:
        if not finite.any():
            return Image.new("L", img.size, 0)
        vals = a[finite]
        lo, hi = float(vals.min()), float(vals.max())
        if lo >= 0 and hi <= 1.0 and img.mode == "F":
            value_range = (0.0, 1.0)
        elif lo >= 0 and hi <= 255:
            value_range = (0.0, 255.0)
        elif lo >= 0 and hi <= 65535:
            value_range = (0.0, 65535.0)
        else:
            value_range = (lo, hi if hi > lo else lo + 1.0)
    lo, hi = value_range
    a = np.where(finite, a, lo)
    a = (a - lo) * (255.0 / (hi - lo)) + 0.5
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8))      # 2-D uint8: mode "L"
