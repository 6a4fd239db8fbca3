"""One image of a llama.cpp prompt as a unit we encode, cache and evaluate ourselves: its parts (text tokens
and libmtmd image chunks), the option the planner chose handed to libmtmd (``inputs/ladders.py``: its
``image_max_tokens``, a resized image, Idefics3's overview tile), the encode, the embedding-cache entry and
the evaluation. A mixin of ``gguf_images.GGUFImages`` (which owns the libmtmd context, the bitmap and
tokenize helpers and the prompt's plan): the unit half of it, kept apart to stay readable.

Evaluation: plain positions go through the backend (llama_decode with batch.embd); where the model places
image tokens itself (M-RoPE, non-causal attention) ``_decode_placed`` does what libmtmd's
``mtmd_helper_decode_image_chunk`` does, but without a libmtmd context (loading one costs the projector's
weights: seconds for Qwen3-VL's, on every cache hit from a new process): the positions come from the live
chunk or, on a cache hit, from the chunk's metadata (``mtmd_input_chunk_save``: its token grid) that the
cache entry keeps with the embeddings, through ``mtmd_helper_image_get_decoder_pos``; the same code path
both ways, so a cached answer is the uncached one, and the tests check both against libmtmd's own path.
"""
from __future__ import annotations

import base64
import ctypes
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import BackendError, BadMedia
from ..inputs.detail import Option
from ..inputs.planner import ImagePlanner, Planned
from .gguf_context import decode_error


@dataclass
class TokenPart:      # a unit's text tokens (Idefics3's row/col and image markers)
    tokens: list


@dataclass
class EmbedPart:      # a unit's embedding run (one libmtmd image chunk)
    n_tokens: int
    n_pos: int = -1           # KV positions it takes (M-RoPE: fewer than its tokens); -1: n_tokens
    blob: Optional[bytes] = None    # libmtmd's chunk metadata (mtmd_input_chunk_save), helper-decoded families
    chunk: object = None      # the live libmtmd chunk (not owned: freed with the unit's list)

    @property
    def positions(self) -> int:
        return self.n_tokens if self.n_pos < 0 else self.n_pos


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
        return sum(len(p.tokens) if isinstance(p, TokenPart) else p.positions for p in self.parts)

    @property
    def n_tokens(self) -> int:
        return sum(p.n_tokens for p in self.parts if isinstance(p, EmbedPart))

    @property
    def n_cells(self) -> int:     # KV cells: one per token, whatever its position
        return sum(len(p.tokens) if isinstance(p, TokenPart) else p.n_tokens for p in self.parts)

    @property
    def tiles(self) -> int:
        return sum(1 for p in self.parts if isinstance(p, EmbedPart))

    def layout(self) -> list:
        """The parts as the cache's JSON meta stores them (an embedding run with libmtmd's chunk metadata
        where the model's positions need it: ["e", tokens, positions, base64 chunk])."""
        return [["t", list(p.tokens)] if isinstance(p, TokenPart) else
                ["e", p.n_tokens] if p.blob is None else
                ["e", p.n_tokens, p.positions, base64.b64encode(p.blob).decode()] for p in self.parts]



