"""Idefics3 / SmolVLM checkpoint -> three ONNX graphs (onnx-community's layout) -> int8 / int4 variants.

optimum cannot export these models. The vision encoder and the token embeddings are traced with
``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``) from small wrappers around the
checkpoint's own modules; the decoder is written by ``quantize.onnx.build_fused_decoder`` straight from the
safetensors (the text model is a Llama: GroupQueryAttention, KV cache in a shared buffer, the fused decoder
text models get; ``decoder="traced"`` traces it too, as before, and text models the builder does not know
fall back to that):

``out_dir/onnx/vision_encoder.onnx``
    ``pixel_values`` [batch, num_images, 3, tile, tile] float32 and ``pixel_attention_mask``
    [batch, num_images, tile, tile] bool -> ``image_features`` [num_images, image_seq_len, text_hidden]:
    the vision tower, the connector's pixel shuffle and the projection into the text model's space.
    ``tile`` is fixed at ``vision_config.image_size`` (what the image processor's tiles always are);
    all-zero padding images are dropped, as transformers does.
``out_dir/onnx/embed_tokens.onnx``
    ``input_ids`` [batch, seq] int64 -> ``inputs_embeds`` [batch, seq, text_hidden].
``out_dir/onnx/decoder_model_merged.onnx``
    ``inputs_embeds`` [batch, seq, text_hidden], ``attention_mask`` [batch, past + seq] int64,
    ``past_key_values.{i}.key|value`` [batch, kv_heads, past, head_dim] -> ``logits`` [batch, 1, vocab]
    (last position only: all generation needs) and ``present.{i}.key|value``. The fused decoder has no
    ``position_ids`` (GroupQueryAttention places the rotary from the cache length: Idefics3's positions
    are the plain 0..n-1 of one sequence) and declares ``edgevlm.kv_cache = shared``, so the runtime binds
    past and present to one buffer per layer; the traced one takes ``position_ids`` [batch, seq] and
    concatenates the cache inside the graph.

Beside ``onnx/`` (in ``out_dir``): the checkpoint's config, generation config, tokenizer, processor
configs and chat template, so the folder is a complete artifact for the ONNX backend.

``quantize_vision`` writes ``*_int8.onnx`` (8-bit blockwise ``MatMulNBits`` plus int8 ``Gather``) or
``*_q4.onnx`` (4-bit ``MatMulNBits``, plus ``GatherBlockQuantized`` for the token embeddings, whose
graph is exported at opset 21 for that)
next to the fp32 parts, through ``quantize.onnx.quantize_onnx`` one part at a time.

Library code: no prints, progress through ``on_progress(stage, done, total)``, heavy imports inside
functions, and the output directory is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal, Optional

from ..runtime.errors import BackendError, BadModelFile, EdgeVLMError, ModelNotFound, UsageError, first_line, missing_extra
from ..runtime.protocol import ProgressCallback
from .onnx import _check_checkpoint, _progress, _quiet, _save, keep_last_logits, quantize_onnx

SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm")
PARTS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
# onnx-community's suffixes for the quantized variants.
VARIANT_SUFFIX = {"fp32": "", "int8": "_int8", "int4": "_q4"}
# Everything the runtime (tokenizer, chat template, image processor) needs, copied beside onnx/.
VISION_SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json",
)
_OPSET = 18            # the TorchScript exporter's well-trodden range
DECODERS = ("auto", "fused", "traced")
# Where an Idefics3 / SmolVLM checkpoint keeps its text model's tensors (lm_head.weight sits at the top).
_TEXT_PREFIXES = ("model.text_model", "text_model", "model.language_model")
_EMBED_OPSET = 21      # int4 embeddings (GatherBlockQuantized) need int4 tensors, i.e. opset 21


def _model_class(model_type: str):
    try:
        if model_type == "smolvlm":
            from transformers import SmolVLMForConditionalGeneration as cls
        else:
            from transformers import Idefics3ForConditionalGeneration as cls
    except ImportError as e:
        raise missing_extra("transformers", extra="quantize") from e
    return cls


def _wrappers(model):
    """The three torch modules to trace, built around ``model``'s own submodules."""
    import torch
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask

    inner = model.model
    vcfg = model.config.vision_config

    class VisionEncoder(torch.nn.Module):
        """``get_image_features`` in trace-friendly form: the per-image Python loop that buckets patch
        positions becomes tensor arithmetic (same float32 operations, so the same position ids)."""

        def __init__(self) -> None:
            super().__init__()
            self.vision = inner.vision_model
            self.connector = inner.connector
            self.patch = int(vcfg.patch_size)
            self.per_side = int(vcfg.image_size) // int(vcfg.patch_size)

        def forward(self, pixel_values, pixel_attention_mask):
            b, n, c, h, w = pixel_values.shape
            pv = pixel_values.reshape(b * n, c, h, w)
            mask = pixel_attention_mask.reshape(b * n, h, w)
            real = (pv == 0.0).sum(dim=(-1, -2, -3)) != c * h * w      # drop all-zero padding images
            pv, mask = pv[real], mask[real]
            m, p = pv.shape[0], self.patch
            hp, wp = h // p, w // p
            patch_mask = mask.reshape(m, hp, p, wp, p).to(torch.int64).sum(dim=(2, 4)) > 0

            emb = self.vision.embeddings
            x = emb.patch_embedding(pv).flatten(2).transpose(1, 2)
            boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side)
            nb_h = patch_mask[:, :, 0].sum(dim=1)
            nb_w = patch_mask[:, 0, :].sum(dim=1)
            h_idx = torch.arange(hp, dtype=pv.dtype)
            w_idx = torch.arange(wp, dtype=pv.dtype)
            frac_h = h_idx[None, :] / nb_h[:, None] * (1 - 1e-6)
            frac_w = w_idx[None, :] / nb_w[:, None] * (1 - 1e-6)
            # torch.bucketize(x, boundaries, right=True) == number of boundaries <= x
            bucket_h = (frac_h[..., None] >= boundaries).sum(dim=-1)
            bucket_w = (frac_w[..., None] >= boundaries).sum(dim=-1)
            pos = bucket_h[:, :, None] * self.per_side + bucket_w[:, None, :]
            pos = torch.where(patch_mask, pos, torch.zeros_like(pos)).reshape(m, hp * wp)
            x = x + emb.position_embedding(pos)

            attn = _prepare_4d_attention_mask(patch_mask.reshape(m, hp * wp), x.dtype)
            hidden = self.vision.encoder(inputs_embeds=x, attention_mask=attn).last_hidden_state
            hidden = self.vision.post_layernorm(hidden)
            return self.connector(hidden)

    class EmbedTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = inner.text_model.get_input_embeddings()

        def forward(self, input_ids):
            return self.embed(input_ids)

    class Decoder(torch.nn.Module):
        """The text model and lm_head over ``inputs_embeds``, with the KV cache as flat tensors. The causal
        mask is built here (a 4D mask passes through transformers untouched) so that no shape-dependent
        shortcut of transformers' mask helpers is frozen into the trace."""

        def __init__(self) -> None:
            super().__init__()
            self.text = inner.text_model
            self.lm_head = model.lm_head

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            q = inputs_embeds.shape[1]
            total = attention_mask.shape[1]
            kv_idx = torch.arange(total)
            q_idx = torch.arange(q) + (total - q)
            allowed = (kv_idx[None, :] <= q_idx[:, None])[None, None] & attention_mask[:, None, None, :].bool()
            mask = torch.where(allowed, torch.zeros((), dtype=inputs_embeds.dtype),
                               torch.full((), torch.finfo(inputs_embeds.dtype).min, dtype=inputs_embeds.dtype))
            cache = DynamicCache.from_legacy_cache(tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)))
            out = self.text(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True, return_dict=True)
            logits = self.lm_head(out.last_hidden_state)
            flat = []
            for k, v in out.past_key_values.to_legacy_cache():
                flat += [k, v]
            return (logits, *flat)

    return VisionEncoder().eval(), EmbedTokens().eval(), Decoder().eval()


