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

from ..runtime.errors import BackendError, BadModelFile, ModelNotFound, UsageError, missing_extra
from ..runtime.protocol import ProgressCallback

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
        raise BadModelFile(f"optimum could not export {src.name} to ONNX: {str(e).splitlines()[0][:300]}",
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


# ------------------------------------------------------------------------------------------ int4 recipe
# What `--to onnx:int4` writes, and why (issue 20; measured on SmolLM2-135M, figures in docs/quantize-output.md):
# * MatMulNBits zero points are whole numbers, so a block whose minimum is not a multiple of its step is
#   shifted as a whole by up to half a step. RTN (min/max) int4 lost 40% top-1 that way; a weighted
#   least-squares search for each block's scale and zero point (llama.cpp's make_qkx idea: try a few
#   scales, refit scale and offset, keep the best) halves the loss. Float zero points would be exact
#   but take onnxruntime's unpacked path: 12x slower decode.
# * Weighted by input-channel importance when the caller has an importance matrix (``--calibration``,
#   the same one GGUF targets use), else by |w| (k-quant's default weighting).
# * recipe "mixed", like Q4_K_M's mix: the most sensitive tensors -- the lm_head (with the tied embedding),
#   the attention q/k/v projections and the MLP down projection of the first and last layers -- as
#   8-bit MatMulNBits, the rest 4-bit.
# * share_tied_embedding: a tied token embedding is not stored twice: GatherBlockQuantized reads the
#   lm_head's own quantized blocks (same bytes, same blocks along the hidden axis) under a second
#   initializer name whose external-data entry points at the same bytes of the data file. (Reading the
#   lm_head's initializer itself cost 0.87x decode: onnxruntime does not prepack a weight two nodes read.)
#   It frees ~1 bit/w on a small model with a big vocabulary, which the 8-bit tensors then spend.
# * recipe "gptq" (issue 20, second round; asked for by name): GPTQ error compensation
#   (``gptq_blocks``) with each layer input's second moments from the calibration text, the attention
#   input projections at 8 bits, the tied embedding shared.
# "int4": 4-bit everywhere, searched (meets the size and speed of the RTN recipe); "mixed" adds the
# 8-bit tensors (better answers, 6.66 bits/w and ~0.9x decode).
INT4_RECIPES = ("gptq", "mixed", "int4", "rtn")   # int4: every MatMul 4-bit, searched; rtn: the pre-issue-20 recipe
_GPTQ_RECIPES = ("gptq",)
# "gptq": the attention input projections at 8 bits (SmolLM2: KL 0.166 -> 0.090 for +0.43 bits/w), the rest
# 4-bit with GPTQ, the tied embedding stored once with the lm_head's blocks.
_GPTQ_8BIT_ROLES = ("q_proj", "k_proj", "v_proj", "qkv_proj")
_HIGH_PRECISION_ROLES = ("lm_head", "q_proj", "k_proj", "v_proj", "qkv_proj")
_EDGE_LAYER_ROLES = ("down_proj", "fc2")


def _node_path(name: str) -> str:
    """``/model/layers.3/self_attn/q_proj/MatMul`` or ``/model.layers.3.self_attn.qkv_proj/MatMul`` ->
    ``model.layers.3.self_attn.q_proj`` (qkv_proj)."""
    parts = [p for p in name.strip("/").split("/") if p]
    if parts and parts[-1].startswith("MatMul"):
        parts = parts[:-1]
    return ".".join(parts)


def _layer_index(path: str) -> Optional[int]:
    bits = path.split(".")
    for i, b in enumerate(bits[:-1]):
        if b in ("layers", "layer", "h", "blocks") and bits[i + 1].isdigit():
            return int(bits[i + 1])
    return None


def int4_recipe(recipe: str, importance: Optional[dict]) -> str:
    """``"auto"``: the searched recipe when an importance matrix (--calibration) weights the search, else
    min/max rounding ("rtn"). Without calibration the search was not measured better on every prompt
    (SmolLM2's " Paris" turned into another token) and costs minutes of numpy per 100M weights, so it
    stays opt-in there. "gptq" is asked for by name: better answers than "int4" and a smaller file, but
    its 8-bit q/k/v decode ~0.85-0.9x, below issue 20's 0.95x (docs/quantize-output.md)."""
    if recipe == "auto":
        return "int4" if importance else "rtn"
    if recipe not in INT4_RECIPES:
        raise UsageError(f"Unknown int4 recipe {recipe!r}.", hint=f"Use one of {', '.join(INT4_RECIPES)}, or auto.")
    return recipe


def int4_bits_plan(names: list[str], recipe: str = "mixed") -> dict[str, int]:
    """MatMul node name -> bits (4 or 8) for ``recipe``. Roles are read from the names our exporters
    write (fused builder, optimum, the vision parts): lm_head, q/k/v (or packed qkv), down_proj/fc2."""
    if recipe not in INT4_RECIPES:
        raise UsageError(f"Unknown int4 recipe {recipe!r}.", hint=f"Use one of {', '.join(INT4_RECIPES)}.")
    plan = {n: 4 for n in names}
    if recipe == "gptq":
        for n in names:
            if _node_path(n).rsplit(".", 1)[-1] in _GPTQ_8BIT_ROLES:
                plan[n] = 8
        return plan
    if recipe != "mixed":
        return plan
    layers = [i for i in (_layer_index(_node_path(n)) for n in names) if i is not None]
    n_layers = max(layers) + 1 if layers else 0
    edge = max(1, n_layers // 6)
    for n in names:
        path = _node_path(n)
        role = path.rsplit(".", 1)[-1]
        layer = _layer_index(path)
        if role in _HIGH_PRECISION_ROLES or path.endswith("lm_head"):
            plan[n] = 8
        elif role in _EDGE_LAYER_ROLES and layer is not None and (layer < edge or layer >= n_layers - edge):
            plan[n] = 8
    return plan


def importance_for(names_k: dict[str, int], importance: Optional[dict]) -> dict:
    """Match an importance matrix keyed by Hugging Face tensor names (``model.layers.3.mlp.down_proj.weight``
    -> mean squared input activation per input channel, what ``verify.collect_imatrix`` returns) to MatMul
    nodes by the last four parts of their paths (``layers.3.mlp.down_proj``; ``lm_head``), which the fused
    builder, optimum and the vision exporter all keep. Packed projections (qkv, gate_up) take their first
    member's vector: they share its input. Only vectors of length K are kept."""
    import numpy as np

    if not importance:
        return {}

    def tail(path: str) -> str:
        return "lm_head" if path.endswith("lm_head") else ".".join(path.split(".")[-4:])

    by_tail = {tail(k[:-len(".weight")] if k.endswith(".weight") else k): v for k, v in importance.items()}
    aliases = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}
    out = {}
    for name, k in names_k.items():
        path = _node_path(name)
        head, _, role = path.rpartition(".")
        for cand in (path, f"{head}.{aliases[role]}" if role in aliases else None):
            vec = by_tail.get(tail(cand)) if cand else None
            if vec is not None and np.asarray(vec).size == k:
                out[name] = np.asarray(vec, dtype=np.float32).reshape(-1)
                break
    return out


def _fit_blocks(x, wgt, maxq: int):
    """Weighted least-squares scale and integer zero point for each row of ``x`` [rows, block]: start from
    min/max, try ``maxq + d`` steps over the range (d in -1..1), refit scale and offset by weighted least
    squares, round the zero point, refit the scale, keep the best. Returns q (0..maxq), scale, zero (ints)."""
    import numpy as np

    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    rng = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    sw = wgt.sum(-1, keepdims=True)
    best = None
    for d in np.arange(-1.0, 1.01, 0.1, dtype=np.float32):
        q = np.clip(np.rint((x - lo) * ((maxq + d) / rng)), 0, maxq)
        sq, sqq = (wgt * q).sum(-1, keepdims=True), (wgt * q * q).sum(-1, keepdims=True)
        sx, sqx = (wgt * x).sum(-1, keepdims=True), (wgt * q * x).sum(-1, keepdims=True)
        det = sw * sqq - sq * sq
        ok = det > 1e-30
        s = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), rng / maxq)
        off = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), lo)
        s = np.where(s > 0, s, rng / maxq)
        z = np.clip(np.rint(-off / s), 0, maxq)
        q = np.clip(np.rint(x / s + z), 0, maxq)
        c = q - z
        scc = (wgt * c * c).sum(-1, keepdims=True)
        s = np.where(scc > 0, (wgt * c * x).sum(-1, keepdims=True) / np.where(scc > 0, scc, 1), s)
        s = np.where(s > 0, s, rng / maxq)
        q = np.clip(np.rint(x / s + z), 0, maxq)
        err = (wgt * ((q - z) * s - x) ** 2).sum(-1, keepdims=True)
        if best is None:
            best = [err, q, s, z]
        else:
            better = err < best[0]
            for i, v in enumerate((err, q, s, z)):
                best[i] = np.where(better, v, best[i])
    return best[1], best[2], best[3]


