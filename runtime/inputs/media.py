"""Image input that just works: a path, ``-`` (stdin) or an http(s) URL becomes an ``ImageInput``.

Every image leaves here as plain RGB8 pixels, upright (EXIF orientation applied), in sRGB where the
file carries an ICC profile, with transparency composited onto white, and no larger than
``max_pixels``. Anything that goes wrong becomes a ``BadMedia`` with a one-line message and a hint;
no raw Pillow or OS error escapes.

Memory: a JPEG is decoded at a reduced DCT scale (``Image.draft``) when it is to be downscaled, and
other images are shrunk with ``reduce()`` (a cheap box filter) before the final Lanczos ``resize``,
so a 50-megapixel photo costs a fraction of its full decoded size. Images over
``HARD_LIMIT_PIXELS`` are refused from their header, before any pixel is decoded.

Here: reading bytes from any source within the byte cap, and decoding them behind the guards against
hostile files (the bomb limit, truncated and damaged files, libtiff's chatter, one line per failure).
Beside it: media_sniff (what a file is, from its header), media_budget (the pixel and byte limits,
the target size, Pillow's limits for one decode, ``decode_cost``), media_pixels (decoded image ->
RGB8).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Tuple

from PIL import Image, UnidentifiedImageError

from ..errors import BadMedia
from ..protocol import ImageInput
from .media_budget import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, HARD_LIMIT_PIXELS, check_max_pixels, decode_limits,
                           target_size)
from .media_pixels import to_rgb8
from .media_sniff import URL_SCHEME, describe, is_heif, kind_from_magic, register_heif

# The public face of images, beside load_image, image_from_bytes, image_from_pil and read_bounded:
from .media_budget import decode_cost  # noqa: E402,F401
from .media_sniff import Kind, sniff_kind  # noqa: E402,F401

SUPPORTED_FORMATS_HINT = (
    "Supported: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, and most other formats Pillow opens. "
    "Convert the file to PNG or JPEG and try again."
)

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
    check_max_pixels(max_pixels)
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
    check_max_pixels(max_pixels)
    digest = hashlib.sha256(data).hexdigest()
    # Passed straight through (no local name) so the full-size decode is freed as soon as
    # image_from_pil has its downscaled copy: it lowers peak memory for big photos.
    return image_from_pil(_decode(data, display or source, max_pixels, content_type), source, digest, max_pixels)


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
    check_max_pixels(max_pixels)
    display = _display(source)
    try:
        img = to_rgb8(img, max_pixels)
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
        m = URL_SCHEME.match(source)
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

def _decode(data: bytes, display: str, max_pixels: Optional[int], content_type: Optional[str]) -> Image.Image:
    if is_heif(data):
        register_heif()
    with decode_limits(), _native_stderr_muted(data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
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
            img.draft(None, target_size(w, h, max_pixels))
        img.load()
        return img
    except BadMedia:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(display, None, int(m.group(1)) if m else None) from None
    except UnidentifiedImageError:
        raise _not_an_image(display, describe(data, content_type), data) from None
    except MemoryError:
        raise BadMedia(f"Not enough memory to decode {display}.",
                       hint="Pass a smaller image, or downscale it with another tool first.") from None
    except Exception as e:  # OSError, SyntaxError, ValueError, struct.error, EOFError...: corrupt data
        raise _not_an_image(display, _reason(e), data) from None


def _not_an_image(display: str, reason: str, data: bytes) -> BadMedia:
    hint = SUPPORTED_FORMATS_HINT
    if "truncated" in reason.lower() or "broken" in reason.lower():
        hint = "The file looks truncated or corrupt: download or copy it again. " + hint
    elif is_heif(data):
        hint = "HEIC/HEIF needs a plugin: pip install pillow-heif (or convert the photo to JPEG)."
    elif kind_from_magic(data[:512]) == "video":
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


def _reason(e: object) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Pillow names our BytesIO in some messages ("<_io.BytesIO object at 0x...>"): not useful.
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", text)
    return text.rstrip(".") or type(e).__name__


def _display(source: object) -> str:
    s = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
    return "stdin" if s == "-" else str(s)
