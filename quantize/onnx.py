"""Hugging Face decoder checkpoint -> ONNX (fp32) -> int8 / int4, in the layout the ONNX backend runs.

The layout is optimum's / onnx-community's: one ``model.onnx`` (plus ``model.onnx_data`` when the
weights pass 2 GB) taking ``input_ids``, ``attention_mask``, ``position_ids`` (optimum's exports; the
fused builder's graphs place positions from the cache length) and ``past_key_values.{i}.key|value``,
returning ``logits`` and ``present.{i}.key|value``, next to ``config.json``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json`` and the chat template. Quantized variants are written beside it under onnx-community's names
(``model_int8.onnx``, ``model_q4.onnx``) or wherever the caller says.

Two exporters fill that layout (``export_decoder(method=...)``): optimum's tracer for any decoder it
knows, and ``build_fused_decoder`` for Llama-family models, which writes the graph from the safetensors
with onnxruntime's fused operators -- about 11 nodes a layer instead of ~110 and a KV cache that
can stay in one buffer; on SmolLM2-135M int4 at 2 threads it decodes ~2.5x faster than the traced graph.

Library code: no prints, no exits; progress through ``on_progress(stage, done, total)``; heavy
imports (torch, optimum, onnx, onnxruntime.quantization) inside the functions that need them.
Every output is written under a temporary name and renamed into place once complete, so an
interrupted run never leaves a file that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Literal, Optional

from ..runtime.errors import BackendError, BadModelFile, ModelNotFound, UsageError, first_line, missing_extra
from ..runtime.protocol import ProgressCallback
from .onnx_int4 import (_ALIASES_KEY, INT4_RECIPES, _fit_blocks, _quantize_int4, gptq_blocks,  # noqa: F401
                        hessians_for, importance_for, int4_bits_plan, int4_recipe, onnx_float, quantize_blocks)

# What travels with every .onnx file so the directory is a complete artifact for the ONNX backend.
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
)
# onnx-community's file names for the variants we make.
VARIANT_NAMES = {"fp32": "model.onnx", "int8": "model_int8.onnx", "int4": "model_q4.onnx"}
_QUANTIZED_OPS = {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "GatherBlockQuantized", "QLinearMatMul",
                  "MatMulIntegerToFloat", "DequantizeLinear"}
_TWO_GB = 2 * 1024 ** 3 - 64 * 1024 ** 2    # protobuf's limit, with headroom for the graph itself
# Every graph we write keeps its weights in ``<file>_data`` beside it: onnxruntime reads a single-file
# model into memory and holds the protobuf and the tensors made from it at once while the session is
# built, but takes external data without that copy. Peak RSS of SmolLM2-135M loading, single file vs
# external data: fp32 929-1119 vs 703 MiB, int8 386 vs 296, int4 292 vs 231.
_EXTERNAL_THRESHOLD = 1024               # tensors of at least this many bytes go to the data file


def _progress(cb: Optional[ProgressCallback], stage: str, done: int, total: Optional[int]) -> None:
    if cb is not None:
        cb(stage, done, total)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch / transformers / optimum / onnxruntime's quantizers warn and log freely (the int4 quantizer
    logs every node at INFO); a library stays quiet. VLM_DEBUG=1 lets it all through."""
    if os.environ.get("VLM_DEBUG", "") not in ("", "0"):
        yield
        return
    before = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(before)


def _copy_sidecars(src: Path, dst: Path, overwrite: bool) -> None:
    for name in SIDECAR_FILES:
        s = src / name
        if s.is_file() and (overwrite or not (dst / name).exists()) and s.resolve() != (dst / name).resolve():
            shutil.copy2(s, dst / name)


