"""Importance-matrix GGUF quantization, in-process, from activations the source model computed.

An importance matrix says, for each weight matrix, how large the activations entering each input column
are on representative text (llama.cpp's ``llama-imatrix`` defines it as the mean of the squared
activation per column). llama.cpp's quantizer then spends its precision where the activations are large.
``verify.collect_imatrix`` measures it in the fp32 source model with forward hooks on every linear layer
(the same statistic ``llama-imatrix`` gathers from a GGUF, without building llama.cpp's tools); here it is
renamed to GGUF tensor names with gguf-py's own name map and handed to ``llama_model_quantize`` through
its ``imatrix`` parameter (``llama_model_imatrix_data``, a C array since llama.cpp b6000-ish).

Library code: no prints or exits; progress through ``on_progress``; the output appears only when complete.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional

from ..runtime.errors import BackendError, UsageError, missing_extra
from ..runtime.protocol import ProgressCallback
from .gguf import IMATRIX_TYPES, QUANT_TYPES, LogCapture

# Where a vision-language checkpoint keeps its language model; gguf-py's map knows the plain names.
_TEXT_PREFIXES = (("model.text_model.", "model."), ("model.language_model.", "model."),
                  ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("text_model.", "model."))


def to_gguf_names(hf_imatrix: dict, gguf_path: Path) -> dict:
    """Rename ``{hf weight name: array}`` to the tensor names in ``gguf_path``, keeping only tensors that
    exist there with a matching row length. Raises UsageError when almost nothing matches."""
    try:
        import gguf
    except ImportError as e:
        raise missing_extra("gguf", extra="quantize") from e
    from ..runtime.formats.gguf_file import read_gguf

    info = read_gguf(gguf_path)
    arch_name = info.architecture
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise UsageError(f"gguf-py does not know the architecture {arch_name!r}, so the importance matrix "
                         "cannot be matched to its tensors.", hint="Quantize without --calibration.")
    n_blocks = int(info.get(f"{arch_name}.block_count") or 0)
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    rows = {t.name: t.shape[0] for t in info.tensors if len(t.shape) >= 2}
    out: dict = {}
    for hf_name, values in hf_imatrix.items():
        candidates = [hf_name] + [pre_new + hf_name[len(pre):] for pre, pre_new in _TEXT_PREFIXES
                                  if hf_name.startswith(pre)]
        for cand in candidates:
            name = name_map.get_name(cand, try_suffixes=(".weight", ".bias"))
            if name is None:
                continue
            if name == "output.weight" and name not in rows and "token_embd.weight" in rows:
                name = "token_embd.weight"           # tied embeddings: the output matmul uses token_embd
            if rows.get(name) == len(values):
                out[name] = values
            break
    wanted = [n for n in rows if n.startswith("blk.")]
    if wanted and len([n for n in out if n.startswith("blk.")]) < len(wanted) // 2:
        raise UsageError(
            f"The importance matrix matched only {len(out)} of {len(rows)} weight tensors in {Path(gguf_path).name}.",
            hint="This architecture's tensor names are not mapped yet; quantize without --calibration.")
    return out


def quantize_with_imatrix(src: Path, dst: Path, qtype: str, imatrix: dict, *,
                          on_progress: Optional[ProgressCallback] = None) -> Path:
    """Quantize the F16/BF16/F32 GGUF ``src`` to ``qtype`` using ``imatrix`` ({gguf tensor name: float32
    array}); writes ``dst`` atomically. Accepts the types that need an imatrix (IQ2_*, IQ1_*) too."""
    import numpy as np

    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise missing_extra("llama_cpp", package="llama-cpp-python") from e
    from ..runtime.formats.gguf_file import read_gguf

    key = qtype.upper()
    table = {**QUANT_TYPES, **IMATRIX_TYPES}
    if key not in table:
        raise UsageError(f"Unknown quantization type {qtype!r}.", hint="`vlm quantize --list-types` lists them.")
    ftype = getattr(llama_cpp, table[key][0], None)
    if ftype is None or not hasattr(llama_cpp, "llama_model_imatrix_data"):
        raise BackendError(f"This llama-cpp-python ({llama_cpp.__version__}) cannot make {key} with an importance "
                           "matrix.", hint="Upgrade llama-cpp-python, or quantize without --calibration.")
    info = read_gguf(src)
    src, dst = Path(src), Path(dst)
    keep = []                                            # C pointers into these stay valid during the call
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        bname = name.encode()
        keep.append((arr, bname))
        entries[i].name = bname
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    entries[len(imatrix)].name = None                   # the terminator

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.imatrix = ctypes.cast(entries, type(params.imatrix))
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    try:
        llama_cpp.llama_backend_init()
        if on_progress is not None:
            on_progress("quantize", 0, len(info.tensors) or None)
        with LogCapture(llama_cpp, "quantize", on_progress) as log:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if log.interrupt is not None:
            raise log.interrupt
        if rc != 0:
            raise BackendError(f"llama.cpp could not quantize {src.name} to {key} with the importance matrix: "
                               f"{log.reason()}", hint="VLM_DEBUG=1 shows llama.cpp's whole log.")
        read_gguf(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        del keep
    if on_progress is not None:
        on_progress("quantize", len(info.tensors), len(info.tensors) or None)
    return dst


__all__ = ["to_gguf_names", "quantize_with_imatrix"]
