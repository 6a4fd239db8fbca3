"""ONNX backend: decoder-only text models and Idefics3 / SmolVLM vision-language models on onnxruntime alone.

At inference time it needs onnxruntime, numpy, ``tokenizers``, jinja2 (the chat template, sandboxed
by ``runtime/prompt.py``) and, for images, Pillow: no torch, no transformers. It runs decoders in the Hugging
Face / optimum / onnx-community layout (``formats/onnx_graph.py`` says what the graph must declare), with
``tokenizer.json`` (required), ``config.json``, ``generation_config.json``, ``tokenizer_config.json`` and the
chat template beside it or one directory up (``formats/onnx_sidecar.py``).

Which .onnx file is loaded (``pick_model_file``): the file itself when ``Artifact.path`` is a file;
for a directory, the first that exists of ``MODEL_PREFERENCE`` (full precision first, then onnx-community's
quantized names), looked up in the directory and then in its ``onnx/`` subfolder; failing that, the only
.onnx file there. To run a particular variant, pass its file.

The decode loop, and why it is fast:

* one ``IOBinding`` for the session. For graphs that declare it (our fused export writes
  ``edgevlm.kv_cache = shared``; onnxruntime-genai writes ``past_present_share_buffer``) each layer's
  past and present are bound once to the same preallocated buffer and GroupQueryAttention appends in
  place: a step copies no cache and rebinds only ``input_ids``, ``attention_mask`` and ``position_ids``.
  For other graphs (optimum's traced export concatenates inside the graph) the ``present.*`` outputs
  stay ORT values and are bound straight back as the next step's past; nothing round-trips via numpy;
* ``input_ids``, ``attention_mask`` and ``position_ids`` are views into arrays allocated once at load
  (the mask is a row of ones, positions an arange), so a step allocates no numpy arrays;
* logits are written into a numpy buffer allocated once and bound as the output, and only the last
  row is read (greedy = ``argmax`` of that row; sampling works on it alone);
* SessionOptions: intra-op threads = physical / performance cores, sequential execution, one inter-op
  thread, all graph optimizations;
* the KV cache survives between turns: the longest common token prefix with the previous turn is kept
  (shared buffers: the rest is simply ignored; concat graphs: the past is sliced once per turn) and
  only the new tokens are evaluated.

Vision-language models (Idefics3 / SmolVLM) in onnx-community's three-part layout: when the decoder takes
``inputs_embeds`` instead of ``input_ids``, ``vision_encoder*.onnx`` and ``embed_tokens*.onnx`` must lie
beside it, with the decoder file's quantization suffix (``decoder_model_merged_int8.onnx`` ->
``vision_encoder_int8.onnx``, ``embed_tokens_int8.onnx``), or else the fp32 ones (``vision_encoder.onnx``).
``onnx_images.py`` holds that side. Images are prepared by ``runtime/inputs/idefics3.py`` (Pillow + numpy,
from ``preprocessor_config.json``); the
chat template is rendered with list-form content (``{"type": "image"}``), each ``<image>`` expanded to the
model's tile tokens, text positions embedded by ``embed_tokens``, image positions filled with the vision
encoder's features, and the decoder run on ``inputs_embeds``. The KV bookkeeping keys an image position by
(image sha256, detail, offset), so a follow-up question about the same image reuses its positions; the
features are also kept in memory and in the persistent embedding cache (``runtime/inputs/embed_cache.py``),
so an image that must be re-evaluated -- in this process or a later one -- is not re-encoded. The detail
(``--detail``: Idefics3's ``longest_edge = N x tile``) is chosen per image by ``runtime/inputs/planner.py``;
tiles go through the vision encoder ``TILE_BATCH`` at a time (peak RSS of a 13-tile photo: 3.8 GB all at
once, 0.8 GB one by one, same speed).

Environment: ``VLM_ORT_SPIN=0`` stops onnxruntime's worker threads spinning between operators (they
spin by default, which is faster on cores of our own and slower on cores shared with busy work);
``VLM_ONNX_KV=concat`` forces the concat path (for comparisons).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from ..env import debug
from ..errors import BackendError, BadModelFile, ContextOverflow, UsageError, first_line, missing_extra
from ..device.hardware import default_threads
from ..generation.prompt import render_chat
from ..formats.onnx_files import pick_model_file
from ..formats.onnx_graph import read_decoder_graph
from ..formats.onnx_sidecar import read_sidecar
from ..protocol import DEFAULT_CTX, Artifact, ChatRequest, LoadOptions, Prefill, ProgressCallback
from .onnx_images import ONNXImages
from .onnx_kv import ConcatKV, SharedKV
from .text_streams import TextStream as _TextStream
from .prompt_cache import common_prefix


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the install
        raise missing_extra("onnxruntime", extra="onnx") from e
    return ort


def _want_spinning() -> bool:
    """Whether onnxruntime's worker threads spin between operators (its default). Spinning takes the
    hand-off latency off every one of a decode step's few hundred operators: SmolLM2-135M int4 at 2
    threads decoded at ~220 tok/s spinning vs ~137 not. But on cores busy with other work it costs
    (one other busy process on a 2-core machine: ~30 vs ~50 tok/s), and a load-average heuristic
    cannot tell our own spinning from other work -- so spin by default and let ``VLM_ORT_SPIN=0``
    turn it off on shared machines."""
    return os.environ.get("VLM_ORT_SPIN", "1") != "0"


class ONNXBackend:
    format = "onnx"

    def __init__(self) -> None:
        self._sess = None
        self._io = None
        self._kv = None                # onnx_kv.ConcatKV | SharedKV: the past key/value buffers
        self._keys: list[int] = []     # token id held by each KV position
        self._prompt_cache = None      # prompt_cache.PromptCache: past states saved in RAM (vlm serve --prompt-cache)
        self.artifact: Optional[Artifact] = None
        self.model_file: Optional[Path] = None
        self.chat_template: Optional[str] = None
        self.tokenizer = None
        self.config: dict = {}
        self.eos_ids: set[int] = set()
        self.bos_token: str = ""
        self.eos_token: str = ""
        self.n_ctx = 0
        self.n_batch = 512
        self.n_threads = 1
        self.n_layers = 0
        self.load_s = 0.0
        self._last_row = None          # logits after the last evaluated position (a view, see logits())
        self._context_ids: list[int] = []   # the last prompt's token ids (for the detokenizer's context)
        self._ll_tokenizer = None
        # Vision (three-part models): set at load when the decoder takes inputs_embeds.
        self._embeds = False           # the decoder reads inputs_embeds (then _images.embed makes them)
        self._images = None            # onnx_images.ONNXImages: the vision encoder, token embeddings, features
        self.part_files: dict[str, Path] = {}
        self.image_report: Optional[dict] = None
        self._raw_config: dict = {}    # config.json as written (multimodal: text_config not merged in)

    # ------------------------------------------------------------------ loading
    def load(self, artifact: Artifact, opts: LoadOptions, on_progress: Optional[ProgressCallback] = None) -> None:
        t0 = time.perf_counter()
        if on_progress is not None:
            on_progress("load", 0, 3)
        model_file = pick_model_file(Path(artifact.path))
        side = self._sidecar = read_sidecar(model_file, Path(artifact.path))
        self.config, self._raw_config = side.config, side.raw_config
        self.tokenizer, self.chat_template = side.tokenizer, side.chat_template
        self.bos_token, self.eos_token, self.eos_ids = side.bos_token, side.eos_token, side.eos_ids
        if on_progress is not None:
            on_progress("load", 1, 3)

        ort = _import_ort()
        import numpy as np

        self.n_threads = opts.n_threads or default_threads()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.n_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 0 if debug() else 3
        self.spin = _want_spinning()
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        sess = self._session(ort, so, model_file)
        if on_progress is not None:
            on_progress("load", 2, 3)
        self._sess = sess
        self._np = np
        self._ort = ort
        self.model_file = model_file
        graph = read_decoder_graph(sess.get_inputs(), sess.get_outputs(), model_file, self.config)
        for name, value in vars(graph).items():     # the graph's declarations become this backend's attributes
            setattr(self, name, value)
        if self._embeds:
            self._images = ONNXImages(self, ort, so, model_file, side, self._session)
            self.part_files = self._images.part_files
        self._check_vocab(model_file)
        shared = self._shared_kv_capable(sess, side) and self.n_vocab > 0 \
            and os.environ.get("VLM_ONNX_KV", "") != "concat"

        n_train = int(self.config.get("max_position_embeddings") or 0) or (artifact.context_length or 0)
        n_ctx = opts.n_ctx if opts.n_ctx > 0 else (n_train or DEFAULT_CTX)
        if n_train > 0:
            n_ctx = min(n_ctx, n_train)
        self.n_ctx = n_ctx
        self.n_batch = max(1, min(opts.n_batch, n_ctx))
        # Arrays allocated once; each step binds views of them.
        self._ones = np.ones((1, n_ctx), dtype=np.int64)
        self._positions = np.arange(n_ctx, dtype=np.int64).reshape(1, n_ctx)
        self._ids_buf = np.zeros((1, self.n_batch), dtype=np.int64)
        rows = 1 if (self._keep_logits or self._last_only) else self.n_batch
        self._logits_buf = np.empty((1, rows, self.n_vocab), dtype=self._logits_dtype) if self.n_vocab else None
        self._io = sess.io_binding()
        self._kv = (SharedKV if shared else ConcatKV)(np, ort, self._io, self._past_names, self._present_names,
                                                      self.kv_heads, self.head_dim, self._kv_dtype, n_ctx)
        self.reset()
        if opts.prompt_cache_bytes > 0:
            from .prompt_cache import PromptCache

            self._prompt_cache = PromptCache(opts.prompt_cache_bytes)
        self.artifact = artifact
        self.load_s = time.perf_counter() - t0
        if on_progress is not None:
            on_progress("load", 3, 3)

    @staticmethod
    def _session(ort, so, path: Path):
        try:
            return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind11 exception types
            first = first_line(e)
            raise BadModelFile(
                f"onnxruntime could not load {path.name}: {first[:300]}",
                hint="The file is truncated, corrupt or needs a newer onnxruntime: download or export it again "
                     f"(a model whose weights are kept apart needs its {path.name}_data or .onnx_data file "
                     "beside it, whole).",
            ) from e

    @staticmethod
    def _shared_kv_capable(sess, side) -> bool:
        """Whether past and present may be one buffer: the graph says so (our fused builder writes
        ``edgevlm.kv_cache = shared``; onnxruntime-genai's builder writes ``past_present_share_buffer``
        into genai_config.json)."""
        try:
            meta = sess.get_modelmeta().custom_metadata_map or {}
        except Exception:
            meta = {}
        return meta.get("edgevlm.kv_cache") == "shared" or side.shares_kv_buffer()

    def _check_vocab(self, model_file: Path) -> None:
        n_tok = self.tokenizer.get_vocab_size(with_added_tokens=True)
        n = self.n_vocab
        if not n:
            return
        # Models pad their embedding to a round size, so the tokenizer may be a little smaller; a bigger
        # tokenizer, or a much smaller one, belongs to another model.
        if n_tok > n or n - n_tok > max(1024, n // 20):
            raise BadModelFile(
                f"The tokenizer beside {model_file.name} has {n_tok:,} tokens but the model scores {n:,}: "
                "it belongs to another model.",
                hint="Copy the tokenizer.json (and tokenizer_config.json) published with this model.",
            )
        bad = [i for i in self.eos_ids if i >= n]
        if bad:
            raise BadModelFile(f"End-of-text token id {bad[0]} is outside the model's {n:,}-token vocabulary.",
                               hint="generation_config.json / config.json belong to another model.")

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds the tokenizer's BOS/EOS template. The ``tokenizers``
        library always matches special tokens written in the text, so ``parse_special=False`` (the GGUF
        backend's "treat them as plain text") is accepted for the shared interface but only honoured
        for text without them."""
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def detokenize(self, toks: list[int]) -> str:
        return self.tokenizer.decode(toks, skip_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_special=False))

    # ------------------------------------------------------------------ prompt
    @property
    def has_vision(self) -> bool:
        return self._images is not None

    def render(self, request: ChatRequest) -> str:
        """The prompt text. For a vision model every image is one ``<image>`` marker in it (expanded to the
        model's tile tokens by ``_prepare``)."""
        if self._images is not None:
            return self._images.render(request)
        if any(m.images for m in request.messages):
            raise UsageError(
                f"{self.artifact.name if self.artifact else 'This ONNX model'} is a text-only ONNX model, "
                "so it cannot read images.",
                hint="Use a vision model: an Idefics3 / SmolVLM three-part ONNX export, or a GGUF vision model.",
            )
        if request.options.raw or not self.chat_template:
            parts = [m.content for m in request.messages if m.role != "system"]
            return parts[0] if len(parts) == 1 else "\n".join(parts)
        return render_chat(self.chat_template, request.messages, bos_token=self.bos_token, eos_token=self.eos_token,
                           tools=request.tools)

    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        text = self.render(request)
        if request.options.raw or not self.chat_template:
            # plain completion: the tokenizer's own rule (e.g. a BOS), unless the text already has it
            add = not (self.bos_token and text.startswith(self.bos_token))
            return self.tokenize(text, add_special=add)
        return self.tokenize(text, add_special=False)   # the template wrote the special tokens itself

    def _prepare(self, request: ChatRequest) -> tuple[list, list[int], list]:
        """Prompt -> (keys, ids, spans). ``keys`` name what each position holds (a token id, or
        ``(IMG, image id, offset)`` for an image position), ``ids`` are the token ids (``<image>`` at image
        positions) and ``spans`` list each image as (positions, planner.Planned, longest edge, plan): see
        ``onnx_images``."""
        images = [img for m in request.messages for img in m.images]
        if not images or self._images is None:       # (render refuses images for a text-only model)
            ids = self._prompt_ids(request)
            return ids, ids, []
        return self._images.prepare(request, images)

    # ------------------------------------------------------------------ KV cache (onnx_kv)
    @property
    def _shared(self) -> bool:
        return self._kv is not None and self._kv.shared

    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        self._keys = []
        if self._kv is not None:
            self._kv.reset()

    def _reuse_prefix(self, keys: list[int]) -> int:
        n = max(0, min(common_prefix(self._keys, keys), len(keys) - 1))   # evaluate at least one token for logits
        if n == 0:
            self.reset()
        elif n < len(self._keys):
            self._kv.truncate(n)
            del self._keys[n:]
        return n

    # the prompt cache's view of the past (prompt_cache.py): copies of the first len(_keys) positions
    def _state_size(self) -> int:
        return self._kv.state_size(len(self._keys)) if self._kv is not None else 0

    def _state_get(self, size: int):
        return self._kv.state_get(len(self._keys))

    def _state_set(self, data, size: int) -> bool:
        n = data[0].shape[2] if data else 0
        if len(data) != len(self._past_names) or n > self.n_ctx:
            return False
        self._keys = []
        self._kv.state_set(data)
        return True

    def _run(self, toks: list, embeds=None, all_rows: bool = False):
        """Evaluate ``toks`` (KV keys: token ids, or image keys with ``embeds``) after the cached ones;
        returns the logits row of the last one (a view), or with ``all_rows`` every position's rows
        [n, n_vocab] (graphs that can give them: see ``score``). Decoders taking ``inputs_embeds`` get
        ``embeds`` [n, hidden], or the token embeddings of ``toks`` when none are given."""
        np = self._np
        io = self._io
        n, p = len(toks), len(self._keys)
        total = p + n
        kv = self._kv
        kv.before_run(total, p)
        if self._embeds:
            if embeds is None:
                embeds = self._images.embed(toks)
            emb = np.ascontiguousarray(embeds.reshape(1, n, -1), dtype=self._embeds_dtype)
            io.bind_cpu_input("inputs_embeds", emb)
        else:
            ids = self._ids_buf[:, :n]
            ids[0, :] = toks
            io.bind_cpu_input("input_ids", ids if self._ids_dtype == "int64" else ids.astype(self._ids_dtype))
        inputs = self._inputs
        if "attention_mask" in inputs:
            io.bind_cpu_input("attention_mask", self._ones[:, :total])
        if "position_ids" in inputs:
            io.bind_cpu_input("position_ids", self._positions[:, p:total])
        if "cache_position" in inputs:
            io.bind_cpu_input("cache_position", self._positions[0, p:total])
        if self._keep_logits:
            io.bind_cpu_input(self._keep_logits, np.array(0 if all_rows else 1, dtype=np.int64))
        if "use_cache_branch" in inputs:
            io.bind_cpu_input("use_cache_branch", np.array([p > 0]))
        rows = 1 if ((self._keep_logits and not all_rows) or self._last_only) else n
        if all_rows:
            logits = np.empty((1, n, self.n_vocab), dtype=self._logits_dtype)
            io.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
        elif self._logits_buf is not None:
            logits = self._logits_buf.reshape(-1)[: rows * self.n_vocab].reshape(1, rows, self.n_vocab)
            io.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
        else:
            io.bind_output("logits", "cpu")
        kv.bind()
        try:
            self._sess.run_with_iobinding(io)
        except Exception as e:
            raise BackendError(f"onnxruntime failed to evaluate the model: {first_line(e)[:300]}",
                               hint="Run with VLM_DEBUG=1 for onnxruntime's log; the export may be broken.") from e
        out = kv.after_run()
        if out is not None and self._logits_buf is None and not all_rows:
            logits = out.numpy()
        self._keys.extend(toks)
        if all_rows:
            return logits[0].astype(np.float32)
        row = logits[0, -1]
        return row if row.dtype == np.float32 else row.astype(np.float32)

    def _prefill(self, toks: list, embeds=None):
        row = None
        for s in range(0, len(toks), self.n_batch):
            row = self._run(toks[s: s + self.n_batch], None if embeds is None else embeds[s: s + self.n_batch])
        return row

    # ------------------------------------------------------------------ generation seam
    def prefill(self, request: ChatRequest) -> Prefill:
        if self._sess is None:
            raise BackendError("The model is not loaded.", hint="This is a bug: load() must come first.")
        keys, ids, spans = self._prepare(request)
        if not keys:
            raise UsageError("The prompt is empty.", hint="Give the model some text.")
        if len(keys) >= self.n_ctx:
            raise ContextOverflow(
                f"The prompt is {len(keys):,} tokens but the context holds {self.n_ctx:,}.",
                hint="Shorten the input, or raise --ctx (up to the model's trained context).",
            )
        if self._prompt_cache is not None:
            self._prompt_cache.prepare(self, keys)
        reused = self._reuse_prefix(keys)
        embeds, image_s = None, 0.0
        if self._embeds:
            embeds, image_s = self._images.prompt_embeds(ids, spans, reused)
        self.image_report = self._images.planner.report() if spans else None
        t0 = time.perf_counter()
        self._last_row = self._prefill(keys[reused:], embeds)
        if spans:                                   # the decoder's prefill speed, for --detail auto
            self._images.planner.prefilled(len(keys) - reused, time.perf_counter() - t0)
        self._context_ids = ids
        return Prefill(prompt_tokens=len(keys), eval_tokens=len(keys) - reused,
                       image_tokens=sum(len(sp[0]) for sp in spans), image_encode_s=image_s)

    def logits(self):
        return self._last_row

    def eval(self, token: int) -> None:
        self._last_row = self._run([token])

    def eval_tokens(self, tokens: list[int]) -> None:
        self._last_row = self._prefill([int(t) for t in tokens])

    def kv_used(self) -> int:
        return len(self._keys)

    def draft_rows(self) -> int:
        return 0    # our exports return the last position's logits only (docs/decode-less.md: drafting)

    def eval_rows(self, tokens: list[int]):
        raise BackendError("This ONNX model does not verify drafts.", hint="This is a bug: draft_rows() is 0.")

    drop_last = eval_rows

    def kv_keys(self) -> list:
        return self._keys

    def is_eog(self, token: int) -> bool:
        return token in self.eos_ids

    def eog_ids(self) -> set[int]:
        return self.eos_ids

    def text_stream(self) -> _TextStream:
        return _TextStream(self.tokenizer, self._context_ids)

    def constraint_tokenizer(self):
        """llguidance's tokenizer, from tokenizer.json (as wide as the logits row)."""
        if self._ll_tokenizer is None:
            from ..generation.constrain import tokenizer_from_hf

            self._ll_tokenizer = tokenizer_from_hf(self.tokenizer, self.n_vocab, self.eos_ids)
        return self._ll_tokenizer

    def score(self, token_ids: list[int], *, batched: bool = True):
        """Logits after each token from an empty cache. Batched needs a graph that returns every
        position's logits (not one sliced to the last position); otherwise it steps through."""
        np = self._np
        self.reset()
        try:
            if batched and not self._last_only and self.n_vocab:
                rows = [self._run(list(token_ids[s: s + self.n_batch]), all_rows=True)
                        for s in range(0, len(token_ids), self.n_batch)]
                return np.concatenate(rows)
            return np.stack([self._run([int(t)]).copy() for t in token_ids])
        finally:
            self.reset()

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        self._io = None
        self._sess = None
        if self._images is not None:
            self._images.close()
        self._kv, self._keys = None, []
        self._prompt_cache = None

    def slots(self) -> list["ONNXBackend"]:
        return [self]          # one conversation at a time: LoadOptions.n_seq is a GGUF feature

    def end_generation(self) -> None:
        pass

    def kv_cache_bytes(self) -> int:
        """The KV cache at full context: K and V of every layer, in the decoder's past dtype."""
        from ..device.memory import kv_cache_bytes

        return kv_cache_bytes(self.n_ctx, self.n_layers, self.kv_heads, self.head_dim,
                              bytes_per_elem=2 if self._kv_dtype == "float16" else 4)

    def describe(self) -> dict:
        return {"n_ctx": self.n_ctx, "n_threads": self.n_threads, "spin": getattr(self, "spin", None),
                "vision": self.has_vision,
                "parts": {k: str(v) for k, v in self.part_files.items()} or None,
                "model_file": str(self.model_file) if self.model_file else None,
                "kv": f"{self.n_layers} layers x {self.kv_heads} heads x {self.head_dim} ({self._kv_dtype}, "
                      f"{'shared buffer' if self._shared else 'concat'})" if self._sess is not None else None}


__all__ = ["ONNXBackend"]
