"""GGUF backend on llama-cpp-python's low-level API (llama.cpp + libmtmd for images).

Why low-level and not ``llama_cpp.Llama``: the high-level class copies logits into numpy on every
token (~15% of decode time on small models), clears the KV cache on every multimodal request, and
cannot turn off the AMX buffers that crash on some CPUs. Here a turn evaluates only the part of the
prompt that differs from what is already in the KV cache -- text and images alike -- and the
per-token loop is one decode, one native sample and one piece lookup.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import time
from typing import Optional

from ..env import debug
from ..errors import BackendError, BadMedia, BadModelFile, ContextOverflow, UsageError
from ..formats.gguf_file import GGUFInfo, check_mmproj, read_gguf
from ..device.hardware import avoid_amx_buffers, default_threads
from .llamacpp import import_llama as _import_llama
from .prompt_cache import common_prefix
from ..generation.prompt import render_chat
from ..generation.text import Utf8Stream
from ..protocol import Artifact, ChatRequest, LoadOptions, Prefill, ProgressCallback

_IMG = "img"  # key prefix for image positions in the KV bookkeeping
_EXACT_RUN = 3  # tokens per llama_decode in eval_tokens (see there)

# Kept alive for the life of the process: llama.cpp holds the pointers.
_LOG_CALLBACKS: list = []


def _silence_native_logs(llama_cpp, mtmd_cpp=None) -> None:
    """llama.cpp and libmtmd log to stderr by default; scripts want stderr clean unless VLM_DEBUG."""
    if debug():
        return
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
    if not _LOG_CALLBACKS:
        _LOG_CALLBACKS.append(llama_cpp.llama_log_callback(lambda level, text, data: None))
    cb = _LOG_CALLBACKS[0]
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    if mtmd_cpp is not None:
        mtmd_cpp.mtmd_log_set(cb, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(cb, ctypes.c_void_p(0))




def _field_type(struct, name: str):
    """The ctypes type a structure declares for ``name`` (reading a pointer field gives a plain int)."""
    return next(t for n, t, *_ in struct._fields_ if n == name)


def _quantized_kv(llama_cpp, cparams, kv_type: str, info: GGUFInfo, name: str) -> None:
    """--kv-type q8_0|q4_0: K and V in that ggml type. llama.cpp reads a quantized V cache only inside its
    flash-attention kernel (llama_init_from_model refuses one without it; left on AUTO it would switch
    flash attention on itself), so it is asked for explicitly; and every head's K and V must be whole
    32-element blocks, which is checked here so the refusal is one line, not llama.cpp's log."""
    from ..device.memory import KV_BLOCK

    a = info.architecture
    dims = [info.get(f"{a}.attention.key_length"), info.get(f"{a}.attention.value_length")]
    if info.kv_shape:
        dims.append(info.kv_shape[2])
    bad = sorted({int(d) for d in dims if isinstance(d, int) and d % KV_BLOCK})
    if bad:
        raise UsageError(f"--kv-type {kv_type} cannot store {name}'s attention heads of {bad[0]} values "
                         f"(a {kv_type} block holds {KV_BLOCK}).", hint="Use --kv-type f16 for this model.")
    ggml = {"q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[kv_type]
    cparams.type_k = ggml
    cparams.type_v = ggml
    cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED


class _PieceStream:
    """Generated token ids -> text through llama.cpp's pieces (special tokens render as nothing)."""

    def __init__(self, backend: "GGUFBackend") -> None:
        self._b = backend
        self._utf8 = Utf8Stream()

    def feed(self, token: int) -> str:
        b = self._b
        n = b._llama_cpp.llama_token_to_piece(b._vocab, token, b._piece_buf, 256, 0, False)
        return self._utf8.feed(b._piece_buf.raw[: max(n, 0)])

    def flush(self) -> str:
        return self._utf8.flush()


# libmtmd cannot cut an image whose short side rounds to nothing at its resize (a 3000x1 strip fails with
# error 2): such images are letterboxed to this aspect ratio first (black bars, content unchanged). At
# SmolVLM's 2048-px edge a 1:16 image is 2048 x 128 px, so nothing that would still be legible is padded.
_MAX_ASPECT = 16


def _padded(img, ratio: int):
    """``img`` letterboxed (centred on black) so that neither side is under 1/ratio of the other."""
    w, h = img.width, img.height
    if max(w, h) <= ratio * min(w, h):
        return img
    from dataclasses import replace

    from PIL import Image

    nw, nh = (w, -(-w // ratio)) if w > h else (-(-h // ratio), h)
    canvas = Image.new("RGB", (nw, nh))
    canvas.paste(Image.frombytes("RGB", (w, h), img.rgb), ((nw - w) // 2, (nh - h) // 2))
    return replace(img, rgb=canvas.tobytes(), width=nw, height=nh)


class _ImageUnit:
    """One image of a prompt for an Idefics3 projector: its parts, and embeddings or chunks to encode."""

    def __init__(self, img, settings: str, choice) -> None:
        self.img, self.settings, self.choice = img, settings, choice
        self.parts: list = []          # ("t", token ids) | ("e", n_tokens)
        self.embd: Optional[list] = None   # float32 [n_tokens, n_embd] per "e" part, once encoded / cached
        self.chunks = None             # libmtmd's chunk list (freed after encoding)
        self.pending: list = []        # its image chunks, in "e" order
        self.cache_key: Optional[str] = None
        self.hit = False
        self.encode_s = 0.0
        self.report: dict = {}


class GGUFBackend:
    format = "gguf"

    def __init__(self) -> None:
        self._model = None
        self._ctx = None
        self._mtmd = None
        self._batch = None
        self._keys: list = []          # what each KV position holds: token id or (img, id, k)
        self._last_prompt = None       # the last image prompt's (text, image ids, keys, plan, image tokens)
        self._seq = 0                  # the llama.cpp sequence the methods below work on (see gguf_slots)
        self._n_seq = 1
        self._slots: Optional[list] = None
        self._slot_step = None
        self._prompt_cache = None      # prompt_cache.PromptCache: sequences saved in RAM (vlm serve --prompt-cache)
        self._n_swa = 0
        self._eog: Optional[set[int]] = None
        self._mtmd_cap: Optional[int] = None    # image_max_tokens the libmtmd context was made with (None: model's)
        self._mm_info: Optional[GGUFInfo] = None
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
        _silence_native_logs(llama_cpp, mtmd_cpp)
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        if avoid_amx_buffers():
            mparams.use_extra_bufts = False
        self._devices = self._tensor_split = None
        if opts.rpc:
            self._spread_over_workers(llama_cpp, mparams, opts, info)
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
        cparams = llama_cpp.llama_context_default_params()
        self._n_seq = max(1, opts.n_seq)
        cparams.n_ctx = n_ctx * self._n_seq       # n_ctx positions for each sequence (gguf_slots enforces it)
        cparams.n_seq_max = self._n_seq
        if self._n_seq > 1:
            # One KV stream per sequence (llama-server's default for -np N): a token attends to its own
            # sequence's cells only, where one unified buffer makes each attend over all N sequences'
            # (masked). SmolLM2-135M, 2 threads, `vlm serve --parallel 4`, 4 streaming clients: 115-134
            # tok/s split vs 100-111 unified in the same 4 rounds (llama-server 113-126). A step whose
            # sequence ids are not consecutive is split into one ubatch per run of them ([1, 3]: 16.3
            # vs 14.4 ms unified), so the server hands out the lowest free slot when nothing else decides.
            cparams.kv_unified = False
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        self._kv_type = opts.kv_type
        if opts.kv_type != "f16":
            _quantized_kv(llama_cpp, cparams, opts.kv_type, info, artifact.path.name)
        if any(name == "n_outputs_max" for name, _ in cparams._fields_):
            # We read one logits row per batch (the last token's); left at 0 (= n_batch), llama.cpp
            # reserves its compute buffer for n_batch rows of logits: 98 MiB instead of 16 MiB on a
            # SmolVLM-256M-shaped model. On CPU the untouched pages never become RSS, but the
            # allocation is real on GPU backends and where overcommit is off.
            cparams.n_outputs_max = self._n_seq   # slots read one row each per shared decode step
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
            self._mm_info = mm_info
            self._mtmd_gpu = opts.n_gpu_layers != 0 and not opts.rpc    # the projector stays on this host
            self.artifact = artifact
            self._marker = mtmd_cpp.mtmd_default_marker().decode()
            if self._vision_geometry() is None:
                self._use_mtmd(None)        # libmtmd's whole-prompt path; Idefics3 units make theirs on demand
                # (a context costs ~0.4 s for SmolVLM's 190 MB projector: an answer from the embedding cache
                # needs none, and "low" needs another one than the model's own)
        self.info = info
        self.artifact = artifact
        self._progress_ref = progress_ref
        self.load_s = time.perf_counter() - t0

    def _spread_over_workers(self, llama_cpp, mparams, opts: LoadOptions, info: GGUFInfo) -> None:
        """llama.cpp's RPC backend: the workers' devices take all but ``opts.host_layers`` of the layers
        (and their KV cache), in ``opts.worker_shares``; the output layer and the projector stay here."""
        from . import ggml_rpc

        ggml_rpc.install_abort_handler()
        devs = ggml_rpc.devices(opts.rpc)
        self._devices = ggml_rpc.device_array(devs)
        mparams.devices = ctypes.cast(self._devices, _field_type(mparams, "devices"))
        n_layers = info.kv_shape[0] if info.kv_shape else 0
        host = opts.host_layers if opts.host_layers is not None else 0
        mparams.n_gpu_layers = max(0, n_layers - host) if n_layers else 999
        shares = list(opts.worker_shares or [1.0] * len(devs))
        if len(shares) == len(devs) and sum(shares) > 0:
            n_max = llama_cpp.llama_max_devices()
            self._tensor_split = (ctypes.c_float * n_max)(*(shares + [0.0] * (n_max - len(shares)))[:n_max])
            mparams.tensor_split = ctypes.cast(self._tensor_split, _field_type(mparams, "tensor_split"))

    @property
    def has_vision(self) -> bool:
        return self._mm_info is not None

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
        marker = getattr(self, "_marker", "<__media__>")
        if request.options.raw or not self.chat_template:
            parts = []
            for m in request.messages:
                if m.role == "system":
                    continue
                parts.append("".join((img.label + marker) for img in m.images) + m.content)
            return "".join(parts) if len(parts) == 1 else "\n".join(parts)
        return render_chat(self.chat_template, request.messages, bos_token=self._bos_text(),
                           eos_token=self._eos_text(), marker=marker)

    def _add_special(self, text: str) -> bool:
        bos = self._bos_text()
        return not (bos and text.startswith(bos))

    def _prepare(self, request: ChatRequest):
        """Tokenize the prompt. Returns (keys, plan, chunks, n_image_tokens): plan lists ("t", start, tokens)
        and ("i", start, n_pos, chunk) items covering keys in order (chunk None for an image the KV cache
        already holds, see _follow_up); chunks is libmtmd's list to free after evaluation, or None."""
        images = [img for m in request.messages for img in m.images]
        if images and self._mm_info is None:
            raise UsageError(
                f"{self.artifact.name if self.artifact else 'This model'} has no vision projector, so it cannot read images.",
                hint="Use a vision model (e.g. `-m smolvlm-500m`) or pass its projector with --mmproj.",
            )
        text = self.render(request)
        if not images:
            toks = self.tokenize(text, add_special=self._add_special(text))
            return toks, [("t", 0, toks)], None, 0
        detail = request.options.image_detail
        geo = self._vision_geometry()
        return self._follow_up(text, images, detail) or (
            self._tokenize_units(text, images, detail, geo) if geo else self._tokenize_media(text, images))

    def _tokenize_media(self, text: str, images: list):
        """libmtmd's tokenization of a prompt with media markers: it preprocesses every image."""
        mt = self._mtmd_cpp
        bitmaps = []
        try:
            for img in images:
                if len(img.rgb) != img.width * img.height * 3:
                    raise BadMedia(f"Image {img.source} has inconsistent pixel data.", hint="Report this as a bug.")
                buf = (ctypes.c_uint8 * len(img.rgb)).from_buffer_copy(img.rgb)
                bm = mt.mtmd_bitmap_init(img.width, img.height, buf)
                if not bm:
                    raise BadMedia(f"libmtmd could not take image {img.source}.", hint="Try another image format.")
                mt.mtmd_bitmap_set_id(bm, img.sha256.encode())
                bitmaps.append(bm)
            chunks = mt.mtmd_input_chunks_init()
            itext = mt.mtmd_input_text()
            data = text.encode("utf-8")
            itext.text = data
            itext.text_len = len(data)
            itext.add_special = self._add_special(text)
            itext.parse_special = True
            arr = (mt.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mt.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(itext), arr, len(bitmaps))
        finally:
            for bm in bitmaps:
                mt.mtmd_bitmap_free(bm)
        if rc != 0:
            mt.mtmd_input_chunks_free(chunks)
            if rc == 1:           # libmtmd: the markers and the bitmaps do not pair up
                raise BackendError(f"libmtmd could not place the images in the prompt (error {rc}).",
                                   hint=f"Leave the text {self._marker} out of the prompt; attach images instead.")
            sizes = ", ".join(f"{img.width}x{img.height}" for img in images)
            raise BadMedia(f"The vision projector could not prepare the image{'s' if len(images) > 1 else ''} "
                           f"({sizes}; libmtmd error {rc}).",
                           hint="Crop or pad an image of extreme shape, or convert it to PNG or JPEG.")
        keys: list = []
        plan = []
        n_image_pos = 0
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            ch = mt.mtmd_input_chunks_get(chunks, i)
            ctype = mt.mtmd_input_chunk_get_type(ch)
            if ctype == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                toks = [ptr[j] for j in range(n.value)]
                plan.append(("t", len(keys), toks))
                keys.extend(toks)
            else:
                n_pos = mt.mtmd_input_chunk_get_n_pos(ch)
                ident = (mt.mtmd_input_chunk_get_id(ch) or b"").decode(errors="replace")
                plan.append(("i", len(keys), n_pos, ch))
                keys.extend((_IMG, ident, k) for k in range(n_pos))
                n_image_pos += mt.mtmd_input_chunk_get_n_tokens(ch)
        self._last_prompt = (text, self._prompt_ids(images, None), keys,
                             [item if item[0] == "t" else item[:3] + (None,) for item in plan], n_image_pos)
        return keys, plan, chunks, n_image_pos

    def _follow_up(self, text: str, images: list, detail=None):
        """Keys and plan for a prompt that only appends text to the last image prompt, whose images are
        still in the KV cache (a follow-up question in a session), without libmtmd preprocessing them
        again: that costs ~90 MiB of float32 tiles and tens of ms for a 17-tile SmolVLM image.

        Exact, not approximate: libmtmd tokenizes the text between media markers piece by piece, so the
        appended text yields the same tokens as a full tokenization when the last piece and the
        appended text tokenize the same apart as together (checked). Anything else returns None."""
        if self._last_prompt is None:
            return None
        prev_text, prev_ids, prev_keys, prev_plan, n_image_pos = self._last_prompt
        suffix = text[len(prev_text):]
        if (not suffix or not text.startswith(prev_text) or self._marker in suffix
                or self._prompt_ids(images, detail if self._vision_geometry() else None) != prev_ids
                or self._llama_cpp.llama_vocab_get_add_eos(self._vocab)):
            return None
        images_end = max(item[1] + item[2] for item in prev_plan if item[0] == "i")
        if self._keys[:images_end] != prev_keys[:images_end]:
            return None                    # the images are no longer in the KV cache: encode them again
        piece = prev_text.rpartition(self._marker)[2]
        added = self.tokenize(suffix, add_special=False)
        if not added or self.tokenize(piece + suffix, add_special=False) != self.tokenize(piece, add_special=False) + added:
            return None
        keys = prev_keys + added
        plan = prev_plan + [("t", len(prev_keys), added)]
        self._last_prompt = (text, prev_ids, keys, plan, n_image_pos)
        return keys, plan, None, n_image_pos

    # ------------------------------------------------------------------ images: detail, cache, units
    # For Idefics3 projectors (SmolVLM) an image is one "unit" of the plan: its text tokens (row/col
    # markers) and its embedding runs, tokenized by libmtmd one image at a time, encoded with
    # mtmd_encode_chunk and evaluated from float32 embeddings (llama_decode with batch.embd), so that
    # (1) the detail can be chosen per image (libmtmd's image_max_tokens, or the overview tile alone for
    # "low": Idefics3's one-tile input), and (2) the embeddings can come from / go to the persistent
    # cache, which then needs neither libmtmd's preprocessing nor the encoder. Other projectors keep
    # libmtmd's whole-prompt path (_tokenize_media_libmtmd): their M-RoPE / non-causal positions are
    # libmtmd's business.
    def _use_mtmd(self, cap: Optional[int]):
        """The libmtmd context whose preprocessing caps images at ``cap`` tokens (None: the model's own);
        the context is remade when the cap changes (it owns the projector weights, so one at a time)."""
        if self._mtmd is not None and self._mtmd_cap == cap:
            return self._mtmd
        mt = self._mtmd_cpp if self._mtmd is not None else _import_llama()[1]
        if self._mtmd is not None:
            mt.mtmd_free(self._mtmd)
            self._mtmd = None
        mp = mt.mtmd_context_params_default()
        mp.use_gpu = self._mtmd_gpu
        mp.print_timings = False
        mp.n_threads = self.n_threads
        mp.warmup = False
        if cap is not None:
            mp.image_max_tokens = cap
        mmproj = self.artifact.mmproj
        mtmd = mt.mtmd_init_from_file(str(mmproj).encode(), self._model, mp)
        if not mtmd:
            self.close()
            raise BadModelFile(
                f"libmtmd could not load the vision projector {mmproj.name} for {self.artifact.path.name}.",
                hint="Check that the mmproj belongs to this model; VLM_DEBUG=1 shows llama.cpp's log.",
            )
        self._mtmd, self._mtmd_cap = mtmd, cap
        if not mt.mtmd_support_vision(mtmd):
            self.close()
            raise BadModelFile(f"{mmproj.name} does not support images.", hint="Use an image projector.")
        return mtmd

    def _vision_geometry(self) -> Optional[dict]:
        """Tile size, longest edge and tokens per tile of an Idefics3 projector; None for other projectors."""
        mm = self._mm_info
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

    def _encoder_id(self) -> str:
        if getattr(self, "_enc_id", None) is None:
            from importlib.metadata import PackageNotFoundError, version
            from pathlib import Path

            from ..inputs.embed_cache import file_identity

            try:
                ver = version("llama_cpp_python")
            except PackageNotFoundError:  # pragma: no cover
                ver = "?"
            libs = sorted(Path(self._mtmd_cpp.__file__).parent.glob("lib/libmtmd*"))
            build = file_identity(libs[0]) if libs else "?"
            self._enc_id = f"gguf:{file_identity(self.artifact.mmproj)}:{ver}:{build}"
        return self._enc_id

    def _choose(self, images: list, detail, geo: dict) -> list:
        """Per image: (Choice, cap, overview_only) from runtime/inputs/detail.py."""
        from ..inputs.detail import DEFAULT_BUDGET_S, EncodeSpeed, Option, choose, idefics3_ladder
        from ..inputs.idefics3 import hf_grid, mtmd_capped_grid, mtmd_full_grid

        tile, longest, seq = geo["tile"], geo["longest"], geo["seq"]
        cache = self._embed_cache(detail)
        spt = None
        if detail.level == "auto":
            speed = EncodeSpeed()
            spt = speed.get(self._speed_key())
            if spt is None:
                spt = self._calibrate(speed, geo)
        budget = (detail.budget_s if detail.budget_s is not None else DEFAULT_BUDGET_S) / max(1, len(images))
        out = []
        for img in images:
            w, h = img.width, img.height
            cols, rows = mtmd_full_grid(w, h, longest, tile)
            high = Option("mtmd:full", cols * rows + 1, (cols * rows + 1) * seq)
            caps: dict[str, Optional[int]] = {"mtmd:full": None, "mtmd:overview": seq}

            def tiles_at(n: int, w=w, h=h, caps=caps):
                if n == 1:
                    return 1, "mtmd:overview"
                if n * tile >= longest:
                    return high.tiles, "mtmd:full"
                c, r = hf_grid(w, h, n * tile, tile)
                k = max(1, c * r)
                gc, gr = mtmd_capped_grid(w, h, longest, tile, k)
                st = f"mtmd:cap{k * seq}"
                caps[st] = k * seq
                return gc * gr + 1, st
            ladder = idefics3_ladder(w, h, tile, longest, tiles_at, seq)
            iid = self._image_id(img)

            def cached(o: Option, iid=iid) -> bool:
                return cache is not None and cache.has(self._cache_key(iid, o.settings))
            ch = choose(ladder, high, detail, s_per_tile=spt, budget_s=budget, cached=cached)
            out.append((ch, caps.get(ch.option.settings), ch.option.settings == "mtmd:overview"))
        return out

    def _speed_key(self) -> str:
        return f"{self._encoder_id()}:t{self.n_threads}"

    @staticmethod
    def _image_id(img) -> str:
        return f"{img.sha256}:{img.width}x{img.height}" if img.sha256 else __import__(
            "edgevlm.runtime.inputs.embed_cache", fromlist=["pixels_id"]).pixels_id(img.rgb, img.width, img.height)

    def _cache_key(self, iid: str, settings: str) -> str:
        from ..inputs.embed_cache import entry_key

        return entry_key(self._encoder_id(), iid, settings)

    def _embed_cache(self, detail):
        from ..inputs.embed_cache import cache_for

        cache = cache_for(detail)
        if cache is not None:
            self._cache = cache            # where _eval_unit writes what this request encodes
        return cache

    def _calibrate(self, speed, geo: dict) -> Optional[float]:
        """Seconds per tile of this projector here: the overview tile of a blank image (encoded twice: the
        first encode of a context also allocates its compute graph), once per projector, build and thread
        count (EncodeSpeed keeps it)."""
        from ..protocol import ImageInput

        t = geo["tile"]
        blank = ImageInput(rgb=bytes([128]) * (t * t * 3), width=t, height=t, source="(calibration)", sha256="")
        unit = self._image_unit(blank, geo["seq"], True, None, None)
        try:
            self._encode_unit(unit)      # the first encode of a context also sizes its compute graph
            unit.embd = None
            secs = self._encode_unit(unit)
        finally:
            self._free_unit(unit)
        speed.record(self._speed_key(), 1, secs)
        return secs

    def _image_unit(self, img, cap: Optional[int], overview_only: bool, choice, cache) -> "_ImageUnit":
        """One image as parts: ("t", tokens) and ("e", n_tokens) runs, embeddings from the cache or
        libmtmd chunks to encode."""
        settings = choice.option.settings if choice else "mtmd:overview"
        unit = _ImageUnit(img, settings, choice)
        key = self._cache_key(self._image_id(img), settings) if cache is not None else None
        unit.cache_key = key
        if cache is not None:
            hit = cache.get(key)
            if hit is not None and self._unit_from_cache(unit, *hit):
                return unit
        mt = self._mtmd_cpp
        mtmd = self._use_mtmd(cap)
        if len(img.rgb) != img.width * img.height * 3:
            raise BadMedia(f"Image {img.source} has inconsistent pixel data.", hint="Report this as a bug.")
        buf = (ctypes.c_uint8 * len(img.rgb)).from_buffer_copy(img.rgb)
        bm = mt.mtmd_bitmap_init(img.width, img.height, buf)
        if not bm:
            raise BadMedia(f"libmtmd could not take image {img.source} ({img.width}x{img.height}).",
                           hint="Try another image, or convert it to PNG or JPEG.")
        chunks = mt.mtmd_input_chunks_init()
        try:
            itext = mt.mtmd_input_text()
            itext.text = self._marker.encode()
            itext.text_len = len(itext.text)
            itext.add_special = False
            itext.parse_special = True
            arr = (mt.mtmd_bitmap_p_ctypes * 1)(bm)
            rc = mt.mtmd_tokenize(mtmd, chunks, ctypes.byref(itext), arr, 1)
        finally:
            mt.mtmd_bitmap_free(bm)
        if rc != 0:
            mt.mtmd_input_chunks_free(chunks)
            raise BadMedia(f"libmtmd could not prepare image {img.source} ({img.width}x{img.height}, error {rc}).",
                           hint="Try another image, or convert it to PNG or JPEG.")
        unit.chunks = chunks
        parts = []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            ch = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(ch) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mt.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                parts.append(("t", [ptr[j] for j in range(n.value)]))
            else:
                parts.append(("e", mt.mtmd_input_chunk_get_n_tokens(ch), ch))
        if overview_only:          # Idefics3's one-tile input: <fake><global-img> overview <fake>
            ov = [p for p in parts if p[0] == "e"][-1]
            parts = [("t", self.tokenize("<fake_token_around_image><global-img>", add_special=False)), ov,
                     ("t", self.tokenize("<fake_token_around_image>", add_special=False))]
        unit.parts = [p[:2] for p in parts]
        unit.pending = [p[2] for p in parts if p[0] == "e"]
        return unit

    def _unit_from_cache(self, unit: "_ImageUnit", arrays: list, meta: dict) -> bool:
        layout = meta.get("parts")
        if not isinstance(layout, list):
            return False
        parts, n_e = [], 0
        n_embd = self._llama_cpp.llama_model_n_embd_inp(self._model)
        for p in layout:
            if isinstance(p, list) and len(p) == 2 and p[0] == "t" and isinstance(p[1], list):
                parts.append(("t", [int(t) for t in p[1]]))
            elif isinstance(p, list) and len(p) == 2 and p[0] == "e" and isinstance(p[1], int):
                if n_e >= len(arrays) or arrays[n_e].shape != (p[1], n_embd):
                    return False
                parts.append(("e", p[1]))
                n_e += 1
            else:
                return False
        if n_e != len(arrays):
            return False
        unit.parts, unit.embd, unit.hit = parts, list(arrays), True
        return True

    def _encode_unit(self, unit: "_ImageUnit") -> float:
        """Encode the unit's libmtmd chunks (one tile each) into float32 arrays; returns seconds."""
        import numpy as np

        if unit.embd is not None:
            return 0.0
        mt = self._mtmd_cpp
        n_embd = self._llama_cpp.llama_model_n_embd_inp(self._model)
        t0 = time.perf_counter()
        out = []
        for ch in unit.pending:
            rc = mt.mtmd_encode_chunk(self._mtmd, ch)
            if rc != 0:
                raise BackendError(f"libmtmd failed to encode image {unit.img.source} (error {rc}).",
                                   hint="Check that the mmproj belongs to the model.")
            n = mt.mtmd_input_chunk_get_n_tokens(ch)
            ptr = mt.mtmd_get_output_embd(self._mtmd)
            out.append(np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).reshape(n, n_embd).copy())
        unit.embd = out
        unit.encode_s = time.perf_counter() - t0
        return unit.encode_s

    def _free_unit(self, unit: "_ImageUnit") -> None:
        if unit.chunks is not None:
            self._mtmd_cpp.mtmd_input_chunks_free(unit.chunks)
            unit.chunks, unit.pending = None, []

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
                raise BackendError(f"llama.cpp failed to evaluate an image (llama_decode returned {rc}).",
                                   hint="The context may be full: raise --ctx.")
            self._keys.extend(keys[s: s + m])

    def _eval_unit(self, unit: "_ImageUnit", keys: list, logits_last: bool) -> float:
        """Encode (unless cached) and evaluate one image unit; returns the encode seconds."""
        try:
            if unit.embd is None:
                self._encode_unit(unit)
            secs = unit.encode_s
            if not unit.hit:
                from ..inputs.detail import EncodeSpeed

                EncodeSpeed().record(self._speed_key(), len(unit.embd), secs)
                if unit.cache_key is not None:
                    layout = [list(p) for p in unit.parts]
                    why = self._cache.put(unit.cache_key, unit.embd, {"parts": layout})
                    if why:
                        self._cache_warning = f"The image cache could not be written: {why}"
        finally:
            self._free_unit(unit)
        k, e = 0, 0
        last = len(unit.parts) - 1
        for i, part in enumerate(unit.parts):
            if part[0] == "t":
                self._decode_tokens(part[1], logits_last=logits_last and i == last, keys=keys[k: k + len(part[1])])
                k += len(part[1])
            else:
                self._decode_embd(unit.embd[e], keys[k: k + part[1]], logits_last and i == last)
                k += part[1]
                e += 1
        unit.report["encode_s"] = round(secs, 4)
        unit.report["cache"] = "hit" if unit.hit else ("miss" if unit.cache_key else "off")
        return secs

    def _tokenize_units(self, text: str, images: list, detail, geo: dict):
        """Keys and plan of a prompt whose images are units (see above)."""
        lc = self._llama_cpp
        pieces = text.split(self._marker)
        if len(pieces) - 1 != len(images):
            raise BackendError(f"The prompt has {len(pieces) - 1} image markers for {len(images)} images.",
                               hint=f"Leave the text {self._marker} out of the prompt; attach images instead.")
        images = [_padded(img, _MAX_ASPECT) for img in images]
        choices = self._choose(images, detail, geo)
        cache = self._embed_cache(detail)
        keys: list = []
        plan = []
        n_image = 0
        head = [lc.llama_vocab_bos(self._vocab)] if (self._add_special(text) and lc.llama_vocab_get_add_bos(self._vocab)) else []
        self._units = []
        for i, piece in enumerate(pieces):
            toks = (head if i == 0 else []) + (self.tokenize(piece, add_special=False) if piece else [])
            if toks:
                plan.append(("t", len(keys), toks))
                keys.extend(toks)
            if i == len(images):
                break
            ch, cap, ov = choices[i]
            if cap != self._mtmd_cap:     # the libmtmd context changes: encode the chunks made by this one first
                for u in self._units:
                    if u.embd is None and u.pending:
                        self._encode_unit(u)
            unit = self._image_unit(images[i], cap, ov, ch, cache)
            self._units.append(unit)
            n_pos = sum(len(p[1]) if p[0] == "t" else p[1] for p in unit.parts)
            n_tok = sum(p[1] for p in unit.parts if p[0] == "e")
            unit.report = {"source": images[i].source, "detail": ch.level, "reason": ch.reason, "cut": ch.cut,
                           "tiles": sum(1 for p in unit.parts if p[0] == "e"), "tokens": n_tok, "encode_s": 0.0}
            ident = f"{self._image_id(images[i])}|{unit.settings}"
            plan.append(("i", len(keys), n_pos, unit))
            keys.extend((_IMG, ident, k) for k in range(n_pos))
            n_image += n_tok
        if self._add_special(text) and lc.llama_vocab_get_add_eos(self._vocab):
            eos = [lc.llama_vocab_eos(self._vocab)]
            plan.append(("t", len(keys), eos))
            keys.extend(eos)
        self._last_prompt = (text, self._prompt_ids(images, detail), keys,
                             [item if item[0] == "t" else item[:3] + (None,) for item in plan], n_image)
        return keys, plan, None, n_image

    @staticmethod
    def _prompt_ids(images: list, detail) -> list:
        return [(img.sha256, img.width, img.height, detail) for img in images]

    # ------------------------------------------------------------------ KV cache
    def _reuse_prefix(self, keys: list, plan) -> int:
        n = max(0, min(common_prefix(self._keys, keys), len(keys) - 1))   # evaluate at least one token for logits
        # never split an image: back off to its first position
        for item in plan:
            if item[0] == "i" and item[1] < n < item[1] + item[2]:
                n = item[1]
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
        self._keys = []

    def _decode_tokens(self, toks: list[int], logits_last: bool, keys: Optional[list] = None) -> None:
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
                b.logits[i] = False
            last = s + self.n_batch >= len(toks)
            b.logits[len(part) - 1] = logits_last and last
            rc = lc.llama_decode(self._ctx, b)
            if rc != 0:
                raise BackendError(f"llama.cpp failed to evaluate the prompt (llama_decode returned {rc}).",
                                   hint="The context may be full: lower --max-tokens or raise --ctx.")
            self._keys.extend(part if keys is None else keys[s: s + len(part)])

    # ------------------------------------------------------------------ generation seam
    def prefill(self, request: ChatRequest) -> Prefill:
        if self._ctx is None:
            raise BackendError("The model is not loaded.", hint="This is a bug: load() must come first.")
        lc = self._llama_cpp
        self._units, self._cache_warning = [], None
        keys, plan, chunks, n_image_tokens = self._prepare(request)
        try:
            if len(keys) >= self.n_ctx:
                raise ContextOverflow(
                    f"The prompt is {len(keys):,} tokens but the context holds {self.n_ctx:,}.",
                    hint="Shorten the input, or raise --ctx (up to the model's trained context).",
                )
            if self._prompt_cache is not None and not any(item[0] == "i" and item[3] is None for item in plan):
                self._prompt_cache.prepare(self, keys)      # (not for a follow-up: its images are in this sequence)
            reused = self._reuse_prefix(keys, plan)
            image_s = 0.0
            for item in plan:
                start = item[1]
                if item[0] == "t":
                    toks = item[2]
                    end = start + len(toks)
                    if end <= reused:
                        continue
                    offset = max(0, reused - start)
                    self._decode_tokens(toks[offset:], logits_last=end == len(keys))
                else:
                    _, start, n_pos, ch = item
                    if start + n_pos <= reused:
                        continue
                    if isinstance(ch, _ImageUnit):
                        image_s += self._eval_unit(ch, keys[start: start + n_pos], start + n_pos == len(keys))
                        continue
                    if ch is None:   # _follow_up checked that the KV cache holds this image
                        raise BackendError("An image of the conversation left the KV cache.",
                                           hint="This is a bug; start a new conversation (/clear).")
                    ti = time.perf_counter()
                    new_n_past = lc.llama_pos(0)
                    rc = self._mtmd_cpp.mtmd_helper_eval_chunk_single(
                        self._mtmd, self._ctx, ch, len(self._keys), self._seq, self.n_batch,
                        start + n_pos == len(keys), ctypes.byref(new_n_past))
                    image_s += time.perf_counter() - ti
                    if rc != 0:
                        raise BackendError(f"libmtmd failed to encode an image (error {rc}).",
                                           hint="Check that the mmproj belongs to the model.")
                    self._keys.extend(keys[start: start + n_pos])
        finally:
            if chunks is not None:
                self._mtmd_cpp.mtmd_input_chunks_free(chunks)
            for unit in self._units:
                self._free_unit(unit)
        images = [img for m in request.messages for img in m.images]
        reps = [u.report for u in self._units if u.report.get("cache")]
        self.image_report = None if not images else {
            "images": reps, "cut": any(r.get("cut") for r in reps),
            **({"warning": self._cache_warning} if self._cache_warning else {})}
        return Prefill(prompt_tokens=len(keys), eval_tokens=len(keys) - reused, image_tokens=n_image_tokens,
                       image_encode_s=image_s)

    def logits(self):
        """llama.cpp's own logits buffer for the last evaluated position, as a numpy view (no copy).

        numpy is imported here, at the first token, not on a thread during the load or the prefill:
        measured, both made the answer later (llama.cpp calls our log callback ~2,000 times while
        loading, each call then waiting for the GIL; the prefill's threads lose their core)."""
        import numpy as np

        ptr = self._llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def eval(self, token: int) -> None:
        self._tok_one[0] = token
        rc = self._llama_cpp.llama_decode(self._ctx, self._llama_cpp.llama_batch_get_one(self._tok_one, 1))
        if rc != 0:
            raise BackendError(f"llama.cpp failed to decode (llama_decode returned {rc}).", hint="Raise --ctx.")
        self._keys.append(token)

    def eval_tokens(self, tokens: list[int]) -> None:
        """Several tokens (a run the constraint forces) in llama_decodes of at most ``_EXACT_RUN``: from 4
        activation rows on, ggml's CPU matmul switches to its batched kernels for some weight types, whose
        results differ from one-row steps (measured on Gemma 3 270M Q4_K_M, which has Q5_0 and Q8_0
        tensors: logits up to ~2 apart after 4-8 tokens, identical after 2-3; SmolLM2 Q4_1 identical at
        any size), and an answer must not depend on how its tokens were evaluated."""
        toks = [int(t) for t in tokens]
        for s in range(0, len(toks), _EXACT_RUN):
            self._decode_tokens(toks[s: s + _EXACT_RUN], logits_last=s + _EXACT_RUN >= len(toks))

    def kv_used(self) -> int:
        return len(self._keys)

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def eog_ids(self) -> set[int]:
        if self._eog is None:
            self._eog = {t for t in range(self._n_vocab) if self._llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        return self._eog

    def text_stream(self) -> "_PieceStream":
        return _PieceStream(self)

    def constraint_tokenizer(self):
        """llguidance's tokenizer for this vocabulary, from llama.cpp's own (generation/vocab_cache.py)."""
        if self._ll_tokenizer is None:
            from ..generation.vocab_cache import gguf_tokenizer   # pieces cached on disk per vocabulary

            self._ll_tokenizer = gguf_tokenizer(self._llama_cpp, self._vocab, self.artifact.path, self._n_vocab,
                                                sorted(self.eog_ids()))
        return self._ll_tokenizer

    def score(self, token_ids: list[int], *, batched: bool = True):
        """Logits after each token, from an empty cache. Batched: one llama_decode with every position's
        logits, in a context of its own sized to the text (ours reserves one logits row)."""
        import numpy as np

        lc = self._llama_cpp
        n = len(token_ids)
        out = np.empty((n, self._n_vocab), dtype=np.float32)
        self.reset()
        if not batched:
            for i, t in enumerate(token_ids):
                self._decode_tokens([int(t)], logits_last=True)
                out[i] = self.logits()
            self.reset()
            return out
        cp = lc.llama_context_default_params()
        cp.n_ctx = max(n, 64)
        cp.n_batch = cp.n_ubatch = max(n, 64)
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        ctx = lc.llama_init_from_model(self._model, cp)
        if not ctx:
            raise BackendError(f"llama.cpp could not create a {n}-token context to score the text.",
                               hint="There may not be enough memory.")
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(token_ids):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise BackendError(f"llama.cpp failed to evaluate the text (llama_decode returned {rc}).",
                                   hint="VLM_DEBUG=1 shows llama.cpp's log.")
            for i in range(n):
                out[i] = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(self._n_vocab,))
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
        return out

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
        if self._mtmd is not None:
            self._mtmd_cpp.mtmd_free(self._mtmd)
            self._mtmd = None
        self._prompt_cache = None
        if self._slot_step is not None:
            self._slot_step.close()
            self._slot_step = self._slots = None
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._embd_batch is not None:
            lc.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            lc.llama_model_free(self._model)
            self._model = None
        self._keys = []

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ helpers for callers
    def kv_cache_bytes(self) -> Optional[int]:
        """The KV cache at full context (K and V of every layer, in --kv-type), or None when the header lacks the shape."""
        from ..device.memory import kv_cache_bytes

        from ..device.memory import KV_TYPES

        shape = self.info.kv_shape if self.info is not None else None
        bpe = KV_TYPES[getattr(self, "_kv_type", "f16")]
        return kv_cache_bytes(self.n_ctx, *shape, bytes_per_elem=bpe) if shape else None

    def describe(self) -> dict:
        return {"n_ctx": self.n_ctx, "n_threads": self.n_threads, "vision": self.has_vision,
                "kv_type": getattr(self, "_kv_type", "f16"),
                "extra_bufts": not avoid_amx_buffers()}


__all__ = ["GGUFBackend"]
