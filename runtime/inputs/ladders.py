"""Each llama.cpp vision family's detail ladder: what ``--detail low|auto|high`` and ``--image-tokens`` mean
for its encoder, through the knob that encoder really has. Written from libmtmd's own preprocessing
(tools/mtmd/clip.cpp and mtmd-image.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors), so the token
counts predicted here are the ones libmtmd then produces; the planner (``planner.py``) chooses among them.

=============== ===================================== ==============================================
kind            projectors (clip.projector_type)      the knob
=============== ===================================== ==============================================
``tiles``       idefics3 (SmolVLM)                    libmtmd's tile cap (``image_max_tokens``) or
                                                      the overview tile alone (``inputs/idefics3``)
``dynamic``     qwen2vl_merger, qwen2.5vl_merger,     ``image_max_tokens``: the image is resized to at
                qwen3vl_merger (Qwen2.5/3-VL,         most that many tokens, keeping its aspect
                Qwen3.5), gemma4v (Gemma 4)
``lfm2``        lfm2 (LFM2 / LFM2.5-VL, SigLIP2       the image resized to the level's pixel budget
                NaFlex)                               (one image of 64-256 tokens, no tiling); ``high``
                                                      is the model's own 512-px tiling + thumbnail
``grid``        internvl (InternVL 2.5 / 3 / 3.5)     the image resized so its longest edge is N tiles
                                                      (N = 1 is the 448-px thumbnail alone): libmtmd's
                                                      grid never holds more than the image fills
``fixed``       gemma3, mlp / ldp / ldpv2 (LLaVA,     none: one input size; low = auto = high, the
                moondream), anything else             embedding cache still applies
=============== ===================================== ==============================================

``high`` is always the model's own behaviour (libmtmd with the model's settings, the image as given): the
reference. ``low`` is the family's smallest useful input. Encode cost is counted in calibration units
(``Option.cost``): one unit is what ``Family.calibration`` encodes (a tile, or a 256-token image), so the
planner's measured seconds per unit price every option of the ladder.

Where a model positions image tokens itself (M-RoPE: Qwen-VL; non-causal attention: Gemma 3 / 4), the
decode of its embeddings is libmtmd's (``helper_decode``), and an embedding-cache entry keeps libmtmd's
chunk metadata (the image's token grid) with the embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .detail import Option, idefics3_ladder

DYNAMIC = {"qwen2vl_merger": "Qwen2-VL", "qwen2.5vl_merger": "Qwen2.5-VL", "qwen3vl_merger": "Qwen3-VL / Qwen3.5",
           "gemma4v": "Gemma 4"}
MROPE = {"qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger"}
NON_CAUSAL = {"gemma3", "gemma4v"}        # libmtmd decides per model (Gemma 4 E2B/E4B are causal)
FIXED_NAMES = {"gemma3": "Gemma 3", "mlp": "LLaVA", "ldp": "MobileVLM", "ldpv2": "MobileVLM v2"}
CAL_TOKENS = 256                          # one calibration unit of a dynamic encoder


def _round(x: float, f: int) -> int:
    return int(round(x / f)) * f


def dyn_size(w: int, h: int, align: int, min_px: int, max_px: int) -> tuple[int, int]:
    """libmtmd's ``calc_size_preserved_ratio`` (transformers' smart_resize): the size an image is resized to."""
    if w <= 0 or h <= 0:
        return 0, 0
    wb, hb = max(align, _round(w, align)), max(align, _round(h, align))
    if max_px > 0 and wb * hb > max_px:
        beta = math.sqrt(h * w / max_px)
        hb, wb = max(align, math.floor(h / beta / align) * align), max(align, math.floor(w / beta / align) * align)
    elif min_px > 0 and wb * hb < min_px:
        beta = math.sqrt(min_px / (h * w))
        hb, wb = math.ceil(h * beta / align) * align, math.ceil(w * beta / align) * align
    return wb, hb


@dataclass(frozen=True)
class Step:
    """How one option is handed to libmtmd."""

    cap: Optional[int] = None                   # libmtmd's image_max_tokens (None: the model's own)
    size: Optional[tuple[int, int]] = None      # resize the image to (w, h) first (None: as given)
    overview_only: bool = False                 # Idefics3: the overview tile alone


@dataclass(frozen=True)
class Family:
    projector: str
    kind: str                  # tiles | dynamic | lfm2 | grid | fixed
    align: int = 0             # pixels per token side (patch x merge)
    min_tokens: int = 0
    max_tokens: int = 0        # one image's tokens at the model's own settings
    tile: int = 0              # tile / input edge in pixels
    seq: int = 0               # tokens per tile (tiles, grid, lfm2) or of the one input (fixed)
    longest: int = 0           # Idefics3: the longest edge its tiling works at
    max_tiles: int = 0         # grid: the most tiles of its grid
    low_tokens: int = 0        # dynamic / lfm2: the smallest rung

    # ------------------------------------------------------------------ what kind of encoder
    @property
    def name(self) -> str:
        return DYNAMIC.get(self.projector) or FIXED_NAMES.get(self.projector) or \
            {"idefics3": "Idefics3 / SmolVLM", "lfm2": "LFM2-VL", "internvl": "InternVL"}.get(self.projector, self.projector)

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"

    @property
    def helper_decode(self) -> bool:
        """Whether the model places the image's embeddings itself (M-RoPE positions or non-causal attention),
        evaluated as libmtmd's mtmd_helper_decode_image_chunk does it (backends/gguf_units.py)."""
        return self.projector in MROPE or self.projector in NON_CAUSAL

    @property
    def mrope(self) -> bool:
        return self.projector in MROPE

    def non_causal(self, n_embd_text: int) -> bool:
        """libmtmd's mtmd_decode_use_non_causal: Gemma 3 always; Gemma 4 except E2B / E4B (n_embd 1536 / 2560)."""
        if self.projector == "gemma4v":
            return n_embd_text not in (1536, 2560)
        return self.projector in NON_CAUSAL

    # ------------------------------------------------------------------ the ladder
    def ladder(self, w: int, h: int) -> tuple[list[Option], Option]:
        """(options fewest tokens first, the model's own full detail) for a w x h image."""
        if self.kind == "tiles":
            return self._idefics3(w, h)
        if self.kind == "fixed":
            own = Option("own", 1, self.seq)
            return [own], own
        if self.kind == "grid":
            return self._grid(w, h)
        high = self._own(w, h)
        out: dict[int, Option] = {}
        cap = self.low_tokens
        while cap <= self.max_tokens:
            o = self._capped(w, h, cap)
            if o.tokens < high.tokens:
                out.setdefault(o.tokens, o)
            cap *= 2
        out.setdefault(high.tokens, high)
        return sorted(out.values(), key=lambda o: o.tokens), high

    def _units(self, tokens: int) -> float:
        return round(tokens / CAL_TOKENS, 3)

    def _own(self, w: int, h: int) -> Option:
        if self.kind == "lfm2" and self._lfm2_tiles(w, h):
            cols, rows = self._lfm2_tiles(w, h)
            thumb = self._single(w, h, self.max_tokens)
            n = cols * rows * self.seq + thumb
            return Option("own", cols * rows + 1, n, self._units(n))
        n = self._single(w, h, self.max_tokens)
        return Option("own", 1, n, self._units(n))

    def _single(self, w: int, h: int, cap: int) -> int:
        a = self.align
        wb, hb = dyn_size(w, h, a, self.min_tokens * a * a, cap * a * a)
        if self.kind == "lfm2":       # the resized image goes through libmtmd's own pass again
            wb, hb = dyn_size(wb, hb, a, self.min_tokens * a * a, self.max_tokens * a * a)
        return (wb // a) * (hb // a)

    def _capped(self, w: int, h: int, cap: int) -> Option:
        n = self._single(w, h, cap)
        if self.kind == "lfm2":
            a = self.align
            size = dyn_size(w, h, a, self.min_tokens * a * a, cap * a * a)
            return Option(f"fit{size[0]}x{size[1]}", 1, n, self._units(n))
        return Option(f"max{cap}", 1, n, self._units(n))

    def _lfm2_tiles(self, w: int, h: int) -> Optional[tuple[int, int]]:
        """libmtmd's LFM2 tiling: (cols, rows) of 512-px tiles, or None when the image is one input."""
        a = self.align
        hb = max(a // 2, int(round(h / a)) * a)
        wb = max(a // 2, int(round(w / a)) * a)
        if hb * wb <= self.max_tokens * a * a * 2.0:
            return None
        ratios = sorted({(c, r) for n in range(2, 11) for c in range(1, n + 1) for r in range(1, n + 1)
                         if 2 <= c * r <= 10}, key=lambda t: t[0] * t[1])
        aspect, best, diff = w / h, (1, 1), float("inf")
        for c, r in ratios:
            d = abs(aspect - c / r)
            if d < diff:
                diff, best = d, (c, r)
            elif d == diff and w * h > 0.5 * self.tile * self.tile * c * r:
                best = (c, r)
        return best

    def _grid_tiles(self, w: int, h: int) -> int:
        """libmtmd's InternVL tiles for a w x h image: its llava-uhd grid plus the thumbnail, or 1."""
        t = self.tile
        if w <= t and h <= t:
            return 1
        best, best_eff, best_waste = (1, 1), 0, None
        for a in range(1, self.max_tiles + 1):
            for b in range(1, self.max_tiles // a + 1):
                cw, ch = a * t, b * t
                s = min(cw / w, ch / h)
                eff = min(int(w * s) * int(h * s), w * h)
                waste = cw * ch - eff
                if eff > best_eff or (eff == best_eff and waste < best_waste):
                    best, best_eff, best_waste = (a, b), eff, waste
        return best[0] * best[1] + 1

    def _grid(self, w: int, h: int) -> tuple[list[Option], Option]:
        n = self._grid_tiles(w, h)
        high = Option("own", n, n * self.seq, float(n))
        out: dict[int, Option] = {}
        longest = max(w, h)
        for k in range(1, self.max_tiles + 1):
            edge = k * self.tile
            if edge >= longest:
                break
            if k == 1:
                size = (self.tile, self.tile)        # the thumbnail: the whole image on one tile
            else:
                size = (max(1, round(w * edge / longest)), max(1, round(h * edge / longest)))
            tiles = 1 if k == 1 else self._grid_tiles(*size)
            if tiles < n:
                out.setdefault(tiles, Option(f"fit{size[0]}x{size[1]}", tiles, tiles * self.seq, float(tiles)))
        out.setdefault(n, high)
        return sorted(out.values(), key=lambda o: o.tiles), high

    def _idefics3(self, w: int, h: int) -> tuple[list[Option], Option]:
        from .idefics3 import hf_grid, mtmd_capped_grid, mtmd_full_grid

        tile, longest, seq = self.tile, self.longest, self.seq
        cols, rows = mtmd_full_grid(w, h, longest, tile)
        high = Option("mtmd:full", cols * rows + 1, (cols * rows + 1) * seq)

        def tiles_at(n: int):
            if n == 1:
                return 1, "mtmd:overview"
            if n * tile >= longest:
                return high.tiles, "mtmd:full"
            c, r = hf_grid(w, h, n * tile, tile)
            k = max(1, c * r)
            gc, gr = mtmd_capped_grid(w, h, longest, tile, k)
            return gc * gr + 1, f"mtmd:cap{k * seq}"
        ladder = idefics3_ladder(w, h, tile, longest, tiles_at, seq)
        fewer = [o for o in ladder if o.tokens < high.tokens]     # (a capped grid of an extreme aspect ratio
        if len(fewer) < len(ladder):                              # can hold more tiles than the full one)
            fewer.append(high)
        return fewer, high

    def units_of(self, chunks: int, tokens: int) -> float:
        """Calibration units of a real encode of ``chunks`` image chunks holding ``tokens`` tokens."""
        return self._units(tokens) if self.kind in ("dynamic", "lfm2") else float(chunks)

    # ------------------------------------------------------------------ an option as libmtmd's input
    def step(self, settings: str) -> Step:
        if settings == "mtmd:overview":
            return Step(cap=self.seq, overview_only=True)
        if settings.startswith("mtmd:cap"):
            return Step(cap=int(settings[len("mtmd:cap"):]))
        if settings.startswith("max"):
            return Step(cap=int(settings[3:]))
        if settings.startswith("fit"):
            w, _, h = settings[3:].partition("x")
            return Step(size=(int(w), int(h)))
        return Step()                           # own / mtmd:full

    def calibration(self) -> tuple[int, int, str, float]:
        """(width, height, settings, units) of the blank image that measures this encoder's speed."""
        if self.kind in ("tiles", "grid"):
            return self.tile, self.tile, ("mtmd:overview" if self.kind == "tiles" else "own"), 1.0
        if self.kind == "fixed":
            return self.tile or 336, self.tile or 336, "own", 1.0
        side = int(math.sqrt(CAL_TOKENS)) * self.align          # 16 x 16 tokens
        return side, side, ("own" if self.kind == "lfm2" else f"max{CAL_TOKENS}"), 1.0

    # ------------------------------------------------------------------ `vlm info`
    def seconds(self, s_per_unit: float, w: int = 4032, h: int = 3024, s_per_token: Optional[float] = None) -> dict:
        """Estimated encode seconds of a w x h photo per level at ``s_per_unit``, and ``auto_tokens``: the
        option auto takes with the default budget (encode + prefill at ``s_per_token`` when known)."""
        from .detail import DEFAULT_BUDGET_S

        ladder, high = self.ladder(w, h)
        fit = [o for o in ladder if o.units * s_per_unit + o.tokens * (s_per_token or 0.0) <= DEFAULT_BUDGET_S] \
            or ladder[:1]
        return {"low": ladder[0].units * s_per_unit, "auto": fit[-1].units * s_per_unit,
                "high": high.units * s_per_unit, "auto_tokens": fit[-1].tokens}

    def summary(self) -> str:
        if self.fixed:
            return (f"fixed input ({self.name}: one {self.tile or '?'}-px image, {self.seq or '?'} tokens; "
                    "low = auto = high); embedding cache")
        w, h = 4000, 3000
        ladder, high = self.ladder(w, h)
        low = ladder[0]
        knob = {"tiles": "libmtmd's tile cap", "dynamic": "libmtmd's image_max_tokens",
                "lfm2": "the image resized to the level's token budget, no tiling",
                "grid": "the image resized to N tiles"}[self.kind]
        rungs = "/".join(str(o.tokens) for o in ladder)
        return (f"{self.name}: image tokens for a 12 MP photo: low {low.tokens}, auto one of {rungs} (what the "
                f"measured encode and prefill fit in the budget), high {high.tokens}; knob: {knob}; --image-tokens; "
                "embedding cache")


def _int(mm: dict, key: str, default: int = 0) -> int:
    try:
        v = mm.get(key)
        return int(v) if v is not None else default
    except (TypeError, ValueError):
        return default


def family_of(mm: Optional[dict]) -> Optional[Family]:
    """The family of a projector's GGUF metadata; None for a projector without images or unknown metadata."""
    if mm is None:
        return None
    proj = str(mm.get("clip.projector_type", "") or "").lower()
    if not proj and mm.get("clip.has_llava_projector"):
        proj = "mlp"
    patch, size = _int(mm, "clip.vision.patch_size"), _int(mm, "clip.vision.image_size")
    if patch <= 0:
        return None
    merge = _int(mm, "clip.vision.projector.scale_factor") or _int(mm, "clip.vision.spatial_merge_size")
    if proj == "idefics3":
        merge = merge or 1
        seq = (size // patch) ** 2 // (merge * merge)
        return Family(proj, "tiles", patch * merge, tile=size, seq=seq,
                      longest=_int(mm, "clip.vision.preproc_image_size") or size)
    if proj in DYNAMIC:
        if proj == "gemma4v":
            merge = merge or 3
            return Family(proj, "dynamic", patch * merge, 70, 1120, low_tokens=70)
        merge = merge or 2
        return Family(proj, "dynamic", patch * merge, 8, 4096, low_tokens=64)
    if proj == "lfm2":
        merge = merge or 2
        return Family(proj, "lfm2", patch * merge, 64, 256, tile=512, seq=(512 // (patch * merge)) ** 2, low_tokens=64)
    if proj == "internvl":
        merge = merge or 2
        return Family(proj, "grid", patch * merge, tile=size, seq=(size // (patch * merge)) ** 2,
                      max_tiles=_int(mm, "clip.vision.preproc_max_tiles", 12))
    if proj == "gemma3":
        merge = merge or 4
        return Family(proj, "fixed", patch * merge, tile=size, seq=(size // (patch * merge)) ** 2)
    if proj in ("mlp", "ldp", "ldpv2"):
        return Family(proj, "fixed", patch, tile=size, seq=(size // patch) ** 2)
    return None


__all__ = ["Family", "Step", "family_of", "dyn_size", "CAL_TOKENS"]
