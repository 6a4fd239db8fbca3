"""What the user attached to a question, as ImageInputs: image files and URLs as they are, videos as
sampled frames labelled with their timestamps. Every command that takes media goes through here."""
from __future__ import annotations

from typing import Optional

from ..protocol import DEFAULT_CTX, ImageInput


def load_media(refs: list[str], *, frames: Optional[int] = None, fps: Optional[float] = None, n_ctx: int = DEFAULT_CTX) -> list[ImageInput]:
    """Images as they are; videos as sampled frames labelled with their timestamps."""
    from ..config import load_config
    from .media import load_image
    from .media_sniff import sniff_kind

    limit = load_config().max_image_pixels
    kw = {"max_pixels": limit} if limit else {}
    out = []
    for r in refs:
        if r != "-" and "://" not in r and sniff_kind(r) == "video":
            from .video import sample_frames

            out.extend(sample_frames(r, frames=frames, fps=fps, n_ctx=n_ctx, **kw))
        else:
            out.append(load_image(r, **kw))
    return out
