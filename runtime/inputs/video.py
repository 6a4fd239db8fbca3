"""Video input: sample a few frames with a real decoder (PyAV/FFmpeg) and hand them on as images.

Only the sampled frames are decoded into memory: we seek to each timestamp and decode forward to
the first frame at or after it, so a two-hour film costs the same as a ten-second clip.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..digest import sha256_file
from ..errors import BadMedia, UsageError, missing_extra
from .media import image_from_pil
from .media_budget import DEFAULT_MAX_PIXELS
from ..protocol import DEFAULT_CTX, ImageInput

MAX_FRAMES = 64
MAX_VIDEO_PIXELS = 8192 * 8192     # a frame larger than this is refused before decoding
TOKENS_PER_FRAME_GUESS = 512       # for the default frame count: frames are sent as images


def default_frame_count(n_ctx: int) -> int:
    """Enough frames to follow what happens, few enough to leave half the context for the answer."""
    return max(1, min(8, (n_ctx // 2) // TOKENS_PER_FRAME_GUESS))


def _stamp(t: float) -> str:
    m, s = divmod(max(0.0, t), 60)
    return f"[{int(m):02d}:{s:04.1f}]"


def sample_frames(path: str | os.PathLike, *, frames: Optional[int] = None, fps: Optional[float] = None,
                  n_ctx: int = DEFAULT_CTX, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ImageInput]:
    """Frames evenly spread over the video (``frames``) or every 1/``fps`` seconds, each labelled
    with its timestamp (``[mm:ss.s]``) so the model can tell when things happen."""
    try:
        import av
    except ImportError as e:
        raise missing_extra("PyAV (video input)", extra="video") from e
    if frames is not None and frames < 1:
        raise UsageError("--frames must be at least 1.")
    if fps is not None and fps <= 0:
        raise UsageError("--fps must be positive.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadMedia(f"No such file: {path}", hint="Check the path.")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise BadMedia(f"{p.name} is not a video FFmpeg can read ({e}).",
                       hint="Supported: anything FFmpeg decodes (mp4, mov, mkv, webm, avi, ...).") from e
    with container:
        if not container.streams.video:
            raise BadMedia(f"{p.name} has no video stream.", hint="Pass a video file, or an image.")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cc.width and cc.height and cc.width * cc.height > MAX_VIDEO_PIXELS:
            raise BadMedia(f"{p.name} is {cc.width}x{cc.height}: too large to decode safely.",
                           hint="Downscale it first, e.g. ffmpeg -i in.mp4 -vf scale=1920:-2 out.mp4")
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        if not duration or duration <= 0:
            duration = None
        if fps is not None and duration:
            n = min(MAX_FRAMES, max(1, int(duration * fps)))
            times = [i / fps for i in range(n)]
        else:
            n = min(MAX_FRAMES, frames or default_frame_count(n_ctx))
            times = [duration * (i + 0.5) / n for i in range(n)] if duration else [0.0]
        sha = sha256_file(p)
        out: list[ImageInput] = []
        try:
            for t in times:
                frame = _frame_at(container, stream, t)
                if frame is None:
                    break
                ts = float(frame.pts * stream.time_base) if frame.pts is not None else t
                img = frame.to_image()
                out.append(image_from_pil(img, f"{path}@{ts:.2f}s", sha256=f"{sha}:{ts:.3f}",
                                          max_pixels=max_pixels, label=f"Frame at {_stamp(ts)}: "))
        except av.error.FFmpegError as e:
            raise BadMedia(f"{p.name} could not be decoded ({e}).", hint="The file may be damaged; try re-encoding it.") from e
    if not out:
        raise BadMedia(f"No frames could be decoded from {p.name}.", hint="The file may be empty or damaged.")
    return out


def _frame_at(container, stream, t: float):
    """Seek to the keyframe before t and decode forward to the first frame at or after t."""
    target = int(t / stream.time_base) if stream.time_base else 0
    try:
        container.seek(max(0, target), stream=stream, backward=True, any_frame=False)
    except Exception:
        container.seek(0)
    last = None
    for frame in container.decode(stream):
        last = frame
        if frame.pts is None or frame.pts >= target:
            return frame
    return last
