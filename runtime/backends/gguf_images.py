"""Images in a llama.cpp prompt: libmtmd's contexts, its tokenization, and per-image units for projectors
whose embeddings we evaluate ourselves. A collaborator of ``GGUFBackend``: the backend owns the engine
(model, context, KV positions, batches); this module owns what libmtmd does with images.

Two paths:

* **Units** (Idefics3 projectors: SmolVLM). An image is one unit of the plan: its text tokens (row/col
  markers) and its embedding runs, tokenized by libmtmd one image at a time, encoded with
  ``mtmd_encode_chunk`` and evaluated from float32 embeddings (llama_decode with batch.embd), so that
  (1) the detail can be chosen per image (libmtmd's ``image_max_tokens``, or the overview tile alone for
  "low": Idefics3's one-tile input) by the planner (``inputs/planner.py``), and (2) the embeddings can
  come from / go to the persistent cache, which then needs neither libmtmd's preprocessing nor the encoder.
* **libmtmd's whole prompt** (every other projector): libmtmd tokenizes and evaluates the prompt's
  images itself (M-RoPE and non-causal positions are its business).

A prompt is planned as ``TextRun`` and ``ImageRun`` records covering its KV positions in order.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from ..errors import BackendError, BadMedia, BadModelFile
from ..inputs.detail import Option, idefics3_ladder
from ..inputs.planner import IMG, ImagePlanner, Planned, image_id


# libmtmd cannot cut an image whose short side rounds to nothing at its resize (a 3000x1 strip fails with
# error 2): such images are letterboxed to this aspect ratio first (black bars, content unchanged). At
# SmolVLM's 2048-px edge a 1:16 image is 2048 x 128 px, so nothing that would still be legible is padded.
MAX_ASPECT = 16


def padded(img, ratio: int):
    """``img`` letterboxed (centred on black) so that neither side is under 1/ratio of the other."""
    w, h = img.width, img.height
    if max(w, h) <= ratio * min(w, h):
        return img
    from PIL import Image

    nw, nh = (w, -(-w // ratio)) if w > h else (-(-h // ratio), h)
    canvas = Image.new("RGB", (nw, nh))
    canvas.paste(Image.frombytes("RGB", (w, h), img.rgb), ((nw - w) // 2, (nh - h) // 2))
    return replace(img, rgb=canvas.tobytes(), width=nw, height=nh)


# ---------------------------------------------------------------------- records
@dataclass
class TextRun:
    """Token ids at KV positions start .. start + len(tokens)."""

    start: int
    tokens: list


@dataclass
class ImageRun:
    """An image at n_pos KV positions from start. ``source``: our ImageUnit, a libmtmd chunk (whole-prompt
    path), or None for an image the KV cache already holds (a follow-up, see ``GGUFImages.follow_up``)."""

    start: int
    n_pos: int
    source: object = None

    @property
    def end(self) -> int:
        return self.start + self.n_pos


Run = Union[TextRun, ImageRun]


@dataclass
class TokenPart:      # a unit's text tokens (Idefics3's row/col and image markers)
    tokens: list


@dataclass
class EmbedPart:      # a unit's embedding run (one tile)
    n_tokens: int


@dataclass
class ImageUnit:
    """One image of a prompt for an Idefics3 projector: its parts, and embeddings or chunks to encode."""

    planned: Planned
    parts: list = field(default_factory=list)        # TokenPart | EmbedPart, in position order
    embd: Optional[list] = None    # float32 [n_tokens, n_embd] per EmbedPart, once encoded / cached
    chunks: object = None          # libmtmd's chunk list (freed after encoding)
    pending: list = field(default_factory=list)      # its image chunks, in EmbedPart order
    hit: bool = False
    encode_s: float = 0.0

    @property
    def n_pos(self) -> int:
        return sum(len(p.tokens) if isinstance(p, TokenPart) else p.n_tokens for p in self.parts)

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self.parts if isinstance(p, EmbedPart))

    @property
    def tiles(self) -> int:
        return sum(1 for p in self.parts if isinstance(p, EmbedPart))

    def layout(self) -> list:
        """The parts as the cache's JSON meta stores them."""
        return [["t", list(p.tokens)] if isinstance(p, TokenPart) else ["e", p.n_tokens] for p in self.parts]