def _read_config(src: Path, out: Path, overwrite: bool) -> dict:
    cfg = _check_checkpoint(src, out, overwrite)
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"{src.name} is a {mtype or 'unknown'} model; the vision ONNX export handles "
            f"{' and '.join(SUPPORTED_MODEL_TYPES)} (SmolVLM architecture) only.",
            hint="Export text-only decoders with `export_decoder`, or convert other vision models to GGUF.",
        )
    for key in ("text_config", "vision_config"):
        if not isinstance(cfg.get(key), dict):
            raise BadModelFile(f"{src / 'config.json'} has no {key}.", hint="Fetch the checkpoint again.")
    if not (src / "preprocessor_config.json").is_file():
        raise BadModelFile(f"{src} has no preprocessor_config.json, which the runtime needs to prepare images.",
                           hint="Download the checkpoint's preprocessor_config.json (and processor_config.json).")
    return cfg


def _export_one(module, args: tuple, path: Path, input_names: list, output_names: list, dynamic_axes: dict,
                opset: int) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def _finish(raw: Path, final: Path, transform=None) -> None:
    """Load an exported graph (with any external weights torch wrote), apply ``transform`` and save it
    as one file (or one file plus ``<name>_data`` past 2 GB)."""
    import onnx

    model = onnx.load(str(raw), load_external_data=True)
    if transform is not None:
        model = transform(model) or model
    _save(model, final)


