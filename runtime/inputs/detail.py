"""Image detail: how many tiles of an image the vision encoder sees, chosen per image and per device.

A backend describes, for one image, the inputs its model accepts as a ladder of ``Option``s (fewest
tiles first) plus the model's own full tiling (``high``); ``choose`` picks one from the request's
``ImageDetail``:

* ``high``: the model's own full tiling (what transformers and llama.cpp do; the reference);
* ``low``: the smallest input the model accepts (Idefics3 / SmolVLM: the whole image as one tile, the
  ``longest_edge = 1 x tile`` setting its authors document);
* ``auto`` (the default): the most detail the image can cost the time to first token within the budget
  on this device: the ladder's largest option whose encode (its units -- tiles, or 256-token images for a
  dynamic-resolution encoder: ``Option.units`` -- x measured seconds per unit; nothing when its
  embeddings are in the cache) plus the text model's prefill of its tokens (x measured seconds per
  prompt token) is within ``budget_s``. Never a constant: both speeds are measured on this device for
  this encoder / text model, build and thread count (``EncodeSpeed``), the encoder's once at first use
  and the prefill's by every image prompt, and refined by every real run (until a prefill has been
  measured, only the encode counts).

The ladder never upscales an image past the tiles it fills at its own resolution (a 512-px image is one
tile, not thirteen); ``high`` is the model's own behaviour, upscaling included. ``max_tokens``
(``--image-tokens``) caps one image's tokens at any level.

Why ``DEFAULT_BUDGET_S`` is 1 s, encode and prefill together: the question this product answers first is
"what is in this photo", and an answer that starts within about a second of the model being loaded reads
as interactive. The image's tokens are most of that prompt, and their prefill is not small: on a 2-core
x86 the default model's 350M text model takes ~0.7 s for the 234 tokens of one 512-px tile, as long as
half the encode (docs/vision-models.md), and a 2B text model several times that. An encode-only budget
(2 s until this was measured) let ``auto`` start answering after 2-3 s on the default model and far later
on larger ones. Where the smallest input costs more than the budget (a Raspberry Pi, a 2-core VM),
``auto`` is ``low``: the model never gets less than its smallest accepted input.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..protocol import ImageDetail

DEFAULT_BUDGET_S = 1.0
LEVELS = ("low", "auto", "high")


@dataclass(frozen=True)
class Option:
    """One way to feed an image: the preprocessing settings (part of the cache key), tiles encoded,
    image tokens placed in the prompt, and the encode work in the encoder's calibration units (0: one per
    tile; a dynamic-resolution encoder counts tokens, see ``ladders.py``)."""

    settings: str
    tiles: int
    tokens: int
    cost: float = 0.0

    @property
    def units(self) -> float:
        return self.cost or float(self.tiles)


@dataclass(frozen=True)
class Choice:
    option: Option
    level: str              # the level asked for
    cut: bool               # less detail than the model's own full tiling
    reason: str             # one line: why this option


def choose(ladder: Sequence[Option], high: Option, detail: ImageDetail, *, s_per_tile: Optional[float],
           budget_s: float, cached: Callable[[Option], bool] = lambda o: False,
           s_per_token: Optional[float] = None) -> Choice:
    """Pick one option for one image; ``budget_s`` is this image's share of the request's budget;
    ``s_per_token``: the text model's measured prefill seconds per prompt token (None: not yet known)."""
    if detail.level not in LEVELS:
        from ..errors import UsageError

        raise UsageError(f"Unknown image detail {detail.level!r}.", hint="Use --detail low, auto or high.")
    ladder = sorted(ladder, key=lambda o: (o.units, o.tokens)) or [high]
    if detail.level == "high":
        pool = [high]
    elif detail.level == "low":
        pool = [ladder[0]]
    else:
        pool = list(ladder)
        if high.tokens > ladder[-1].tokens and cached(high):
            pool.append(high)               # a full-detail encode from an earlier run costs nothing now
    if detail.max_tokens is not None:
        fit = [o for o in pool if o.tokens <= detail.max_tokens] or \
              [o for o in ladder if o.tokens <= detail.max_tokens] or [ladder[0]]
        pool = fit
    if detail.level != "auto" or len(pool) == 1:
        pick = pool[-1]
        why = detail.level if detail.max_tokens is None else f"{detail.level}, at most {detail.max_tokens} tokens"
        return Choice(pick, detail.level, pick.tokens < high.tokens, why)
    pick, why = pool[0], ""
    for o in pool:
        hit = cached(o)
        enc = 0.0 if hit else o.units * (s_per_tile or 0.0)
        cost = enc + o.tokens * (s_per_token or 0.0)
        if cost <= budget_s:
            pick = o
            if hit and s_per_tile:
                why = "cached" + (f", ~{cost:.1f} s of prefill within {budget_s:.1f} s" if s_per_token else "")
            else:
                why = (f"~{enc:.1f} s of encode + {cost - enc:.1f} s of prefill within {budget_s:.1f} s" if s_per_token
                       else f"~{cost:.1f} s of encode within {budget_s:.1f} s")
    if not why:
        first = pool[0]
        cost = (0.0 if cached(first) else first.units * (s_per_tile or 0.0)) + first.tokens * (s_per_token or 0.0)
        why = f"the smallest input takes ~{cost:.1f} s here, over the {budget_s:.1f} s budget: the smallest input"
    return Choice(pick, "auto", pick.tokens < high.tokens, why)


