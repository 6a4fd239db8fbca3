"""The image detail and cache options (ask, chat, caption, bench) and the one line a terminal gets when
``auto`` gave an image less than its full detail."""
from __future__ import annotations

from typing import Optional

from . import console


def image_detail(detail: str = "auto", image_tokens: Optional[int] = None, image_budget: Optional[float] = None,
                 no_cache: bool = False):
    """The request's ImageDetail from the command line's flags."""
    from edgevlm.runtime.errors import UsageError
    from edgevlm.runtime.protocol import ImageDetail

    level = (detail or "auto").lower()
    if level not in ("low", "auto", "high"):
        raise UsageError(f"Unknown --detail {detail!r}.", hint="Use --detail low, auto or high.")
    return ImageDetail(level=level, max_tokens=image_tokens, budget_s=image_budget, cache=not no_cache)


_warned: set = set()


def notice_images(backend, quiet: bool = False) -> Optional[dict]:
    """After a turn: one dim line on a terminal per image ``auto`` cut, and the cache warning once per
    process (whatever the terminal: an unwritable cache is worth knowing in scripts too). Returns the
    backend's image report (for --json)."""
    rep = getattr(backend, "image_report", None)
    if not rep:
        return None
    warning = rep.get("warning")
    if warning and warning not in _warned:
        _warned.add(warning)
        console.warn(f"{warning}; answering without it.")
    if quiet or not console.err.is_terminal:
        return rep
    for im in rep.get("images", []):
        if im.get("cut") and im.get("detail") == "auto":
            console.info(f"[dim]{im['source']}: {im['tiles']} tile{'s' if im['tiles'] != 1 else ''} "
                         f"({im['tokens']} tokens), not the model's full detail: {im.get('reason', '')}. "
                         "--detail high for all of it.[/]")
    return rep
