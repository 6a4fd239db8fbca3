"""ONNX backend: decoder-only text models and Idefics3 / SmolVLM vision-language models on onnxruntime alone.

At inference time it needs onnxruntime, numpy, ``tokenizers``, jinja2 (the chat template, sandboxed
by ``runtime/prompt.py``) and, for images, Pillow: no torch, no transformers. It runs decoders in the Hugging Face / optimum / onnx-community layout:

* a graph taking ``input_ids`` [batch, seq] (int64), optionally ``attention_mask``, ``position_ids``,
  ``cache_position``, ``num_logits_to_keep`` / ``logits_to_keep`` and ``use_cache_branch`` (old merged
  decoders), plus ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim]; returning
  ``logits`` and ``present.{i}.key|value`` [batch, kv_heads, past + seq, head_dim];
* beside it (or one directory up, as in onnx-community's ``onnx/`` subfolder): ``tokenizer.json``
  (required), ``config.json``, ``generation_config.json``, ``tokenizer_config.json`` and the chat
  template (``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``'s entry).

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
Images are prepared by ``runtime/idefics3.py`` (Pillow + numpy, from ``preprocessor_config.json``); the
chat template is rendered with list-form content (``{"type": "image"}``), each ``<image>`` expanded to the
model's tile tokens, text positions embedded by ``embed_tokens``, image positions filled with the vision
encoder's features, and the decoder run on ``inputs_embeds``. The KV bookkeeping keys an image position by
(image sha256, detail, offset), so a follow-up question about the same image reuses its positions; the
features are also kept in memory and in the persistent embedding cache (``runtime/inputs/embed_cache.py``),
so an image that must be re-evaluated -- in this process or a later one -- is not re-encoded. The detail
(``--detail``: Idefics3's ``longest_edge = N x tile``) is chosen per image by ``runtime/inputs/detail.py``;
tiles go through the vision encoder ``TILE_BATCH`` at a time (peak RSS of a 13-tile photo: 3.8 GB all at
once, 0.8 GB one by one, same speed).

Environment: ``VLM_ORT_SPIN=0`` stops onnxruntime's worker threads spinning between operators (they
spin by default, which is faster on cores of our own and slower on cores shared with busy work);
``VLM_ONNX_KV=concat`` forces the concat path (for comparisons).
"""
from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from ..env import debug
from ..errors import BackendError, BadModelFile, ContextOverflow, UsageError, missing_extra
from ..device.hardware import default_threads
from ..generation.prompt import _compile, render_chat
from ..formats.model_json import read_json_object
from ..formats.onnx_files import pick_model_file, vision_parts
from ..protocol import DEFAULT_CTX, Artifact, ChatRequest, ImageInput, LoadOptions, Prefill, ProgressCallback
from .prompt_cache import common_prefix

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
# Special tokens that end a turn in common chat formats (llama.cpp treats these as end-of-generation too).
_EOG_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
              "<|return|>", "<|eom_id|>", "</s>", "<|END_OF_TURN_TOKEN|>", "<end_of_utterance>")


_IMG = "img"               # key prefix of image positions in the KV bookkeeping: (_IMG, image id, offset)
_FEATURE_CACHE_BYTES = 256 * 1024 ** 2   # image features kept for re-use (most recent first)
# Tiles per vision-encoder run: its activations and the float32 tiles scale with this, not with the image
# (all 13 tiles of a photo in one run peaked at 2.5-3.2 GB on a SmolVLM-256M-shaped model).
TILE_BATCH = 1


def _image_id(img: ImageInput) -> str:
    """What identifies an image's pixels: the sha256 of the user's bytes, and the size they were decoded to
    (the same file may be loaded at another size, which changes its tiles)."""
    sha = img.sha256
    if not sha:
        import hashlib

        sha = hashlib.sha256(img.rgb).hexdigest()
    return f"{sha}:{img.width}x{img.height}"


def _report(images: list, warning: Optional[str]) -> dict:
    """``Backend.image_report``: per image what was chosen and what it cost."""
    out: dict = {"images": images, "cut": any(i.get("cut") for i in images)}
    if warning:
        out["warning"] = warning
    return out


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


def _token_content(v) -> Optional[str]:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _ids(v) -> list[int]:
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if isinstance(x, int)]
    return []


