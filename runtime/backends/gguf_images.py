"""Images in a llama.cpp prompt: libmtmd's contexts, its tokenization, and per-image units for projectors
whose embeddings we evaluate ourselves. A collaborator of ``GGUFBackend``: the backend owns the engine
(model, context, KV positions, batches); this module owns what libmtmd does with images.

Two paths:

* **Units** (every projector family of ``inputs/ladders.py``: Idefics3, LFM2, Qwen-VL, Gemma 3 / 4,
  InternVL, LLaVA). An image is one unit of the plan: its text tokens (markers) and its embedding runs,
  tokenized by libmtmd one image at a time with the option the planner chose (``inputs/planner.py``:
  libmtmd's ``image_max_tokens``, the image resized to the level's budget, Idefics3's overview tile),
  encoded with ``mtmd_encode_chunk`` and evaluated from float32 embeddings, so that the detail is chosen
  per image and the embeddings can come from / go to the persistent cache, which then needs neither
  libmtmd's preprocessing nor the encoder. Plain positions are evaluated here (llama_decode with
  batch.embd); where the model places image tokens itself (M-RoPE, non-causal attention) they are
  evaluated as libmtmd's ``mtmd_helper_decode_image_chunk`` does it (backends/gguf_units.py), with the
  positions of the chunk's token grid, kept with the embeddings in the cache (``mtmd_input_chunk_save``).
* **libmtmd's whole prompt** (a projector ``ladders.family_of`` does not know): libmtmd tokenizes and
  evaluates the prompt's images itself.

A prompt is planned as ``TextRun`` and ``ImageRun`` records covering its KV positions in order.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from typing import Optional, Union

from ..errors import BackendError, BadMedia, BadModelFile
from ..inputs.ladders import Family, family_of
from ..inputs.planner import IMG, ImagePlanner, image_id
from .gguf_units import EmbedPart, ImageUnit, TokenPart, UnitPath


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
    path), or None for an image the KV cache already holds (a follow-up, see ``GGUFImages.follow_up``).
    ``n_cells``: the KV cells it fills, more than its positions for M-RoPE (Qwen-VL: a grid of N tokens
    shares fewer positions); -1: one per position."""

    start: int
    n_pos: int
    source: object = None
    n_cells: int = -1

    @property
    def end(self) -> int:
        return self.start + self.n_pos


Run = Union[TextRun, ImageRun]


def extra_cells(plan: list) -> list:
    """(start, cells beyond its positions) of each image run that fills more KV cells than positions: what
    ``kv_used`` adds to the positions, since the context holds cells, not positions."""
    return [(r.start, r.n_cells - r.n_pos) for r in plan if isinstance(r, ImageRun) and r.n_cells > r.n_pos]


def cells_used(keys: list, extra: list) -> int:
    """KV cells a sequence fills: its positions (``keys``) plus what its M-RoPE images (``extra_cells``
    of its last prompt) fill beyond theirs, for the images still within those positions."""
    n = len(keys)
    return n + sum(e for s, e in extra if s < n)


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


def encoder_id(mmproj) -> str:
    """What names a projector's encoder for the embedding cache and the measured speed: the projector file's
    identity, llama-cpp-python's version and its libmtmd build."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec
    from pathlib import Path

    from ..inputs.embed_cache import file_identity

    try:
        ver = version("llama_cpp_python")
    except PackageNotFoundError:  # pragma: no cover
        ver = "?"
    spec = find_spec("llama_cpp")            # (without loading the native libraries)
    pkg = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    libs = sorted(pkg.glob("lib/libmtmd*")) if pkg else []
    build = file_identity(libs[0]) if libs else "?"
    return f"gguf:{file_identity(mmproj)}:{ver}:{build}"


class GGUFImages(UnitPath):
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
        self._text_id: Optional[str] = None
        self.family: Optional[Family] = family_of(mm_info)
        if self.family is None:
            self.use(None)        # libmtmd's whole-prompt path; units make their context on demand
            # (a context costs ~0.4 s for SmolVLM's 190 MB projector: an answer from the embedding cache
            # needs none for plain positions, and "low" may need another one than the model's own)

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

    # ------------------------------------------------------------------ the planner's Encoder
    @property
    def encoder_id(self) -> str:
        if self._enc_id is None:
            self._enc_id = encoder_id(self.b.artifact.mmproj)
        return self._enc_id

    @property
    def n_threads(self) -> int:
        return self.b.n_threads

    @property
    def text_id(self) -> str:
        if self._text_id is None:
            self._text_id = encoder_id(self.b.artifact.path)      # (the same naming, for the text model)
        return self._text_id

    # ------------------------------------------------------------------ a prompt's images
    def prepare(self, text: str, images: list, detail):
        """(keys, plan, chunks, n_image_tokens) of a prompt with images; chunks is libmtmd's list to free
        after evaluation (whole-prompt path) or None."""
        self.free_all()
        self.units, self.planner = [], None
        return self.follow_up(text, images, detail) or (
            self.tokenize_units(text, images, detail) if self.family else self.tokenize_media(text, images))

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
                plan.append(ImageRun(len(keys), n_pos, ch, mt.mtmd_input_chunk_get_n_tokens(ch)))
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
                or _prompt_ids(images, detail if self.family else None) != last.ids
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
        if self.family.fixed:
            own = self.family.ladder(0, 0)[1]
            planned = [planner.fixed(img, own, f"fixed input ({self.family.name})") for img in images]
        else:
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
            if self.family.step(p.settings).cap != self.cap:
                # the libmtmd context changes: encode the chunks made by this one first
                for u in self.units:
                    if u.embd is None and u.pending:
                        self.encode(u)
            unit = self.unit(p, planner)
            self.units.append(unit)
            p.report.tiles, p.report.tokens = unit.tiles, unit.n_tokens
            ident = f"{image_id(images[i])}|{p.settings}"
            plan.append(ImageRun(len(keys), unit.n_pos, unit, unit.n_cells))
            keys.extend((IMG, ident, k) for k in range(unit.n_pos))
            n_image += unit.n_tokens
        if b._add_special(text) and lc.llama_vocab_get_add_eos(b._vocab):
            eos = [lc.llama_vocab_eos(b._vocab)]
            plan.append(TextRun(len(keys), eos))
            keys.extend(eos)
        self._remember(text, _prompt_ids(images, detail), keys, plan, n_image)
        return keys, plan, None, n_image


__all__ = ["GGUFImages", "ImageUnit", "ImageRun", "extra_cells", "cells_used", "TextRun", "TokenPart", "EmbedPart", "LastPrompt", "IMG", "MAX_ASPECT",
           "padded"]