def keep_last_logits(model) -> bool:
    """Rewrite a decoder so it scores only the last position: slice the hidden states to the last row
    before the lm_head MatMul, and declare ``logits`` as [batch, 1, vocab]. Generation never needs more,
    and scoring every prompt position costs a fifth of a small model's prefill and a vocab-wide row of
    memory per prompt token. Returns False (model untouched) when the graph does not end in a MatMul."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    out = next((o for o in g.output if o.name == "logits"), None)
    idx = next((i for i, n in enumerate(g.node) if "logits" in n.output), None)
    if out is None or idx is None or g.node[idx].op_type != "MatMul":
        return False
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 3 or (dims[1].HasField("dim_value") and dims[1].dim_value == 1):
        return False
    head = g.node[idx]
    hidden, sliced = head.input[0], head.input[0] + "/last_position"
    consts = {"starts": -1, "ends": np.iinfo(np.int64).max, "axes": 1}
    names = {}
    for key, val in consts.items():
        names[key] = f"edgevlm_last_logits_{key}"
        g.initializer.append(numpy_helper.from_array(np.array([val], dtype=np.int64), names[key]))
    node = helper.make_node("Slice", [hidden, names["starts"], names["ends"], names["axes"]], [sliced],
                            name="/edgevlm/last_position/Slice")
    head.input[0] = sliced
    g.node.insert(idx, node)
    dims[1].Clear()
    dims[1].dim_value = 1
    meta = {p.key: p for p in model.metadata_props}
    if "edgevlm.logits" not in meta:
        model.metadata_props.append(onnx.StringStringEntryProto(key="edgevlm.logits", value="last"))
    return True


def _check_checkpoint(src: Path, out: Path, overwrite: bool) -> dict:
    """The checkpoint's config.json, after the checks every builder makes (see ``gguf._checkpoint_config``),
    and an output directory that is new or empty unless ``overwrite``."""
    from .gguf import _checkpoint_config

    cfg = _checkpoint_config(src)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already exists and is not empty.", hint="Choose another output directory, or remove it.")
    return cfg


def export_decoder(src_dir: str | Path, out_dir: str | Path, on_progress: Optional[ProgressCallback] = None,
                   *, method: Literal["auto", "fused", "optimum"] = "auto", opset: Optional[int] = None,
                   overwrite: bool = False, last_logits_only: bool = True) -> Path:
    """Export the HF decoder checkpoint in ``src_dir`` to fp32 ONNX with KV-cache inputs/outputs.

    Two ways, one layout (the inputs and outputs keep optimum's names and meaning):

    * ``"optimum"``: optimum's ``main_export`` with task ``text-generation-with-past`` (torch tracing; any
      decoder architecture optimum knows). With ``last_logits_only`` (default) the graph is then cut to
      score only the last position (``keep_last_logits``), which is all generation needs.
    * ``"fused"``: ``build_fused_decoder`` writes the graph directly from the safetensors with
      onnxruntime's fused decoder operators (GroupQueryAttention with rotary embedding,
      SkipSimplifiedLayerNormalization); ~11 nodes a layer instead of ~110, and a KV cache that can live
      in one preallocated buffer. Llama-family architectures only (``FUSED_ARCHITECTURES``); no torch.
    * ``"auto"`` (default): ``"fused"`` when the architecture is supported, else ``"optimum"``.

    Returns the path of ``out_dir/model.onnx``. ``out_dir`` is built in a temporary directory beside it
    and renamed into place; an existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    src, out = Path(src_dir).expanduser(), Path(out_dir).expanduser()
    cfg = _check_checkpoint(src, out, overwrite)
    if method not in ("auto", "fused", "optimum"):
        raise UsageError(f"Unknown export method {method!r}.", hint="Use auto, fused or optimum.")
    if method == "auto":
        method = "fused" if fused_unsupported_reason(cfg) is None else "optimum"
    elif method == "fused":
        reason = fused_unsupported_reason(cfg)
        if reason:
            raise UsageError(f"The fused ONNX builder cannot export {src.name}: {reason}.",
                             hint="Use the optimum export (method='optimum').")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if method == "fused":
            model = build_fused_decoder(src, tmp, cfg, on_progress)
        else:
            model = _export_optimum(src, tmp, opset, last_logits_only, on_progress)
        # The source's own files are the truth (optimum re-saves config/tokenizer in its own way).
        _copy_sidecars(src, tmp, overwrite=True)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / model.name