@dataclass
class LastPrompt:
    """The last image prompt of a sequence: its text, image ids, keys, plan (image sources dropped) and image
    tokens, so that a follow-up question appends text without preprocessing its images again."""

    text: str
    ids: list
    keys: list
    plan: list
    n_image: int


def _prompt_ids(images: list, detail) -> list:
    return [(img.sha256, img.width, img.height, detail) for img in images]


def _settings_cap(settings: str, seq: int) -> tuple[Optional[int], bool]:
    """(libmtmd's image_max_tokens, overview only) of a unit setting (``Option.settings``)."""
    if settings == "mtmd:overview":
        return seq, True
    if settings.startswith("mtmd:cap"):
        return int(settings[len("mtmd:cap"):]), False
    return None, False


class GGUFImages:
    """libmtmd for one loaded model: its context(s), the image path of each prompt, the encoder's identity."""

    def __init__(self, backend, mm_info, gpu: bool) -> None:
        self.b = backend
        self.mm_info = mm_info
        self.gpu = gpu
        self.marker = backend._mtmd_cpp.mtmd_default_marker().decode()
        self.ctx = None                 # libmtmd context
        self.cap: Optional[int] = None  # image_max_tokens it was made with (None: the model's own)
        self.units: list[ImageUnit] = []
        self.planner: Optional[ImagePlanner] = None
        self._enc_id: Optional[str] = None
        self.geo = self.geometry()
        if self.geo is None:
            self.use(None)        # libmtmd's whole-prompt path; Idefics3 units make theirs on demand
            # (a context costs ~0.4 s for SmolVLM's 190 MB projector: an answer from the embedding cache
            # needs none, and "low" needs another one than the model's own)

    # ------------------------------------------------------------------ libmtmd context
    def use(self, cap: Optional[int]):
        """The libmtmd context whose preprocessing caps images at ``cap`` tokens (None: the model's own);
        the context is remade when the cap changes (it owns the projector weights, so one at a time)."""
        if self.ctx is not None and self.cap == cap:
            return self.ctx
        b, mt = self.b, self.b._mtmd_cpp
        self.free_context()
        mp = mt.mtmd_context_params_default()
        mp.use_gpu = self.gpu
        mp.print_timings = False
        mp.n_threads = b.n_threads
        mp.warmup = False
        if cap is not None:
            mp.image_max_tokens = cap
        mmproj = b.artifact.mmproj
        ctx = mt.mtmd_init_from_file(str(mmproj).encode(), b._model, mp)
        if not ctx:
            b.close()
            raise BadModelFile(
                f"libmtmd could not load the vision projector {mmproj.name} for {b.artifact.path.name}.",
                hint="Check that the mmproj belongs to this model; VLM_DEBUG=1 shows llama.cpp's log.",
            )
        self.ctx, self.cap = ctx, cap
        if not mt.mtmd_support_vision(ctx):
            b.close()
            raise BadModelFile(f"{mmproj.name} does not support images.", hint="Use an image projector.")
        return ctx

    def free_context(self) -> None:
        if self.ctx is not None:
            self.b._mtmd_cpp.mtmd_free(self.ctx)
            self.ctx = None

    def geometry(self) -> Optional[dict]:
        """Tile size, longest edge and tokens per tile of an Idefics3 projector; None for other projectors."""
        mm = self.mm_info
        if mm is None or str(mm.get("clip.projector_type", "")).lower() != "idefics3":
            return None                 # (Idefics3 positions are plain: no M-RoPE, causal)
        try:
            tile = int(mm.get("clip.vision.image_size"))
            patch = int(mm.get("clip.vision.patch_size"))
            merge = int(mm.get("clip.vision.projector.scale_factor", 1) or 1)
            longest = int(mm.get("clip.vision.preproc_image_size") or tile)
        except (TypeError, ValueError):
            return None
        return {"tile": tile, "longest": longest, "seq": (tile // patch) ** 2 // (merge * merge)}

    # ------------------------------------------------------------------ the planner's Encoder
    @property
    def encoder_id(self) -> str:
        if self._enc_id is None:
            from importlib.metadata import PackageNotFoundError, version
            from pathlib import Path

            from ..inputs.embed_cache import file_identity

            try:
                ver = version("llama_cpp_python")
            except PackageNotFoundError:  # pragma: no cover
                ver = "?"
            libs = sorted(Path(self.b._mtmd_cpp.__file__).parent.glob("lib/libmtmd*"))
            build = file_identity(libs[0]) if libs else "?"
            self._enc_id = f"gguf:{file_identity(self.b.artifact.mmproj)}:{ver}:{build}"
        return self._enc_id

    @property
    def n_threads(self) -> int:
        return self.b.n_threads

    def time_one_tile(self) -> Optional[tuple[int, float]]:
        """The overview tile of a blank image, encoded twice (the first encode of a context also allocates
        its compute graph)."""
        from ..protocol import ImageDetail, ImageInput

        t = self.geo["tile"]
        blank = ImageInput(rgb=bytes([128]) * (t * t * 3), width=t, height=t, source="(calibration)", sha256="")
        planner = ImagePlanner(self, ImageDetail(cache=False))
        unit = self.unit(planner.fixed(blank, Option("mtmd:overview", 1, self.geo["seq"])), planner)
        try:
            self.encode(unit)
            unit.embd = None
            secs = self.encode(unit)
        finally:
            self.free(unit)
        return 1, secs

    # ------------------------------------------------------------------ a prompt's images
    def prepare(self, text: str, images: list, detail):
        """(keys, plan, chunks, n_image_tokens) of a prompt with images; chunks is libmtmd's list to free
        after evaluation (whole-prompt path) or None."""
        self.free_all()
        self.units, self.planner = [], None
        return self.follow_up(text, images, detail) or (
            self.tokenize_units(text, images, detail) if self.geo else self.tokenize_media(text, images))

    def report(self, had_images: bool) -> Optional[dict]:
        if not had_images:
            return None
        if self.planner is None:
            return {"images": [], "cut": False}
        return self.planner.report() or {"images": [], "cut": False}

    def _bitmap(self, img):
        """A libmtmd bitmap of ``img``'s pixels (the caller frees it)."""
        mt = self.b._mtmd_cpp
        if len(img.rgb) != img.width * img.height * 3:
            raise BadMedia(f"Image {img.source} has inconsistent pixel data.", hint="Report this as a bug.")
        buf = (ctypes.c_uint8 * len(img.rgb)).from_buffer_copy(img.rgb)
        bm = mt.mtmd_bitmap_init(img.width, img.height, buf)
        if not bm:
            raise BadMedia(f"libmtmd could not take image {img.source} ({img.width}x{img.height}).",
                           hint="Try another image, or convert it to PNG or JPEG.")
        return bm

    def _tokenize(self, ctx, text: str, bitmaps: list, add_special: bool):
        """libmtmd's tokenization of ``text`` with one bitmap per marker: (rc, chunks); chunks None unless rc 0."""
        mt = self.b._mtmd_cpp
        chunks = mt.mtmd_input_chunks_init()
        itext = mt.mtmd_input_text()
        data = text.encode("utf-8")
        itext.text = data
        itext.text_len = len(data)
        itext.add_special = add_special
        itext.parse_special = True
        arr = (mt.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        rc = mt.mtmd_tokenize(ctx, chunks, ctypes.byref(itext), arr, len(bitmaps))
        if rc != 0:
            mt.mtmd_input_chunks_free(chunks)
            return rc, None
        return rc, chunks

    def _chunks(self, chunks):
        """(chunk, its token ids) of a text chunk, (chunk, None) of an image chunk, in order."""
        mt = self.b._mtmd_cpp
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            ch = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(ch) != mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                yield ch, None
                continue
            n = ctypes.c_size_t()
            ptr = mt.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
            yield ch, [ptr[j] for j in range(n.value)]

    def tokenize_media(self, text: str, images: list):
        """libmtmd's tokenization of a prompt with media markers: it preprocesses every image."""
        mt = self.b._mtmd_cpp
        bitmaps = []
        try:
            for img in images:
                bitmaps.append(self._bitmap(img))
                mt.mtmd_bitmap_set_id(bitmaps[-1], img.sha256.encode())
            rc, chunks = self._tokenize(self.ctx, text, bitmaps, self.b._add_special(text))
        finally:
            for bm in bitmaps:
                mt.mtmd_bitmap_free(bm)
        if rc != 0:
            if rc == 1:           # libmtmd: the markers and the bitmaps do not pair up
                raise BackendError(f"libmtmd could not place the images in the prompt (error {rc}).",
                                   hint=f"Leave the text {self.marker} out of the prompt; attach images instead.")
            sizes = ", ".join(f"{img.width}x{img.height}" for img in images)
            raise BadMedia(f"The vision projector could not prepare the image{'s' if len(images) > 1 else ''} "
                           f"({sizes}; libmtmd error {rc}).",
                           hint="Crop or pad an image of extreme shape, or convert it to PNG or JPEG.")
        keys: list = []
        plan: list = []
        n_image_pos = 0
        for ch, toks in self._chunks(chunks):
            if toks is not None:
                plan.append(TextRun(len(keys), toks))
                keys.extend(toks)
            else:
                n_pos = mt.mtmd_input_chunk_get_n_pos(ch)
                ident = (mt.mtmd_input_chunk_get_id(ch) or b"").decode(errors="replace")
                plan.append(ImageRun(len(keys), n_pos, ch))
                keys.extend((IMG, ident, k) for k in range(n_pos))
                n_image_pos += mt.mtmd_input_chunk_get_n_tokens(ch)
        self._remember(text, _prompt_ids(images, None), keys, plan, n_image_pos)
        return keys, plan, chunks, n_image_pos

    def _remember(self, text: str, ids: list, keys: list, plan: list, n_image: int) -> None:
        plan = [replace(r, source=None) if isinstance(r, ImageRun) else r for r in plan]
        self.b._last_prompt = LastPrompt(text, ids, keys, plan, n_image)

    def follow_up(self, text: str, images: list, detail=None):
        """Keys and plan for a prompt that only appends text to the last image prompt, whose images are
        still in the KV cache (a follow-up question in a session), without libmtmd preprocessing them
        again: that costs ~90 MiB of float32 tiles and tens of ms for a 17-tile SmolVLM image.

        Exact, not approximate: libmtmd tokenizes the text between media markers piece by piece, so the
        appended text yields the same tokens as a full tokenization when the last piece and the
        appended text tokenize the same apart as together (checked). Anything else returns None."""
        b = self.b
        last: Optional[LastPrompt] = b._last_prompt
        if last is None:
            return None
        suffix = text[len(last.text):]
        if (not suffix or not text.startswith(last.text) or self.marker in suffix
                or _prompt_ids(images, detail if self.geo else None) != last.ids
                or b._llama_cpp.llama_vocab_get_add_eos(b._vocab)):
            return None
        images_end = max(r.end for r in last.plan if isinstance(r, ImageRun))
        if b._keys[:images_end] != last.keys[:images_end]:
            return None                    # the images are no longer in the KV cache: encode them again
        piece = last.text.rpartition(self.marker)[2]
        added = b.tokenize(suffix, add_special=False)
        if not added or b.tokenize(piece + suffix, add_special=False) != b.tokenize(piece, add_special=False) + added:
            return None
        keys = last.keys + added
        plan = last.plan + [TextRun(len(last.keys), added)]
        b._last_prompt = LastPrompt(text, last.ids, keys, plan, last.n_image)
        return keys, plan, None, last.n_image

    # ------------------------------------------------------------------ units
    def ladder(self, img) -> tuple[list, Option]:
        """Idefics3's ladder for one image as libmtmd cuts it: longest edge N x tile, at libmtmd's tile caps."""
        from ..inputs.idefics3 import hf_grid, mtmd_capped_grid, mtmd_full_grid

        tile, longest, seq = self.geo["tile"], self.geo["longest"], self.geo["seq"]
        w, h = img.width, img.height
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
        return idefics3_ladder(w, h, tile, longest, tiles_at, seq), high

    def unit(self, p: Planned, planner: ImagePlanner) -> ImageUnit:
        """One image as parts, embeddings from the cache or libmtmd chunks to encode."""
        b, mt = self.b, self.b._mtmd_cpp
        unit = ImageUnit(p)
        hit = planner.lookup(p)
        if hit is not None and self._from_cache(unit, *hit):
            return unit
        cap, overview_only = _settings_cap(p.settings, self.geo["seq"])
        ctx = self.use(cap)
        img = p.image
        bm = self._bitmap(img)
        try:
            rc, chunks = self._tokenize(ctx, self.marker, [bm], False)
        finally:
            mt.mtmd_bitmap_free(bm)
        if rc != 0:
            raise BadMedia(f"libmtmd could not prepare image {img.source} ({img.width}x{img.height}, error {rc}).",
                           hint="Try another image, or convert it to PNG or JPEG.")
        unit.chunks = chunks
        parts: list = []
        pending: list = []
        for ch, toks in self._chunks(chunks):
            if toks is not None:
                parts.append(TokenPart(toks))
            else:
                parts.append(EmbedPart(mt.mtmd_input_chunk_get_n_tokens(ch)))
                pending.append(ch)
        if overview_only:          # Idefics3's one-tile input: <fake><global-img> overview <fake>
            ov = [p for p in parts if isinstance(p, EmbedPart)][-1]
            parts = [TokenPart(b.tokenize("<fake_token_around_image><global-img>", add_special=False)), ov,
                     TokenPart(b.tokenize("<fake_token_around_image>", add_special=False))]
            pending = pending[-1:]
        unit.parts, unit.pending = parts, pending
        return unit

    def _from_cache(self, unit: ImageUnit, arrays: list, meta: dict) -> bool:
        layout = meta.get("parts")
        if not isinstance(layout, list):
            return False
        parts: list = []
        n_e = 0
        n_embd = self.b._llama_cpp.llama_model_n_embd_inp(self.b._model)
        for p in layout:
            if isinstance(p, list) and len(p) == 2 and p[0] == "t" and isinstance(p[1], list):
                parts.append(TokenPart([int(t) for t in p[1]]))
            elif isinstance(p, list) and len(p) == 2 and p[0] == "e" and isinstance(p[1], int):
                if n_e >= len(arrays) or arrays[n_e].shape != (p[1], n_embd):
                    return False
                parts.append(EmbedPart(p[1]))
                n_e += 1
            else:
                return False
        if n_e != len(arrays):
            return False
        unit.parts, unit.embd, unit.hit = parts, list(arrays), True
        return True

    def encode(self, unit: ImageUnit) -> float:
        """Encode the unit's libmtmd chunks (one tile each) into float32 arrays; returns seconds."""
        import numpy as np

        if unit.embd is not None:
            return 0.0
        b, mt = self.b, self.b._mtmd_cpp
        n_embd = b._llama_cpp.llama_model_n_embd_inp(b._model)
        t0 = time.perf_counter()
        out = []
        for ch in unit.pending:
            rc = mt.mtmd_encode_chunk(self.ctx, ch)
            if rc != 0:
                raise BackendError(f"libmtmd failed to encode image {unit.planned.image.source} (error {rc}).",
                                   hint="Check that the mmproj belongs to the model.")
            n = mt.mtmd_input_chunk_get_n_tokens(ch)
            ptr = mt.mtmd_get_output_embd(self.ctx)
            out.append(np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).reshape(n, n_embd).copy())
        unit.embd = out
        unit.encode_s = time.perf_counter() - t0
        return unit.encode_s

    def free(self, unit: ImageUnit) -> None:
        if unit.chunks is not None:
            self.b._mtmd_cpp.mtmd_input_chunks_free(unit.chunks)
            unit.chunks, unit.pending = None, []

    def free_all(self) -> None:
        for unit in self.units:
            self.free(unit)

    def evaluate(self, unit: ImageUnit, keys: list, logits_last: bool) -> float:
        """Encode (unless cached) and evaluate one image unit; returns the encode seconds."""
        b, planner = self.b, self.planner
        try:
            if unit.embd is None:
                self.encode(unit)
            secs = unit.encode_s
            if unit.hit:
                planner.hit(unit.planned)
            else:
                planner.encoded_now(unit.planned, unit.embd, {"parts": unit.layout()}, len(unit.embd), secs)
        finally:
            self.free(unit)
        k, e = 0, 0
        last = len(unit.parts) - 1
        for i, part in enumerate(unit.parts):
            if isinstance(part, TokenPart):
                b._decode_tokens(part.tokens, logits_last=logits_last and i == last, keys=keys[k: k + len(part.tokens)])
                k += len(part.tokens)
            else:
                b._decode_embd(unit.embd[e], keys[k: k + part.n_tokens], logits_last and i == last)
                k += part.n_tokens
                e += 1
        return secs

    def tokenize_units(self, text: str, images: list, detail):
        """Keys and plan of a prompt whose images are units (see the module docstring)."""
        b = self.b
        lc = b._llama_cpp
        pieces = text.split(self.marker)
        if len(pieces) - 1 != len(images):
            raise BackendError(f"The prompt has {len(pieces) - 1} image markers for {len(images)} images.",
                               hint=f"Leave the text {self.marker} out of the prompt; attach images instead.")
        images = [padded(img, MAX_ASPECT) for img in images]
        planner = self.planner = ImagePlanner(self, detail)
        planned = planner.plan(images, self.ladder)
        keys: list = []
        plan: list = []
        n_image = 0
        head = [lc.llama_vocab_bos(b._vocab)] if (b._add_special(text) and lc.llama_vocab_get_add_bos(b._vocab)) else []
        self.units = []
        for i, piece in enumerate(pieces):
            toks = (head if i == 0 else []) + (b.tokenize(piece, add_special=False) if piece else [])
            if toks:
                plan.append(TextRun(len(keys), toks))
                keys.extend(toks)
            if i == len(images):
                break
            p = planned[i]
            if _settings_cap(p.settings, self.geo["seq"])[0] != self.cap:
                # the libmtmd context changes: encode the chunks made by this one first
                for u in self.units:
                    if u.embd is None and u.pending:
                        self.encode(u)
            unit = self.unit(p, planner)
            self.units.append(unit)
            p.report.tiles, p.report.tokens = unit.tiles, unit.n_tokens
            ident = f"{image_id(images[i])}|{p.settings}"
            plan.append(ImageRun(len(keys), unit.n_pos, unit))
            keys.extend((IMG, ident, k) for k in range(unit.n_pos))
            n_image += unit.n_tokens
        if b._add_special(text) and lc.llama_vocab_get_add_eos(b._vocab):
            eos = [lc.llama_vocab_eos(b._vocab)]
            plan.append(TextRun(len(keys), eos))
            keys.extend(eos)
        self._remember(text, _prompt_ids(images, detail), keys, plan, n_image)
        return keys, plan, None, n_image


__all__ = ["GGUFImages", "ImageUnit", "ImageRun", "TextRun", "LastPrompt", "IMG", "MAX_ASPECT", "padded"]
