"""`vlm info`: what a model is, read from its own files (or the registry when not installed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..digest import sha256_file
from ..errors import BadModelFile, first_line
from ..formats.gguf_file import read_gguf


def _human_params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit} ({n:,})"
    return str(n)


def _file_entry(p: Path, hash_files: bool) -> dict:
    return {"name": p.name, "path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p) if hash_files else None}


def describe(ref: str, mmproj: Optional[Path] = None, hash_files: bool = True) -> dict:
    from .. import loader

    resolved = loader.resolve(ref, want_vision=True, mmproj=mmproj)
    art = resolved.artifact
    if art is None:                       # registry entry, not installed: say what we know
        spec, a = resolved.model, resolved.artifact_spec
        return {
            "model": resolved.alias_ref, "name": spec.name, "installed": False, "format": a.format,
            "architecture": spec.architecture, "parameters": _human_params(spec.parameters) if spec.parameters else None,
            "quantization": a.quantization, "context_length": spec.context_length,
            "vision_projector": a.mmproj, "chat_template": None if spec.chat_format is None else spec.chat_format,
            "license": spec.license,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in a.files],
        }
    if art.format == "onnx":
        return {"model": resolved.alias_ref, "installed": True, **describe_onnx(Path(art.path), hash_files)}
    if art.format != "gguf":
        files = sorted(p for p in Path(art.path).rglob("*") if p.is_file())
        return {"model": resolved.alias_ref, "installed": True, "format": art.format, "path": str(art.path),
                "files": [_file_entry(p, hash_files) for p in files]}
    info = read_gguf(art.path)
    doc: dict = {
        "model": resolved.alias_ref, "installed": True, "format": "gguf", "path": str(art.path),
        "architecture": info.architecture, "name": info.get("general.name"),
        "parameters": _human_params(info.n_params), "quantization": info.quantization,
        "context_length": info.context_length, "chat_template": "yes" if info.chat_template else "no",
        "vocab_size": info.vocab_size, "vision_projector": None,
    }
    files = [art.path]
    if art.mmproj is not None:
        mm = read_gguf(art.mmproj)
        from ..formats.gguf_file import check_mmproj

        try:
            check_mmproj(info, mm)
            match = "matches the model"
        except BadModelFile as e:
            match = f"MISMATCH: {e.message}"
        doc["vision_projector"] = f"{art.mmproj.name} ({mm.get('clip.projector_type', 'clip')}, {match})"
        doc["image_detail"] = _gguf_detail(mm)
        est = _encode_estimate(mm, art.mmproj, art.path)
        if est:
            doc["image_encode_estimate"] = est
        files.append(art.mmproj)
    doc["files"] = [_file_entry(p, hash_files) for p in files]
    return doc


# ----------------------------------------------------------------------------------------- ONNX
_ONNX_SIDECARS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                  "preprocessor_config.json", "processor_config.json")
# onnx-community's file-name suffixes, for when the `onnx` package is not installed to read the graph.
_SUFFIX_QUANT = (("_q4f16", "int4 weights, fp16 activations"), ("_q4", "int4"), ("_int8", "int8"),
                 ("_uint8", "uint8"), ("_quantized", "int8"), ("_bnb4", "4-bit (bnb4)"), ("_fp16", "fp16"))


def _region(t):
    """Where an initializer's bytes lie in its external data file (None when inline): a tied embedding
    can be stored once and read under two names."""
    ext = {e.key: e.value for e in t.external_data}
    return (ext.get("location"), ext.get("offset", "0"), ext.get("length")) if ext else None


def _onnx_graph_facts(files: list[Path]) -> dict:
    """Parameters and quantization read from the graphs (weights stay on disk); {} without `onnx`."""
    try:
        import onnx
    except ImportError:
        return {}
    n_params, quant = 0, {}
    dtypes: dict[int, int] = {}
    for f in files:
        try:
            g = onnx.load(str(f), load_external_data=False).graph
        except Exception as e:                    # a corrupt file: the backend says so at load
            raise BadModelFile(f"{f.name} is not a readable ONNX model: {first_line(e)[:200]}",
                               hint="Download or export the model again.") from e
        packed = set()
        inits = {t.name: t for t in g.initializer}
        made_by = {o: n for n in g.node for o in n.output}
        gathers = []
        for n in g.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "MatMulNBits":
                k, block = int(attrs.get("K", 0)), int(attrs.get("block_size", 0) or 1)
                src = made_by.get(n.input[0])
                if src is not None and src.op_type == "Concat" and src.name.startswith("/edgevlm/block_sums/"):
                    k = k * block // (block + 1)  # int4 "offset": K weights + one row per block for the block means
                n_params += k * int(attrs.get("N", 0))
                packed.update(n.input[1:])
                key = f"int{attrs.get('bits', 4)} (MatMulNBits, block {attrs.get('block_size', '?')})"
                quant[key] = quant.get(key, 0) + 1
            elif n.op_type == "GatherBlockQuantized":
                gathers.append((n, attrs))
            elif n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"):
                quant["int8 (dynamic, per tensor)"] = quant.get("int8 (dynamic, per tensor)", 0) + 1
        regions = {_region(inits[x]) for x in packed if x in inits} - {None}
        for n, attrs in gathers:
            # A quantized embedding: its scales and zero points are not parameters (they may reach it
            # through a Reshape), and its data holds 8/bits values a byte when stored as uint8; a table
            # shared with the lm_head's MatMulNBits is counted there already.
            for name in n.input[1:]:
                while name not in inits and name in made_by and made_by[name].op_type in ("Reshape", "Cast", "Identity"):
                    name = made_by[name].input[0]
                packed.add(name)
            data = inits.get(n.input[0])
            if data is not None and n.input[0] not in packed and _region(data) not in regions:
                size = 1
                for dim in data.dims:
                    size *= int(dim)
                per_byte = 8 // int(attrs.get("bits", 4)) if data.data_type == onnx.TensorProto.UINT8 else 1
                # an int4 "offset" table (quantize/onnx_int4.py) holds a row per block after its blocks
                p = n.name.rpartition("/GatherBlockQuantized")[0]
                kb, kbt = inits.get(f"{p}/kb"), inits.get(f"{p}/kbt")
                if p.startswith("/edgevlm/embed/") and kb is not None and kbt is not None:
                    size = size * int(onnx.numpy_helper.to_array(kb)[0]) // int(onnx.numpy_helper.to_array(kbt)[0])
                n_params += size * per_byte
            packed.add(n.input[0])
        for t in g.initializer:
            if t.name in packed or t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or not t.dims:
                continue                          # shapes, axes, indices, scalar constants: not weights
            size = 1
            for d in t.dims:
                size *= int(d)
            n_params += size
            dtypes[t.data_type] = dtypes.get(t.data_type, 0) + size
    if quant:
        q = ", ".join(sorted(quant, key=quant.get, reverse=True))
    elif dtypes:
        q = onnx.helper.tensor_dtype_to_np_dtype(max(dtypes, key=dtypes.get)).name
        q = {"float32": "fp32", "float16": "fp16"}.get(q, q)
    else:
        q = None
    return {"parameters": n_params, "quantization": q}


def describe_onnx(path: Path, hash_files: bool = True) -> dict:
    """`vlm info` for an ONNX artifact: the decoder that would load, its vision parts and sidecars."""
    import json

    from ..formats.onnx_files import pick_model_file, vision_parts, weight_files

    model_file = pick_model_file(path)
    d = model_file.parent
    dirs = [d, d.parent] + ([Path(path)] if Path(path).is_dir() else [])

    def find(name: str) -> Optional[Path]:
        return next((x / name for x in dirs if (x / name).is_file()), None)

    def read(name: str) -> dict:
        p = find(name)
        try:
            v = json.loads(p.read_text(encoding="utf-8")) if p else {}
        except (OSError, ValueError) as e:
            raise BadModelFile(f"{name} in {p.parent} is not valid JSON: {e}", hint="Fetch the model's files again.") from e
        return v if isinstance(v, dict) else {}

    cfg = read("config.json")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    parts: dict[str, Path] = {}
    if any(d.glob("vision_encoder*.onnx")):
        parts = vision_parts(model_file)
    graphs = [model_file, *parts.values()]
    weights = weight_files(path)
    facts = _onnx_graph_facts(graphs)
    quant = facts.get("quantization")
    if quant is None:
        stem = model_file.stem
        quant = next((q for suf, q in _SUFFIX_QUANT if stem.endswith(suf)), "fp32")
    tc = read("tokenizer_config.json")
    has_template = bool(find("chat_template.jinja") or find("chat_template.json") or tc.get("chat_template"))
    vision = detail = None
    if parts:
        pp = read("preprocessor_config.json")
        kind = pp.get("image_processor_type") or pp.get("processor_class") or "unknown image processor"
        vision = f"three-part: {', '.join(p.name for p in parts.values())} ({kind})"
        le = (pp.get("size") or {}).get("longest_edge")
        tile = (pp.get("max_image_size") or {}).get("longest_edge")
        if pp.get("do_image_splitting", True) and le and tile:
            detail = (f"low (1 tile of {tile} px), auto, high (longest edge {le} px: up to "
                      f"{(le // tile) ** 2 + 1} tiles); --image-tokens; embedding cache")
        else:
            detail = "one fixed-size input (low = auto = high); embedding cache"
    files = list(weights)
    files += [p for p in (find(n) for n in _ONNX_SIDECARS) if p is not None]
    return {
        "format": "onnx", "path": str(model_file),
        "architecture": (cfg.get("architectures") or [None])[0] or cfg.get("model_type"),
        "parameters": _human_params(facts["parameters"]) if facts.get("parameters") else None,
        "quantization": quant,
        "context_length": cfg.get("max_position_embeddings") or text.get("max_position_embeddings"),
        "chat_template": "yes" if has_template else "no",
        "vocab_size": cfg.get("vocab_size") or text.get("vocab_size"),
        "vision_projector": vision,
        **({"image_detail": detail} if parts else {}),
        "files": [_file_entry(p, hash_files) for p in files],
    }


def _gguf_detail(mm) -> str:
    """What --detail / --image-tokens / the embedding cache do for this projector (`vlm info`): the family's
    ladder (inputs/ladders.py) with its token counts for a 12 MP photo, or that its input is fixed."""
    from ..inputs.ladders import family_of

    fam = family_of(mm)
    if fam is None:
        return ("the projector's own preprocessing only (libmtmd's whole prompt): --detail, --image-tokens and "
                "the embedding cache do not apply to this projector type")
    return fam.summary()


def image_levels(mm, mmproj: Path, model: Path) -> Optional[dict]:
    """Per detail level, the image tokens of a 12 MP photo (4032 x 3024) and its estimated encode seconds on
    this device, from the encoder speed measured here (the first `auto` answer measures it; ``encode_s`` None
    before that) and, for auto, the text model's measured prefill speed: what `vlm info` and `vlm doctor`
    show. None for a projector without a ladder."""
    from ..backends.gguf_images import encoder_id
    from ..inputs.detail import EncodeSpeed
    from ..inputs.ladders import family_of

    fam = family_of(mm)
    if fam is None:
        return None
    ladder, high = fam.ladder(4032, 3024)
    doc: dict = {"family": fam.name, "fixed_input": fam.fixed, "encode_s": None, "threads": None,
                 "tokens": {"low": ladder[0].tokens, "auto": [o.tokens for o in ladder], "high": high.tokens}}
    if fam.fixed:
        return doc
    enc = encoder_id(mmproj)
    speed = EncodeSpeed()
    keys = sorted(k for k in speed._read() if k.startswith(enc + ":t"))
    spu = speed.get(keys[-1]) if keys else None
    if spu:
        t = keys[-1].rpartition(":t")[2]
        est = fam.seconds(spu, s_per_token=speed.get(f"prefill:{encoder_id(model)}:t{t}"))
        doc["tokens"]["auto"] = est.pop("auto_tokens")
        doc["encode_s"] = {k: round(v, 2) for k, v in est.items()}
        doc["threads"] = int(t) if t.isdigit() else None
    return doc


def _encode_estimate(mm, mmproj: Path, model: Path) -> Optional[str]:
    """`vlm info`'s line: estimated encode seconds of a 12 MP photo per detail level here; None before any
    measurement."""
    lv = image_levels(mm, mmproj, model)
    if not lv or not lv["encode_s"]:
        return None
    est = lv["encode_s"]
    return (f"a 12 MP photo here ({lv['threads']} threads, measured): low ~{est['low']:.1f} s, auto ~{est['auto']:.1f} s, "
            f"high ~{est['high']:.1f} s")
