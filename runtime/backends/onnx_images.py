"""Images for the ONNX backend's three-part vision models (Idefics3 / SmolVLM in onnx-community's layout):
the vision encoder and token-embedding sessions, the Idefics3 preprocessor, the prompt's ``<image>``
markers expanded to tile tokens, and the features -- from this process's memory, the persistent embedding
cache or the encoder. A collaborator of ``ONNXBackend``, which owns the decoder and its KV cache; the
per-image detail choice, cache keys and reports are the planner's (``runtime/inputs/planner.py``).

Tiles go through the vision encoder ``TILE_BATCH`` at a time (peak RSS of a 13-tile photo: 3.8 GB all at
once, 0.8 GB one by one, same speed).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from ..errors import BackendError, BadModelFile, UsageError, first_line
from ..formats.onnx_files import vision_parts
from ..generation.prompt import _compile, render_chat
from ..inputs.detail import Option, idefics3_ladder
from ..inputs.planner import IMG, ImagePlanner
from ..protocol import ChatRequest, ImageInput

_FEATURE_CACHE_BYTES = 256 * 1024 ** 2   # image features kept for re-use (most recent first)
# Tiles per vision-encoder run: its activations and the float32 tiles scale with this, not with the image
# (all 13 tiles of a photo in one run peaked at 2.5-3.2 GB on a SmolVLM-256M-shaped model).
TILE_BATCH = 1


class ONNXImages:
    """The vision half of a three-part model, loaded beside its decoder ``backend``."""

    def __init__(self, backend, ort, so, model_file: Path, side, session) -> None:
        """``session(ort, options, path)``: the backend's way to open a graph with one clear error."""
        from ..inputs.embed_cache import file_identity
        from ..inputs.idefics3 import Idefics3Preprocessor

        b = self.b = backend
        self.features: OrderedDict = OrderedDict()   # (image id, settings) -> float32 [positions, hidden]
        self.planner: Optional[ImagePlanner] = None  # of the current prompt
        parts = vision_parts(model_file)
        self.processor = Idefics3Preprocessor.from_dirs(side.dirs, b._raw_config)
        emb = session(ort, so, parts["embed_tokens"])
        # The encoder without onnxruntime's CPU memory arena: the arena keeps (and rounds up) a tile's
        # activations after the encode; measured on a SmolVLM-256M-shaped model, 13 tiles: peak RSS
        # 620 MiB instead of 759 MiB, encode time unchanged (67 s vs 72 s on a loaded machine).
        vso = ort.SessionOptions()
        vso.intra_op_num_threads = so.intra_op_num_threads
        vso.inter_op_num_threads = 1
        vso.execution_mode = so.execution_mode
        vso.graph_optimization_level = so.graph_optimization_level
        vso.log_severity_level = so.log_severity_level
        vso.add_session_config_entry("session.intra_op.allow_spinning", "1" if b.spin else "0")
        vso.enable_cpu_mem_arena = False
        vis = session(ort, vso, parts["vision_encoder"])
        e_in = {i.name: i for i in emb.get_inputs()}
        e_out = [o.name for o in emb.get_outputs()]
        if "input_ids" not in e_in or len(e_out) != 1:
            raise BadModelFile(f"{parts['embed_tokens'].name} does not map input_ids to one embeddings output.",
                               hint="Use the embed_tokens graph exported with this decoder.")
        v_in = {i.name for i in vis.get_inputs()}
        if "pixel_values" not in v_in or len(vis.get_outputs()) != 1:
            raise BadModelFile(f"{parts['vision_encoder'].name} does not take pixel_values to one features output.",
                               hint="Use the vision_encoder graph exported with this decoder.")
        self.embed_sess, self.vision_sess = emb, vis
        self.embed_out = e_out[0]
        self.embed_ids_dtype = "int32" if e_in["input_ids"].type == "tensor(int32)" else "int64"
        self.vision_out = vis.get_outputs()[0].name
        self.vision_mask = "pixel_attention_mask" in v_in
        tok = b.tokenizer
        self.image_token_id = tok.token_to_id(self.processor.image_token)
        if self.image_token_id is None:
            raise BadModelFile(f"The tokenizer has no {self.processor.image_token} token, so it cannot place images.",
                               hint="Copy the tokenizer.json published with this model.")
        self.part_files = {"decoder": model_file, **parts}

        self._encoder_id = f"onnx:{file_identity(parts['vision_encoder'])}:ort{ort.__version__}"
        self._text_id = f"onnx:{file_identity(model_file)}:ort{ort.__version__}"
        self.tile_batch = TILE_BATCH

    # ------------------------------------------------------------------ the planner's Encoder
    @property
    def encoder_id(self) -> str:
        return self._encoder_id

    @property
    def n_threads(self) -> int:
        return self.b.n_threads

    @property
    def text_id(self) -> str:
        return self._text_id

    # ------------------------------------------------------------------ prompt
    def render(self, request: ChatRequest) -> str:
        """The prompt text with one ``<image>`` marker per image (expanded to the tiles by ``prepare``)."""
        marker = self.processor.image_token
        n_images = sum(len(m.images) for m in request.messages)
        if request.options.raw or not self.b.chat_template:
            parts = ["".join(img.label + marker for img in m.images) + m.content
                     for m in request.messages if m.role != "system"]
            return "\n".join(parts)
        # List-form content, as Hugging Face processors render it: SmolVLM's templates read every message's
        # content as a list of parts, and an image part is {"type": "image"}.
        msgs = []
        for m in request.messages:
            parts: list[dict] = []
            for img in m.images:
                if img.label:
                    parts.append({"type": "text", "text": img.label})
                parts.append({"type": "image"})
            parts.append({"type": "text", "text": m.content})
            msgs.append({"role": m.role, "content": parts})
        import jinja2

        try:
            text = _compile(self.b.chat_template).render(messages=msgs, add_generation_prompt=True,
                                                          bos_token=self.b.bos_token, eos_token=self.b.eos_token)
            if text.count(marker) == n_images:
                return text
        except jinja2.exceptions.TemplateError:
            pass
        # Templates that take string content only: the image markers go in front of the text.
        return render_chat(self.b.chat_template, request.messages, bos_token=self.b.bos_token,
                           eos_token=self.b.eos_token, marker=marker)

    def prepare(self, request: ChatRequest, images: list) -> tuple[list, list[int], list]:
        """(keys, ids, spans) of a prompt with images (see ``ONNXBackend._prepare``)."""
        proc = self.processor
        text = self.render(request)
        planned = self.plan_images(images, request.options.image_detail)
        plans = [proc.plan(p.image.width, p.image.height, le) for p, le in planned]
        try:
            text = proc.expand(text, plans)
        except ValueError as e:
            raise UsageError(f"Cannot place the images in the prompt: {e}.",
                             hint=f"Leave the text {proc.image_token} out of the prompt; attach images instead.") from e
        b = self.b
        add = (request.options.raw or not b.chat_template) and not (b.bos_token and text.startswith(b.bos_token))
        ids = b.tokenize(text, add_special=add)
        img_id = self.image_token_id
        positions = [i for i, t in enumerate(ids) if t == img_id]
        want = sum(p.tiles for p in plans) * proc.image_seq_len
        if len(positions) != want:
            raise UsageError(f"The prompt holds {len(positions)} image positions where the images need {want}.",
                             hint=f"Leave the text {proc.image_token} out of the prompt; attach images instead.")
        keys: list = list(ids)
        spans, k = [], 0
        for (p, le), plan in zip(planned, plans):
            pos = positions[k: k + plan.tiles * proc.image_seq_len]
            ident = f"{p.id}|{p.settings}"
            for off, q in enumerate(pos):
                keys[q] = (IMG, ident, off)
            spans.append((pos, p, le, plan))
            k += len(pos)
        return keys, ids, spans

    def embed(self, ids) -> "object":
        """Token embeddings [n, hidden] for ``ids`` (the embed_tokens graph)."""
        np = self.b._np
        arr = np.asarray(ids, dtype=self.embed_ids_dtype).reshape(1, -1)
        try:
            out = self.embed_sess.run([self.embed_out], {"input_ids": arr})[0]
        except Exception as e:
            raise BackendError(f"onnxruntime failed to embed the tokens: {first_line(e)[:300]}",
                               hint="Run with VLM_DEBUG=1 for onnxruntime's log; the export may be broken.") from e
        return out[0]

    # ------------------------------------------------------------------ features
    def plan_images(self, images: list, detail) -> list:
        """Each image's planner.Planned and the longest edge it is cut at (None: the model's own), from the
        Idefics3 ladder of this preprocessor (``runtime/inputs/planner.py`` chooses)."""
        proc = self.processor
        seq = proc.image_seq_len
        planner = self.planner = ImagePlanner(self, detail, in_memory=lambda iid, st: (iid, st) in self.features)
        edges: dict = {}

        def ladder_of(img):
            hp = proc.plan(img.width, img.height)
            high = Option(proc.settings(), hp.tiles, hp.tiles * seq)
            edges[high.settings] = None
            if not (proc.do_image_splitting and proc.do_resize and "longest_edge" in proc.size):
                return [high], high

            def tiles_at(n: int):
                le = n * proc.tile
                st = proc.settings(le) if le != proc.longest_edge else high.settings
                edges.setdefault(st, le if le != proc.longest_edge else None)
                return proc.plan(img.width, img.height, le).tiles, st
            return idefics3_ladder(img.width, img.height, proc.tile, proc.longest_edge, tiles_at, seq), high
        return [(p, edges.get(p.settings)) for p in planner.plan(images, ladder_of)]

    def time_one_tile(self) -> Optional[tuple[int, float]]:
        """One tile of a blank image through the encoder (twice: the first run also plans memory)."""
        proc = self.processor
        t = proc.tile
        blank = ImageInput(rgb=bytes([128]) * (t * t * 3), width=t, height=t, source="(calibration)", sha256="")
        batch = proc.preprocess([blank], longest_edge=t)
        feeds = {"pixel_values": batch.pixel_values}
        if self.vision_mask:
            feeds["pixel_attention_mask"] = batch.pixel_attention_mask
        try:
            self.vision_sess.run([self.vision_out], feeds)     # the first run also plans its memory
            t0 = time.perf_counter()
            self.vision_sess.run([self.vision_out], feeds)
        except Exception:
            return None
        return batch.pixel_values.shape[1], time.perf_counter() - t0

    def features_of(self, p, le, plan) -> tuple["object", float]:
        """The features [tiles * image_seq_len, hidden] of planned image ``p``, from memory, the embedding
        cache or the vision encoder (tile batches of ``TILE_BATCH``); returns them and the seconds spent
        encoding (0 when cached)."""
        planner, img = self.planner, p.image
        p.report.tiles, p.report.tokens = plan.tiles, plan.tiles * self.processor.image_seq_len
        key = (p.id, p.settings)
        feats = self.features.get(key)
        if feats is not None:
            self.features.move_to_end(key)
            planner.hit(p, "memory")
            if p.key is not None and not planner.cache.has(p.key):      # encoded earlier with --no-cache
                planner.store(p, [feats], {"tiles": plan.tiles})
            return feats, 0.0
        np = self.b._np
        want = plan.tiles * self.processor.image_seq_len
        hit = planner.lookup(p)
        if hit is not None and len(hit[0]) == 1 and hit[0][0].shape == (want, self.b._hidden):
            feats = hit[0][0]
            planner.hit(p)
            self.remember(key, feats)
            return feats, 0.0
        t0 = time.perf_counter()
        got_plan, batches = self.processor.tile_batches(img, le, self.tile_batch)
        outs = []
        for batch in batches:
            feeds = {"pixel_values": batch.pixel_values}
            if self.vision_mask:
                feeds["pixel_attention_mask"] = batch.pixel_attention_mask
            try:
                out = self.vision_sess.run([self.vision_out], feeds)[0]
            except Exception as e:
                raise BackendError(f"onnxruntime failed to encode image {img.source}: {first_line(e)[:300]}",
                                   hint="Run with VLM_DEBUG=1 for onnxruntime's log; the export may be broken.") from e
            outs.append(out.reshape(-1, out.shape[-1]))
        feats = np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)
        if feats.shape[0] != want or feats.shape[1] != self.b._hidden or got_plan != plan:
            raise BadModelFile(
                f"The vision encoder gave {feats.shape[0]} x {feats.shape[1]} features for an image that takes "
                f"{want} positions of the decoder's {self.b._hidden}.",
                hint="preprocessor_config.json / processor_config.json do not belong to this model.",
            )
        secs = time.perf_counter() - t0
        planner.encoded_now(p, [feats], {"tiles": plan.tiles}, plan.tiles, secs)
        self.remember(key, feats)
        return feats, secs

    def remember(self, key, feats) -> None:
        self.features[key] = feats
        while len(self.features) > 1 and sum(f.nbytes for f in self.features.values()) > _FEATURE_CACHE_BYTES:
            self.features.popitem(last=False)

    def prompt_embeds(self, ids: list[int], spans: list, start: int) -> tuple["object", float]:
        """Embeddings of positions ``start:`` of the prompt: token embeddings, with image features scattered
        into the image positions. Returns them and the image-encode seconds."""
        np = self.b._np
        emb = np.array(self.embed(ids[start:]), dtype=np.float32)
        encode_s = 0.0
        for positions, p, le, plan in spans:
            if positions[-1] < start:
                continue                        # this image is entirely in the reused prefix
            feats, secs = self.features_of(p, le, plan)
            encode_s += secs
            pos = np.asarray(positions)
            keep = pos >= start
            emb[pos[keep] - start] = feats[keep]
        return emb, encode_s

    def close(self) -> None:
        self.embed_sess = self.vision_sess = None
        self.features.clear()


__all__ = ["ONNXImages", "TILE_BATCH", "IMG"]
