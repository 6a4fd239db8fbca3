"""ggml's RPC backend, from the ggml libraries llama-cpp-python already loads (a GGUF backend helper).

A worker (`vlm worker`) serves this device's CPU to other hosts with ``ggml_backend_rpc_start_server``;
a main host registers each worker with ``ggml_backend_rpc_add_server`` + ``ggml_backend_register`` and
names the workers' devices in ``llama_model_params.devices``, so llama.cpp spreads layers (and their KV
cache) over them. llama-cpp-python's high-level ``rpc_servers`` option does not do this any more (it
predates llama.cpp's device registry), so we call ggml directly through ctypes.

What a user meets, and what we do about it:
- The RPC protocol has no authentication or encryption: workers bind 127.0.0.1 unless told otherwise,
  and the CLI warns loudly for any other address.
- ggml aborts the process when a worker cannot be reached or dies mid-answer
  (``GGML_ABORT("Remote RPC server crashed...")``). We check every worker with a TCP connect before
  loading, and ``install_abort_handler`` turns a later abort into one line on stderr and exit code 10.
- The build must have RPC (``-DGGML_RPC=ON``); ``available()`` says whether it does.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from ..errors import BackendError, MissingExtra, UsageError

DEFAULT_PORT = 50052
INSTALL_HINT = ('CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall --no-cache-dir llama-cpp-python '
                "(add your usual flags, e.g. -DGGML_CUDA=ON)")
_GGML_TYPE_CPU = 0

_lib = None
_registered: dict[str, list[int]] = {}      # endpoint -> its device handles, registered once per process
_abort_cb = None                            # kept alive: ggml holds the pointer


def _libs() -> list[ctypes.CDLL]:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    out = []
    for name in ("libggml-rpc", "libggml", "libggml-base", "libggml-cpu", "libllama"):
        for suffix in (".so", ".dylib", ".dll"):
            p = libdir / f"{name}{suffix}"
            if p.exists():
                try:
                    out.append(ctypes.CDLL(str(p), mode=getattr(ctypes, "RTLD_GLOBAL", 0)))
                except OSError:
                    pass
    return out


def _fn(name: str, restype, argtypes):
    for lib in _libs_cached():
        f = getattr(lib, name, None)
        if f is not None:
            f.restype, f.argtypes = restype, argtypes
            return f
    return None


def _libs_cached():
    global _lib
    if _lib is None:
        from .llamacpp import import_llama

        import_llama()          # a clear MissingExtra when llama-cpp-python itself is missing
        _lib = _libs()
    return _lib


def available() -> bool:
    """Whether this llama.cpp build has the RPC backend."""
    try:
        return _fn("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p]) is not None
    except MissingExtra:
        return False


def require() -> None:
    if not available():
        raise MissingExtra("This llama-cpp-python build has no RPC backend.", hint=INSTALL_HINT)


def parse_endpoints(spec: str | list[str] | None) -> list[str]:
    """``host:port[,host:port...]`` -> ["host:port", ...]; a bare host gets the default port."""
    if not spec:
        return []
    parts = spec if isinstance(spec, list) else spec.split(",")
    out = []
    for p in (x.strip() for x in parts):
        if not p:
            continue
        host, sep, port = p.rpartition(":")
        if not sep:
            host, port = p, str(DEFAULT_PORT)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--rpc: {p!r} is not HOST:PORT.", hint="For example --rpc 192.168.1.20:50052,192.168.1.21:50052")
        out.append(f"{host}:{int(port)}")
    if len(set(out)) != len(out):
        raise UsageError("--rpc names a worker twice.", hint="List each worker once.")
    return out


def check_reachable(endpoints: list[str], timeout: float = 3.0) -> None:
    """A TCP connect to every worker before anything loads (ggml would abort the process instead)."""
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                pass
        except OSError as e:
            raise BackendError(f"Worker {ep} is not reachable: {e.strerror or e}.",
                               hint=f"Start it there with `vlm worker --host HOST --port {port}`, "
                                    "and check the address and any firewall or SSH tunnel.") from e


def worker_memory(endpoint: str) -> tuple[int, int]:
    """(free, total) bytes of a worker's first device, as it reports them."""
    require()
    f = _fn("ggml_backend_rpc_get_device_memory", None,
            [ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)])
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    f(endpoint.encode(), 0, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


def devices(endpoints: list[str]) -> list[int]:
    """The ggml device handles of these workers, registered with ggml once per process."""
    require()
    add = _fn("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    register = _fn("ggml_backend_register", None, [ctypes.c_void_p])
    count = _fn("ggml_backend_reg_dev_count", ctypes.c_size_t, [ctypes.c_void_p])
    get = _fn("ggml_backend_reg_dev_get", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t])
    out = []
    for ep in endpoints:
        if ep not in _registered:
            check_reachable([ep])
            reg = add(ep.encode())
            if not reg:
                raise BackendError(f"ggml could not add the worker {ep}.", hint="VLM_DEBUG=1 shows ggml's log.")
            register(reg)
            _registered[ep] = [get(reg, i) for i in range(count(reg))]
        out += _registered[ep]
    return out


def registered() -> bool:
    return bool(_registered)


def cpu_device() -> int:
    f = _fn("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int])
    dev = f(_GGML_TYPE_CPU) if f is not None else None
    if not dev:
        raise BackendError("ggml has no CPU device.", hint="Reinstall llama-cpp-python.")
    return dev


def device_array(devs: list[int]):
    """A NULL-terminated ``ggml_backend_dev_t *`` for ``llama_model_params.devices`` (keep it alive)."""
    arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
    return arr


def install_abort_handler(what: str = "A worker") -> None:
    """Turn ggml's abort (a worker that died or answered garbage) into one line and exit code 10."""
    global _abort_cb
    if _abort_cb is not None:
        return
    setter = _fn("ggml_set_abort_callback", ctypes.c_void_p, [ctypes.c_void_p])
    if setter is None:
        return
    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(msg: bytes) -> None:      # pragma: no cover - runs just before the process would abort
        text = (msg or b"").decode("utf-8", "replace").strip().splitlines()
        first = text[0] if text else "ggml aborted"
        try:
            sys.stderr.write(f"Error: the inference engine failed: {first}\n"
                             f"Hint: {what} may have stopped or lost its connection; check the workers "
                             "(`vlm doctor --rpc ...`) and try again.\n")
            sys.stderr.flush()
        finally:
            os._exit(10)

    _abort_cb = proto(on_abort)
    setter(ctypes.cast(_abort_cb, ctypes.c_void_p))



def spread_over_workers(llama_cpp, mparams, opts, info) -> tuple:
    """llama.cpp's RPC backend in a model's load parameters: the workers' devices take all but
    ``opts.host_layers`` of the layers (and their KV cache), in ``opts.worker_shares``; the output layer and
    the projector stay here. Returns the ctypes arrays ``mparams`` points into (keep them alive while the
    model loads)."""
    from .llamacpp import field_type

    install_abort_handler()
    devs = devices(opts.rpc)
    dev_array = device_array(devs)
    mparams.devices = ctypes.cast(dev_array, field_type(mparams, "devices"))
    n_layers = info.kv_shape[0] if info.kv_shape else 0
    host = opts.host_layers if opts.host_layers is not None else 0
    mparams.n_gpu_layers = max(0, n_layers - host) if n_layers else 999
    shares = list(opts.worker_shares or [1.0] * len(devs))
    split = None
    if len(shares) == len(devs) and sum(shares) > 0:
        n_max = llama_cpp.llama_max_devices()
        split = (ctypes.c_float * n_max)(*(shares + [0.0] * (n_max - len(shares)))[:n_max])
        mparams.tensor_split = ctypes.cast(split, field_type(mparams, "tensor_split"))
    return dev_array, split


def serve(host: str, port: int, threads: int, cache_dir: Optional[Path]) -> None:
    """Serve this device's CPU to other hosts until the process ends (blocks in ggml)."""
    require()
    start = _fn("ggml_backend_rpc_start_server", None,
                [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)])
    devs = (ctypes.c_void_p * 1)(cpu_device())
    endpoint = f"{host}:{port}".encode()
    start(endpoint, str(cache_dir).encode() if cache_dir else None, threads, 1, devs)


__all__ = ["available", "require", "parse_endpoints", "check_reachable", "worker_memory", "devices",
           "device_array", "install_abort_handler", "serve", "DEFAULT_PORT", "INSTALL_HINT"]
