"""Importing llama-cpp-python's ctypes bindings without its heavy package __init__."""
from __future__ import annotations

import ctypes
import logging

from ..env import debug
from ..errors import BackendError, missing_extra


def _defer_llama_cpp_init() -> None:
    """Import only llama-cpp-python's ctypes bindings, not its package __init__.

    ``import llama_cpp`` also imports the high-level Llama class, its chat formats, jinja2 and numpy:
    ~100-140 ms of every `vlm ask` spent on code we do not use. We register the package without
    running its __init__ and run it on first attribute access (PEP 562), so ``llama_cpp.Llama`` and
    friends still work for anyone who asks for them later in the same process.
    """
    import importlib.util
    import sys

    if "llama_cpp" in sys.modules:
        return
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.loader is None:
        return
    pkg = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):
        pkg.__dict__.pop("__getattr__", None)       # run the real __init__ once, then behave normally
        spec.loader.exec_module(pkg)
        try:
            return pkg.__dict__[name]
        except KeyError:
            raise AttributeError(name) from None

    pkg.__getattr__ = __getattr__
    sys.modules["llama_cpp"] = pkg


def import_llama():
    """(llama_cpp.llama_cpp, llama_cpp.mtmd_cpp): the low-level bindings, imported fast."""
    try:
        _defer_llama_cpp_init()
        import llama_cpp.llama_cpp as llama_cpp
        import llama_cpp.mtmd_cpp as mtmd_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise missing_extra("llama-cpp-python", package="llama-cpp-python") from e
    return llama_cpp, mtmd_cpp


# Kept alive for the life of the process: llama.cpp holds the pointers.
_LOG_CALLBACKS: list = []


def silence_native_logs(llama_cpp, mtmd_cpp=None) -> None:
    """llama.cpp and libmtmd log to stderr by default; scripts want stderr clean unless VLM_DEBUG."""
    if debug():
        return
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
    if not _LOG_CALLBACKS:
        _LOG_CALLBACKS.append(llama_cpp.llama_log_callback(lambda level, text, data: None))
    cb = _LOG_CALLBACKS[0]
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    if mtmd_cpp is not None:
        mtmd_cpp.mtmd_log_set(cb, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(cb, ctypes.c_void_p(0))




def field_type(struct, name: str):
    """The ctypes type a structure declares for ``name`` (reading a pointer field gives a plain int)."""
    return next(t for n, t, *_ in struct._fields_ if n == name)


def score_batch(lc, model, token_ids: list[int], n_threads: int, n_vocab: int):
    """Logits [n, n_vocab] after each token, from one llama_decode with every position's logits, in a context
    of its own sized to the text (a generating context reserves one logits row)."""
    import numpy as np

    n = len(token_ids)
    out = np.empty((n, n_vocab), dtype=np.float32)
    cp = lc.llama_context_default_params()
    cp.n_ctx = max(n, 64)
    cp.n_batch = cp.n_ubatch = max(n, 64)
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.no_perf = True
    ctx = lc.llama_init_from_model(model, cp)
    if not ctx:
        raise BackendError(f"llama.cpp could not create a {n}-token context to score the text.",
                           hint="There may not be enough memory.")
    batch = lc.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, t in enumerate(token_ids):
            batch.token[i] = t
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        rc = lc.llama_decode(ctx, batch)
        if rc != 0:
            raise BackendError(f"llama.cpp failed to evaluate the text (llama_decode returned {rc}).",
                               hint="VLM_DEBUG=1 shows llama.cpp's log.")
        for i in range(n):
            out[i] = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    return out
