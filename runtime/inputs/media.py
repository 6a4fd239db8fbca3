"""Image input that just works: a path, ``-`` (stdin) or an http(s) URL becomes an ``ImageInput``.

Every image leaves here as plain RGB8 pixels, upright (EXIF orientation applied), in sRGB where the
file carries an ICC profile, with transparency composited onto white, and no larger than
``max_pixels``. Anything that goes wrong becomes a ``BadMedia`` with a one-line message and a hint;
no raw Pillow or OS error escapes.

Memory: a JPEG is decoded at a reduced DCT scale (``Image.draft``) when it is to be downscaled, and
other images are shrunk with ``reduce()`` (a cheap box filter) before the final Lanczos ``resize``,
so a 50-megapixel photo costs a fraction of its full decoded size. Images over
``HARD_LIMIT_PIXELS`` are refused from their header, before any pixel is decoded.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Literal, Optional, Tuple

from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import BadMedia, UsageError
from ..protocol import ImageInput

DEFAULT_MAX_PIXELS = 4_000_000
"""Images with more pixels are downscaled (aspect kept) before they reach the vision encoder."""

HARD_LIMIT_PIXELS = 200_000_000
"""Images claiming more pixels are refused as a possible decompression bomb, before decoding."""

DEFAULT_MAX_BYTES = 100 * 1024 * 1024

SUPPORTED_FORMATS_HINT = (
    "Supported: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, and most other formats Pillow opens. "
    "Convert the file to PNG or JPEG and try again."
)

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

_VIDEO_EXTS = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg",
    ".m2ts", ".mts", ".3gp", ".3g2", ".ogv",
})
# ISO-BMFF ("ftyp") major brands that are still images; any other brand is taken as video.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_IMAGE_BRANDS = _HEIF_BRANDS | {b"avif", b"avis"}

_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

Kind = Literal["image", "video", "unknown"]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def load_image(
    source: str | os.PathLike,
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    stdin: Optional[BinaryIO] = None,
    timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ImageInput:
    """Read an image from a file path, ``"-"`` (``stdin``, default ``sys.stdin.buffer``) or an
    http(s) URL, and return it normalised (see the module docstring).

    ``max_pixels=None`` keeps the full resolution (the hard bomb limit still applies).
    ``timeout`` bounds a URL fetch; ``max_bytes`` caps how much is read from any source.
    Raises ``BadMedia`` for anything that is not a readable image.
    """
    _check_max_pixels(max_pixels)
    data, display, content_type = _read_source(source, stdin=stdin, timeout=timeout, max_bytes=max_bytes)
    return image_from_bytes(data, os.fsdecode(os.fspath(source)), max_pixels=max_pixels,
                            content_type=content_type, display=display)


def image_from_bytes(
    data: bytes,
    source: str,
    *,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    content_type: Optional[str] = None,
    display: Optional[str] = None,
) -> ImageInput:
    """Decode an image already in memory (a server's data URI, a fetched body) with every guard
    ``load_image`` applies: sniffing, the decompression-bomb limit, the pixel cap, normalisation.
    ``source`` names it in the ImageInput, ``display`` in error messages (default: ``source``)."""
    _check_max_pixels(max_pixels)
    digest = hashlib.sha256(data).hexdigest()
    # Passed straight through (no local name) so the full-size decode is freed as soon as
    # image_from_pil has its downscaled copy: it lowers peak memory for big photos.
    return image_from_pil(_decode(data, display or source, max_pixels, content_type), source, digest, max_pixels)


def decode_cost(data: bytes, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> int:
    """The pixels decoding ``data`` holds at once, from its header alone: the full size, or for a JPEG
    that will be downscaled the reduced DCT scale it is decoded at. What a server admits against its
    pixel budget before decoding (peak memory is ~4-6 bytes a pixel). 0 when the header cannot be read
    (the decode then says why)."""
    if _is_heif(data):
        _register_heif()
    try:
        with _decode_guard():
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if max_pixels is not None and 0 < w * h <= HARD_LIMIT_PIXELS and w * h > max_pixels:
                img.draft(None, _target_size(w, h, max_pixels))
            w, h = img.size
            return max(0, w) * max(0, h)
    except Exception:       # noqa: BLE001 - not an image, a bomb, a damaged header: decoding reports it
        return 0


def read_bounded(resp, max_bytes: int, deadline: float, too_big: Callable[[], Exception],
                 timed_out: Callable[[], Exception]) -> bytes:
    """A response body read in 64 KiB pieces: at most ``max_bytes`` (else ``too_big()`` is raised), before
    ``deadline`` (time.monotonic; else ``timed_out()``). Shared by `vlm ask URL` and the server's fetches."""
    chunks, total = [], 0
    while True:
        chunk = resp.read(1 << 16)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise too_big()
        if time.monotonic() > deadline:
            raise timed_out()
        chunks.append(chunk)


def image_from_pil(
    img: Image.Image,
    source: str,
    sha256: Optional[str] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    *,
    label: str = "",
) -> ImageInput:
    """Normalise an already-opened Pillow image into an ``ImageInput``.

    Applies EXIF orientation, downscales to at most ``max_pixels`` (aspect kept; ``None``: never),
    converts any mode to RGB8 (alpha over white, CMYK and embedded ICC profiles to sRGB, 16-bit and
    float data scaled, not clipped). ``sha256`` should be the hash of the bytes the user gave;
    when ``None`` the hash of the resulting pixels is used. The input image is not modified.
    """
    _check_max_pixels(max_pixels)
    display = _display(source)
    try:
        orientation = _orientation(img)
        icc = img.info.get("icc_profile") or None
        img, value_range = _to_resizable(img)
        img = _downscale(img, max_pixels)
        img = _to_rgb(img, icc, value_range)
        if orientation in _ORIENTATION:
            img = img.transpose(_ORIENTATION[orientation])
        rgb = img.tobytes()
    except BadMedia:
        raise
    except MemoryError:
        raise BadMedia(
            f"Not enough memory to process the image from {display}.",
            hint="Pass a smaller image, or downscale it with another tool first.",
        ) from None
    except Exception as e:  # any Pillow failure on odd data: never let it escape raw
        raise BadMedia(
            f"Could not process the image from {display} ({_reason(e)}).",
            hint=SUPPORTED_FORMATS_HINT,
        ) from e
    if sha256 is None:
        sha256 = hashlib.sha256(rgb).hexdigest()
    return ImageInput(rgb=rgb, width=img.width, height=img.height, source=str(source),
                      sha256=sha256, label=label)


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
    if _URL_SCHEME.match(s):
        from urllib.parse import urlsplit

        return _kind_from_ext(os.path.splitext(urlsplit(s).path)[1])
    head = b""
    try:
        if os.path.isdir(s):
            return "unknown"
        with open(s, "rb") as f:
            head = f.read(512)
    except OSError:
        pass
    return _kind_from_magic(head) or _kind_from_ext(os.path.splitext(s)[1])


# --------------------------------------------------------------------------------------------
# Reading bytes
# --------------------------------------------------------------------------------------------

def _read_source(
    source: str | os.PathLike, *, stdin: Optional[BinaryIO], timeout: float, max_bytes: int
) -> Tuple[bytes, str, Optional[str]]:
    """Return (bytes, name for messages, content type when known)."""
    if isinstance(source, str):
        if source == "-":
            return _read_stdin(stdin, max_bytes), "stdin", None
        m = _URL_SCHEME.match(source)
        if m:
            scheme = m.group(1).lower()
            if scheme in ("http", "https"):
                data, ctype = _fetch(source, timeout, max_bytes)
                return data, source, ctype
            if scheme == "file":
                from urllib.parse import urlsplit
                from urllib.request import url2pathname

                path = Path(url2pathname(urlsplit(source).path))
                return _read_file(path, source, max_bytes), source, None
            raise BadMedia(
                f"Unsupported URL scheme '{scheme}' in {source}.",
                hint="Use an http(s) URL, or download the image and pass its file path.",
            )
    display = os.fsdecode(os.fspath(source))
    return _read_file(Path(display), display, max_bytes), display, None


def _read_file(path: Path, display: str, max_bytes: int) -> bytes:
    try:
        if path.is_dir():
            raise BadMedia(f"{display} is a directory, not an image file.",
                           hint="Pass the path of an image file inside it.")
        with open(path, "rb") as f:
            try:
                size = os.fstat(f.fileno()).st_size
            except OSError:
                size = 0
            if size > max_bytes:
                raise _too_big(display, size, max_bytes)
            data = f.read(max_bytes + 1)    # +1: catches files that grew, FIFOs, /dev/stdin
    except FileNotFoundError:
        raise BadMedia(f"No such file: {display}", hint="Check the path and the spelling.") from None
    except IsADirectoryError:
        raise BadMedia(f"{display} is a directory, not an image file.",
                       hint="Pass the path of an image file inside it.") from None
    except PermissionError:
        raise BadMedia(f"Cannot read {display}: permission denied.",
                       hint="Check the file's permissions, or copy it somewhere readable.") from None
    except OSError as e:
        raise BadMedia(f"Cannot read {display}: {e.strerror or e}.",
                       hint="Check that the file is accessible and try again.") from None
    if len(data) > max_bytes:
        raise _too_big(display, None, max_bytes)
    if not data:
        raise BadMedia(f"{display} is empty (0 bytes), not an image.",
                       hint="The file may not have finished downloading or copying; get it again.")
    return data


def _read_stdin(stdin: Optional[BinaryIO], max_bytes: int) -> bytes:
    if stdin is None:
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:
            raise BadMedia("No standard input to read the image from.",
                           hint="Pipe an image in, e.g. `cat photo.jpg | vlm ...`, or pass a path.")
        stdin = stream
    try:
        if stdin.isatty():
            raise BadMedia("'-' reads an image from standard input, but stdin is a terminal.",
                           hint="Pipe an image in, e.g. `cat photo.jpg | vlm ...`, or pass a path.")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        data = stdin.read(max_bytes + 1)
    except (OSError, ValueError) as e:
        raise BadMedia(f"Cannot read the image from stdin: {e}.",
                       hint="Pass the image as a file path instead.") from None
    if data is None:
        data = b""
    if isinstance(data, str):  # a text stream was passed by mistake
        raise BadMedia("stdin is a text stream; image bytes are needed.",
                       hint="Pass a binary stream (sys.stdin.buffer).")
    if len(data) > max_bytes:
        raise _too_big("The image on stdin", None, max_bytes)
    if not data:
        raise BadMedia("stdin was empty: no image bytes to read.",
                       hint="Pipe an image in, e.g. `cat photo.jpg | vlm ...`, or pass a path.")
    return bytes(data)


def _fetch(url: str, timeout: float, max_bytes: int) -> Tuple[bytes, Optional[str]]:
    import http.client
    import urllib.error
    import urllib.request

    hint = "Check the address and your network connection, or download the image yourself and pass its file path."
    req = urllib.request.Request(url, headers={"User-Agent": "edgevlm", "Accept": "image/*,*/*;q=0.5"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            ctype = resp.headers.get_content_type() if resp.headers.get("Content-Type") else None
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _too_big(url, int(length), max_bytes)
            data = read_bounded(resp, max_bytes, deadline, lambda: _too_big(url, None, max_bytes),
                                lambda: BadMedia(f"Could not fetch {url} (timed out after {timeout:g} s).", hint=hint))
    except BadMedia:
        raise
    except urllib.error.HTTPError as e:
        e.close()           # it holds the response (and its socket) open
        raise BadMedia(f"Could not fetch {url} (HTTP {e.code} {e.reason}).", hint=hint) from None
    except urllib.error.URLError as e:
        raise BadMedia(f"Could not fetch {url} ({_reason(e.reason)}).", hint=hint) from None
    except TimeoutError:
        raise BadMedia(f"Could not fetch {url} (timed out after {timeout:g} s).", hint=hint) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise BadMedia(f"Could not fetch {url} ({_reason(e)}).", hint=hint) from None
    if not data:
        raise BadMedia(f"{url} returned no data.", hint=hint)
    return data, ctype


def _too_big(display: str, size: Optional[int], max_bytes: int) -> BadMedia:
    what = f" ({size / 2**20:.1f} MiB)" if size is not None else ""
    return BadMedia(
        f"{display} is too large{what}: the limit is {max_bytes / 2**20:.0f} MiB.",
        hint="Resize or recompress the image (e.g. to a JPEG of a few megapixels) and try again.",
    )


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_DECODE_LOCK = threading.RLock()


@contextmanager
def _decode_guard() -> Iterator[None]:
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


def _decode(data: bytes, display: str, max_pixels: Optional[int], content_type: Optional[str]) -> Image.Image:
    if _is_heif(data):
        _register_heif()
    with _decode_guard(), _native_stderr_muted(data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return _decode_guarded(data, display, max_pixels, content_type)


@contextmanager
def _native_stderr_muted(on: bool) -> Iterator[None]:
    """libtiff prints its warnings and errors about damaged files straight to file descriptor 2, under
    Pillow; a TIFF decode runs with fd 2 pointed at /dev/null (VLM_DEBUG=1 keeps them). Only TIFFs: the
    redirect is process-wide while it lasts."""
    from ..env import debug

    if not on or debug():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _decode_guarded(data: bytes, display: str, max_pixels: Optional[int], content_type: Optional[str]) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > HARD_LIMIT_PIXELS:
            raise _bomb(display, (w, h))
        if w <= 0 or h <= 0:
            raise ValueError(f"invalid size {w}x{h}")
        if max_pixels is not None and w * h > max_pixels:
            # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below the target size. No-op elsewhere.
            img.draft(None, _target_size(w, h, max_pixels))
        img.load()
        return img
    except BadMedia:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(display, None, int(m.group(1)) if m else None) from None
    except UnidentifiedImageError:
        raise _not_an_image(display, _describe(data, content_type), data) from None
    except MemoryError:
        raise BadMedia(f"Not enough memory to decode {display}.",
                       hint="Pass a smaller image, or downscale it with another tool first.") from None
    except Exception as e:  # OSError, SyntaxError, ValueError, struct.error, EOFError...: corrupt data
        raise _not_an_image(display, _reason(e), data) from None


def _not_an_image(display: str, reason: str, data: bytes) -> BadMedia:
    hint = SUPPORTED_FORMATS_HINT
    if "truncated" in reason.lower() or "broken" in reason.lower():
        hint = "The file looks truncated or corrupt: download or copy it again. " + hint
    elif _is_heif(data):
        hint = "HEIC/HEIF needs a plugin: pip install pillow-heif (or convert the photo to JPEG)."
    elif _kind_from_magic(data[:512]) == "video":
        hint = "This is a video: pass it as a video input instead of an image."
    return BadMedia(f"{display} is not an image Pillow can read ({reason}).", hint=hint)


def _bomb(display: str, size: Optional[Tuple[int, int]], pixels: Optional[int] = None) -> BadMedia:
    if size:
        dims = f"{size[0]}x{size[1]}, {size[0] * size[1] / 1e6:.0f} megapixels"
    else:
        dims = f"{pixels / 1e6:.0f} megapixels" if pixels else "over the limit"
    return BadMedia(
        f"{display} is too large to decode safely ({dims}; the limit is "
        f"{HARD_LIMIT_PIXELS / 1e6:.0f} megapixels): possible decompression bomb.",
        hint="If the image is genuine, downscale it with another tool first.",
    )


def _describe(data: bytes, content_type: Optional[str]) -> str:
    """A short guess at what non-image bytes are, for the error message."""
    head = data[:512]
    kind = _kind_from_magic(head)
    if kind == "video":
        return "it is a video file"
    if _is_heif(head):
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


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def _register_heif() -> None:
    try:
        import pillow_heif  # optional: makes iPhone photos just work when it is installed
    except ImportError:
        return
    try:
        pillow_heif.register_heif_opener()
    except Exception:
        pass


def _reason(e: object) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Pillow names our BytesIO in some messages ("<_io.BytesIO object at 0x...>"): not useful.
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", text)
    return text.rstrip(".") or type(e).__name__


# --------------------------------------------------------------------------------------------
# Normalising
# --------------------------------------------------------------------------------------------

def _check_max_pixels(max_pixels: Optional[int]) -> None:
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"max_pixels must be a positive number of pixels, not {max_pixels}.")


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if value else 1
    except Exception:       # malformed EXIF must not cost the user their image
        return 1


def _target_size(w: int, h: int, max_pixels: Optional[int]) -> Tuple[int, int]:
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
    tw, th = _target_size(w, h, max_pixels)
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


# --------------------------------------------------------------------------------------------
# Sniffing
# --------------------------------------------------------------------------------------------

def _kind_from_magic(head: bytes) -> Optional[Kind]:
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


def _kind_from_ext(ext: str) -> Kind:
    ext = ext.lower()
    if ext in _VIDEO_EXTS:
        return "video"
    if ext in _image_exts():
        return "image"
    return "unknown"


_IMAGE_EXTS: Optional[frozenset] = None


def _image_exts() -> frozenset:
    global _IMAGE_EXTS
    if _IMAGE_EXTS is None:
        Image.init()
        # Only formats Pillow can open (the registry also lists save-only ones such as .pdf).
        _IMAGE_EXTS = frozenset(e for e, fmt in Image.registered_extensions().items()
                                if fmt in Image.OPEN) | {".heic", ".heif"}
    return _IMAGE_EXTS


def _display(source: object) -> str:
    s = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    return "stdin" if s == "-" else str(s)
