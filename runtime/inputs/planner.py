"""The image planner: everything about a request's images that is not the engine's business, written once
for every backend and family.

A backend describes its encoder (``Encoder``: an id naming the projector / encoder file and engine build,
its thread count, and how to time one tile) and, per image, the inputs its family accepts as a ladder of
``detail.Option``s. The planner then owns, for one prefill:

* the per-image detail choice (``detail.choose``): the request's level, token cap and budget, the seconds
  per tile measured on this device for this encoder (``EncodeSpeed``, calibrated once), and which options
  are already encoded (embedding cache, or the backend's own memory);
* the embedding-cache entries: the key (encoder id, pixels id, settings), the read and the write, and the
  one warning a write that failed leaves;
* every real encode refining the measured speed;
* the typed per-image report (``ImageReport``) and ``Backend.image_report`` built from them.

What stays in a backend: its family's ladder (what a setting means for its preprocessing) and the encode
itself. Adding a family is a ladder and an encode call, not another copy of this bookkeeping.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

from ..protocol import ImageDetail, ImageInput
from .detail import DEFAULT_BUDGET_S, Choice, EncodeSpeed, Option, choose

MIN_SAMPLE_UNITS = 0.5
MIN_PREFILL_TOKENS = 32
IMG = "img"   # key prefix of an image position in a backend's KV bookkeeping: (IMG, image id, offset)


class Encoder(Protocol):
    """What the planner needs to know of a backend's vision encoder."""

    @property
    def encoder_id(self) -> str: ...          # projector / encoder file identity + engine build

    @property
    def n_threads(self) -> int: ...

    @property
    def text_id(self) -> str: ...             # the text model file identity + engine build (its prefill speed)

    def time_one_tile(self) -> Optional[tuple[float, float]]:
        """Encode the family's calibration input, a blank tile or 256-token image (twice: the first run also
        sizes the graph); (units, seconds) of the second run, or None when it cannot be measured."""
        ...


def image_id(img: ImageInput) -> str:
    """What identifies an image's pixels: the sha256 of the user's bytes and the size they were decoded to
    (the same file loaded at another size has other tiles), or the sha256 of the pixels when there are no
    user bytes (a video frame, a calibration tile)."""
    if img.sha256:
        return f"{img.sha256}:{img.width}x{img.height}"
    from .embed_cache import pixels_id

    return pixels_id(img.rgb, img.width, img.height)


@dataclass
class ImageReport:
    """One image of a prompt: what was chosen for it and what it cost (``--json``'s ``timings.images``)."""

    source: str
    detail: str                  # the level asked for: low | auto | high
    reason: str                  # one line: why this option
    cut: bool                    # less than the model's own full detail
    tiles: int
    tokens: int
    encode_s: float = 0.0
    cache: str = ""              # hit | miss | off | memory ("" until the image is evaluated)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Planned:
    """One image with the option chosen for it."""

    image: ImageInput
    id: str                      # image_id(image)
    choice: Choice
    key: Optional[str]           # its embedding-cache entry (None: the cache is off)
    report: ImageReport = field(init=False)

    def __post_init__(self) -> None:
        c = self.choice
        self.report = ImageReport(self.image.source, c.level, c.reason, c.cut, c.option.tiles, c.option.tokens)

    @property
    def settings(self) -> str:
        return self.choice.option.settings


