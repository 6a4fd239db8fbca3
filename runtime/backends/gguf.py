"""GGUF backend on llama-cpp-python's low-level API (llama.cpp + libmtmd for images).

Why low-level and not ``llama_cpp.Llama``: the high-level class copies logits into numpy on every
token (~15% of decode time on small models), clears the KV cache on every multimodal request, and
cannot turn off the AMX buffers that crash on some CPUs. Here a turn evaluates only the part of the
prompt that differs from what is already in the KV cache -- text and images alike -- and the
per-token loop is one decode, one native sample and one piece lookup.
"""
from __future__ import annotations

import ctypes
import sys
import time
from typing import Optional

from ..errors import BackendError, BadModelFile, ContextOverflow, UsageError
from ..formats.gguf_file import GGUFInfo, check_mmproj, read_gguf
from ..device.hardware import avoid_amx_buffers, default_threads
from .gguf_context import context_params, decode_error
from .gguf_images import GGUFImages, ImageRun, ImageUnit, TextRun, cells_used, extra_cells
from .llamacpp import field_type as _field_type, import_llama as _import_llama, score_batch, silence_native_logs
from .prompt_cache import common_prefix
from .text_streams import PieceStream
from ..generation.prompt import render_chat
from ..protocol import Artifact, ChatRequest, LoadOptions, Prefill, ProgressCallback

_EXACT_RUN = 3  # tokens per llama_decode in eval_tokens (see there)


