"""`vlm quantize`: one Hugging Face checkpoint in, verified GGUF / ONNX artifacts and a manifest out.

The steps, in the order that fails cheapest first:

1. **plan** -- parse every ``--to`` target, find the checkpoint (a local folder, or a hub repo id fetched
   with huggingface_hub), refuse pickle weights and custom code unless allowed, check that llama.cpp's
   converter (GGUF) or optimum (ONNX) knows the architecture, and that the output folder can be written;
2. **reference** -- run the source in transformers (fp32) once: log-probs over a held-out paragraph,
   greedy completions of a fixed prompt set and, with ``calibration``, the importance matrix;
3. **build** -- GGUF: llama.cpp's converter to F16 (plus the vision projector), then
   ``llama_model_quantize`` per type; ONNX: optimum export to fp32, then int8 / int4 per type;
4. **verify** -- load every artifact with our own runtime and compare it with the reference
   (``verify.py``); an artifact that does not load or gives non-finite logits fails the whole run;
5. **publish** -- ``manifest.json`` (sha256 of every file, the source's revision, metrics, tool versions)
   is written last into a hidden staging folder beside the output, which is then renamed into place.

Ctrl-C or any failure removes the staging folder, so nothing that looks complete is left behind; the
source folder is only read. Optionally (``register``) the artifacts are installed into the model store
and added to the user's registry, so ``vlm chat -m NAME`` runs them.

Library code: nothing here prints or exits; long steps report ``onreport(stage, done, total)``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from ..runtime.errors import UsageError
from ..runtime.protocol import ProgressCallback, prefixed
from .manifest import MANIFEST, _manifest, gguf_bits_per_weight
from .registration import register
from .results import ArtifactResult, QuantizeOptions, QuantizeResult
from .source import Source, default_name, resolve_source, source_fingerprint
from .targets import (
    DEFAULT_TARGETS,
    MMPROJ_TYPES,
    Target,
    check_architecture,
    check_extra,
    parse_target,
)

# ------------------------------------------------------------------------------------ pipeline

def _check_out_dir(out: Path, src_dir: Optional[Path], force: bool) -> None:
    out_r = out.resolve()
    if src_dir is not None:
        s = src_dir.resolve()
        if out_r == s or s in out_r.parents or out_r in s.parents:
            raise UsageError("The output folder must be outside the checkpoint folder (and not contain it).",
                             hint="Choose another --out.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder.", hint="Choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} already exists and is not empty.",
                         hint="Choose another --out, or pass --force to replace it.")


def _check_space(src: Source, targets: list[Target], out: Path) -> None:
    weights = sum(p.stat().st_size for p in src.dir.iterdir()
                  if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    # an F16 GGUF and/or an fp32 ONNX export, plus every artifact (none bigger than the source's bytes/2)
    need = (weights if any(t.format == "gguf" for t in targets) else 0)
    need += 2 * weights if any(t.format == "onnx" for t in targets) else 0
    need += len(targets) * weights // 2
    parent = out.parent if not out.exists() else out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need:
        gib = 1024 ** 3
        raise UsageError(f"Building these artifacts needs about {need / gib:.1f} GiB in {parent}, "
                         f"which has {free / gib:.1f} GiB free.", hint="Free some space or choose another --out.")


def plan(src_ref: str, opts: QuantizeOptions) -> list[Target]:
    """Everything that can be checked without the checkpoint: targets, flags, name, calibration file."""
    from ..runtime.models.registry import ALIAS_RE

    if not opts.targets:
        opts.targets = list(DEFAULT_TARGETS)
    if opts.calibration is not None:
        cal = Path(opts.calibration).expanduser()
        if not cal.is_file():
            raise UsageError(f"Calibration file not found: {cal}", hint="Pass a UTF-8 text file of typical input.")
    targets: list[Target] = []
    for spec in opts.targets:
        t = parse_target(spec, calibration=opts.calibration is not None)
        if t in targets:
            raise UsageError(f"--to {t.label} is given twice.", hint="Name each target once.")
        targets.append(t)
    check_extra(targets, opts.calibration is not None)
    if opts.mmproj_type.lower() not in MMPROJ_TYPES:
        raise UsageError(f"Unknown --mmproj-type {opts.mmproj_type!r}.", hint=f"Use one of {', '.join(MMPROJ_TYPES)}.")
    if opts.block_size < 16 or opts.block_size & (opts.block_size - 1):
        raise UsageError(f"--block-size {opts.block_size} is not a power of two >= 16.", hint="Use 32, 64 or 128.")
    if opts.verify_tokens < 16:
        raise UsageError("--verify-tokens must be at least 16.", hint="The default is 256.")
    name = opts.name if opts.name is not None else default_name(src_ref)
    if not ALIAS_RE.match(name):
        raise UsageError(f"--name {name!r} must be lowercase letters, digits, '.' or '-'.",
                         hint="For example --name smollm2-135m-q.")
    opts.name = name
    if opts.register:
        from ..runtime.models.registry import Registry

        registry = Registry.load(opts.home)
        if name in registry and registry.get(name).origin == "shipped":
            raise UsageError(f"'{name}' is a model in edgevlm's own registry.",
                             hint="Choose another --name for your build.")
    from .onnx import INT4_RECIPES

    if opts.onnx_int4_recipe not in ("auto", *INT4_RECIPES):
        raise UsageError(f"Unknown ONNX int4 recipe {opts.onnx_int4_recipe!r}.",
                         hint=f"Use auto, {', '.join(INT4_RECIPES)}.")
    if opts.onnx_int4_recipe == "gptq" and opts.calibration is None:
        raise UsageError("The gptq int4 recipe needs --calibration (it fits each layer to its inputs).",
                         hint="Pass --calibration FILE with text like your inputs, or another recipe.")
    return targets


def quantize(src_ref: str, opts: QuantizeOptions, on_progress: Optional[ProgressCallback] = None) -> QuantizeResult:
    """Build, verify and publish every target; see the module docstring for the steps."""
    from . import verify as V
    from .gguf import make_staging_dir

    t_start = time.perf_counter()
    targets = plan(src_ref, opts)
    src = resolve_source(src_ref, revision=opts.revision, allow_pickle=opts.allow_pickle,
                         trust_remote_code=opts.trust_remote_code, on_progress=on_progress,
                         before_download=lambda cfg: check_architecture(cfg, targets,
                                                                        trust_remote_code=opts.trust_remote_code))
    check_architecture(src.config, targets, trust_remote_code=opts.trust_remote_code)
    out = Path(opts.out_dir).expanduser() if opts.out_dir else Path.cwd() / f"{opts.name}-quantized"
    out = out.absolute()
    _check_out_dir(out, src.dir, opts.force)
    _check_space(src, targets, out)
    calibration_text = None
    if opts.calibration is not None:
        try:
            calibration_text = Path(opts.calibration).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"Cannot read the calibration file {opts.calibration}: {e}",
                             hint="Pass a UTF-8 text file.") from e
    staging = make_staging_dir(out)        # UsageError now, before hours of work, if out is not writable
    try:
        fingerprint = source_fingerprint(src, on_progress)
        ref = V.source_reference(src.dir, n_tokens=opts.verify_tokens, trust_remote_code=opts.trust_remote_code,
                                 allow_pickle=opts.allow_pickle, calibration_text=calibration_text,
                                 on_progress=on_progress, hessians=opts.onnx_int4_recipe == "gptq")
        work = staging / ".work"
        work.mkdir()
        artifacts: list[ArtifactResult] = []
        steps: dict[str, float] = {}
        gguf_targets = [t for t in targets if t.format == "gguf"]
        onnx_targets = [t for t in targets if t.format == "onnx"]
        if gguf_targets:
            artifacts += _build_gguf(src, gguf_targets, staging, work, opts, ref, steps, on_progress)
        if onnx_targets:
            artifacts += _build_onnx(src, onnx_targets, staging, work, opts, ref, steps, on_progress)
        shutil.rmtree(work)
        for a in artifacts:                  # an artifact that does not load or gives NaN fails the run
            if a.target.format == "gguf":
                a.verification = V.verify_gguf(staging / a.model, ref, mmproj=staging / a.mmproj if a.mmproj else None,
                                               threads=opts.threads, on_progress=on_progress)
            elif src.vision:
                a.verification = V.verify_onnx_vision(staging / a.model, ref, threads=opts.threads,
                                                      on_progress=on_progress)
            else:
                a.verification = V.verify_onnx(staging / a.model, ref, threads=opts.threads, on_progress=on_progress)
        manifest = _manifest(opts, src, fingerprint, ref, targets, artifacts, staging, steps,
                             time.perf_counter() - t_start, calibration_text)
        from ..runtime.config import atomic_write_text

        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (staging / MANIFEST).chmod(0o644)         # mkstemp's 0600 would hide it from other users
        _publish(staging, out, opts.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = QuantizeResult(out_dir=out, manifest=manifest, artifacts=artifacts)
    if opts.register:
        result.registered = register(result, home=opts.home, on_progress=on_progress)
    return result


def _gguf_base(targets: list[Target]) -> str:
    quants = {t.quant for t in targets}
    if "F32" in quants:
        return "f32"
    if "BF16" in quants and "F16" not in quants:
        return "bf16"
    return "f16"


def _build_gguf(src: Source, targets: list[Target], staging: Path, work: Path, opts: QuantizeOptions, ref,
                steps: dict, on_progress) -> list[ArtifactResult]:
    from .gguf import run_converter, convert_hf_to_gguf, quantize_gguf

    base = _gguf_base(targets)
    mm_type = opts.mmproj_type.lower()
    t0 = time.perf_counter()
    conv = convert_hf_to_gguf(src.dir, work / "gguf", outtype=base, mmproj=src.vision and mm_type == base,
                              on_progress=prefixed(on_progress, "gguf"))
    mmproj_final = None
    if src.vision:
        mmproj_final = f"mmproj-{opts.name}-{mm_type.upper()}.gguf"
        if conv.mmproj is not None:
            os.replace(conv.mmproj, staging / mmproj_final)
        else:                                   # the projector at its own type: a second converter run
            mm_dir = work / "mmproj"
            mm_dir.mkdir()
            run_converter([("convert-mmproj", [str(src.dir), "--mmproj", "--outfile", str(mm_dir / mmproj_final),
                                                "--outtype", mm_type])], mm_dir, prefixed(on_progress, "gguf"))
            found = sorted(mm_dir.glob("*.gguf"))
            if len(found) != 1:
                from ..runtime.errors import BackendError

                raise BackendError("llama.cpp's converter wrote no vision projector.", hint="VLM_DEBUG=1 shows its log.")
            os.replace(found[0], staging / mmproj_final)
    steps["gguf_convert_s"] = round(time.perf_counter() - t0, 2)
    imatrix = None
    if ref.imatrix is not None:
        from .imatrix import to_gguf_names

        imatrix = to_gguf_names(ref.imatrix, conv.model)
    out = []
    for t in targets:
        t1 = time.perf_counter()
        name = f"{opts.name}-{t.quant}.gguf"
        cb = prefixed(on_progress, f"gguf {t.quant}")
        if t.quant == base.upper():
            try:
                os.link(conv.model, staging / name)
            except OSError:
                shutil.copyfile(conv.model, staging / name)
        elif imatrix is not None and t.quant not in ("F16", "BF16", "F32"):
            from .imatrix import quantize_with_imatrix

            quantize_with_imatrix(conv.model, staging / name, t.quant, imatrix, on_progress=cb)
        else:
            quantize_gguf(conv.model, staging / name, t.quant, on_progress=cb)
        files = [name] + ([mmproj_final] if mmproj_final else [])
        out.append(ArtifactResult(target=t, model=name, files=files, mmproj=mmproj_final,
                                  build_seconds=round(time.perf_counter() - t1, 2),
                                  bits_per_weight=gguf_bits_per_weight(staging / name)))
    return out


def _build_onnx(src: Source, targets: list[Target], staging: Path, work: Path, opts: QuantizeOptions, ref,
                steps: dict, on_progress) -> list[ArtifactResult]:
    if src.vision:
        return _build_onnx_vision(src, targets, staging, work, opts, ref, steps, on_progress)
    from .onnx import SIDECAR_FILES, VARIANT_NAMES, export_decoder, quantize_onnx

    t0 = time.perf_counter()
    fp32 = export_decoder(src.dir, work / "onnx-fp32", on_progress=prefixed(on_progress, "onnx"))
    steps["onnx_export_s"] = round(time.perf_counter() - t0, 2)
    onnx_dir = staging / "onnx"
    out = []
    for t in targets:
        t1 = time.perf_counter()
        dst = onnx_dir / VARIANT_NAMES[t.quant]
        if t.quant == "fp32":                   # the export itself, as exported
            from .onnx import _copy_sidecars

            onnx_dir.mkdir(parents=True, exist_ok=True)
            for p in (fp32, fp32.with_name(fp32.name + "_data")):
                if p.is_file():
                    shutil.copy2(p, onnx_dir / p.name.replace(fp32.name, dst.name, 1))
            _copy_sidecars(fp32.parent, onnx_dir, overwrite=False)
        else:
            quantize_onnx(fp32, dst, t.quant, block_size=opts.block_size, importance=ref.imatrix,
                          recipe=opts.onnx_int4_recipe,
                          on_progress=prefixed(on_progress, f"onnx {t.quant}"))
        weights = [p for p in onnx_dir.iterdir() if p.name == dst.name or p.name == dst.name + "_data"]
        sidecars = [onnx_dir / n for n in SIDECAR_FILES if (onnx_dir / n).is_file()]
        size = sum(p.stat().st_size for p in weights)
        out.append(ArtifactResult(target=t, model=f"onnx/{dst.name}",
                                  files=[f"onnx/{p.name}" for p in weights + sidecars],
                                  build_seconds=round(time.perf_counter() - t1, 2),
                                  bits_per_weight=round(8 * size / ref.n_params, 2) if ref.n_params else None))
    return out


def _build_onnx_vision(src: Source, targets: list[Target], staging: Path, work: Path, opts: QuantizeOptions, ref,
                       steps: dict, on_progress) -> list[ArtifactResult]:
    """Three parts (vision encoder, token embeddings, decoder on inputs_embeds) per target, under
    ``onnx/`` with onnx-community's names (``*_int8.onnx``, ``*_q4.onnx``) and the processor sidecars."""
    from .onnx_vision import PARTS, VISION_SIDECAR_FILES, export_vision, quantize_vision

    t0 = time.perf_counter()
    exp = export_vision(src.dir, work / "onnx-vision", on_progress=prefixed(on_progress, "onnx"))
    steps["onnx_export_s"] = round(time.perf_counter() - t0, 2)
    onnx_dir = staging / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    for name in VISION_SIDECAR_FILES:       # beside the parts: each variant's folder is complete on its own
        f = Path(exp["dir"]) / name
        if f.is_file():
            shutil.copy2(f, onnx_dir / name)
    sidecars = [f"onnx/{n}" for n in VISION_SIDECAR_FILES if (onnx_dir / n).is_file()]
    n_params = getattr(ref, "n_params", None)
    out = []
    for t in targets:
        t1 = time.perf_counter()
        if t.quant == "fp32":                   # the exported parts, as exported
            parts_dir = Path(exp["dir"]) / "onnx"
            written = {part: work / f"{part}.onnx" for part in PARTS}
            for part in PARTS:
                for p in (parts_dir / f"{part}.onnx", parts_dir / f"{part}.onnx_data"):
                    if p.is_file():
                        shutil.copy2(p, work / p.name)
        else:
            written = quantize_vision(exp["dir"], t.quant, block_size=opts.block_size, importance=ref.imatrix,
                                      recipe=opts.onnx_int4_recipe,
                                      on_progress=prefixed(on_progress, f"onnx {t.quant}"))
        weights = []
        for part in PARTS:
            for p in (written[part], written[part].with_name(written[part].name + "_data")):
                if p.is_file():
                    os.replace(p, onnx_dir / p.name)
                    weights.append(onnx_dir / p.name)
        size = sum(p.stat().st_size for p in weights)
        out.append(ArtifactResult(target=t, model=f"onnx/{written['decoder_model_merged'].name}",
                                  files=[f"onnx/{p.name}" for p in weights] + sidecars,
                                  build_seconds=round(time.perf_counter() - t1, 2),
                                  bits_per_weight=round(8 * size / n_params, 2) if n_params else None))
    return out


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished staging folder to ``out``; with ``force`` an existing ``out`` is replaced."""
    from .gguf import publish_dir

    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} appeared while quantizing and is not empty.", hint="Choose another --out.")
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    publish_dir(staging, out)


__all__ = ["ArtifactResult", "QuantizeOptions", "QuantizeResult", "Source", "Target", "check_architecture",
           "default_name", "parse_target", "plan", "quantize", "register",
           "resolve_source"]
