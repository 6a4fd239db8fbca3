"""Importing llama-cpp-python's ctypes bindings without its heavy package __init__."""
from __future__ import annotations

from ..errors import missing_extra


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