class GGUFBackend:
    format = "gguf"

    def __init__(self) -> None:
        self._model = None
        self._ctx = None
        self._images: Optional[GGUFImages] = None   # libmtmd and the image path (a vision model only)
        self._batch = None
        self._keys: list = []          # what each KV position holds: token id or (img, id, k)
        self._extra: list = []         # (start, cells) an M-RoPE image fills beyond its positions (extra_cells)
        self._last_prompt = None       # gguf_images.LastPrompt of this sequence (a follow-up's starting point)
        self._seq = 0                  # the llama.cpp sequence the methods below work on (see gguf_slots)
        self._n_seq = 1
        self._slots: Optional[list] = None
        self._slot_step = None
        self._prompt_cache = None      # prompt_cache.PromptCache: sequences saved in RAM (vlm serve --prompt-cache)
        self._n_swa = 0
        self._eog: Optional[set[int]] = None
        self._embd_batch = None
        self.image_report: Optional[dict] = None
        self._ll_tokenizer = None
        self.info: Optional[GGUFInfo] = None
        self.artifact: Optional[Artifact] = None
        self.chat_template: Optional[str] = None
        self.n_ctx = 0
        self.n_batch = 512
        self.n_threads = 1
        self.load_s = 0.0

    # ------------------------------------------------------------------ loading
    def load(self, artifact: Artifact, opts: LoadOptions, on_progress: Optional[ProgressCallback] = None) -> None:
        t0 = time.perf_counter()
        info = read_gguf(artifact.path)
        mm_info = read_gguf(artifact.mmproj) if artifact.mmproj else None
        if info.is_mmproj:
            raise BadModelFile(
                f"{artifact.path.name} is a vision projector (mmproj), not a language model.",
                hint="Pass the language model with -m and the projector with --mmproj.",
            )
        if mm_info is not None:
            check_mmproj(info, mm_info)
        llama_cpp, mtmd_cpp = _import_llama()
        silence_native_logs(llama_cpp, mtmd_cpp)
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        if avoid_amx_buffers():
            mparams.use_extra_bufts = False
        self._devices = self._tensor_split = None
        if opts.rpc:
            from .ggml_rpc import spread_over_workers

            self._devices, self._tensor_split = spread_over_workers(llama_cpp, mparams, opts, info)
        elif "edgevlm.runtime.backends.ggml_rpc" in sys.modules:
            # workers registered earlier in this process (a server) stay out of a load that names none
            from . import ggml_rpc

            if ggml_rpc.registered():
                self._devices = ggml_rpc.device_array([])
                mparams.devices = ctypes.cast(self._devices, _field_type(mparams, "devices"))
        progress_ref = None
        if on_progress is not None:
            def _cb(p: float, _data) -> bool:
                on_progress("load", int(p * 100), 100)
                return True
            progress_ref = llama_cpp.llama_progress_callback(_cb)
            mparams.progress_callback = progress_ref
        model = llama_cpp.llama_model_load_from_file(str(artifact.path).encode(), mparams)
        if not model:
            raise BadModelFile(
                f"llama.cpp could not load {artifact.path.name} (architecture {info.architecture!r}).",
                hint="The architecture may be newer than this llama-cpp-python build: upgrade it, "
                     "or run with VLM_DEBUG=1 to see llama.cpp's log.",
            )
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        n_ctx = opts.n_ctx if opts.n_ctx > 0 else n_ctx_train
        if n_ctx_train > 0:
            n_ctx = min(n_ctx, n_ctx_train)
        self.n_threads = opts.n_threads or default_threads()
        self.n_batch = max(32, min(opts.n_batch, n_ctx))
        self._n_seq = max(1, opts.n_seq)
        self._kv_type = opts.kv_type
        cparams = context_params(llama_cpp, n_ctx, self._n_seq, self.n_batch, self.n_threads, opts.kv_type, info,
                                 artifact.path.name, rows=_EXACT_RUN)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx and opts.kv_type != "f16":
            self.close()
            raise BackendError(f"llama.cpp could not create a context with a {opts.kv_type} KV cache for "
                               f"{artifact.path.name} (a quantized V cache needs flash attention on every device).",
                               hint="Use --kv-type f16, or lower --ctx; VLM_DEBUG=1 shows llama.cpp's reason.")
        if not ctx:
            self.close()
            raise BackendError(
                f"llama.cpp could not create a context of {n_ctx} tokens for {artifact.path.name}.",
                hint="Lower --ctx; the KV cache may not fit in memory.",
            )
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        # drafts are verified in exact runs (eval_tokens), but a recurrent memory (LFM2, Qwen3.5) cannot cut one back
        self._draft_rows = 0 if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model) \
            else _EXACT_RUN
        self.n_ctx = llama_cpp.llama_n_ctx(ctx) // self._n_seq
        self._n_swa = llama_cpp.llama_model_n_swa(model)
        if opts.prompt_cache_bytes > 0:
            from .prompt_cache import PromptCache

            self._prompt_cache = PromptCache(opts.prompt_cache_bytes, self._n_swa)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._tok_one = (llama_cpp.llama_token * 1)()
        self._llama_cpp, self._mtmd_cpp = llama_cpp, mtmd_cpp

        tmpl = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template = tmpl.decode("utf-8", "replace") if tmpl else info.chat_template
        if mm_info is not None:
            self.artifact = artifact
            self._images = GGUFImages(self, mm_info, gpu=opts.n_gpu_layers != 0 and not opts.rpc)  # projector stays here
        self.info = info
        self.artifact = artifact
        self._progress_ref = progress_ref
        self.load_s = time.perf_counter() - t0

    @property
    def has_vision(self) -> bool:
        return self._images is not None

    # ------------------------------------------------------------------ tokens
    def _token_text(self, tok: int) -> str:
        n = self._llama_cpp.llama_token_to_piece(self._vocab, tok, self._piece_buf, 256, 0, True)
        return self._piece_buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        lc = self._llama_cpp
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def detokenize(self, toks: list[int]) -> str:
        lc, buf = self._llama_cpp, self._piece_buf
        out = bytearray()
        for t in toks:
            n = lc.llama_token_to_piece(self._vocab, t, buf, 256, 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", "replace")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_special=False, parse_special=True))

    def _bos_text(self) -> str:
        bos = self._llama_cpp.llama_vocab_bos(self._vocab)
        return self._token_text(bos) if bos >= 0 else ""

    def _eos_text(self) -> str:
        eos = self._llama_cpp.llama_vocab_eos(self._vocab)
        return self._token_text(eos) if eos >= 0 else ""

    # ------------------------------------------------------------------ prompt
    def render(self, request: ChatRequest) -> str:
        marker = self._images.marker if self._images is not None else "<__media__>"
        if request.options.raw or not self.chat_template:
            parts = []
            for m in request.messages:
                if m.role == "system":
                    continue
                parts.append("".join((img.label + marker) for img in m.images) + m.content)
            return "".join(parts) if len(parts) == 1 else "\n".join(parts)
        return render_chat(self.chat_template, request.messages, bos_token=self._bos_text(),
                           eos_token=self._eos_text(), marker=marker, tools=request.tools)

    def _add_special(self, text: str) -> bool:
        bos = self._bos_text()
        return not (bos and text.startswith(bos))

    def _prepare(self, request: ChatRequest):
        """Tokenize the prompt. Returns (keys, plan, chunks, n_image_tokens): plan lists TextRun and ImageRun
        records covering keys in order (gguf_images); chunks is libmtmd's list to free after evaluation, or
        None."""
        images = [img for m in request.messages for img in m.images]
        if images and self._images is None:
            raise UsageError(
                f"{self.artifact.name if self.artifact else 'This model'} has no vision projector, so it cannot read images.",
                hint="Use a vision model (e.g. `-m smolvlm-500m`) or pass its projector with --mmproj.",
            )
        text = self.render(request)
        if not images:
            if self._images is not None:
                self._images.units, self._images.planner = [], None
            toks = self.tokenize(text, add_special=self._add_special(text))
            return toks, [TextRun(0, toks)], None, 0
        return self._images.prepare(text, images, request.options.image_detail)

    def _decode_embd(self, embd, keys: list, logits_last: bool) -> None:
        """Evaluate float32 embeddings [n, n_embd] at the next positions (what libmtmd's
        mtmd_helper_decode_image_chunk does for causal, non-M-RoPE models)."""
        import numpy as np

        lc = self._llama_cpp
        n, n_embd = embd.shape
        if self._embd_batch is None:
            self._embd_batch = lc.llama_batch_init(self.n_batch, n_embd, 1)
        b = self._embd_batch
        dst = np.ctypeslib.as_array(b.embd, shape=(self.n_batch * n_embd,))
        for s in range(0, n, self.n_batch):
            m = min(self.n_batch, n - s)
            dst[: m * n_embd] = embd[s: s + m].reshape(-1)
            pos0 = len(self._keys)
            b.n_tokens = m
            for i in range(m):
                b.pos[i] = pos0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = self._seq
                b.logits[i] = False
            b.logits[m - 1] = logits_last and s + m >= n
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                raise decode_error(rc, "an image")
            self._keys.extend(keys[s: s + m])

    # ------------------------------------------------------------------ KV cache
    def _reuse_prefix(self, keys: list, plan) -> int:
        n = max(0, min(common_prefix(self._keys, keys), len(keys) - 1))   # evaluate at least one token for logits
        # never split an image: back off to its first position
        for run in plan:
            if isinstance(run, ImageRun) and run.start < n < run.end:
                n = run.start
        # a state restored from the prompt cache holds only the last n_swa positions of a sliding-window
        # layer (llama.cpp writes no masked cells): a prefix that ends earlier cannot be continued
        if n > 0 and self._llama_cpp.llama_memory_seq_pos_min(self._mem, self._seq) > max(0, n - self._n_swa):
            n = 0
        if n < len(self._keys):
            ok = self._llama_cpp.llama_memory_seq_rm(self._mem, self._seq, n, -1)
            if not ok:
                self._forget_seq()
                n = 0
            del self._keys[n:]
        return n

    # the prompt cache's view of this sequence (prompt_cache.py)
    def _state_size(self) -> int:
        return self._llama_cpp.llama_state_seq_get_size_ext(self._ctx, self._seq, 0)

    def _state_get(self, size: int):
        data = (ctypes.c_uint8 * size)()
        return data if self._llama_cpp.llama_state_seq_get_data_ext(self._ctx, data, size, self._seq, 0) == size else None

    def _state_set(self, data, size: int) -> bool:
        return self._llama_cpp.llama_state_seq_set_data_ext(self._ctx, data, size, self._seq, 0) == size

    def _forget_seq(self) -> None:
        if self._n_seq == 1:
            self._llama_cpp.llama_memory_clear(self._mem, True)
        else:
            self._llama_cpp.llama_memory_seq_rm(self._mem, self._seq, -1, -1)

    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        if self._ctx is not None:
            self._forget_seq()
        self._keys, self._extra = [], []

    def _decode_tokens(self, toks: list[int], logits_last: bool, keys: Optional[list] = None, all_rows=False) -> None:
        lc = self._llama_cpp
        b = self._batch
        for s in range(0, len(toks), self.n_batch):
            part = toks[s: s + self.n_batch]
            pos0 = len(self._keys)
            b.n_tokens = len(part)
            for i, t in enumerate(part):
                b.token[i] = t
                b.pos[i] = pos0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = self._seq
                b.logits[i] = all_rows
            last = s + self.n_batch >= len(toks)
            b.logits[len(part) - 1] = logits_last and last
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                raise decode_error(rc, "the prompt")
            self._keys.extend(part if keys is None else keys[s: s + len(part)])

    # ------------------------------------------------------------------ generation seam
    def prefill(self, request: ChatRequest) -> Prefill:
        if self._ctx is None:
            raise BackendError("The model is not loaded.", hint="This is a bug: load() must come first.")
        lc = self._llama_cpp
        keys, plan, chunks, n_image_tokens = self._prepare(request)
        images = self._images
        try:
            cells = cells_used(keys, extra_cells(plan))
            if cells >= self.n_ctx:
                raise ContextOverflow(
                    f"The prompt is {cells:,} tokens but the context holds {self.n_ctx:,}.",
                    hint="Shorten the input, or raise --ctx (up to the model's trained context).",
                )
            if self._prompt_cache is not None and not any(isinstance(r, ImageRun) and r.source is None for r in plan):
                self._prompt_cache.prepare(self, keys)      # (not for a follow-up: its images are in this sequence)
            reused = self._reuse_prefix(keys, plan)
            if any(isinstance(r, ImageRun) and r.source is None and r.end > reused for r in plan):
                # a follow-up whose images the sequence no longer holds: a recurrent memory (LFM2, Qwen3.5)
                # cannot cut back to the prefix, so _reuse_prefix forgot it all; prepare the images again
                self._last_prompt = None
                keys, plan, chunks, n_image_tokens = self._prepare(request)
                reused = self._reuse_prefix(keys, plan)
            self._extra = extra_cells(plan)
            image_s, t_eval = 0.0, time.perf_counter()
            for run in plan:
                if isinstance(run, TextRun):
                    end = run.start + len(run.tokens)
                    if end <= reused:
                        continue
                    self._decode_tokens(run.tokens[max(0, reused - run.start):], logits_last=end == len(keys))
                    continue
                if run.end <= reused:
                    continue
                last = run.end == len(keys)
                if isinstance(run.source, ImageUnit):
                    image_s += images.evaluate(run.source, keys[run.start: run.end], last)
                    continue
                if run.source is None:   # follow_up checked that the KV cache holds this image
                    raise BackendError("An image of the conversation left the KV cache.",
                                       hint="This is a bug; start a new conversation (/clear).")
                ti = time.perf_counter()
                new_n_past = lc.llama_pos(0)
                rc = self._mtmd_cpp.mtmd_helper_eval_chunk_single(
                    images.ctx, self._ctx, run.source, len(self._keys), self._seq, self.n_batch, last,
                    ctypes.byref(new_n_past))
                image_s += time.perf_counter() - ti
                if rc != 0:
                    raise BackendError(f"libmtmd failed to encode an image (error {rc}).",
                                       hint="Check that the mmproj belongs to the model.")
                self._keys.extend(keys[run.start: run.end])
            t_eval = time.perf_counter() - t_eval
        finally:
            if chunks is not None:
                self._mtmd_cpp.mtmd_input_chunks_free(chunks)
            if images is not None:
                images.free_all()
        had_images = any(m.images for m in request.messages)
        self.image_report = images.report(had_images) if images is not None else None
        more = sum(e for _, e in self._extra)                   # (M-RoPE: tokens beyond positions)
        kept = reused + sum(e for st, e in self._extra if st < reused)
        if images is not None and images.planner is not None:   # the text model's prefill speed, for auto
            images.planner.prefilled(len(keys) + more - kept, t_eval - image_s)
        return Prefill(prompt_tokens=len(keys) + more, eval_tokens=len(keys) + more - kept, image_tokens=n_image_tokens,
                       image_encode_s=image_s)

    def logits(self):
        """llama.cpp's own logits buffer for the last evaluated position, as a numpy view (no copy). numpy is
        imported here, at the first token, not on a thread during the load or the prefill: measured, both
        made the answer later (llama.cpp calls our log callback ~2,000 times while loading, each call then
        waiting for the GIL; the prefill's threads lose their core)."""
        from numpy.ctypeslib import as_array

        return as_array(self._llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self._n_vocab,))

    def eval(self, token: int) -> None:
        self._tok_one[0] = token
        rc = self._llama_cpp.llama_decode(self._ctx, self._llama_cpp.llama_batch_get_one(self._tok_one, 1))
        if rc != 0:
            raise decode_error(rc, "the next token")
        self._keys.append(token)

    def eval_tokens(self, tokens: list[int]) -> None:
        """Several tokens (a run the constraint forces) in llama_decodes of at most ``_EXACT_RUN``: from 4
        rows on, ggml's CPU matmul takes batched kernels for some weight types, whose results differ from
        one-row steps (Gemma 3 270M Q4_K_M: logits ~1 apart; docs/decode-less.md), and an answer must not
        depend on how its tokens were evaluated."""
        toks = [int(t) for t in tokens]
        for s in range(0, len(toks), _EXACT_RUN):
            self._decode_tokens(toks[s: s + _EXACT_RUN], logits_last=s + _EXACT_RUN >= len(toks))

    def draft_rows(self) -> int:
        return self._draft_rows

    def eval_rows(self, tokens: list[int]):
        """One llama_decode with every position's logits; the rows are a view of llama.cpp's buffer."""
        from numpy.ctypeslib import as_array

        self._decode_tokens([int(t) for t in tokens], logits_last=True, all_rows=True)
        return as_array(self._llama_cpp.llama_get_logits(self._ctx), shape=(len(tokens), self._n_vocab))

    def drop_last(self, n: int) -> None:
        if n > 0:
            self._llama_cpp.llama_memory_seq_rm(self._mem, self._seq, len(self._keys) - n, -1)
            del self._keys[-n:]

    def kv_keys(self) -> list:
        return self._keys

    def kv_used(self) -> int:
        return cells_used(self._keys, self._extra)

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def eog_ids(self) -> set[int]:
        if self._eog is None:
            self._eog = {t for t in range(self._n_vocab) if self._llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        return self._eog

    def text_stream(self) -> PieceStream:
        return PieceStream(self._llama_cpp, self._vocab, self._piece_buf)

    def constraint_tokenizer(self):
        """llguidance's tokenizer for this vocabulary, from llama.cpp's own (generation/vocab_cache.py)."""
        if self._ll_tokenizer is None:
            from ..generation.vocab_cache import gguf_tokenizer   # pieces cached on disk per vocabulary

            self._ll_tokenizer = gguf_tokenizer(self._llama_cpp, self._vocab, self.artifact.path, self._n_vocab,
                                                sorted(self.eog_ids()))
        return self._ll_tokenizer

    def score(self, token_ids: list[int], *, batched: bool = True):
        """Logits after each token, from an empty cache. Batched: one llama_decode with every position's
        logits, in a context of its own sized to the text (ours reserves only a draft's rows)."""
        import numpy as np

        self.reset()
        if not batched:
            rows = []
            for t in token_ids:
                self._decode_tokens([int(t)], logits_last=True)
                rows.append(self.logits().copy())
            self.reset()
            return np.stack(rows)
        return score_batch(self._llama_cpp, self._model, token_ids, self.n_threads, self._n_vocab)

    def slots(self) -> list:
        """``vlm serve --parallel``: one view per llama.cpp sequence, their decode steps batched (gguf_slots)."""
        if self._n_seq == 1:
            return [self]
        if self._slots is None:
            from .gguf_slots import make_slots

            self._slots = make_slots(self, self._n_seq)
        return self._slots

    def end_generation(self) -> None:
        pass

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        lc = getattr(self, "_llama_cpp", None)
        if lc is None:
            try:
                lc = _import_llama()[0]  # model may be loaded before _llama_cpp is set
            except ImportError:  # pragma: no cover
                return
        if self._images is not None:
            self._images.free_context()
        self._prompt_cache = None
        if self._slot_step is not None:
            self._slot_step.close()
            self._slot_step = self._slots = None
        for name in ("_batch", "_embd_batch"):
            if getattr(self, name) is not None:
                lc.llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lc.llama_model_free(self._model)
            self._model = None
        self._keys, self._extra = [], []

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ helpers for callers
    def kv_cache_bytes(self) -> Optional[int]:
        """The KV cache at full context (K and V of every layer, in --kv-type), or None when the header lacks the shape."""
        from ..device.memory import KV_TYPES, kv_cache_bytes

        shape = self.info.kv_shape if self.info is not None else None
        bpe = KV_TYPES[getattr(self, "_kv_type", "f16")]
        return kv_cache_bytes(self.n_ctx, *shape, bytes_per_elem=bpe) if shape else None

    def describe(self) -> dict:
        return {"n_ctx": self.n_ctx, "n_threads": self.n_threads, "vision": self.has_vision,
                "kv_type": getattr(self, "_kv_type", "f16"), "extra_bufts": not avoid_amx_buffers()}


__all__ = ["GGUFBackend"]