def _to_opset(model, version: int):
    import onnx
    from onnx import version_converter

    current = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if current >= version:
        return model
    converted = version_converter.convert_version(model, version)
    onnx.checker.check_model(converted)
    return converted


def _fused_text(model, src: Path, decoder: str) -> Optional[tuple[dict, str]]:
    """(text config, tensor prefix) when ``build_fused_decoder`` can write this checkpoint's decoder and
    ``decoder`` allows it; None for the traced export (``decoder="fused"`` refuses instead)."""
    from .onnx import _SafeTensors, fused_unsupported_reason

    if decoder not in DECODERS:
        raise UsageError(f"Unknown decoder export {decoder!r}.", hint=f"Use one of {', '.join(DECODERS)}.")
    if decoder == "traced":
        return None
    tc = model.config.text_config.to_dict()
    prefix = None
    if tc.get("model_type") != "llama":
        reason = f"its text model is {tc.get('model_type')!r}, not llama"
    else:
        reason = fused_unsupported_reason({**tc, "architectures": ["LlamaForCausalLM"]})
    if reason is None:
        names = _SafeTensors(src)
        prefix = next((p for p in _TEXT_PREFIXES if f"{p}.layers.0.input_layernorm.weight" in names), None)
        if prefix is None:
            reason = "its text-model tensors are not under " + " / ".join(_TEXT_PREFIXES)
    if reason is None:
        return tc, prefix
    if decoder == "fused":
        raise UsageError(f"The fused decoder cannot be built for {src.name}: {reason}.",
                         hint="Export with decoder='traced' (or 'auto', which falls back to it).")
    return None