def _export_optimum(src: Path, tmp: Path, opset: Optional[int], last_logits_only: bool,
                    on_progress: Optional[ProgressCallback]) -> Path:
    try:
        with _quiet():
            from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise missing_extra("optimum-onnx", extra="quantize") from e
    _progress(on_progress, "export", 0, 1)
    try:
        with _quiet():
            main_export(str(src), str(tmp), task="text-generation-with-past", opset=opset,
                        do_validation=False, local_files_only=True, device="cpu")
    except (KeyError, ValueError, NotImplementedError) as e:
        raise BadModelFile(f"optimum could not export {src.name} to ONNX: {first_line(e)[:300]}",
                           hint="Only decoder architectures optimum supports can be exported "
                                "(`optimum-cli export onnx --help`); VLM_DEBUG=1 shows the log.") from e
    model = tmp / "model.onnx"
    if not model.is_file():
        raise BackendError(f"optimum did not write model.onnx for {src.name}.",
                           hint="Run with VLM_DEBUG=1 to see optimum's log.")
    _progress(on_progress, "export", 1, 1)
    _progress(on_progress, "optimize", 0, 1)
    import onnx

    data = model.with_name(model.name + "_data")
    if data.exists():                  # optimum moved the weights out itself (over 2 GB)
        m = onnx.load(str(model), load_external_data=False)   # external weights stay where they are
        if last_logits_only and keep_last_logits(m):
            onnx.save_model(m, str(model))
    else:                              # a single file: move the weights out (see _EXTERNAL_THRESHOLD)
        m = onnx.load(str(model))
        if last_logits_only:
            keep_last_logits(m)
        _save_external(m, model)
    del m
    _progress(on_progress, "optimize", 1, 1)
    return model


# ------------------------------------------------------------------------------------------ fused builder
FUSED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ROPE_TYPES = (None, "default", "linear", "llama3")


def fused_unsupported_reason(cfg: dict) -> Optional[str]:
    """Why ``build_fused_decoder`` cannot build this config (None: it can)."""
    archs = cfg.get("architectures") or []
    if not any(a in FUSED_ARCHITECTURES for a in archs):
        return f"architecture {', '.join(archs) or 'unknown'} is not one of {', '.join(FUSED_ARCHITECTURES)}"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"activation {cfg.get('hidden_act')!r} is not silu"
    rs = cfg.get("rope_scaling") or None
    rtype = (rs or {}).get("rope_type", (rs or {}).get("type"))
    if rtype not in _ROPE_TYPES:
        return f"rope scaling {rtype!r} is not supported"
    if cfg.get("quantization_config"):
        return "the checkpoint is already quantized"
    return None


class _SafeTensors:
    """Reads (sharded) safetensors as float32 numpy arrays without torch (bf16 and f16 widened)."""

    _DTYPES = {"F32": "float32", "F16": "float16", "BF16": "uint16"}

    def __init__(self, src: Path) -> None:
        import numpy as np

        self.np = np
        index = src / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
        if not files:
            raise BadModelFile(f"{src} has no *.safetensors weights.",
                               hint="The fused builder reads safetensors; use method='optimum' for *.bin checkpoints.")
        self.entries: dict[str, tuple] = {}
        for name in files:
            path = src / name
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                mm = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise BadModelFile(f"{path.name} is not a readable safetensors file: {e}",
                                   hint="Download the checkpoint again.") from e
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                self.entries[key] = (mm, 8 + n, meta)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str):
        np = self.np
        if key not in self.entries:
            raise BadModelFile(f"The checkpoint has no tensor {key}.", hint="Is this the full checkpoint?")
        mm, base, meta = self.entries[key]
        dt = self._DTYPES.get(meta["dtype"])
        if dt is None:
            raise BadModelFile(f"Tensor {key} is stored as {meta['dtype']}.", hint="Use a float checkpoint.")
        a, b = meta["data_offsets"]
        raw = np.frombuffer(mm[base + a: base + b], dtype=dt).reshape(meta["shape"])
        if dt == "uint16":   # bfloat16: the high half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