class UnitPath:
    """The unit half of ``GGUFImages`` (see the module docstring)."""

    def time_one_tile(self) -> Optional[tuple[float, float]]:
        """The family's calibration input (a blank tile, or a 256-token image), encoded twice (the first
        encode of a context also allocates its compute graph): (units, seconds of the second)."""
        from ..protocol import ImageDetail, ImageInput

        w, h, settings, units = self.family.calibration()
        blank = ImageInput(rgb=bytes([128]) * (w * h * 3), width=w, height=h, source="(calibration)", sha256="")
        planner = ImagePlanner(self, ImageDetail(cache=False))
        unit = self.unit(planner.fixed(blank, Option(settings, 1, 0)), planner)
        try:
            self.encode(unit)
            unit.embd = None
            secs = self.encode(unit)
        finally:
            self.free(unit)
        return units, secs

    # ------------------------------------------------------------------ units
    def ladder(self, img) -> tuple[list, Option]:
        """The family's ladder for one image (``inputs/ladders.py``), as libmtmd will cut it."""
        return self.family.ladder(img.width, img.height)

    def unit(self, p: Planned, planner: ImagePlanner) -> ImageUnit:
        """One image as parts, embeddings from the cache or libmtmd chunks to encode."""
        b, mt = self.b, self.b._mtmd_cpp
        unit = ImageUnit(p)
        hit = planner.lookup(p)
        if hit is not None and self._from_cache(unit, *hit):
            return unit
        step = self.family.step(p.settings)
        ctx = self.use(step.cap)
        img = p.image
        if step.size is not None and step.size != (img.width, img.height):
            img = _resized(img, step.size)
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
                part = EmbedPart(mt.mtmd_input_chunk_get_n_tokens(ch), mt.mtmd_input_chunk_get_n_pos(ch), chunk=ch)
                if self.family.helper_decode:
                    part.blob = self._save_chunk(ch)
                parts.append(part)
                pending.append(ch)
        if step.overview_only:     # Idefics3's one-tile input: <fake><global-img> overview <fake>
            ov = [p for p in parts if isinstance(p, EmbedPart)][-1]
            parts = [TokenPart(b.tokenize("<fake_token_around_image><global-img>", add_special=False)), ov,
                     TokenPart(b.tokenize("<fake_token_around_image>", add_special=False))]
            pending = pending[-1:]
        unit.parts, unit.pending = parts, pending
        return unit

    def _save_chunk(self, ch) -> bytes:
        """libmtmd's metadata of an image chunk (its token grid, positions), for the cache."""
        mt = self.b._mtmd_cpp
        n = ctypes.c_size_t(0)
        mt.mtmd_input_chunk_save(ch, None, 0, ctypes.byref(n))
        buf = ctypes.create_string_buffer(max(1, n.value))
        if mt.mtmd_input_chunk_save(ch, buf, n.value, ctypes.byref(n)) != 0:
            raise BackendError("libmtmd could not describe an image chunk.", hint="Use --no-image-cache.")
        return buf.raw[: n.value]

    def _from_cache(self, unit: ImageUnit, arrays: list, meta: dict) -> bool:
        layout = meta.get("parts")
        if not isinstance(layout, list):
            return False
        parts: list = []
        n_e = 0
        n_embd = self.b._llama_cpp.llama_model_n_embd_inp(self.b._model)
        helper = self.family.helper_decode
        for p in layout:
            if isinstance(p, list) and len(p) == 2 and p[0] == "t" and isinstance(p[1], list):
                parts.append(TokenPart([int(t) for t in p[1]]))
            elif isinstance(p, list) and len(p) in (2, 4) and p[0] == "e" and isinstance(p[1], int):
                if n_e >= len(arrays) or arrays[n_e].shape != (p[1], n_embd) or (len(p) == 4) != helper:
                    return False
                part = EmbedPart(p[1])
                if helper:
                    try:
                        part.n_pos, part.blob = int(p[2]), base64.b64decode(p[3], validate=True)
                    except (TypeError, ValueError):
                        return False
                parts.append(part)
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
                units = self.family.units_of(len(unit.embd), unit.n_tokens)
                planner.encoded_now(unit.planned, unit.embd, {"parts": unit.layout()}, units, secs)
            k, e = 0, 0
            last = len(unit.parts) - 1
            for i, part in enumerate(unit.parts):
                if isinstance(part, TokenPart):
                    b._decode_tokens(part.tokens, logits_last=logits_last and i == last,
                                     keys=keys[k: k + len(part.tokens)])
                    k += len(part.tokens)
                    continue
                if self.family.helper_decode:
                    self._decode_placed(part, unit.embd[e], keys[k: k + part.positions])
                else:
                    b._decode_embd(unit.embd[e], keys[k: k + part.n_tokens], logits_last and i == last)
                k += part.positions
                e += 1
        finally:
            self.free(unit)
        return secs

    def _decode_placed(self, part: EmbedPart, embd, keys: list) -> None:
        """Evaluate one embedding run whose positions or attention are the model's own, as libmtmd's
        ``mtmd_helper_decode_image_chunk`` does, without a libmtmd context (none is needed on a cache hit):
        M-RoPE positions from the chunk's token grid (``mtmd_helper_image_get_decoder_pos`` on the live
        chunk, or on one loaded from the cached metadata), section-major in the batch (t, y, x, z: the
        vendored llama.cpp's layout for an embedding batch); non-causal attention where the model has it."""
        import numpy as np

        b, mt, lc = self.b, self.b._mtmd_cpp, self.b._llama_cpp
        n, n_embd = embd.shape
        pos = None
        if self.family.mrope:
            owned = None
            ch = part.chunk
            if ch is None:
                owned = ch = mt.mtmd_input_chunk_load(part.blob, len(part.blob))
            try:
                if not ch or mt.mtmd_input_chunk_get_n_tokens(ch) != n:
                    raise BackendError("A cached image embedding does not fit this projector.",
                                       hint="Clear the image cache (`vlm cache clear`) or use --no-image-cache.")
                rel = (mt.mtmd_decoder_pos * n)()
                mt.mtmd_helper_image_get_decoder_pos(mt.mtmd_input_chunk_get_tokens_image(ch), len(b._keys), rel)
            finally:
                if owned:
                    mt.mtmd_input_chunk_free(owned)
            grid = np.ctypeslib.as_array(ctypes.cast(rel, ctypes.POINTER(ctypes.c_uint32)), shape=(n, 4))
            pos = np.ascontiguousarray(grid[:, [0, 2, 1, 3]].T, dtype=np.int32)     # (t, x, y, z) -> t, y, x, z
        non_causal = self.family.non_causal(lc.llama_model_n_embd(b._model))
        if b._embd_batch is None:
            b._embd_batch = lc.llama_batch_init(b.n_batch, n_embd, 1)
        batch = b._embd_batch
        own_pos = ctypes.cast(batch.pos, ctypes.c_void_p).value   # (the address: a field read is a view)
        pbuf = (lc.llama_pos * (4 * b.n_batch))()
        dst = np.ctypeslib.as_array(batch.embd, shape=(b.n_batch * n_embd,))
        pos0 = len(b._keys)
        if non_causal:
            lc.llama_set_causal_attn(b._ctx, False)
        try:
            batch.pos = ctypes.cast(pbuf, ctypes.POINTER(lc.llama_pos))
            for s in range(0, n, b.n_batch):
                m = min(b.n_batch, n - s)
                dst[: m * n_embd] = embd[s: s + m].reshape(-1)
                if pos is None:
                    pbuf[:m] = range(pos0 + s, pos0 + s + m)
                else:
                    for j in range(4):
                        pbuf[j * m: (j + 1) * m] = pos[j, s: s + m].tolist()
                batch.n_tokens = m
                for t in range(m):
                    batch.n_seq_id[t] = 1
                    batch.seq_id[t][0] = b._seq
                    batch.logits[t] = False
                rc = lc.llama_decode(b._ctx, batch)
                if rc != 0:
                    raise decode_error(rc, "an image")
        finally:
            batch.pos = ctypes.cast(own_pos, ctypes.POINTER(lc.llama_pos))
            if non_causal:
                lc.llama_set_causal_attn(b._ctx, True)
        b._keys.extend(keys)


def _resized(img, size: tuple[int, int]):
    """``img`` resized to ``size`` (Pillow's filter, which averages on the way down: libmtmd's own resize
    would alias a 12 MP photo taken to a few hundred pixels)."""
    from PIL import Image

    im = Image.frombytes("RGB", (img.width, img.height), img.rgb).resize(size, Image.BICUBIC)
    return replace(img, rgb=im.tobytes(), width=size[0], height=size[1])


__all__ = ["EmbedPart", "ImageUnit", "TokenPart", "UnitPath"]