def export_vision(src_dir: str | Path, out_dir: str | Path, on_progress: Optional[ProgressCallback] = None,
                  *, overwrite: bool = False, decoder: str = "auto") -> dict:
    """Export the Idefics3 / SmolVLM checkpoint in ``src_dir`` to the three-part ONNX layout in ``out_dir``
    (see the module docstring). Returns a summary: ``dir``, the three part paths, ``image_seq_len``,
    ``tile``, ``n_layers``, ``kv_heads``, ``head_dim``, ``hidden_size``, ``decoder_kind`` ("fused" or
    "traced"). ``decoder``: "auto" (fused when the builder supports the text model, else traced),
    "fused" or "traced".

    ``out_dir`` is built in a temporary directory beside it and renamed into place; an existing non-empty
    ``out_dir`` is an error unless ``overwrite``.
    """
    src, out = Path(src_dir).expanduser(), Path(out_dir).expanduser()
    cfg = _read_config(src, out, overwrite)
    try:
        with _quiet():
            import torch
    except ImportError as e:
        raise missing_extra("torch", extra="quantize") from e
    cls = _model_class(cfg["model_type"])

    _progress(on_progress, "load", 0, 1)
    try:
        with _quiet():
            model = cls.from_pretrained(str(src), dtype=torch.float32, attn_implementation="eager",
                                        local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BadModelFile(f"transformers could not load {src.name}: {first_line(e)[:300]}",
                           hint="Check that the checkpoint is complete; VLM_DEBUG=1 shows the full log.") from e
    tcfg, vcfg = model.config.text_config, model.config.vision_config
    n_layers = int(tcfg.num_hidden_layers)
    n_heads = int(tcfg.num_attention_heads)
    kv_heads = int(getattr(tcfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(tcfg, "head_dim", None) or tcfg.hidden_size // n_heads)
    hidden = int(tcfg.hidden_size)
    tile = int(vcfg.image_size)
    image_seq_len = (tile // int(vcfg.patch_size)) ** 2 // int(model.config.scale_factor) ** 2
    fused = _fused_text(model, src, decoder)
    vision, embed, traced = _wrappers(model)
    _progress(on_progress, "load", 1, 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        raw, staged = tmp / "raw", tmp / "out"
        onnx_dir = staged / "onnx"
        raw.mkdir()
        onnx_dir.mkdir(parents=True)
        g = torch.Generator().manual_seed(0)
        with _quiet():
            _progress(on_progress, "export", 0, 3)
            pv = torch.rand((1, 2, 3, tile, tile), generator=g) * 2 - 1
            pmask = torch.ones((1, 2, tile, tile), dtype=torch.bool)
            _export_one(vision, (pv, pmask), raw / "vision_encoder.onnx",
                        ["pixel_values", "pixel_attention_mask"], ["image_features"],
                        {"pixel_values": {0: "batch_size", 1: "num_images"},
                         "pixel_attention_mask": {0: "batch_size", 1: "num_images"},
                         "image_features": {0: "num_images"}}, _OPSET)
            _finish(raw / "vision_encoder.onnx", onnx_dir / "vision_encoder.onnx",
                    lambda m: _set_dims(m, "image_features", ["num_images", image_seq_len, hidden]))
            _progress(on_progress, "export", 1, 3)

            ids = torch.tensor([[1, 2, 3]], dtype=torch.int64)
            _export_one(embed, (ids,), raw / "embed_tokens.onnx", ["input_ids"], ["inputs_embeds"],
                        {"input_ids": {0: "batch_size", 1: "sequence_length"},
                         "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}, _OPSET)
            _finish(raw / "embed_tokens.onnx", onnx_dir / "embed_tokens.onnx", lambda m: _to_opset(m, _EMBED_OPSET))
            _progress(on_progress, "export", 2, 3)

            if fused is not None:
                from .onnx import build_fused_decoder

                built = build_fused_decoder(src, raw, fused[0], inputs_embeds=True, prefix=fused[1])
                _finish(built, onnx_dir / "decoder_model_merged.onnx")
            else:
                _export_traced_decoder(traced, raw, onnx_dir, g, hidden, kv_heads, head_dim, n_layers)
            _progress(on_progress, "export", 3, 3)
        del model, vision, embed, traced

        for name in VISION_SIDECAR_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, staged / name)
        staged.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    except EdgeVLMError:
        raise
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        first = first_line(e)
        raise BackendError(f"torch.onnx.export failed on {src.name}: {first[:300]}",
                           hint="Run with VLM_DEBUG=1 to see the exporter's log.") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = out / "onnx"
    return {"dir": out, "vision_encoder": d / "vision_encoder.onnx", "embed_tokens": d / "embed_tokens.onnx",
            "decoder": d / "decoder_model_merged.onnx", "image_seq_len": image_seq_len, "tile": tile,
            "n_layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim, "hidden_size": hidden,
            "decoder_kind": "traced" if fused is None else "fused"}


def _export_traced_decoder(decoder, raw: Path, onnx_dir: Path, g, hidden: int, kv_heads: int, head_dim: int,
                           n_layers: int) -> None:
    """The decoder traced from transformers' text model (``decoder="traced"``): takes ``position_ids`` and
    concatenates the KV cache inside the graph."""
    import torch

    seq, past_len = 3, 2      # a prefill after a cached prefix: both lengths stay symbolic
    emb = torch.randn((1, seq, hidden), generator=g)
    am = torch.ones((1, past_len + seq), dtype=torch.int64)
    pos = torch.arange(past_len, past_len + seq, dtype=torch.int64)[None]
    past = [torch.randn((1, kv_heads, past_len, head_dim), generator=g) for _ in range(2 * n_layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    axes = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    _export_one(decoder, (emb, am, pos, *past), raw / "decoder_model_merged.onnx",
                ["inputs_embeds", "attention_mask", "position_ids", *past_names],
                ["logits", *present_names], axes, _OPSET)
    _finish(raw / "decoder_model_merged.onnx", onnx_dir / "decoder_model_merged.onnx", _last_logits)


def _set_dims(model, output: str, dims: list):
    """Name or fix an output's dimensions (the tracer leaves the vision features' length anonymous)."""
    out = next(o for o in model.graph.output if o.name == output)
    for d, v in zip(out.type.tensor_type.shape.dim, dims):
        d.Clear()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v
    return model


def _last_logits(model):
    keep_last_logits(model)
    return model


def _parts_dir(model_dir: Path) -> Path:
    for d in (model_dir / "onnx", model_dir):
        if (d / "decoder_model_merged.onnx").is_file():
            return d
    raise ModelNotFound(f"{model_dir} holds no decoder_model_merged.onnx (nor does its onnx/ folder).",
                        hint="Pass the directory `export_vision` wrote.")


def quantize_vision(out_dir: str | Path, kind: Literal["int8", "int4"], block_size: int = 32,
                    on_progress: Optional[ProgressCallback] = None, *, recipe: str = "auto",
                    importance: Optional[dict] = None) -> dict[str, Path]:
    """Quantize the three fp32 parts in ``out_dir`` (or its ``onnx/`` folder) to ``kind``, writing
    ``<part>_int8.onnx`` or ``<part>_q4.onnx`` beside them with ``quantize_onnx``. Returns part -> path.

    int8: 8-bit blockwise ``MatMulNBits`` for every MatMul with constant weights (the vision tower's
    linear layers, the decoder) and int8 ``Gather`` for the token and position embeddings. int4:
    ``quantize_onnx``'s int4 ``recipe`` on each part (searched 4-bit blocks weighted by ``importance``
    -- the importance matrix of the checkpoint's tensors -- where its names match; ``"mixed"`` adds 8-bit
    lm_head, q/k/v and edge-layer down projections / fc2), and ``GatherBlockQuantized`` for the token
    embeddings; the vision tower's patch convolution stays fp32 in both.
    """
    if kind not in ("int8", "int4"):
        raise UsageError(f"Unknown ONNX quantization {kind!r}.", hint="Use int8 or int4.")
    d = _parts_dir(Path(out_dir).expanduser())
    missing = [p for p in PARTS if not (d / f"{p}.onnx").is_file()]
    if missing:
        raise BadModelFile(f"{d} lacks {', '.join(p + '.onnx' for p in missing)}.",
                           hint="Export the model again with `export_vision`.")
    suffix = VARIANT_SUFFIX[kind]
    written: dict[str, Path] = {}
    for i, part in enumerate(PARTS):
        _progress(on_progress, f"quantize {kind}", i, len(PARTS))
        written[part] = quantize_onnx(d / f"{part}.onnx", d / f"{part}{suffix}.onnx", kind=kind,
                                      block_size=block_size, recipe=recipe, importance=importance)
    _progress(on_progress, f"quantize {kind}", len(PARTS), len(PARTS))
    return written


__all__ = ["export_vision", "quantize_vision", "SUPPORTED_MODEL_TYPES", "PARTS", "VARIANT_SUFFIX",
           "VISION_SIDECAR_FILES"]
