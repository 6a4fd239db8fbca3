"""runtime.media: real files written by Pillow in tmp_path; only the network is local (http.server)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from edgevlm.runtime.errors import BadMedia, EdgeVLMError
from edgevlm.runtime.inputs.media import (
    DEFAULT_MAX_PIXELS,
    HARD_LIMIT_PIXELS,
    image_from_pil,
    load_image,
    sniff_kind,
)
from edgevlm.runtime.protocol import ImageInput

RED = (220, 30, 40)
BLUE = (20, 40, 230)


def px(inp: ImageInput, x: int, y: int) -> tuple[int, int, int]:
    i = (y * inp.width + x) * 3
    return tuple(inp.rgb[i:i + 3])


def close(a, b, tol=0):
    return all(abs(int(p) - int(q)) <= tol for p, q in zip(a, b))


def two_tone(size=(40, 30)) -> Image.Image:
    """Red image with a blue 10x10 square in the top-left corner."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (0, 0, 10, 10))
    return img


# --------------------------------------------------------------------------------------------
# Formats and conversions
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,ext,kwargs,tol", [
    ("JPEG", "jpg", {"quality": 95}, 12),
    ("PNG", "png", {}, 0),
    ("WEBP", "webp", {"lossless": True}, 0),
    ("GIF", "gif", {}, 0),
    ("BMP", "bmp", {}, 0),
    ("TIFF", "tiff", {}, 0),
])
def test_every_format_round_trips(tmp_path, fmt, ext, kwargs, tol):
    path = tmp_path / f"img.{ext}"
    two_tone().save(path, fmt, **kwargs)
    inp = load_image(path)
    assert (inp.width, inp.height) == (40, 30)
    assert len(inp.rgb) == 40 * 30 * 3
    assert close(px(inp, 3, 3), BLUE, tol)
    assert close(px(inp, 30, 20), RED, tol)
    assert inp.source == str(path)
    assert inp.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    inp = load_image(path)
    assert px(inp, 8, 8) == RED


def test_exif_orientation_6_rotates_upright(tmp_path):
    # Stored 40x20: left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise.
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, "JPEG", exif=exif, quality=95)
    inp = load_image(path)
    assert (inp.width, inp.height) == (20, 40)
    assert close(px(inp, 10, 5), RED, 12)       # the left edge is now the top
    assert close(px(inp, 10, 35), BLUE, 12)


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, "JPEG", quality=95)   # pure red ink
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    inp = load_image(path)
    assert close(px(inp, 16, 16), (255, 0, 0), 10)


def test_cmyk_with_bad_icc_profile_falls_back_to_plain_convert(tmp_path):
    path = tmp_path / "cmyk-icc.tiff"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(path, "TIFF", icc_profile=b"not a real profile")
    inp = load_image(path)
    assert close(px(inp, 4, 4), (0, 255, 255), 2)   # cyan