def _rope_caches(cfg: dict, head_dim: int, n_pos: int):
    """cos/sin caches [n_pos, head_dim/2] the way transformers computes them (float32)."""
    import math

    import numpy as np

    base = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    rs = cfg.get("rope_scaling") or {}
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype == "linear":
        inv = inv / float(rs["factor"])
    elif rtype == "llama3":
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    freqs = np.arange(n_pos, dtype=np.float32)[:, None] * inv[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def build_fused_decoder(src: Path, out_dir: Path, cfg: dict, on_progress: Optional[ProgressCallback] = None, *,
                        inputs_embeds: bool = False, prefix: str = "model") -> Path:
    """Write ``out_dir/model.onnx`` for a Llama-family checkpoint with onnxruntime's fused operators.

    Per layer: SkipSimplifiedLayerNormalization -> one MatMul for packed Q/K/V -> GroupQueryAttention
    (rotary inside, KV cache in/out) -> MatMul -> SkipSimplifiedLayerNormalization -> gate/up MatMuls,
    SiLU, down MatMul. The interface is optimum's (``input_ids``, ``attention_mask``,
    ``past_key_values.{i}.key|value`` -> ``logits`` [batch, 1, vocab], ``present.{i}.key|value``) without
    ``position_ids``, as onnxruntime-genai's models have it: GroupQueryAttention places the rotary from the
    cache length, which is right for one unpadded sequence, and per token that path was ~1-2% quicker
    than reading position ids. Optimum's runners look the input up before feeding it, so they still run
    it. Gate and up are one MatMul (one kernel call over [gate | up], then a Split): quantized per
    output column, so int4/int8 weights are the same as two separate MatMuls', and decode is ~3% quicker
    (fewer, larger calls into the thread pool). The metadata ``edgevlm.kv_cache = shared`` tells a runner it
    may also bind each past and present to one max-length buffer (GroupQueryAttention then appends in
    place instead of copying the cache every step).

    ``inputs_embeds=True`` builds the decoder of a vision-language model: it takes ``inputs_embeds``
    [batch, seq, hidden] (token embeddings with image features scattered in, made by the caller) instead of
    ``input_ids`` and holds no embedding table (unless the lm_head is tied to it). ``prefix`` is where the
    text model's tensors live in the checkpoint (``model.text_model`` for Idefics3 / SmolVLM); the lm_head
    is ``lm_head.weight`` either way.
    """
    import numpy as np

    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise missing_extra("onnx", extra="quantize") from e

    L = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    n_pos = int(cfg.get("max_position_embeddings") or 4096)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    window = int(window) if window and int(window) < n_pos else -1
    w = _SafeTensors(src)
    embed_name = f"{prefix}.embed_tokens.weight"
    head_name = "lm_head.weight" if "lm_head.weight" in w else embed_name      # else tied to the embeddings
    vocab = int(w.entries[head_name][2]["shape"][0]) if head_name in w else int(w.get(head_name).shape[0])

    nodes: list = []
    inits: list = []

    def init(name: str, arr) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, ins: list, outs: list, name: str, domain: str = "", **attrs) -> list:
        nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        return outs

    def linear(x: str, prefix: str, weights: list[str], biases: Optional[list[str]] = None) -> str:
        wt = np.concatenate([w.get(k) for k in weights], axis=0).T   # [in, out]
        out = node("MatMul", [x, init(f"{prefix}.weight", wt)], [f"/{prefix}/MatMul/output_0"], f"/{prefix}/MatMul")[0]
        if biases and all(b in w for b in biases):
            b = np.concatenate([w.get(k) for k in biases])
            out = node("Add", [out, init(f"{prefix}.bias", b)], [f"/{prefix}/Add/output_0"], f"/{prefix}/Add")[0]
        return out

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    graph_inputs = [
        helper.make_tensor_value_info("inputs_embeds", f32, ["batch_size", "sequence_length", hidden]) if inputs_embeds
        else helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
    ]
    graph_outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", 1, vocab])]
    for i in range(L):
        for kv in ("key", "value"):
            graph_inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", f32, ["batch_size", kv_heads, "past_sequence_length", head_dim]))
            graph_outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", f32, ["batch_size", kv_heads, "present_sequence_length", head_dim]))

    # GroupQueryAttention's view of the mask: seqlens_k = tokens so far - 1, total_sequence_length.
    init("/const/axis1", np.array([1], dtype=np.int64))
    init("/const/one", np.array(1, dtype=np.int64))
    node("ReduceSum", ["attention_mask", "/const/axis1"], ["/mask/sum"], "/mask/ReduceSum", keepdims=0)
    node("Sub", ["/mask/sum", "/const/one"], ["/mask/sub"], "/mask/Sub")
    node("Cast", ["/mask/sub"], ["/mask/seqlens_k"], "/mask/Cast", to=i32)
    node("Shape", ["attention_mask"], ["/mask/shape"], "/mask/Shape")
    node("Gather", ["/mask/shape", "/const/one"], ["/mask/total"], "/mask/Gather", axis=0)
    node("Cast", ["/mask/total"], ["/mask/total_seq_len"], "/mask/Cast_1", to=i32)
    inter = int(cfg.get("intermediate_size") or w.get(f"{prefix}.layers.0.mlp.gate_proj.weight").shape[0])
    init("/const/gate_up_split", np.array([inter, inter], dtype=np.int64))
    cos, sin = _rope_caches(cfg, head_dim, n_pos)
    init("cos_cache", cos)
    init("sin_cache", sin)

    if inputs_embeds:
        x = "inputs_embeds"
    else:
        node("Gather", [init(embed_name, w.get(embed_name)), "input_ids"], ["/model/embed_tokens/output_0"],
             "/model/embed_tokens/Gather", axis=0)
        x = "/model/embed_tokens/output_0"
    residual, last_out = None, None
    for i in range(L):
        p = f"{prefix}.layers.{i}"
        _progress(on_progress, "build", i, L)
        ln_in = init(f"{p}.input_layernorm.weight", w.get(f"{p}.input_layernorm.weight"))
        normed = f"/{p}/input_layernorm/output_0"
        if i == 0:
            node("SimplifiedLayerNormalization", [x, ln_in], [normed], f"/{p}/input_layernorm/LayerNorm",
                 axis=-1, epsilon=eps, stash_type=1)
            residual = x
        else:
            res = f"/{p}/input_layernorm/residual"
            node("SkipSimplifiedLayerNormalization", [last_out, residual, ln_in], [normed, "", "", res],
                 f"/{p}/input_layernorm/SkipLayerNorm", domain="com.microsoft", epsilon=eps)
            residual = res
        a = f"{p}.self_attn"
        qkv = linear(normed, f"{a}.qkv_proj", [f"{a}.{n}_proj.weight" for n in "qkv"],
                     [f"{a}.{n}_proj.bias" for n in "qkv"])
        gqa_out = f"/{a}/GroupQueryAttention/output_0"
        node("GroupQueryAttention",
             [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "/mask/seqlens_k",
              "/mask/total_seq_len", "cos_cache", "sin_cache"],
             [gqa_out, f"present.{i}.key", f"present.{i}.value"], f"/{a}/GroupQueryAttention",
             domain="com.microsoft", num_heads=n_heads, kv_num_heads=kv_heads, do_rotary=1,
             rotary_interleaved=0, local_window_size=window)
        o = linear(gqa_out, f"{a}.o_proj", [f"{a}.o_proj.weight"], [f"{a}.o_proj.bias"])
        ln_post = init(f"{p}.post_attention_layernorm.weight", w.get(f"{p}.post_attention_layernorm.weight"))
        normed2, res2 = f"/{p}/post_attention_layernorm/output_0", f"/{p}/post_attention_layernorm/residual"
        node("SkipSimplifiedLayerNormalization", [o, residual, ln_post], [normed2, "", "", res2],
             f"/{p}/post_attention_layernorm/SkipLayerNorm", domain="com.microsoft", epsilon=eps)
        residual = res2
        m = f"{p}.mlp"
        gate_up = linear(normed2, f"{m}.gate_up_proj", [f"{m}.gate_proj.weight", f"{m}.up_proj.weight"],
                         [f"{m}.gate_proj.bias", f"{m}.up_proj.bias"])
        gate, up = node("Split", [gate_up, "/const/gate_up_split"], [f"/{m}/gate", f"/{m}/up"], f"/{m}/Split", axis=-1)
        node("Sigmoid", [gate], [f"/{m}/act/sigmoid"], f"/{m}/act/Sigmoid")
        node("Mul", [gate, f"/{m}/act/sigmoid"], [f"/{m}/act/output_0"], f"/{m}/act/Mul")
        node("Mul", [f"/{m}/act/output_0", up], [f"/{m}/Mul/output_0"], f"/{m}/Mul")
        last_out = linear(f"/{m}/Mul/output_0", f"{m}.down_proj", [f"{m}.down_proj.weight"], [f"{m}.down_proj.bias"])
    _progress(on_progress, "build", L, L)

    node("SkipSimplifiedLayerNormalization", [last_out, residual, init(f"{prefix}.norm.weight", w.get(f"{prefix}.norm.weight"))],
         ["/model/norm/output_0"], "/model/norm/SkipLayerNorm", domain="com.microsoft", epsilon=eps)
    init("/const/last_start", np.array([-1], dtype=np.int64))
    init("/const/last_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    node("Slice", ["/model/norm/output_0", "/const/last_start", "/const/last_end", "/const/axis1"],
         ["/model/norm/last_position"], "/edgevlm/last_position/Slice")
    head = w.get(head_name)
    node("MatMul", ["/model/norm/last_position", init("lm_head.weight", np.ascontiguousarray(head.T))], ["logits"],
         "/lm_head/MatMul")

    graph = helper.make_graph(nodes, "edgevlm-fused-decoder", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="edgevlm", opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    for k, v in {"edgevlm.kv_cache": "shared", "edgevlm.logits": "last", "edgevlm.builder": "fused-v2",
                 "edgevlm.architecture": ",".join(cfg.get("architectures") or [])}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    _progress(on_progress, "save", 0, 1)
    path = out_dir / "model.onnx"
    _save_external(model, path)
    _progress(on_progress, "save", 1, 1)
    return path


def _resolve_input(model_dir_or_file: str | Path) -> Path:
    p = Path(model_dir_or_file).expanduser()
    if p.is_dir():
        from ..runtime.formats.onnx_files import pick_model_file

        return pick_model_file(p)
    if not p.is_file():
        raise ModelNotFound(f"No such ONNX model: {p}", hint="Pass a .onnx file or the directory that holds model.onnx.")
    return p


def _has_constant_gather(model) -> bool:
    """A Gather whose table is an initializer (an embedding lookup) is in the main graph."""
    inits = {t.name for t in model.graph.initializer}
    return any(n.op_type == "Gather" and n.input and n.input[0] in inits for n in model.graph.node)




def _save_external(model, path: Path) -> None:
    """``model`` to ``path`` with its weights in ``<name>_data`` beside it (see ``_EXTERNAL_THRESHOLD``);
    the data file gets the graph's permissions (onnx creates it owner-only). Initializers listed under
    ``_ALIASES_KEY`` are written once: the alias's external-data entry points at its target's bytes."""
    import onnx

    data = path.with_name(path.name + "_data")
    meta = {p.key: p.value for p in model.metadata_props}
    aliases = json.loads(meta.get(_ALIASES_KEY) or "{}")
    held = {}
    inits = model.graph.initializer
    for i in reversed(range(len(inits)) if aliases else ()):
        if inits[i].name in aliases:
            held[inits[i].name] = onnx.TensorProto()
            held[inits[i].name].CopyFrom(inits[i])
            del inits[i]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=_EXTERNAL_THRESHOLD)
    if held:
        targets = {t.name: t for t in model.graph.initializer}
        for name, t in held.items():
            target = targets.get(aliases[name])
            if target is not None and target.data_location == onnx.TensorProto.EXTERNAL:
                alias = onnx.TensorProto()
                alias.CopyFrom(target)                   # dims, type and the same location/offset/length
                alias.name = name
                model.graph.initializer.append(alias)
            else:                                        # small enough to stay inline: a copy
                model.graph.initializer.append(t)
        onnx.save_model(model, str(path))
    if data.exists():
        shutil.copymode(path, data)


