"""What an input is, from its first bytes (else its name): an image, a video, or unknown; whether it is
HEIF (and the optional plugin that reads it); and, for an error message, what bytes that are not an
image look like (an HTML page, an SVG, text, a video).
"""
from __future__ import annotations

import os
import re
from typing import Literal, Optional

from PIL import Image

Kind = Literal["image", "video", "unknown"]

_VIDEO_EXTS = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg",
    ".m2ts", ".mts", ".3gp", ".3g2", ".ogv",
})
# ISO-BMFF ("ftyp") major brands that are still images; any other brand is taken as video.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_IMAGE_BRANDS = _HEIF_BRANDS | {b"avif", b"avis"}

URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def sniff_kind(path: str | os.PathLike) -> Kind:
    """Say whether an input looks like an image or a video, from its first bytes, else its extension.

    ``"-"`` (stdin) is read as an image; URLs are judged by the extension of their path. A path that
    cannot be read is judged by extension alone, so the loader can report the real problem.
    """
    s = os.fspath(path)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s == "-":
        return "image"
    if URL_SCHEME.match(s):
        from urllib.parse import urlsplit

        return kind_from_ext(os.path.splitext(urlsplit(s).path)[1])
    head = b""
    try:
        if os.path.isdir(s):
            return "unknown"
        with open(s, "rb") as f:
            head = f.read(512)
    except OSError:
        pass
    return kind_from_magic(head) or kind_from_ext(os.path.splitext(s)[1])


def describe(data: bytes, content_type: Optional[str]) -> str:
    """A short guess at what non-image bytes are, for the error message."""
    head = data[:512]
    kind = kind_from_magic(head)
    if kind == "video":
        return "it is a video file"
    if is_heif(head):
        return "HEIC/HEIF without the pillow-heif plugin"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        what = "an HTML page"
    elif stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        what = "an SVG (vector) image; convert it to PNG"
    elif b"\x00" not in head and _is_text(head):
        what = "text"
    else:
        what = ""
    if content_type and not content_type.startswith("image/"):
        return f"the server sent {content_type}" + (f", which looks like {what}" if what else "")
    return f"it looks like {what}" if what else "unrecognised file format"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:    # not merely a character cut at the 512-byte boundary
            return False
    return True


def is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def register_heif() -> None:
    try:
        import pillow_heif  # optional: makes iPhone photos just work when it is installed
    except ImportError:
        return
    try:
        pillow_heif.register_heif_opener()
    except Exception:
        pass


def kind_from_magic(head: bytes) -> Optional[Kind]:
    if not head:
        return None
    if (head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
                         b"MM\x00*", b"II+\x00", b"8BPS", b"qoif", b"\xff\x4f\xff\x51",
                         b"\x00\x00\x00\x0cjP  ", b"\x00\x00\x01\x00"))
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (head[:2] == b"BM" and len(head) >= 14 and head[6:10] == b"\x00\x00\x00\x00")):
        return "image"
    if head[4:8] == b"ftyp":
        return "image" if head[8:12] in _IMAGE_BRANDS else "video"
    if (head.startswith((b"\x1a\x45\xdf\xa3", b"FLV\x01", b"\x00\x00\x01\xba",
                         b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"))
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
            or (len(head) > 376 and head[0] == head[188] == head[376] == 0x47)):   # MPEG-TS
        return "video"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):    # old QuickTime
        return "video"
    return None


def kind_from_ext(ext: str) -> Kind:
    ext = ext.lower()
    if ext in _VIDEO_EXTS:
        return "video"
    if ext in image_exts():
        return "image"
    return "unknown"


_IMAGE_EXTS: Optional[frozenset] = None


def image_exts() -> frozenset:
    global _IMAGE_EXTS
    if _IMAGE_EXTS is None:
        Image.init()
        # Only formats Pillow can open (the registry also lists save-only ones such as .pdf).
        _IMAGE_EXTS = frozenset(e for e, fmt in Image.registered_extensions().items()
                                if fmt in Image.OPEN) | {".heic", ".heif"}
    return _IMAGE_EXTS