class _TextStream:
    """Token ids -> text pieces, correct across multi-byte characters and byte-fallback tokens."""

    def __init__(self, tokenizer, context: list[int]) -> None:
        self._tok = tokenizer
        self._ds = None
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:  # tokenizers < 0.21
            DecodeStream = None
        if DecodeStream is not None:
            try:   # context ids let sentencepiece-style decoders keep a leading space (tokenizers >= 0.22)
                self._ds = DecodeStream(ids=list(context[-4:]), skip_special_tokens=True)
            except TypeError:
                self._ds = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._sent = ""

    def feed(self, tok: int) -> str:
        if self._ds is not None:
            return self._ds.step(self._tok, tok) or ""
        self._ids.append(tok)   # fallback: decode everything, send what is new and complete
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self._sent):
            return ""
        out, self._sent = text[len(self._sent):], text
        return out

    def flush(self) -> str:
        if self._ds is not None:
            return ""
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        out = text[len(self._sent):] if text.startswith(self._sent) else ""
        self._sent = text
        return out


class ONNXBackend:
    format = "onnx"

    def __init__(self) -> None:
        self._sess = None
        self._io = None
        self._past: list = []          # OrtValues, [1, kv_heads, len(self._keys), head_dim] each
        self._past_keep: list = []     # numpy arrays backing sliced past values (kept alive)
        self._keys: list[int] = []     # token id held by each KV position
        self._shared = False           # past and present share one buffer per layer (see "KV cache")
        self._capacity = 0             # shared mode: positions the buffers hold
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
        self._embeds = False           # the decoder reads inputs_embeds (then _embed_sess makes them)
        self._embed_sess = None
        self._vision_sess = None
        self._processor = None         # runtime.idefics3.Idefics3Preprocessor
        self.part_files: dict[str, Path] = {}
        self._features: OrderedDict = OrderedDict()   # (_image_id, settings) -> float32 [positions, hidden]
        self.image_report: Optional[dict] = None
        self._encoder_id = ""          # names the vision encoder + engine build (embedding cache, encode speed)
        self._detail: dict = {}        # _image_id -> (settings, longest_edge, Choice) for the current prompt
        self._report: list = []
        self._raw_config: dict = {}    # config.json as written (multimodal: text_config not merged in)

    # ------------------------------------------------------------------ loading
    def load(self, artifact: Artifact, opts: LoadOptions, on_progress: Optional[ProgressCallback] = None) -> None:
        t0 = time.perf_counter()
        if opts.kv_type != "f16":
            raise UsageError(f"--kv-type {opts.kv_type} is for GGUF models: an ONNX decoder keeps its KV cache in "
                             "the dtype it was exported with.", hint="Drop --kv-type, or use the model's GGUF artifact.")
        if on_progress is not None:
            on_progress("load", 0, 3)
        model_file = pick_model_file(Path(artifact.path))
        side = self._sidecar_dirs(model_file, Path(artifact.path))
        self.config = self._load_config(side)
        self.tokenizer = self._load_tokenizer(side, model_file)
        self._load_tokens_and_template(side)
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
        self._inspect_graph(sess, model_file)
        if self._embeds:
            self._load_vision(ort, so, model_file, side)
        self._check_vocab(model_file)
        self._shared = self._shared_kv_capable(sess, side) and self.n_vocab > 0 \
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
        self._capacity = 0
        self._past_keep = []
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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadModelFile(
                f"onnxruntime could not load {path.name}: {first[:300]}",
                hint="The file is truncated, corrupt or needs a newer onnxruntime: download or export it again "
                     f"(a model whose weights are kept apart needs its {path.name}_data or .onnx_data file "
                     "beside it, whole).",
            ) from e

    def _load_vision(self, ort, so, model_file: Path, dirs: list[Path]) -> None:
        """The vision encoder, token embeddings and image preprocessor of a three-part model."""
        from ..inputs.idefics3 import Idefics3Preprocessor

        parts = vision_parts(model_file)
        self._processor = Idefics3Preprocessor.from_dirs(dirs, self._raw_config)
        emb = self._session(ort, so, parts["embed_tokens"])
        # The encoder without onnxruntime's CPU memory arena: the arena keeps (and rounds up) a tile's
        # activations after the encode; measured on a SmolVLM-256M-shaped model, 13 tiles: peak RSS
        # 620 MiB instead of 759 MiB, encode time unchanged (67 s vs 72 s on a loaded machine).
        vso = ort.SessionOptions()
        vso.intra_op_num_threads = so.intra_op_num_threads
        vso.inter_op_num_threads = 1
        vso.execution_mode = so.execution_mode
        vso.graph_optimization_level = so.graph_optimization_level
        vso.log_severity_level = so.log_severity_level
        vso.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        vso.enable_cpu_mem_arena = False
        vis = self._session(ort, vso, parts["vision_encoder"])
        e_in = {i.name: i for i in emb.get_inputs()}
        e_out = [o.name for o in emb.get_outputs()]
        if "input_ids" not in e_in or len(e_out) != 1:
            raise BadModelFile(f"{parts['embed_tokens'].name} does not map input_ids to one embeddings output.",
                               hint="Use the embed_tokens graph exported with this decoder.")
        v_in = {i.name for i in vis.get_inputs()}
        if "pixel_values" not in v_in or len(vis.get_outputs()) != 1:
            raise BadModelFile(f"{parts['vision_encoder'].name} does not take pixel_values to one features output.",
                               hint="Use the vision_encoder graph exported with this decoder.")
        self._embed_sess, self._vision_sess = emb, vis
        self._embed_out = e_out[0]
        self._embed_ids_dtype = _ORT_TYPES.get(e_in["input_ids"].type, "int64")
        self._vision_out = vis.get_outputs()[0].name
        self._vision_mask = "pixel_attention_mask" in v_in
        tok = self.tokenizer
        self._image_token_id = tok.token_to_id(self._processor.image_token)
        if self._image_token_id is None:
            raise BadModelFile(f"The tokenizer has no {self._processor.image_token} token, so it cannot place images.",
                               hint="Copy the tokenizer.json published with this model.")
        self.part_files = {"decoder": model_file, **parts}
        from ..inputs.embed_cache import file_identity

        self._encoder_id = f"onnx:{file_identity(parts['vision_encoder'])}:ort{ort.__version__}"
        self._tile_batch = TILE_BATCH

    @staticmethod
    def _sidecar_dirs(model_file: Path, given: Path) -> list[Path]:
        dirs = [model_file.parent, model_file.parent.parent]
        if given.is_dir() and given not in dirs:
            dirs.insert(1, given)
        return dirs

    @staticmethod
    def _find(dirs: list[Path], name: str) -> Optional[Path]:
        for d in dirs:
            if (d / name).is_file():
                return d / name
        return None

    def _load_config(self, dirs: list[Path]) -> dict:
        p = self._find(dirs, "config.json")
        cfg = read_json_object(p) if p else {}
        self._raw_config = cfg
        text = cfg.get("text_config")
        if isinstance(text, dict):   # multimodal configs nest the decoder's settings
            cfg = {**cfg, **text}
        gp = self._find(dirs, "generation_config.json")
        self._gen_config = read_json_object(gp) if gp else {}
        return cfg

    def _load_tokenizer(self, dirs: list[Path], model_file: Path):
        p = self._find(dirs, "tokenizer.json")
        if p is None:
            raise BadModelFile(
                f"No tokenizer.json next to {model_file.name}.",
                hint="Copy the model's tokenizer.json (from its Hugging Face repository) into "
                     f"{model_file.parent}.",
            )
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise missing_extra("tokenizers", extra="onnx") from e
        try:
            return Tokenizer.from_file(str(p))
        except Exception as e:
            raise BadModelFile(f"{p.name} in {p.parent} is not a tokenizer the `tokenizers` library can read: "
                               f"{str(e).splitlines()[0][:200]}",
                               hint="Fetch the model's tokenizer.json again.") from e

    def _load_tokens_and_template(self, dirs: list[Path]) -> None:
        tp = self._find(dirs, "tokenizer_config.json")
        tcfg = read_json_object(tp) if tp else {}
        tok = self.tokenizer
        self.bos_token = _token_content(tcfg.get("bos_token")) or ""
        self.eos_token = _token_content(tcfg.get("eos_token")) or ""
        sm = self._find(dirs, "special_tokens_map.json")
        if sm and (not self.bos_token or not self.eos_token):
            smap = read_json_object(sm)
            self.bos_token = self.bos_token or _token_content(smap.get("bos_token")) or ""
            self.eos_token = self.eos_token or _token_content(smap.get("eos_token")) or ""
        if not self.bos_token and isinstance(self.config.get("bos_token_id"), int):
            self.bos_token = tok.id_to_token(self.config["bos_token_id"]) or ""
        eos = set(_ids(self._gen_config.get("eos_token_id"))) | set(_ids(self.config.get("eos_token_id")))
        if self.eos_token and tok.token_to_id(self.eos_token) is not None:
            eos.add(tok.token_to_id(self.eos_token))
        if not self.eos_token and eos:
            self.eos_token = tok.id_to_token(min(eos)) or ""
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        for name in _EOG_NAMES:
            if name in specials:
                eos.add(tok.token_to_id(name))
        self.eos_ids = {i for i in eos if i is not None and i >= 0}

        tmpl = None
        jp = self._find(dirs, "chat_template.jinja")
        if jp is not None:
            tmpl = jp.read_text(encoding="utf-8")
        else:
            cj = self._find(dirs, "chat_template.json")
            tmpl = read_json_object(cj).get("chat_template") if cj else tcfg.get("chat_template")
        if isinstance(tmpl, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        self.chat_template = tmpl if isinstance(tmpl, str) and tmpl.strip() else None

    def _inspect_graph(self, sess, model_file: Path) -> None:
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = {o.name: o for o in sess.get_outputs()}
        self._embeds = "input_ids" not in inputs and "inputs_embeds" in inputs
        if "input_ids" not in inputs and not self._embeds:
            raise BadModelFile(f"{model_file.name} has no input_ids input, so it is not a decoder language model.",
                               hint="Pass a decoder exported with `--task text-generation-with-past`.")
        if "logits" not in outputs:
            raise BadModelFile(f"{model_file.name} has no logits output.",
                               hint="Pass a causal language model export (text-generation-with-past).")
        past = sorted(((int(m.group(1)), m.group(2)), n) for n in inputs if (m := _PAST.match(n)))
        if not past:
            raise BadModelFile(
                f"{model_file.name} was exported without a KV cache (no past_key_values inputs), which would "
                "re-read the whole text for every token.",
                hint="Re-export with `optimum-cli export onnx --task text-generation-with-past` "
                     "(or `vlm quantize --to onnx`).",
            )
        names = [n for _, n in past]
        self.n_layers = len(names) // 2
        self._past_names = names
        self._present_names = []
        for n in names:
            out = n.replace("past_key_values", "present")
            if out not in outputs:
                raise BadModelFile(f"{model_file.name} takes {n} but has no {out} output.",
                                   hint="Use an optimum / onnx-community decoder export.")
            self._present_names.append(out)
        first = inputs[names[0]]
        self._kv_dtype = _ORT_TYPES.get(first.type)
        if self._kv_dtype not in ("float32", "float16"):
            raise BadModelFile(f"{model_file.name} keeps its KV cache as {first.type}, which this backend does not run.",
                               hint="Use an fp32, fp16 or weight-quantized export.")
        shape = first.shape
        heads = shape[1] if isinstance(shape[1], int) else None
        hdim = shape[3] if isinstance(shape[3], int) else None
        cfg = self.config
        n_heads = cfg.get("num_attention_heads")
        self.kv_heads = heads or cfg.get("num_key_value_heads") or n_heads
        self.head_dim = hdim or cfg.get("head_dim") or (cfg.get("hidden_size", 0) // n_heads if n_heads else None)
        if not self.kv_heads or not self.head_dim:
            raise BadModelFile(f"Cannot tell the KV-cache shape of {model_file.name} from the graph or config.json.",
                               hint="Put the model's config.json beside it.")
        logits = outputs["logits"]
        self._logits_dtype = _ORT_TYPES.get(logits.type)
        if self._logits_dtype not in ("float32", "float16"):
            raise BadModelFile(f"{model_file.name} returns logits as {logits.type}, which this backend does not read.",
                               hint="Use an fp32, fp16 or weight-quantized export.")
        v = logits.shape[-1] if logits.shape else None
        self.n_vocab = v if isinstance(v, int) else int(cfg.get("vocab_size") or 0)
        # Graphs that score only the last position declare logits as [batch, 1, vocab].
        self._last_only = len(logits.shape or []) == 3 and logits.shape[1] == 1
        known = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position",
                 "num_logits_to_keep", "logits_to_keep", "use_cache_branch", *names}
        unknown = [n for n in inputs if n not in known]
        if unknown:
            raise BadModelFile(f"{model_file.name} needs inputs this backend does not know: {', '.join(unknown[:5])}.",
                               hint="Use an optimum / onnx-community decoder export.")
        self._inputs = set(inputs)
        self._keep_logits = next((n for n in ("num_logits_to_keep", "logits_to_keep") if n in inputs), None)
        if self._embeds:
            emb = inputs["inputs_embeds"]
            self._embeds_dtype = _ORT_TYPES.get(emb.type)
            h = emb.shape[-1] if emb.shape else None
            self._hidden = h if isinstance(h, int) else int(self.config.get("hidden_size") or 0)
            if self._embeds_dtype not in ("float32", "float16"):
                raise BadModelFile(f"{model_file.name} takes inputs_embeds as {emb.type}, which this backend does not feed.",
                                   hint="Use an fp32, fp16 or weight-quantized export.")
            self._ids_dtype = "int64"
        else:
            self._ids_dtype = _ORT_TYPES.get(inputs["input_ids"].type, "int64")

    def _shared_kv_capable(self, sess, dirs: list[Path]) -> bool:
        """Whether past and present may be one buffer: the graph says so (our fused builder writes
        ``edgevlm.kv_cache = shared``; onnxruntime-genai's builder writes ``past_present_share_buffer``
        into genai_config.json)."""
        try:
            meta = sess.get_modelmeta().custom_metadata_map or {}
        except Exception:
            meta = {}
        if meta.get("edgevlm.kv_cache") == "shared":
            return True
        gp = self._find(dirs, "genai_config.json")
        if gp is not None:
            try:
                return bool(read_json_object(gp).get("search", {}).get("past_present_share_buffer"))
            except BadModelFile:
                return False
        return False

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
        return self._vision_sess is not None

    def render(self, request: ChatRequest) -> str:
        """The prompt text. For a vision model every image is one ``<image>`` marker in it (expanded to the
        model's tile tokens by ``_prepare``)."""
        if self.has_vision:
            return self._render_vision(request)
        if any(m.images for m in request.messages):
            raise UsageError(
                f"{self.artifact.name if self.artifact else 'This ONNX model'} is a text-only ONNX model, "
                "so it cannot read images.",
                hint="Use a vision model: an Idefics3 / SmolVLM three-part ONNX export, or a GGUF vision model.",
            )
        if request.options.raw or not self.chat_template:
            parts = [m.content for m in request.messages if m.role != "system"]
            return parts[0] if len(parts) == 1 else "\n".join(parts)
        return render_chat(self.chat_template, request.messages, bos_token=self.bos_token, eos_token=self.eos_token)

    def _render_vision(self, request: ChatRequest) -> str:
        marker = self._processor.image_token
        n_images = sum(len(m.images) for m in request.messages)
        if request.options.raw or not self.chat_template:
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
            text = _compile(self.chat_template).render(messages=msgs, add_generation_prompt=True,
                                                        bos_token=self.bos_token, eos_token=self.eos_token)
            if text.count(marker) == n_images:
                return text
        except jinja2.exceptions.TemplateError:
            pass
        # Templates that take string content only: the image markers go in front of the text.
        return render_chat(self.chat_template, request.messages, bos_token=self.bos_token,
                           eos_token=self.eos_token, marker=marker)

    def _prompt_ids(self, request: ChatRequest) -> list[int]:
        text = self.render(request)
        if request.options.raw or not self.chat_template:
            # plain completion: the tokenizer's own rule (e.g. a BOS), unless the text already has it
            add = not (self.bos_token and text.startswith(self.bos_token))
            return self.tokenize(text, add_special=add)
        return self.tokenize(text, add_special=False)   # the template wrote the special tokens itself

    def _prepare(self, request: ChatRequest) -> tuple[list, list[int], list]:
        """Prompt -> (keys, ids, spans). ``keys`` name what each position holds (a token id, or
        ``(_IMG, sha256, offset)`` for an image position), ``ids`` are the token ids (``<image>`` at image
        positions) and ``spans`` list each image as (first position, positions, image, plan)."""
        images = [img for m in request.messages for img in m.images]
        if not images:
            ids = self._prompt_ids(request)
            return ids, ids, []
        proc = self._processor
        text = self.render(request)
        plans = self._choose_details(images, request.options.image_detail)
        try:
            text = proc.expand(text, plans)
        except ValueError as e:
            raise UsageError(f"Cannot place the images in the prompt: {e}.",
                             hint=f"Leave the text {proc.image_token} out of the prompt; attach images instead.") from e
        add = (request.options.raw or not self.chat_template) and not (self.bos_token and text.startswith(self.bos_token))
        ids = self.tokenize(text, add_special=add)
        img_id = self._image_token_id
        positions = [i for i, t in enumerate(ids) if t == img_id]
        want = sum(p.tiles for p in plans) * proc.image_seq_len
        if len(positions) != want:
            raise UsageError(f"The prompt holds {len(positions)} image positions where the images need {want}.",
                             hint=f"Leave the text {proc.image_token} out of the prompt; attach images instead.")
        keys: list = list(ids)
        spans, k = [], 0
        for img, plan in zip(images, plans):
            pos = positions[k: k + plan.tiles * proc.image_seq_len]
            image_id = f"{_image_id(img)}|{self._detail[_image_id(img)][0]}"
            for off, p in enumerate(pos):
                keys[p] = (_IMG, image_id, off)
            spans.append((pos, img, plan))
            k += len(pos)
        return keys, ids, spans

    # ------------------------------------------------------------------ vision
    def _embed(self, ids) -> "object":
        """Token embeddings [n, hidden] for ``ids`` (the embed_tokens graph)."""
        np = self._np
        arr = np.asarray(ids, dtype=self._embed_ids_dtype).reshape(1, -1)
        try:
            out = self._embed_sess.run([self._embed_out], {"input_ids": arr})[0]
        except Exception as e:
            raise BackendError(f"onnxruntime failed to embed the tokens: {str(e).splitlines()[0][:300]}",
                               hint="Run with VLM_DEBUG=1 for onnxruntime's log; the export may be broken.") from e
        return out[0]

    # ------------------------------------------------------------------ detail
    def _speed_key(self) -> str:
        return f"{self._encoder_id}:t{self.n_threads}"

    def _choose_details(self, images: list, detail) -> list:
        """Each image's plan at the detail chosen for it (``runtime/inputs/detail.py``); remembers the
        choice in ``self._detail`` for the encode and the report."""
        from ..inputs.detail import DEFAULT_BUDGET_S, EncodeSpeed, Option, choose, idefics3_ladder

        proc = self._processor
        seq = proc.image_seq_len
        cache = self._embed_cache(detail)
        speed = EncodeSpeed()
        spt = None
        if detail.level == "auto":
            spt = speed.get(self._speed_key())
            if spt is None:
                spt = self._calibrate(speed)
        budget = (detail.budget_s if detail.budget_s is not None else DEFAULT_BUDGET_S) / max(1, len(images))
        self._detail, plans = {}, []
        for img in images:
            iid = _image_id(img)
            hp = proc.plan(img.width, img.height)
            high = Option(proc.settings(), hp.tiles, hp.tiles * seq)
            edges = {high.settings: None}
            if proc.do_image_splitting and proc.do_resize and "longest_edge" in proc.size:
                def tiles_at(n: int):
                    le = n * proc.tile
                    st = proc.settings(le) if le != proc.longest_edge else high.settings
                    edges.setdefault(st, le if le != proc.longest_edge else None)
                    return proc.plan(img.width, img.height, le).tiles, st
                ladder = idefics3_ladder(img.width, img.height, proc.tile, proc.longest_edge, tiles_at, seq)
            else:
                ladder = [high]

            def cached(o: Option, iid=iid) -> bool:
                return (iid, o.settings) in self._features or (
                    cache is not None and cache.has(self._cache_key(iid, o.settings)))
            ch = choose(ladder, high, detail, s_per_tile=spt, budget_s=budget, cached=cached)
            le = edges.get(ch.option.settings)
            self._detail[iid] = (ch.option.settings, le, ch)
            plans.append(proc.plan(img.width, img.height, le))
        return plans

    def _calibrate(self, speed) -> Optional[float]:
        """Seconds per tile of this encoder here: one tile of a blank image through it (twice: the first run
        also plans memory), once per encoder, build and thread count (kept by EncodeSpeed)."""
        proc = self._processor
        t = proc.tile
        blank = ImageInput(rgb=bytes([128]) * (t * t * 3), width=t, height=t, source="(calibration)", sha256="")
        batch = proc.preprocess([blank], longest_edge=t)
        feeds = {"pixel_values": batch.pixel_values}
        if self._vision_mask:
            feeds["pixel_attention_mask"] = batch.pixel_attention_mask
        try:
            self._vision_sess.run([self._vision_out], feeds)     # the first run also plans its memory
            t0 = time.perf_counter()
            self._vision_sess.run([self._vision_out], feeds)
        except Exception:
            return None
        secs = time.perf_counter() - t0
        speed.record(self._speed_key(), batch.pixel_values.shape[1], secs)
        return secs / max(1, batch.pixel_values.shape[1])

    def _embed_cache(self, detail):
        from ..inputs.embed_cache import cache_for

        return cache_for(detail)

    def _cache_key(self, iid: str, settings: str) -> str:
        from ..inputs.embed_cache import entry_key

        return entry_key(self._encoder_id, iid, settings)

    # ------------------------------------------------------------------ vision
    def _image_features(self, img: ImageInput, plan, detail=None) -> tuple["object", float]:
        """The image's features [tiles * image_seq_len, hidden], from memory, the embedding cache or the
        vision encoder (tile batches of ``VLM_ONNX_TILE_BATCH``, default 1); returns them and the seconds
        spent encoding (0 when cached)."""
        from ..protocol import ImageDetail

        detail = detail or ImageDetail()
        iid = _image_id(img)
        settings, le, choice = self._detail.get(iid) or (self._processor.settings(), None, None)
        key = (iid, settings)
        rep = {"source": img.source, "detail": choice.level if choice else "high",
               "reason": choice.reason if choice else "", "cut": bool(choice and choice.cut),
               "tiles": plan.tiles, "tokens": plan.tiles * self._processor.image_seq_len, "encode_s": 0.0}
        self._report.append(rep)
        cache = self._embed_cache(detail)
        ckey = self._cache_key(iid, settings)
        feats = self._features.get(key)
        if feats is not None:
            self._features.move_to_end(key)
            rep["cache"] = "memory"
            if cache is not None and not cache.has(ckey):      # encoded earlier with --no-cache
                self._store(cache, ckey, feats, plan)
            return feats, 0.0
        np = self._np
        want = plan.tiles * self._processor.image_seq_len
        if cache is not None:
            hit = cache.get(ckey)
            if hit is not None and len(hit[0]) == 1 and hit[0][0].shape == (want, self._hidden):
                feats = hit[0][0]
                rep["cache"] = "hit"
                self._remember(key, feats)
                return feats, 0.0
        t0 = time.perf_counter()
        got_plan, batches = self._processor.tile_batches(img, le, self._tile_batch)
        outs = []
        for batch in batches:
            feeds = {"pixel_values": batch.pixel_values}
            if self._vision_mask:
                feeds["pixel_attention_mask"] = batch.pixel_attention_mask
            try:
                out = self._vision_sess.run([self._vision_out], feeds)[0]
            except Exception as e:
                raise BackendError(f"onnxruntime failed to encode image {img.source}: {str(e).splitlines()[0][:300]}",
                                   hint="Run with VLM_DEBUG=1 for onnxruntime's log; the export may be broken.") from e
            outs.append(out.reshape(-1, out.shape[-1]))
        feats = np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)
        if feats.shape[0] != want or feats.shape[1] != self._hidden or got_plan != plan:
            raise BadModelFile(
                f"The vision encoder gave {feats.shape[0]} x {feats.shape[1]} features for an image that takes "
                f"{want} positions of the decoder's {self._hidden}.",
                hint="preprocessor_config.json / processor_config.json do not belong to this model.",
            )
        secs = time.perf_counter() - t0
        rep["encode_s"] = round(secs, 4)
        rep["cache"] = "miss" if cache is not None else "off"
        from ..inputs.detail import EncodeSpeed

        EncodeSpeed().record(self._speed_key(), plan.tiles, secs)
        if cache is not None:
            self._store(cache, ckey, feats, plan)
        self._remember(key, feats)
        return feats, secs

    def _store(self, cache, ckey: str, feats, plan) -> None:
        why = cache.put(ckey, [feats], {"tiles": plan.tiles})
        if why:
            self._cache_warning = f"The image cache could not be written: {why}"

    def _remember(self, key, feats) -> None:
        self._features[key] = feats
        while len(self._features) > 1 and sum(f.nbytes for f in self._features.values()) > _FEATURE_CACHE_BYTES:
            self._features.popitem(last=False)

    def _prompt_embeds(self, ids: list[int], spans: list, start: int, detail=None) -> tuple["object", float]:
        """Embeddings of positions ``start:`` of the prompt: token embeddings, with image features scattered
        into the image positions. Returns them and the image-encode seconds."""
        np = self._np
        emb = np.array(self._embed(ids[start:]), dtype=np.float32)
        encode_s = 0.0
        for positions, img, plan in spans:
            if positions[-1] < start:
                continue                        # this image is entirely in the reused prefix
            feats, secs = self._image_features(img, plan, detail)
            encode_s += secs
            pos = np.asarray(positions)
            keep = pos >= start
            emb[pos[keep] - start] = feats[keep]
        return emb, encode_s

    # ------------------------------------------------------------------ KV cache
    # Two ways to hold the cache, chosen at load from what the graph says it supports:
    # * "concat" (any optimum / onnx-community export): the graph concatenates past and new keys into
    #   ``present``. The presents stay ORT values (allocated by ORT, never copied to numpy) and are bound
    #   as the next step's past.
    # * "shared" (graphs built on GroupQueryAttention that declare it, see ``_shared_kv_capable``): each
    #   layer's past and present are bound to one preallocated buffer of ``capacity`` positions; the
    #   operator appends the new keys in place, so a step copies nothing and all bindings but the three
    #   small inputs stay fixed. The buffer grows by doubling (rarely: log2 of the context).
    def reset(self) -> None:
        """Forget the KV cache (a new conversation)."""
        self._keys = []
        if self._sess is None:
            self._past, self._past_keep = [], []
            return
        if self._shared:
            return            # positions past len(self._keys) are ignored and overwritten
        np, ort = self._np, self._ort
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self._kv_dtype)
        self._past_keep = [empty]
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]

    def _reuse_prefix(self, keys: list[int]) -> int:
        n = max(0, min(common_prefix(self._keys, keys), len(keys) - 1))   # evaluate at least one token for logits
        if n == 0:
            self.reset()
        elif n < len(self._keys):
            if not self._shared:   # once a turn: slice the past down to the common prefix
                np, ort = self._np, self._ort
                keep = [np.ascontiguousarray(v.numpy()[:, :, :n, :]) for v in self._past]
                self._past_keep = keep
                self._past = [ort.OrtValue.ortvalue_from_numpy(a) for a in keep]
            del self._keys[n:]
        return n

    # the prompt cache's view of the past (prompt_cache.py): copies of the first len(_keys) positions
    def _state_size(self) -> int:
        return (len(self._past_names) * self.kv_heads * len(self._keys) * self.head_dim
                * self._np.dtype(self._kv_dtype).itemsize) if self._sess is not None else 0

    def _state_get(self, size: int):
        n = len(self._keys)
        if self._shared:
            return [b[:, :, :n].copy() for b in self._past_keep]
        return [v.numpy()[:, :, :n, :].copy() for v in self._past]

    def _state_set(self, data, size: int) -> bool:
        n = data[0].shape[2] if data else 0
        if len(data) != len(self._past_names) or n > self.n_ctx:
            return False
        if self._shared:
            self._keys = []                  # nothing of the old state is worth copying into bigger buffers
            self._ensure_capacity(n)
            for b, a in zip(self._past_keep, data):
                b[:, :, :n] = a
        else:
            self._past_keep = list(data)     # moved in: the cache no longer holds them
            self._past = [self._ort.OrtValue.ortvalue_from_numpy(a) for a in data]
        return True

    def _ensure_capacity(self, total: int) -> None:
        """Shared mode: make the per-layer buffers hold ``total`` positions (bound as past and present)."""
        if total <= self._capacity:
            return
        np, ort, io = self._np, self._ort, self._io
        cap = min(self.n_ctx, max(total, 2 * self._capacity, 256))
        n = len(self._keys)
        bufs = []
        for old in self._past_keep or [None] * len(self._past_names):
            b = np.zeros((1, self.kv_heads, cap, self.head_dim), dtype=self._kv_dtype)
            if old is not None and n:
                b[:, :, :n] = old[:, :, :n]
            bufs.append(b)
        self._past_keep = bufs
        self._past = [ort.OrtValue.ortvalue_from_numpy(b) for b in bufs]   # views of the numpy memory
        for past, present, value in zip(self._past_names, self._present_names, self._past):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        self._capacity = cap

    def _run(self, toks: list, embeds=None, all_rows: bool = False):
        """Evaluate ``toks`` (KV keys: token ids, or image keys with ``embeds``) after the cached ones;
        returns the logits row of the last one (a view), or with ``all_rows`` every position's rows
        [n, n_vocab] (graphs that can give them: see ``score``). Decoders taking ``inputs_embeds`` get
        ``embeds`` [n, hidden], or the token embeddings of ``toks`` when none are given."""
        np = self._np
        io = self._io
        n, p = len(toks), len(self._keys)
        total = p + n
        if self._shared:
            self._ensure_capacity(total)
        if self._embeds:
            if embeds is None:
                embeds = self._embed(toks)
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
        if not self._shared:
            for name, value in zip(self._past_names, self._past):
                io.bind_ortvalue_input(name, value)
            for name in self._present_names:
                io.bind_output(name, "cpu")
        try:
            self._sess.run_with_iobinding(io)
        except Exception as e:
            raise BackendError(f"onnxruntime failed to evaluate the model: {str(e).splitlines()[0][:300]}",
                               hint="Run with VLM_DEBUG=1 for onnxruntime's log; the export may be broken.") from e
        if not self._shared:
            outs = io.get_outputs()
            self._past = outs[1:]
            self._past_keep = []
            io.clear_binding_outputs()
            if self._logits_buf is None and not all_rows:
                logits = outs[0].numpy()
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
        self._report, self._cache_warning = [], None
        if self._embeds:
            embeds, image_s = self._prompt_embeds(ids, spans, reused, request.options.image_detail)
        self.image_report = _report(self._report, self._cache_warning) if spans else None
        self._last_row = self._prefill(keys[reused:], embeds)
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
        self._embed_sess = self._vision_sess = None
        self._features.clear()
        self._past, self._past_keep, self._keys = [], [], []
        self._capacity = 0
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