class ImagePlanner:
    """The images of one prefill (make a new one per prefill: it holds that request's reports)."""

    def __init__(self, encoder: Encoder, detail: Optional[ImageDetail],
                 in_memory: Callable[[str, str], bool] = lambda iid, settings: False) -> None:
        from .embed_cache import cache_for

        self.encoder = encoder
        self.detail = detail or ImageDetail()
        self.cache = cache_for(self.detail)
        self._in_memory = in_memory
        self.planned: list[Planned] = []
        self.warning: Optional[str] = None

    # ------------------------------------------------------------------ choice
    @property
    def speed_key(self) -> str:
        return f"{self.encoder.encoder_id}:t{self.encoder.n_threads}"

    def key(self, iid: str, settings: str) -> Optional[str]:
        if self.cache is None:
            return None
        from .embed_cache import entry_key

        return entry_key(self.encoder.encoder_id, iid, settings)

    def encoded(self, iid: str, option: Option) -> bool:
        """Whether ``option`` of this image costs no encode now."""
        if self._in_memory(iid, option.settings):
            return True
        key = self.key(iid, option.settings)
        return key is not None and self.cache.has(key)

    @property
    def prefill_key(self) -> str:
        return f"prefill:{self.encoder.text_id}:t{self.encoder.n_threads}"

    def seconds_per_token(self) -> Optional[float]:
        """The text model's measured prefill seconds per prompt token here (None until an image prompt has
        measured it)."""
        return EncodeSpeed().get(self.prefill_key)

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A prefill of ``tokens`` prompt tokens took ``seconds`` apart from image encodes: refine the text
        model's speed (prefills under ``MIN_PREFILL_TOKENS`` are too short to time)."""
        if tokens >= MIN_PREFILL_TOKENS and seconds > 0:
            EncodeSpeed().record(self.prefill_key, tokens, seconds)

    def seconds_per_tile(self) -> Optional[float]:
        """This encoder's measured seconds per calibration unit (a tile, or a 256-token image for a
        dynamic-resolution encoder) here; calibrated by the backend once when unknown."""
        speed = EncodeSpeed()
        spt = speed.get(self.speed_key)
        if spt is None:
            got = self.encoder.time_one_tile()
            if got is not None and got[0] > 0 and got[1] > 0:
                speed.record(self.speed_key, *got)
                spt = got[1] / got[0]
        return spt

    def plan(self, images: Sequence[ImageInput],
             ladder_of: Callable[[ImageInput], tuple[Sequence[Option], Option]]) -> list[Planned]:
        """Choose each image's option. ``ladder_of(image)`` -> (the family's ladder, its own full detail)."""
        spt = self.seconds_per_tile() if self.detail.level == "auto" else None
        sptok = self.seconds_per_token() if self.detail.level == "auto" else None
        budget = (self.detail.budget_s if self.detail.budget_s is not None else DEFAULT_BUDGET_S) / max(1, len(images))
        out = []
        for img in images:
            ladder, high = ladder_of(img)
            iid = image_id(img)
            ch = choose(ladder, high, self.detail, s_per_tile=spt, budget_s=budget,
                        cached=lambda o, iid=iid: self.encoded(iid, o), s_per_token=sptok)
            out.append(Planned(img, iid, ch, self.key(iid, ch.option.settings)))
        self.planned.extend(out)
        return out

    def fixed(self, img: ImageInput, option: Option, reason: str = "the model's only input") -> Planned:
        """An image of a family with one input size: nothing to choose, the cache still applies."""
        iid = image_id(img)
        p = Planned(img, iid, Choice(option, self.detail.level, False, reason), self.key(iid, option.settings))
        self.planned.append(p)
        return p

    # ------------------------------------------------------------------ cache and speed
    def lookup(self, p: Planned) -> Optional[tuple[list, dict]]:
        """The cached encoder output of ``p`` (arrays, meta), or None."""
        return self.cache.get(p.key) if p.key is not None else None

    def encoded_now(self, p: Planned, arrays: list, meta: dict, units: float, seconds: float) -> None:
        """A real encode of ``p`` (``units``: its work in the encoder's calibration units, a tile or a
        256-token image): refine the measured speed, keep the output in the cache, report it. An encode of
        under half a unit (a thumbnail-sized image) is not a speed sample: a fixed cost (the first encode
        of a context also sizes its graph) would dominate it and inflate the seconds per unit many times."""
        if units >= MIN_SAMPLE_UNITS:
            EncodeSpeed().record(self.speed_key, units, seconds)
        p.report.encode_s = round(seconds, 4)
        p.report.cache = "miss" if p.key is not None else "off"
        self.store(p, arrays, meta)

    def store(self, p: Planned, arrays: list, meta: dict) -> None:
        if p.key is None:
            return
        why = self.cache.put(p.key, arrays, meta)
        if why:
            self.warning = f"The image cache could not be written: {why}"

    def hit(self, p: Planned, where: str = "hit") -> None:
        p.report.cache = where

    # ------------------------------------------------------------------ report
    def report(self) -> Optional[dict]:
        """``Backend.image_report`` of this prefill: the images evaluated, whether any got less than full
        detail, and the cache warning (None when the prompt had no images)."""
        if not self.planned:
            return None
        reps = [p.report.as_dict() for p in self.planned if p.report.cache]
        out: dict = {"images": reps, "cut": any(r["cut"] for r in reps)}
        if self.warning:
            out["warning"] = self.warning
        return out


__all__ = ["IMG", "Encoder", "ImagePlanner", "ImageReport", "Planned", "image_id"]