def idefics3_ladder(width: int, height: int, tile: int, max_longest_edge: int,
                    tiles_at: Callable[[int], tuple[int, str]], seq: int) -> list[Option]:
    """Options for an Idefics3-style model: longest edge N x tile for N = 1 .. the model's maximum, never
    more tiles than the image fills at its own size. ``tiles_at(N)`` -> (tiles, settings)."""
    n_max = max(1, max_longest_edge // tile)
    n_native = max(1, -(-max(width, height) // tile))
    out: dict[int, Option] = {}
    for n in range(1, min(n_max, n_native) + 1):
        tiles, settings = tiles_at(n)
        out.setdefault(tiles, Option(settings, tiles, tiles * seq))
    return sorted(out.values(), key=lambda o: o.tiles)


# ---------------------------------------------------------------------- measured encode speed
class EncodeSpeed:
    """Seconds per tile of one encoder on this device, kept in ``$VLM_HOME/cache/encode-speed.json`` by
    key (backend, encoder file identity, engine build, threads): measured once, refined by real encodes
    (the mean of the last few), and forgotten when the encoder or the build changes (a new key)."""

    KEEP = 8

    def __init__(self, path: Optional[Path] = None) -> None:
        if path is None:
            from .embed_cache import cache_root

            path = cache_root() / "encode-speed.json"
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Optional[float]:
        e = self._read().get(key)
        try:
            xs = [float(x) for x in e["samples"] if float(x) > 0]
        except (TypeError, KeyError, ValueError):
            return None
        return sum(xs) / len(xs) if xs else None

    def record(self, key: str, tiles: float, seconds: float) -> None:
        """Add one measurement; an unwritable cache folder is silently skipped (the next run measures again)."""
        if tiles <= 0 or seconds <= 0:
            return
        try:
            from filelock import FileLock

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=10):
                data = self._read()
                e = data.get(key) if isinstance(data.get(key), dict) else {}
                samples = [x for x in e.get("samples", []) if isinstance(x, (int, float))]
                samples = (samples + [seconds / tiles])[-self.KEEP:]
                data[key] = {"samples": samples, "updated": time.time()}
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
                os.replace(tmp, self.path)
        except Exception:      # filelock Timeout, OSError: a speed not kept is measured again next time
            pass


__all__ = ["Option", "Choice", "choose", "idefics3_ladder", "EncodeSpeed", "DEFAULT_BUDGET_S", "LEVELS"]
