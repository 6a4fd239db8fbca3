"""Where an ONNX model's parts are: which .onnx file loads, its vision parts, the files whose weights
load, and the decoder's KV shape from config.json. File-layout questions only, answered without
onnxruntime, so the loader, bench, info and quantize ask them without loading a backend.

Which .onnx file is loaded (``pick_model_file``): the file itself when given a file; for a directory,
the first that exists of ``MODEL_PREFERENCE`` (full precision first, then onnx-community's quantized
names), looked up in the directory and then in its ``onnx/`` subfolder; failing that, the only .onnx
file there. The three-part vision layout (onnx-community's Idefics3 / SmolVLM exports): a decoder
taking ``inputs_embeds`` with ``vision_encoder*.onnx`` and ``embed_tokens*.onnx`` beside it, sharing
the decoder file's quantization suffix, or else the fp32 ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import BadModelFile, ModelNotFound

# Directory lookup order (see module docstring). Full precision first: it is what an export writes and
# what a quantizer wants as input; onnx-community publishes the quantized variants under these names.
MODEL_PREFERENCE = (
    "model.onnx", "decoder_model_merged.onnx",
    "model_q4.onnx", "model_int8.onnx", "model_quantized.onnx", "model_q4f16.onnx",
    "model_fp16.onnx", "decoder_model_merged_q4.onnx", "decoder_model_merged_int8.onnx",
    "decoder_model_merged_quantized.onnx", "decoder_model_merged_fp16.onnx",
    "model_uint8.onnx", "model_bnb4.onnx",
)


# The three-part vision layout: the parts that go with a decoder taking inputs_embeds, and the decoder
# names whose suffix (``_int8``, ``_q4``, ...) the other parts share.
VISION_PARTS = ("vision_encoder", "embed_tokens")
_DECODER_STEMS = ("decoder_model_merged", "decoder_model", "model")


def vision_parts(model_file: Path) -> dict[str, Path]:
    """The vision encoder and token-embedding graphs that go with the decoder ``model_file``: the ones with
    the decoder's suffix, else the fp32 ones. Raises ``BadModelFile`` naming what is missing."""
    stem = model_file.stem
    suffix = next((stem[len(p):] for p in _DECODER_STEMS if stem.startswith(p)), "")
    found, missing = {}, []
    for part in VISION_PARTS:
        for name in dict.fromkeys((f"{part}{suffix}.onnx", f"{part}.onnx")):
            if (model_file.parent / name).is_file():
                found[part] = model_file.parent / name
                break
        else:
            missing.append(f"{part}{suffix}.onnx" if suffix else f"{part}.onnx")
    if missing:
        raise BadModelFile(
            f"{model_file.name} is the decoder of a three-part vision model, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {model_file.parent}.",
            hint="Download or export the whole model: vision_encoder*.onnx, embed_tokens*.onnx and "
                 "decoder_model_merged*.onnx belong together (`edgevlm.quantize.onnx_vision.export_vision`).",
        )
    return found


def weight_files(path: Path) -> list[Path]:
    """The files whose weights loading ``path`` (an .onnx file or a model directory) reads: the decoder
    ``pick_model_file`` chooses, its vision parts when it has them, and their external data files. What
    memory estimates and `vlm info` count: a directory may hold several variants, but only one loads."""
    model_file = pick_model_file(path)
    graphs = [model_file]
    if any(model_file.parent.glob("vision_encoder*.onnx")):
        graphs += list(vision_parts(model_file).values())
    files = []
    for g in graphs:
        files.append(g)
        files += [x for x in (g.with_name(g.name + "_data"), g.with_name(g.name + ".data")) if x.is_file()]
    return files


def kv_shape_from_config(path: Path) -> Optional[tuple[int, int, int]]:
    """(layers, kv_heads, head_dim) of the decoder, from the config.json beside the model, or None."""
    model_file = pick_model_file(path)
    for d in (model_file.parent, model_file.parent.parent, Path(path)):
        cfg_path = d / "config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            if isinstance(cfg.get("text_config"), dict):
                cfg = {**cfg, **cfg["text_config"]}
            try:
                layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
                kv = int(cfg.get("num_key_value_heads") or heads)
                head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                return None
            return layers, kv, head_dim
    return None


def pick_model_file(path: Path) -> Path:
    """The .onnx file to load for ``path`` (a file, or a directory: see ``MODEL_PREFERENCE``)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".onnx":
            raise BadModelFile(f"{path.name} is not an .onnx file.", hint="Pass the model's .onnx file or its directory.")
        return path
    if not path.is_dir():
        raise ModelNotFound(f"No such ONNX model: {path}", hint="Pass the model's directory or its .onnx file.")
    for d in (path, path / "onnx"):
        for name in MODEL_PREFERENCE:
            if (d / name).is_file():
                return d / name
    found = sorted(p for d in (path, path / "onnx") if d.is_dir() for p in d.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise BadModelFile(f"{path} holds no .onnx model.",
                           hint="Export one with `vlm quantize --to onnx`, or pass the directory that holds model.onnx.")
    raise BadModelFile(
        f"{path} holds several .onnx files and none has a standard name: {', '.join(p.name for p in found[:6])}.",
        hint="Pass the one to run as -m DIR/FILE.onnx.",
    )
