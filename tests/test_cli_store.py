"""The store from the command line: list, rm, info, first run with nothing installed, offline,
memory refusal, user config defaults."""
from __future__ import annotations

import json
import os

import pytest

from conftest import MODELS_HOME, assert_clean_error, vlm

pytestmark = pytest.mark.model


@pytest.fixture
def home_with_smollm2(tmp_path, smollm2_gguf):
    """A fresh VLM_HOME holding smollm2-135m (hard links to the shared test copy)."""
    home = tmp_path / "home"
    src = MODELS_HOME / "models" / "smollm2-135m" / "q4_1"
    dst = home / "models" / "smollm2-135m" / "q4_1"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return home


def test_list_empty_and_available(tmp_path):
    r = vlm("list", home=tmp_path)
    assert r.returncode == 0 and r.stdout == "" and "No models installed" in r.stderr
    r = vlm("list", "--available", "--json", home=tmp_path)
    rows = json.loads(r.stdout)
    names = {x["model"].split(":")[0] for x in rows}
    for alias in ("llama3.2-1b", "llama3.2-3b", "llama-guard3-1b", "smolvlm-256m", "smolvlm-500m", "qwen2.5-vl-3b",
                  "gemma3-4b", "moondream2", "internvl3-1b", "llava1.5-7b", "smollm2-135m", "gemma3-270m"):
        assert alias in names
    r = vlm("list", "--available", home=tmp_path)
    assert "smolvlm-500m" in r.stdout and "QUANT" in r.stdout


def test_list_info_rm(home_with_smollm2):
    r = vlm("list", home=home_with_smollm2)
    assert r.returncode == 0 and "smollm2-135m:q4_1" in r.stdout
    r = vlm("info", "smollm2-135m", "--json", "--no-hash", home=home_with_smollm2)
    doc = json.loads(r.stdout)
    assert doc["installed"] is True and doc["quantization"] == "Q4_1"
    r = vlm("rm", "-y", "smollm2-135m", home=home_with_smollm2)
    assert r.returncode == 0, r.stderr
    assert not (home_with_smollm2 / "models" / "smollm2-135m" / "q4_1").exists()
    r = vlm("rm", "-y", "smollm2-135m", home=home_with_smollm2)
    assert_clean_error(r, 3)


def test_info_of_registry_model_not_installed(tmp_path):
    r = vlm("info", "smolvlm-500m", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["installed"] is False and doc["vision_projector"]
    assert any("mmproj" in f["name"].lower() for f in doc["files"])


def test_first_run_without_terminal_never_asks(tmp_path):
    r = vlm("ask", "Why is the sky blue?", home=tmp_path)
    assert_clean_error(r, 3, "not installed", "vlm pull llama3.2-1b")
    assert "MB" in r.stderr or "GB" in r.stderr          # says how big the download is


def test_offline_pull_is_one_clear_line(tmp_path):
    r = vlm("pull", "llama3.2-1b", home=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(r, 8, "offline")
    assert not any((tmp_path / "models").rglob("manifest.json")) if (tmp_path / "models").exists() else True


def test_memory_check_refuses_before_loading(home_with_smollm2):
    r = vlm("ask", "-m", "smollm2-135m", "hi", home=home_with_smollm2, env={"VLM_MEMORY_LIMIT": "100M"})
    assert_clean_error(r, 7, "needs about", "--ignore-memory")
    r = vlm("ask", "-m", "smollm2-135m", "-n", "2", "--ignore-memory", "hi", home=home_with_smollm2,
            env={"VLM_MEMORY_LIMIT": "100M"})
    assert r.returncode == 0, r.stderr
    r = vlm("pull", "llava1.5-7b", home=home_with_smollm2, env={"VLM_MEMORY_LIMIT": "1G"})
    assert_clean_error(r, 7, "needs about")


def test_config_default_model(home_with_smollm2):
    (home_with_smollm2 / "config.yaml").write_text("default_text_model: smollm2-135m\n")
    r = vlm("ask", "--json", "-n", "2", "hi", home=home_with_smollm2)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "smollm2-135m:q4_1"
    (home_with_smollm2 / "config.yaml").write_text("default_txt_model: x\n")
    r = vlm("ask", "hi", home=home_with_smollm2)
    assert_clean_error(r, 2, "default_txt_model")


def test_help_and_version():
    r = vlm("--help")
    assert r.returncode == 0 and "ask" in r.stdout and "caption" in r.stdout
    r = vlm("--version")
    assert r.stdout.startswith("edgevlm ")
