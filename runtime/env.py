"""Every environment variable edgevlm reads, in one table that doubles as documentation (the README's
table is checked against it by tests/test_architecture.py), and the one parser of each flag."""
from __future__ import annotations

import os

ENV: dict[str, str] = {
    "VLM_HOME": "where models, config and the user registry live",
    "VLM_DEBUG": "`1`: tracebacks and llama.cpp's / onnxruntime's own logs on stderr",
    "VLM_THREADS": "default thread count (else physical / performance cores)",
    "VLM_MEMORY_LIMIT": "treat this as the memory available (e.g. `4G`)",
    "VLM_OFFLINE": "`1`: never touch the network; fail at once with a clear message",
    "HF_HUB_OFFLINE": "`1`: the same as VLM_OFFLINE",
    "HF_ENDPOINT": "Hugging Face mirror for `hf` sources",
    "HF_TOKEN": "Hugging Face token for `hf` sources",
    "VLM_PYPI_INDEX": "package index for `pypi` sources (else PIP_INDEX_URL)",
    "VLM_LLAMA_EXTRA_BUFTS": "`0`/`1`: force llama.cpp's extra buffer types (AMX, repacked weights) off/on",
    "VLM_ORT_SPIN": "`0`: onnxruntime's worker threads do not spin between operators (shared cores)",
    "GOMP_SPINCOUNT": "read by libgomp, not by us: `1000` makes llama.cpp's OpenMP threads (pip builds) sleep sooner "
                      "when they wait (cores shared with other work; slower on idle cores)",
    "VLM_ONNX_KV": "`concat`: the ONNX backend never shares past/present buffers (for comparisons)",
    "VLM_API_KEY": "`vlm serve`: the API key clients must send (`Authorization: Bearer KEY`); same as --api-key",
    "NO_COLOR": "no colours on stderr",
    "VLM_TEST_CACHE": "tests: where models and fixtures are cached",
    "VLM_TEST_NETWORK": "tests: `1` runs the live-PyPI test",
}

_TRUE = ("1", "true", "yes", "on")


def flag(name: str) -> bool:
    """A yes/no variable: 1, true, yes or on (any case) is yes; unset, empty, 0 or anything else is no."""
    assert name in ENV, name
    return os.environ.get(name, "").strip().lower() in _TRUE


def debug() -> bool:
    """VLM_DEBUG=1: tracebacks and the engines' own logs."""
    return flag("VLM_DEBUG")


__all__ = ["ENV", "debug", "flag"]