def _icc_rgb_profile(primaries, description: bytes) -> bytes:
    """A minimal ICC v2 matrix/TRC RGB display profile (gamma 2.2) with the given D50 primaries."""
    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(v):
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(description) + 1) + description + b"\0"
            + b"\0" * 8 + b"\0\0\0" + b"\0" * 67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233) + b"\0\0"
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(primaries[0])),
            (b"gXYZ", xyz(primaries[1])), (b"bXYZ", xyz(primaries[2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + b"\0" * 4 + s15(0.9642) + s15(1.0) + s15(0.8249)
              + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def test_rgb_with_icc_profile_is_converted_to_srgb(tmp_path):
    # sRGB's D50 primaries with red and green swapped: stored (255, 0, 0) *means* sRGB green.
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    path = tmp_path / "swapped.png"
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    img.paste((0, 0, 255), (0, 4, 8, 8))
    img.save(path, icc_profile=_icc_rgb_profile((green, red, blue), b"swapped red-green"))
    inp = load_image(path)
    assert close(px(inp, 2, 1), (0, 255, 0), 12)
    assert close(px(inp, 2, 6), (0, 0, 255), 12)
    # An sRGB-tagged image keeps its pixels.
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "srgb.png", icc_profile=srgb)
    assert px(load_image(tmp_path / "srgb.png"), 4, 4) == (200, 100, 50)


def test_broken_icc_profile_is_ignored(tmp_path):
    path = tmp_path / "bad-icc.png"
    Image.new("RGB", (8, 8), (200, 100, 50)).save(path, icc_profile=b"garbage" * 20)
    assert px(load_image(path), 4, 4) == (200, 100, 50)


def test_16bit_png_gradient_maps_to_full_8bit_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    arr = np.tile(ramp, (4, 1))
    path = tmp_path / "grad16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    inp = load_image(path)
    row = [px(inp, x, 2)[0] for x in range(256)]
    assert row[0] == 0 and row[-1] == 255
    assert 120 <= row[128] <= 135                    # mid-grey, not clipped to white
    assert all(b >= a for a, b in zip(row, row[1:]))  # monotonic
    assert len(set(row)) > 200                        # uses the whole range
    assert px(inp, 100, 1)[0] == px(inp, 100, 1)[1] == px(inp, 100, 1)[2]


def test_32bit_int_and_float_images_are_scaled(tmp_path):
    ints = Image.fromarray(np.array([[0, 1000, 100000]], dtype=np.int32))
    out = image_from_pil(ints, "ints", None)
    assert [px(out, x, 0)[0] for x in range(3)] == [0, 3, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    out = image_from_pil(floats, "floats", None)
    assert [px(out, x, 0)[0] for x in range(4)] == [0, 128, 255, 0]


def test_palette_with_transparency_composites_over_white(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    img.paste(1, (10, 0, 20, 20))                    # right half: opaque red; left: index 0
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    inp = load_image(path)
    assert px(inp, 5, 10) == (255, 255, 255)         # transparent -> white, not black
    assert px(inp, 15, 10) == RED


def test_rgba_composites_over_white(tmp_path):
    img = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    img.paste((255, 0, 0, 128), (10, 0, 20, 10))
    img.paste((*BLUE, 255), (20, 0, 30, 10))
    path = tmp_path / "alpha.png"
    img.save(path)
    inp = load_image(path)
    assert px(inp, 5, 5) == (255, 255, 255)
    assert close(px(inp, 15, 5), (255, 127, 127), 2)
    assert px(inp, 25, 5) == BLUE


@pytest.mark.parametrize("mode,color,expected", [
    ("LA", (100, 0), (255, 255, 255)),
    ("LA", (100, 255), (100, 100, 100)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("P", 1, RED),
])
def test_other_modes_become_rgb(mode, color, expected):
    img = Image.new(mode, (4, 4), color)
    if mode == "P":
        img.putpalette([0, 0, 0, *RED])
    out = image_from_pil(img, "mem", "x" * 64)
    assert (out.width, out.height) == (4, 4)
    assert px(out, 1, 1) == expected


def test_image_from_pil_carries_label_and_hashes_pixels_when_no_sha():
    img = two_tone()
    out = image_from_pil(img, "clip.mp4", None, label="[00:03]")
    assert out.label == "[00:03]" and out.source == "clip.mp4"
    assert out.sha256 == hashlib.sha256(out.rgb).hexdigest()
    assert img.mode == "RGB" and img.size == (40, 30)   # input untouched


# --------------------------------------------------------------------------------------------
# Size limits
# --------------------------------------------------------------------------------------------

def test_50_megapixel_jpeg_is_downscaled_with_aspect_ratio_in_low_memory(tmp_path):
    path = tmp_path / "big.jpg"
    big = Image.new("RGB", (8000, 6250), RED)
    big.paste(BLUE, (0, 0, 4000, 6250))               # left half blue
    big.save(path, "JPEG", quality=70)
    del big
    # Peak memory in a fresh process. Pillow holds RGB at 4 bytes/pixel, so a full decode alone
    # needs 200 MB (about 260 MB peak with the resize); decoding at 1/2 scale peaks near 95 MB.
    code = (
        "import json, resource, sys\n"
        "from edgevlm.runtime.inputs.media import load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "inp = load_image(sys.argv[1])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "scale = 1 if sys.platform == 'darwin' else 1024\n"
        "i = lambda x, y: list(inp.rgb[(y * inp.width + x) * 3:(y * inp.width + x) * 3 + 3])\n"
        "print(json.dumps({'w': inp.width, 'h': inp.height, 'grow_mb': (after - before) * scale / 2**20,"
        " 'left': i(10, 10), 'right': i(inp.width - 10, 10)}))\n"
    )
    pytest.importorskip("resource")
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["w"] * r["h"] <= DEFAULT_MAX_PIXELS
    assert r["w"] * r["h"] > 0.99 * DEFAULT_MAX_PIXELS
    assert abs(r["w"] / r["h"] - 8000 / 6250) < 0.002
    assert close(r["left"], BLUE, 12) and close(r["right"], RED, 12)
    assert r["grow_mb"] < 160, f"peak memory grew by {r['grow_mb']:.0f} MB"


def test_large_png_is_reduced_then_resized(tmp_path):
    path = tmp_path / "wide.png"
    two_tone((3000, 1000)).save(path, compress_level=1)
    inp = load_image(path, max_pixels=100_000)
    assert inp.width * inp.height <= 100_000
    assert abs(inp.width / inp.height - 3.0) < 0.01
    assert px(inp, inp.width - 5, inp.height - 5) == RED


def test_max_pixels_none_keeps_full_size(tmp_path):
    path = tmp_path / "a.png"
    two_tone((300, 200)).save(path)
    assert (load_image(path, max_pixels=None).width, load_image(path, max_pixels=10_000).width) == (300, 122)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(20_000, 20_000), (15_000, 14_000)])   # 400 MP; 210 MP (just over)
def test_decompression_bomb_refused_from_header(tmp_path, w, h):
    assert w * h > HARD_LIMIT_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(w, h))
    saved = Image.MAX_IMAGE_PIXELS
    t0 = time.monotonic()
    with pytest.raises(BadMedia, match="decompression bomb") as exc:
        load_image(path)
    assert time.monotonic() - t0 < 1.0
    assert exc.value.hint
    assert Image.MAX_IMAGE_PIXELS == saved          # the global is restored


def test_file_over_max_bytes_is_refused(tmp_path):
    path = tmp_path / "a.png"
    two_tone().save(path)
    with pytest.raises(BadMedia, match="too large"):
        load_image(path, max_bytes=100)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------

def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, this is not a picture\n")
    with pytest.raises(BadMedia) as exc:
        load_image(path)
    assert str(exc.value).startswith(f"{path} is not an image Pillow can read (")
    assert "text" in str(exc.value)
    assert "PNG" in exc.value.hint and "JPEG" in exc.value.hint
    assert isinstance(exc.value, ValueError) and exc.value.exit_code == 5


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(BadMedia, match="empty") as exc:
        load_image(path)
    assert exc.value.hint


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_an_error_not_half_grey(tmp_path, fmt):
    noise = Image.effect_noise((200, 200), 60).convert("RGB")
    buf = io.BytesIO()
    noise.save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadMedia, match="is not an image Pillow can read") as exc:
        load_image(path)
    assert "truncated" in str(exc.value) and "again" in exc.value.hint


def test_truncated_is_an_error_even_if_someone_set_load_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[:2000])
    with pytest.raises(BadMedia, match="truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True   # restored


def test_directory(tmp_path):
    with pytest.raises(BadMedia, match="is a directory") as exc:
        load_image(tmp_path)
    assert exc.value.hint


def test_missing_file(tmp_path):
    with pytest.raises(BadMedia, match="No such file") as exc:
        load_image(tmp_path / "nope.jpg")
    assert exc.value.hint and isinstance(exc.value, EdgeVLMError)


@pytest.mark.skipif(sys.platform == "win32" or (hasattr(os, "geteuid") and os.geteuid() == 0),
                    reason="root (and Windows) can read a chmod 000 file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.png"
    two_tone().save(path)
    path.chmod(0)
    try:
        with pytest.raises(BadMedia, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_file_that_fails_to_read_even_as_root():
    with pytest.raises(BadMedia, match="Cannot read /proc/self/mem") as exc:
        load_image("/proc/self/mem")
    assert exc.value.hint


def test_video_passed_as_image_says_so(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(struct.pack(">I", 24) + b"ftypisom" + b"\x00" * 200)
    with pytest.raises(BadMedia, match="video") as exc:
        load_image(path)
    assert "video" in exc.value.hint


def test_unsupported_url_scheme():
    with pytest.raises(BadMedia, match="Unsupported URL scheme 'ftp'"):
        load_image("ftp://example.com/a.png")


# --------------------------------------------------------------------------------------------
# stdin
# --------------------------------------------------------------------------------------------

def test_stdin_dash_reads_bytes_and_hashes_them():
    buf = io.BytesIO()
    two_tone().save(buf, "PNG")
    data = buf.getvalue()
    inp = load_image("-", stdin=io.BytesIO(data))
    assert (inp.width, inp.height) == (40, 30)
    assert inp.source == "-"
    assert inp.sha256 == hashlib.sha256(data).hexdigest()
    assert px(inp, 3, 3) == BLUE


def test_empty_stdin():
    with pytest.raises(BadMedia, match="stdin was empty"):
        load_image("-", stdin=io.BytesIO(b""))


def test_garbage_on_stdin_names_stdin():
    with pytest.raises(BadMedia, match="^stdin is not an image Pillow can read"):
        load_image("-", stdin=io.BytesIO(b"\x00\x01\x02garbage" * 10))


# --------------------------------------------------------------------------------------------
# URLs (a real local http.server; the network is the only thing faked)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def http_dir(tmp_path, no_proxy):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_url(http_dir):
    root, base = http_dir
    two_tone().save(root / "pic.png")
    url = f"{base}/pic.png"
    inp = load_image(url)
    assert (inp.width, inp.height) == (40, 30)
    assert inp.source == url
    assert inp.sha256 == hashlib.sha256((root / "pic.png").read_bytes()).hexdigest()
    assert px(inp, 30, 20) == RED


def test_http_404(http_dir):
    _, base = http_dir
    with pytest.raises(BadMedia, match="Could not fetch .*404") as exc:
        load_image(f"{base}/missing.png")
    assert "download" in exc.value.hint


def test_http_html_page_is_not_an_image(http_dir):
    root, base = http_dir
    (root / "page.html").write_text("<!doctype html><html><body>hi</body></html>")
    with pytest.raises(BadMedia, match="text/html"):
        load_image(f"{base}/page.html")


def test_http_response_over_max_bytes(http_dir):
    root, base = http_dir
    two_tone((200, 200)).save(root / "pic.bmp")
    with pytest.raises(BadMedia, match="too large"):
        load_image(f"{base}/pic.bmp", max_bytes=1000)


def test_closed_port_fails_fast(no_proxy):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises(BadMedia, match="Could not fetch") as exc:
        load_image(f"http://127.0.0.1:{port}/x.png", timeout=5)
    assert time.monotonic() - t0 < 5
    assert "download" in exc.value.hint


# --------------------------------------------------------------------------------------------
# sniff_kind
# --------------------------------------------------------------------------------------------

def test_sniff_kind_by_magic_and_extension(tmp_path):
    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    png = tmp_path / "a.png"
    two_tone().save(png)
    jpg_named_bin = tmp_path / "photo.bin"
    two_tone().save(jpg_named_bin, "JPEG")
    assert sniff_kind(png) == "image"
    assert sniff_kind(jpg_named_bin) == "image"                     # magic beats the extension
    assert sniff_kind(str(png)) == "image"
    assert sniff_kind(write("v.dat", struct.pack(">I", 24) + b"ftypisom" + b"\0" * 16)) == "video"
    assert sniff_kind(write("q.dat", struct.pack(">I", 20) + b"ftypqt  " + b"\0" * 16)) == "video"
    assert sniff_kind(write("m.dat", b"\x1a\x45\xdf\xa3" + b"\0" * 32)) == "video"      # mkv/webm
    assert sniff_kind(write("x.dat", b"RIFF\0\0\0\0AVI LIST")) == "video"
    assert sniff_kind(write("w.dat", b"RIFF\0\0\0\0WEBPVP8 ")) == "image"
    assert sniff_kind(write("h.dat", struct.pack(">I", 24) + b"ftypheic" + b"\0" * 16)) == "image"
    assert sniff_kind(write("notes.txt", b"just text")) == "unknown"
    assert sniff_kind(tmp_path / "missing.mov") == "video"          # unreadable: extension decides
    assert sniff_kind(tmp_path / "missing.webm") == "video"
    assert sniff_kind(tmp_path / "missing.JPG") == "image"
    assert sniff_kind(tmp_path / "missing.pdf") == "unknown"         # Pillow can only save PDFs
    assert sniff_kind(tmp_path) == "unknown"
    assert sniff_kind("-") == "image"
    assert sniff_kind("https://example.com/clip.mp4?x=1") == "video"
    assert sniff_kind("https://example.com/cat.webp") == "image"


def test_damaged_tiffs_leave_stderr_to_us(tmp_path):
    """libtiff's own messages (fd 2) and Pillow's warnings about damaged files never reach the user raw."""
    import io
    import random
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    paths = []
    for comp in ("tiff_deflate", "tiff_lzw", "packbits"):
        b = io.BytesIO()
        im.save(b, format="TIFF", compression=comp)
        rnd = random.Random(1)
        for k in range(4):
            d = bytearray(b.getvalue())
            for _ in range(8):
                d[rnd.randrange(8, len(d))] = rnd.randrange(256)
            p = tmp_path / f"bad_{comp}_{k}.tif"
            p.write_bytes(bytes(d))
            paths.append(str(p))
    code = ("import sys\nfrom edgevlm.runtime.inputs.media import load_image\nfrom edgevlm.runtime.errors import BadMedia\n"
            "for p in sys.argv[1:]:\n    try:\n        load_image(p)\n    except BadMedia:\n        pass\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "VLM_DEBUG"}
    r = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr[:500]
