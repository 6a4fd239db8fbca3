"""The values `vlm quantize` passes between its steps: the options it was given and what it built."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .targets import DEFAULT_TARGETS, Target


@dataclass
class ArtifactResult:
    target: Target
    model: str                        # main file, relative to the output folder
    files: list[str]                  # every file of the artifact, relative to the output folder
    mmproj: Optional[str] = None
    build_seconds: float = 0.0
    bits_per_weight: Optional[float] = None
    verification: Optional[object] = None     # verify.Verification
    record: dict = field(default_factory=dict)


@dataclass
class QuantizeResult:
    out_dir: Path
    manifest: dict
    artifacts: list[ArtifactResult]
    registered: list[str] = field(default_factory=list)


@dataclass
class QuantizeOptions:
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    out_dir: Optional[Path] = None
    name: Optional[str] = None
    revision: Optional[str] = None
    calibration: Optional[Path] = None
    mmproj_type: str = "f16"
    block_size: int = 32
    onnx_int4_recipe: str = "auto"    # quantize.onnx.INT4_RECIPES or "auto" (see onnx.int4_recipe)
    verify_tokens: int = 256
    allow_pickle: bool = False
    trust_remote_code: bool = False
    force: bool = False
    register: bool = False
    threads: Optional[int] = None
    home: Optional[Path] = None       # VLM_HOME for --register (None: the default)
