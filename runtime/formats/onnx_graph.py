"""What an ONNX decoder graph declares: its inputs and outputs read off an onnxruntime session (names,
element types, static shapes), checked against the Hugging Face / optimum / onnx-community decoder layout.
No engine import: the caller passes the session's ``get_inputs()`` / ``get_outputs()`` (objects with
``name``, ``type`` and ``shape``).

* a graph taking ``input_ids`` [batch, seq] (int64) -- or ``inputs_embeds`` for the decoder of a three-part
  vision model -- optionally ``attention_mask``, ``position_ids``, ``cache_position``,
  ``num_logits_to_keep`` / ``logits_to_keep`` and ``use_cache_branch`` (old merged decoders), plus
  ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim]; returning ``logits`` and
  ``present.{i}.key|value`` [batch, kv_heads, past + seq, head_dim].
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import BadModelFile

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


@dataclass
class DecoderGraph:
    """The decoder's declared interface. Field names are the backend's attribute names (``ONNXBackend``
    takes them over one by one)."""

    _embeds: bool = False             # takes inputs_embeds instead of input_ids
    _inputs: set = field(default_factory=set)
    _past_names: list = field(default_factory=list)
    _present_names: list = field(default_factory=list)
    _kv_dtype: Optional[str] = None
    _logits_dtype: Optional[str] = None
    _embeds_dtype: Optional[str] = None
    _ids_dtype: str = "int64"
    _keep_logits: Optional[str] = None    # num_logits_to_keep | logits_to_keep
    _last_only: bool = False              # logits declared [batch, 1, vocab]
    _hidden: int = 0
    n_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    n_vocab: int = 0


def read_decoder_graph(session_inputs, session_outputs, model_file: Path, config: dict) -> DecoderGraph:
    """The graph's interface, or BadModelFile naming what makes it unusable (no KV cache, unknown inputs,
    unsupported dtypes)."""
    g = DecoderGraph()
    inputs = {i.name: i for i in session_inputs}
    outputs = {o.name: o for o in session_outputs}
    g._embeds = "input_ids" not in inputs and "inputs_embeds" in inputs
    if "input_ids" not in inputs and not g._embeds:
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
    g.n_layers = len(names) // 2
    g._past_names = names
    g._present_names = []
    for n in names:
        out = n.replace("past_key_values", "present")
        if out not in outputs:
            raise BadModelFile(f"{model_file.name} takes {n} but has no {out} output.",
                               hint="Use an optimum / onnx-community decoder export.")
        g._present_names.append(out)
    first = inputs[names[0]]
    g._kv_dtype = ORT_TYPES.get(first.type)
    if g._kv_dtype not in ("float32", "float16"):
        raise BadModelFile(f"{model_file.name} keeps its KV cache as {first.type}, which this backend does not run.",
                           hint="Use an fp32, fp16 or weight-quantized export.")
    shape = first.shape
    heads = shape[1] if isinstance(shape[1], int) else None
    hdim = shape[3] if isinstance(shape[3], int) else None
    cfg = config
    n_heads = cfg.get("num_attention_heads")
    g.kv_heads = heads or cfg.get("num_key_value_heads") or n_heads
    g.head_dim = hdim or cfg.get("head_dim") or (cfg.get("hidden_size", 0) // n_heads if n_heads else None)
    if not g.kv_heads or not g.head_dim:
        raise BadModelFile(f"Cannot tell the KV-cache shape of {model_file.name} from the graph or config.json.",
                           hint="Put the model's config.json beside it.")
    logits = outputs["logits"]
    g._logits_dtype = ORT_TYPES.get(logits.type)
    if g._logits_dtype not in ("float32", "float16"):
        raise BadModelFile(f"{model_file.name} returns logits as {logits.type}, which this backend does not read.",
                           hint="Use an fp32, fp16 or weight-quantized export.")
    v = logits.shape[-1] if logits.shape else None
    g.n_vocab = v if isinstance(v, int) else int(cfg.get("vocab_size") or 0)
    # Graphs that score only the last position declare logits as [batch, 1, vocab].
    g._last_only = len(logits.shape or []) == 3 and logits.shape[1] == 1
    known = {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position",
             "num_logits_to_keep", "logits_to_keep", "use_cache_branch", *names}
    unknown = [n for n in inputs if n not in known]
    if unknown:
        raise BadModelFile(f"{model_file.name} needs inputs this backend does not know: {', '.join(unknown[:5])}.",
                           hint="Use an optimum / onnx-community decoder export.")
    g._inputs = set(inputs)
    g._keep_logits = next((n for n in ("num_logits_to_keep", "logits_to_keep") if n in inputs), None)
    if g._embeds:
        emb = inputs["inputs_embeds"]
        g._embeds_dtype = ORT_TYPES.get(emb.type)
        h = emb.shape[-1] if emb.shape else None
        g._hidden = h if isinstance(h, int) else int(config.get("hidden_size") or 0)
        if g._embeds_dtype not in ("float32", "float16"):
            raise BadModelFile(f"{model_file.name} takes inputs_embeds as {emb.type}, which this backend does not feed.",
                               hint="Use an fp32, fp16 or weight-quantized export.")
        g._ids_dtype = "int64"
    else:
        g._ids_dtype = ORT_TYPES.get(inputs["input_ids"].type, "int64")
    return g


__all__ = ["DecoderGraph", "read_decoder_graph", "ORT_TYPES"]