def _weights_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _save(model, out: Path) -> None:
    """Write ``model`` to ``out`` atomically: into a temp dir beside it, then renamed (data file first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        data_name = out.name + "_data"
        _save_external(model, tmp / out.name)
        if (tmp / data_name).exists():
            os.replace(tmp / data_name, out.parent / data_name)
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_onnx(model_dir_or_file: str | Path, out_file: str | Path, kind: Literal["int8", "int4"] = "int8",
                  block_size: int = 32, on_progress: Optional[ProgressCallback] = None, *,
                  symmetric: bool = False, accuracy_level: int = 4, quantize_embeddings: bool = True,
                  recipe: str = "auto", importance: Optional[dict] = None,
                  share_tied_embedding: Optional[bool] = None, offset_roles: Optional[tuple] = None,
                  eight_bit_roles: Optional[tuple] = None) -> Path:
    """Quantize an fp32/fp16 ONNX decoder's weights.

    * ``int8``: ``MatMulNBitsQuantizer(bits=8, block_size, symmetric)`` for every MatMul with a constant
      weight (activations quantized per block at run time with ``accuracy_level=4``), and the token
      embedding as int8 through ``quantize_dynamic`` (Gather + DequantizeLinear).
    * ``int4`` (``recipe="int4"``): blockwise 4-bit ``MatMulNBits`` (``block_size``, asymmetric,
      ``accuracy_level=4``: the kernel computes in int8, the fast path on VNNI / dot-product CPUs) with
      each block's scale and zero point found by a weighted least-squares search, weighted by
      ``importance`` when given (Hugging Face tensor name -> mean squared input activation per input
      channel: the importance matrix ``--calibration`` computes for GGUF targets), every MatMul; the token
      embedding as 4-bit ``GatherBlockQuantized`` blocks found the same way. ``recipe="mixed"``: also
      the lm_head, the attention q/k/v projections and the first and last layers' MLP down projections
      as 8-bit ``MatMulNBits`` (the widest block up to 256 dividing K): better answers, bigger and slower
      (figures in docs/quantize-output.md). ``recipe="gptq"`` (``importance`` must be an
      ``ImportanceMatrix`` with second moments: ``verify.source_reference(..., hessians=True)``; tensors
      without one fall back to the search): every 4-bit MatMul quantized with GPTQ's error compensation
      (``gptq_blocks``), the attention q/k/v projections at 8 bits. ``recipe="offset"``: each 4-bit block
      with a float minimum, the part its integer zero point cannot hold carried by extra input rows (the
      input's block means, see ``quantize/onnx_int4.py``), for the MatMuls whose role is in ``offset_roles``
      (default all), the lm_head at 8 bits (``eight_bit_roles`` replaces that); with GPTQ on top
      (``gptq_offset_blocks``) when ``importance`` carries second moments. ``share_tied_embedding`` (default: on for "gptq" and "offset"): a tied embedding is read by
      ``GatherBlockQuantized`` from the lm_head's quantized blocks, stored once in the data file under two
      initializer names (onnxruntime still prepacks the lm_head's). ``recipe="rtn"``: the recipe before
      issue 20, ``MatMulNBitsQuantizer`` min/max rounding (``symmetric`` applies to it only), kept to
      measure against; ``"auto"``: "offset", with or without ``importance`` (``int4_recipe``).

    ``out_file`` gets the sidecar files (config, tokenizer, chat template) copied next to it when it is
    written to another directory, so its directory is a complete artifact. Returns ``out_file``.
    """
    if kind not in ("int8", "int4"):
        raise UsageError(f"Unknown ONNX quantization {kind!r}.", hint="Use int8 or int4.")
    recipe = int4_recipe(recipe, importance)
    if block_size < 16 or block_size & (block_size - 1):
        raise UsageError(f"Block size {block_size} is not a power of two >= 16.", hint="Use 32 (default), 64 or 128.")
    src = _resolve_input(model_dir_or_file)
    out = Path(out_file).expanduser()
    if out.suffix != ".onnx":
        raise UsageError(f"{out.name} does not end in .onnx.", hint="Name the output like model_q4.onnx.")
    if out.resolve() == src.resolve():
        raise UsageError("The output would overwrite the input model.", hint="Write to another file name.")
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise missing_extra("onnxruntime.quantization", extra="quantize") from e

    _progress(on_progress, "load", 0, 1)
    try:
        model = onnx.load(str(src), load_external_data=True)
    except Exception as e:
        raise BadModelFile(f"{src.name} is not a readable ONNX model: {e}",
                           hint="Re-export it (`vlm quantize --to onnx`) or download it again.") from e
    _progress(on_progress, "load", 1, 1)
    done = sorted({n.op_type for n in model.graph.node} & _QUANTIZED_OPS)
    if done:
        raise UsageError(f"{src.name} is already quantized (it has {', '.join(done)} nodes).",
                         hint="Quantize the full-precision model.onnx instead.")

    _progress(on_progress, f"quantize {kind}", 0, 1)
    with _quiet():
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)
        except ImportError as e:  # onnx_ir is needed by the n-bit quantizer
            raise missing_extra("onnx_ir", extra="quantize") from e
        if kind == "int8":
            # Blockwise 8-bit weights (MatMulNBits bits=8, symmetric, one fp32 scale per block); with
            # accuracy_level=4 the kernel quantizes activations per block at run time. Per-tensor
            # dynamic quantization (quantize_dynamic's MatMulInteger) was measured on SmolLM2-135M at
            # 54% top-1 agreement / KL 0.61 with its source: one activation scale per tensor cannot
            # hold the outlier channels of small LLMs. Blockwise: 93% / KL 0.006 (q8_0: 96% / 0.004).
            cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                               accuracy_level=accuracy_level, bits=8, op_types_to_quantize=("MatMul",),
                                               quant_axes=(("MatMul", 0),))
            q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, algo_config=cfg)
            q.process()
            qmodel = q.model.model
            del model
            if quantize_embeddings and _has_constant_gather(qmodel):
                # Embedding lookups: int8 per tensor (a lookup has no activations to quantize; a
                # Gather -> DequantizeLinear pair), which alone saves a quarter of a small model's file.
                with tempfile.TemporaryDirectory(prefix=".q8.", dir=out.parent if out.parent.exists() else None) as td:
                    tin, tout = Path(td) / "in.onnx", Path(td) / "out.onnx"
                    external = _weights_bytes(qmodel) > _TWO_GB
                    onnx.save_model(qmodel, str(tin), save_as_external_data=external, location="in.onnx_data")
                    del qmodel
                    # DefaultTensorType: onnx's shape inference cannot type the outputs of onnxruntime's
                    # fused operators (GroupQueryAttention, MatMulNBits, ...), and they are all float here.
                    quantize_dynamic(str(tin), str(tout), weight_type=QuantType.QInt8, per_channel=False,
                                     use_external_data_format=external, op_types_to_quantize=["Gather"],
                                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
                    qmodel = onnx.load(str(tout), load_external_data=True)
        elif recipe != "rtn":
            share = recipe in ("gptq", "offset") if share_tied_embedding is None else share_tied_embedding
            qmodel = _quantize_int4(model, block_size, accuracy_level, recipe, importance, quantize_embeddings,
                                    share, offset_roles=offset_roles, eight_bit_roles=eight_bit_roles)
            del model
        else:
            # Embedding lookups too (GatherBlockQuantized, halves a small model's file) when the graph is
            # already at opset 21, which int4 tensors need; older graphs keep float embeddings rather
            # than being force-upgraded.
            opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
            ops = ("MatMul", "Gather") if quantize_embeddings and opset >= 21 else ("MatMul",)
            cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                               accuracy_level=accuracy_level, bits=4, op_types_to_quantize=ops,
                                               quant_axes=(("MatMul", 0), ("Gather", 1)))
            q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, algo_config=cfg)
            q.process()
            qmodel = q.model.model
    _progress(on_progress, f"quantize {kind}", 1, 1)

    _progress(on_progress, "save", 0, 1)
    _save(qmodel, out)
    if out.parent.resolve() != src.parent.resolve():
        _copy_sidecars(src.parent, out.parent, overwrite=False)
    _progress(on_progress, "save", 1, 1)
    return out


__all__ = ["export_decoder", "quantize_onnx", "keep_last_logits", "build_fused_decoder", "fused_unsupported_reason",
           "int4_bits_plan", "importance_for", "hessians_for", "quantize_blocks", "gptq_blocks", "int4_recipe",
           "FUSED_ARCHITECTURES", "INT4_RECIPES",
           "SIDECAR_FILES", "VARIANT_NAMES"]