def quantize_blocks(wt, bits: int, block: int, importance=None, chunk: int = 4096):
    """A MatMul weight [K, N] -> MatMulNBits inputs: B uint8 [N, K/block, block*bits/8] (two 4-bit values a
    byte, low nibble first), scales float32 [N, K/block], packed zero points uint8 [N * ceil(K/block * bits/8)].
    Blocks run along K (one column's consecutive input channels), as the kernel reads them."""
    import numpy as np

    K, N = wt.shape
    kb = -(-K // block)
    maxq = (1 << bits) - 1
    imp = None
    if importance is not None:
        imp = np.zeros(kb * block, np.float32)
        imp[:K] = np.maximum(np.asarray(importance, np.float32), 0)
        if not np.any(imp > 0):
            imp = None
    q_all = np.empty((N, kb, block), np.uint8)
    s_all = np.empty((N, kb), np.float32)
    z_all = np.empty((N, kb), np.uint8)
    for c0 in range(0, N, chunk):
        cols = np.asarray(wt[:, c0:c0 + chunk], dtype=np.float32).T          # [n, K]
        n = cols.shape[0]
        if kb * block != K:
            cols = np.pad(cols, ((0, 0), (0, kb * block - K)))
        x = cols.reshape(n * kb, block)
        if imp is not None:        # the error a weight causes ~ its input's mean square (the imatrix)
            w = np.array(np.broadcast_to(imp.reshape(1, kb, block), (n, kb, block)).reshape(n * kb, block))
        else:                      # llama.cpp's weighting without an imatrix: favours the large weights
            w = np.sqrt((x * x).mean(-1, keepdims=True) + x * x)
        if kb * block != K:                                          # padding must not pull the fit
            pad = np.zeros((kb * block,), np.float32)
            pad[:K] = 1
            w = w * np.broadcast_to(pad.reshape(1, kb, block), (n, kb, block)).reshape(n * kb, block)
        q, s, z = _fit_blocks(x, w, maxq)
        q_all[c0:c0 + n] = q.reshape(n, kb, block)
        s_all[c0:c0 + n] = s.reshape(n, kb)
        z_all[c0:c0 + n] = z.reshape(n, kb)
    return _pack(q_all, s_all, z_all, bits)


def hessians_for(names_k: dict[str, int], importance: Optional[dict]) -> dict:
    """MatMul node name -> its input's second moment ``mean(x x^T)`` [K, K], matched like ``importance_for``
    from the ``hessians`` an ``ImportanceMatrix`` (``verify.collect_imatrix``) carries; {} without them."""
    hs = getattr(importance, "hessians", None) if importance else None
    if not hs:
        return {}
    flat = {k: v.reshape(-1) for k, v in hs.items()}      # views: matched on size K*K like the vectors
    got = importance_for({n: k * k for n, k in names_k.items()}, flat)
    return {n: v.reshape(names_k[n], names_k[n]) for n, v in got.items()}


def gptq_blocks(wt, bits: int, block: int, hessian, *, damp: float = 0.01, step: int = 128):
    """``quantize_blocks`` with GPTQ's error compensation (Frantar et al. 2022): input channels are
    quantized one at a time in order, and each one's rounding error, divided by its diagonal of the
    inverse Hessian's Cholesky factor, is spread over the channels not yet quantized in proportion to
    how their inputs correlate (``hessian`` = the input's ``mean(x x^T)`` from calibration text), so the
    layer's output error rather than its weight error is what the rounding minimises. Each block's scale and
    integer zero point are fitted (``_fit_blocks``, weighted by the Hessian's diagonal) on the weights
    as updated when the block is reached. Same outputs as ``quantize_blocks``."""
    import numpy as np

    K, N = wt.shape
    if K % block:
        return quantize_blocks(wt, bits, block, np.diag(hessian))
    maxq = (1 << bits) - 1
    W = np.array(wt, dtype=np.float32)                         # [K, N]: GPTQ's columns are our rows
    H = np.array(hessian, dtype=np.float64)
    diag = np.diag(H).copy()
    dead = diag <= 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(K)] += damp * float(np.mean(diag[~dead])) if np.any(~dead) else damp
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T             # upper factor of H^-1
    except np.linalg.LinAlgError:
        H[np.diag_indices(K)] += 0.1 * float(np.mean(np.diag(H)))
        U = np.linalg.cholesky(np.linalg.inv(H)).T
    U = U.astype(np.float32)
    imp = np.maximum(diag, 0).astype(np.float32)
    Q = np.empty((K, N), np.uint8)
    kb = K // block
    S = np.empty((kb, N), np.float32)
    Z = np.empty((kb, N), np.float32)
    step = max(block, step - step % block)
    for i1 in range(0, K, step):
        i2 = min(i1 + step, K)
        W1 = W[i1:i2]                                          # a view: updated in place
        E1 = np.empty((i2 - i1, N), np.float32)
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                x = np.ascontiguousarray(W1[i:i + block].T)       # [N, block]
                w8 = np.broadcast_to(imp[col:col + block] + 1e-12, x.shape)
                _, s, z = _fit_blocks(x, w8, maxq)
                s, z = s[:, 0], z[:, 0]
                S[col // block], Z[col // block] = s, z
            w = W1[i]
            q = np.clip(np.rint(w / s + z), 0, maxq)
            Q[col] = q
            err = (w - (q - z) * s) / U[col, col]
            E1[i] = err
            if i + 1 < i2 - i1:
                W1[i + 1:] -= np.outer(U[col, col + 1:i2], err)
        if i2 < K:
            W[i2:] -= U[i1:i2, i2:].T @ E1
    q_all = np.ascontiguousarray(Q.T).reshape(N, kb, block)
    s_all, z_all = np.ascontiguousarray(S.T), np.ascontiguousarray(Z.T).astype(np.uint8)
    return _pack(q_all, s_all, z_all, bits)


def _pack(q_all, s_all, z_all, bits: int):
    """[N, K/block, block] levels, [N, K/block] scales and integer zero points -> MatMulNBits' inputs."""
    import numpy as np

    N, kb = s_all.shape
    if bits == 4:
        packed = q_all[..., 0::2] | (q_all[..., 1::2] << 4)
        zz = z_all if kb % 2 == 0 else np.concatenate([z_all, np.full((N, 1), 8, np.uint8)], 1)
        zp = (zz[:, 0::2] | (zz[:, 1::2] << 4)).reshape(-1)
    else:
        packed, zp = q_all, z_all.reshape(-1)
    return packed.astype(np.uint8), s_all.astype(np.float32), zp.astype(np.uint8), z_all


def _wide_block(k: int, block_size: int) -> int:
    """8-bit tensors take the widest block (up to 256) that divides K: the scale costs 32/block bits a weight,
    and 8-bit steps are fine enough that wider blocks cost next to nothing in accuracy."""
    for b in (256, 128, 64, 32, 16):
        if b >= block_size and k % b == 0:
            return b
    return block_size


def _quantize_int4(model, block_size: int, accuracy_level: int, recipe: str, importance: Optional[dict],
                   quantize_embeddings: bool, share_tied_embedding: bool = False,
                   bits_plan: Optional[dict] = None):
    """The int4 recipe (see the comment above ``INT4_RECIPES``) applied to ``model`` in place."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    targets = []
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            t = inits[n.input[1]]
            if len(t.dims) == 2 and t.data_type == onnx_float():
                targets.append(n)
    ks = {n.name: int(inits[n.input[1]].dims[0]) for n in targets}
    plan = int4_bits_plan(list(ks), recipe)
    if bits_plan:
        plan.update({n: b for n, b in bits_plan.items() if n in plan})
    imps = importance_for(ks, importance)
    hs = hessians_for(ks, importance) if recipe in _GPTQ_RECIPES else {}
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
               and inits[n.input[0]].data_type == onnx_float()]
    tables = {n.input[0]: numpy_helper.to_array(inits[n.input[0]]) for n in gathers}

    replaced: dict[str, list] = {}
    drop: set[str] = set()
    tied: dict[str, tuple] = {}          # embedding table name -> (B, scales, unpacked zero points, bits, block, K)
    aliases: dict[str, str] = {}        # initializer -> the one whose bytes it shares on disk
    for n in targets:
        wt = numpy_helper.to_array(inits[n.input[1]])
        K, N = wt.shape
        bits = plan[n.name]
        block = block_size if bits == 4 else _wide_block(K, block_size)
        if n.name in hs:
            packed, scales, zp, z = gptq_blocks(wt, bits, block, hs[n.name])
        else:
            packed, scales, zp, z = quantize_blocks(wt, bits, block, imps.get(n.name))
        base = n.input[1]
        names = (f"{base}_Q{bits}", f"{base}_scales", f"{base}_zero_points")
        g.initializer.extend([numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scales, names[1]),
                              numpy_helper.from_array(zp, names[2])])
        replaced[n.name] = [helper.make_node("MatMulNBits", [n.input[0], *names], list(n.output),
                                             name=n.name + f"_Q{bits}", domain="com.microsoft", K=K, N=N,
                                             bits=bits, block_size=block, accuracy_level=accuracy_level)]
        drop.add(base)
        if share_tied_embedding and K % block == 0:
            for tname, table in tables.items():
                if tname not in tied and table.shape == (N, K) and np.array_equal(table, wt.T):
                    tied[tname] = (names[0], names[1], z, bits, block, K, N)
        del wt
    for n in gathers:
        tname = n.input[0]
        if tname in tied:
            # The lm_head's own blocks, under names of their own that point at the same bytes of the data
            # file (``_save_external``): one copy on disk, while onnxruntime still prepacks the lm_head's
            # weight (it does not prepack an initializer that two nodes read: 0.87x decode).
            b_name, s_name, z, bits, block, K, N = tied[tname]
            inits_now = {t.name: t for t in g.initializer}
            for name in (b_name, s_name):
                alias = onnx.TensorProto()
                alias.CopyFrom(inits_now[name])
                alias.name = f"{name}/embedding"
                g.initializer.append(alias)
                aliases[alias.name] = name
            b_name, s_name = f"{b_name}/embedding", f"{s_name}/embedding"
        elif quantize_embeddings:
            table = tables[tname]
            bits, block = 4, block_size
            if table.shape[1] % block:
                continue
            N, K = table.shape
            packed, scales, _, z = quantize_blocks(np.ascontiguousarray(table.T), bits, block)
            b_name, s_name = f"{tname}_Q{bits}", f"{tname}_scales"
            g.initializer.extend([numpy_helper.from_array(packed, b_name), numpy_helper.from_array(scales, s_name)])
        else:
            continue
        p = f"/edgevlm/embed/{tname}"
        kb = K // block
        g.initializer.extend([numpy_helper.from_array(z.reshape(N, kb, 1).astype(np.uint8), f"{tname}_zero_points3"),
                              numpy_helper.from_array(np.array([N, kb, 1], np.int64), f"{p}/scales_shape"),
                              numpy_helper.from_array(np.array([K], np.int64), f"{p}/width")])
        # data [V, K/block, block*bits/8] (the MatMulNBits layout) -> [..., K/block, block] -> [..., K]
        replaced[n.name or p] = [
            helper.make_node("Reshape", [s_name, f"{p}/scales_shape"], [f"{p}/scales"], name=f"{p}/Reshape_scales"),
            helper.make_node("GatherBlockQuantized", [b_name, n.input[1], f"{p}/scales", f"{tname}_zero_points3"],
                             [f"{p}/blocks"], name=f"{p}/GatherBlockQuantized", domain="com.microsoft",
                             gather_axis=0, quantize_axis=2, block_size=block, bits=bits),
            helper.make_node("Shape", [n.input[1]], [f"{p}/ids_shape"], name=f"{p}/Shape"),
            helper.make_node("Concat", [f"{p}/ids_shape", f"{p}/width"], [f"{p}/out_shape"], name=f"{p}/Concat",
                             axis=0),
            helper.make_node("Reshape", [f"{p}/blocks", f"{p}/out_shape"], list(n.output), name=f"{p}/Reshape"),
        ]
        if not n.name:
            n.name = p
        drop.add(tname)
    if aliases:
        meta = {p.key: p for p in model.metadata_props}
        entry = meta.get(_ALIASES_KEY) or model.metadata_props.add(key=_ALIASES_KEY)
        entry.value = json.dumps({**json.loads(entry.value or "{}"), **aliases})
    new_nodes = []
    for n in g.node:
        new_nodes.extend(replaced.get(n.name, [n]) if n.name else [n])
    g.ClearField("node")
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name not in drop or t.name in used]
    g.ClearField("initializer")
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def onnx_float() -> int:
    import onnx

    return onnx.TensorProto.FLOAT


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


# metadata_props key: JSON {initializer: initializer} of tensors stored once in the data file and read
# under two names (a tied embedding and the lm_head: see ``_quantize_int4``).
_ALIASES_KEY = "edgevlm.tensor_aliases"


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
                  share_tied_embedding: Optional[bool] = None) -> Path:
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
      (``gptq_blocks``), the attention q/k/v projections at 8 bits. ``share_tied_embedding`` (default: on for "gptq"): a tied embedding is read by
      ``GatherBlockQuantized`` from the lm_head's quantized blocks, stored once in the data file under two
      initializer names (onnxruntime still prepacks the lm_head's). ``recipe="rtn"``: the recipe before
      issue 20, ``MatMulNBitsQuantizer`` min/max rounding (``symmetric`` applies to it only), kept to
      measure against; ``"auto"``: gptq / int4 / rtn by what ``importance`` holds (``int4_recipe``).

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
            share = recipe == "gptq" if share_tied_embedding is None else share_tied_embedding
            qmodel = _quantize_int4(model, block_size, accuracy_level, recipe, importance, quantize_embeddings,
                                    share)
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
