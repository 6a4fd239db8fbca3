"""Registry (shipped + user overlay + config defaults) and config.yaml, on small files in tmp_path."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from edgevlm.runtime.config import Config, load_config, save_config, vlm_home
from edgevlm.runtime.errors import ModelNotFound, UsageError
from edgevlm.runtime.models.registry import Registry, RegistryError, register_user_model, shipped_registry_path

SHA = "ab" * 32


def entry(**over) -> dict:
    e = {
        "name": "Tiny LM", "kind": "text", "architecture": "llama", "parameters": 135_000_000,
        "context_length": 8192, "chat_format": None, "license": "apache-2.0",
        "homepage": "https://huggingface.co/org/tiny", "kv": {"layers": 30, "kv_heads": 3, "head_dim": 64},
        "default": "q4_k_m",
        "artifacts": {
            "q4_k_m": {"format": "gguf", "quantization": "Q4_K_M", "model": "tiny-q4.gguf", "files": [
                {"name": "tiny-q4.gguf", "size": 1000, "sha256": SHA,
                 "source": {"hf": {"repo": "org/tiny-GGUF", "file": "tiny-q4.gguf"}}}]},
            "q8_0": {"format": "gguf", "quantization": "Q8_0", "model": "tiny-q8.gguf", "files": [
                {"name": "tiny-q8.gguf", "size": 2000, "source": {"url": "https://example.org/tiny-q8.gguf"}},
                {"name": "mmproj.gguf", "size": None,
                 "source": {"pypi": {"package": "tiny-w", "version": "0.1.2", "member": "tiny_w/m.gguf"}}}],
                "mmproj": "mmproj.gguf"},
        },
    }
    e.update(over)
    return e


def write(path: Path, models: dict, defaults: dict | None = None, version=1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": version, **({"defaults": defaults} if defaults else {}), "models": models}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("VLM_HOME", str(h))
    return h


@pytest.fixture
def shipped(tmp_path) -> Path:
    return write(tmp_path / "shipped.yaml", {"tiny": entry(), "tiny-vl": entry(name="Tiny VL", kind="vision")},
                 {"text": "tiny", "vision": "tiny-vl"})


def test_load_builds_specs(home, shipped):
    reg = Registry.load(home, shipped=shipped)
    assert [m.alias for m in reg.models()] == ["tiny", "tiny-vl"]
    m = reg.get("tiny")
    assert (m.name, m.kind, m.architecture, m.context_length, m.origin) == ("Tiny LM", "text", "llama", 8192, "shipped")
    assert m.kv == (30, 3, 64) and m.completion_only is False and m.chat_format is None
    q4 = m.artifacts["q4_k_m"]
    assert q4.files[0].source == {"hf": {"repo": "org/tiny-GGUF", "file": "tiny-q4.gguf", "revision": "main"}}
    q8 = m.artifacts["q8_0"]
    assert q8.mmproj == "mmproj.gguf"
    assert q8.files[1].source["pypi"] == [{"package": "tiny-w", "version": "0.1.2", "member": "tiny_w/m.gguf"}]
    assert m.download_size(q8) == 2000 and q8.total_size is None
    assert m.download_size() == 1000 and q4.total_size == 1000
    assert reg.defaults == {"text": "tiny", "vision": "tiny-vl"}


def test_resolve_alias_and_artifact(home, shipped):
    reg = Registry.load(home, shipped=shipped)
    m, a = reg.resolve("tiny")
    assert (m.alias, a.key) == ("tiny", "q4_k_m")
    m, a = reg.resolve("Tiny:Q8_0")
    assert (m.alias, a.key) == ("tiny", "q8_0")
    assert m.ref(a) == "tiny:q8_0" and m.ref() == "tiny"


def test_unknown_alias_suggests_close_names(home, shipped):
    reg = Registry.load(home, shipped=shipped)
    with pytest.raises(ModelNotFound, match="Did you mean 'tiny'") as ei:
        reg.get("tinny")
    assert "vlm list --available" in ei.value.hint
    with pytest.raises(ModelNotFound) as ei:
        reg.resolve("zzz")
    assert "Did you mean" not in str(ei.value)


def test_unknown_artifact_lists_available(home, shipped):
    with pytest.raises(ModelNotFound, match="no artifact 'q2_k'.*q4_k_m, q8_0") as ei:
        Registry.load(home, shipped=shipped).resolve("tiny:q2_k")
    assert "tiny:q8_0" in ei.value.hint


def test_overlay_wins_and_config_sets_defaults(home, shipped):
    write(home / "models.yaml", {"tiny": entry(name="My Tiny", default="q8_0"), "mine": entry(name="Mine")},
          {"text": "mine"})
    reg = Registry.load(home, shipped=shipped)
    assert reg.get("tiny").name == "My Tiny" and reg.get("tiny").origin == "user"
    assert reg.resolve("tiny")[1].key == "q8_0"
    assert reg.get("tiny-vl").origin == "shipped"
    assert reg.defaults == {"text": "mine", "vision": "tiny-vl"}
    save_config(Config(default_text_model="tiny:q8_0", default_vision_model="tiny"), home)
    reg = Registry.load(home, shipped=shipped)
    assert reg.defaults == {"text": "tiny:q8_0", "vision": "tiny"}
    assert reg.resolve(reg.default_ref("text"))[1].key == "q8_0"


def _broken(mutate) -> dict:
    e = copy.deepcopy(entry())
    mutate(e)
    return e


@pytest.mark.parametrize("mutate, words", [
    (lambda e: e.update(kindd="text"), ["model 'tiny'", "unknown field 'kindd'", "did you mean 'kind'"]),
    (lambda e: e.update(kind="txt"), ["model 'tiny'", "'kind'", "text, vision, guard", "'txt'"]),
    (lambda e: e.pop("name"), ["model 'tiny'", "'name' is required"]),
    (lambda e: e.update(default="q2_k"), ["model 'tiny'", "'default'", "q2_k", "q4_k_m, q8_0"]),
    (lambda e: e.update(parameters="135M"), ["model 'tiny'", "'parameters'", "whole number"]),
    (lambda e: e.update(kv={"layers": 30, "kv_heads": 3}), ["model 'tiny'", "'kv'", "head_dim"]),
    (lambda e: e.update(completion_only="yes"), ["model 'tiny'", "'completion_only'"]),
    (lambda e: e.update(artifacts={}), ["model 'tiny'", "'artifacts'"]),
    (lambda e: e["artifacts"]["q4_k_m"].update(format="safetensors"),
     ["model 'tiny'", "artifact 'q4_k_m'", "'format'", "gguf, onnx"]),
    (lambda e: e["artifacts"]["q4_k_m"].update(model="other.gguf"), ["artifact 'q4_k_m'", "'model'", "other.gguf"]),
    (lambda e: e["artifacts"]["q8_0"].update(mmproj="nope.gguf"), ["artifact 'q8_0'", "'mmproj'", "nope.gguf"]),
    (lambda e: e["artifacts"]["q4_k_m"]["files"][0].update(sha256="xyz"),
     ["artifact 'q4_k_m'", "file 'tiny-q4.gguf'", "'sha256'", "64 hex"]),
    (lambda e: e["artifacts"]["q4_k_m"]["files"][0].update(size=-1), ["file 'tiny-q4.gguf'", "'size'"]),
    (lambda e: e["artifacts"]["q4_k_m"]["files"][0].update(
        source={"url": "https://x/y", "hf": {"repo": "a/b", "file": "c"}}), ["file 'tiny-q4.gguf'", "exactly one of"]),
    (lambda e: e["artifacts"]["q4_k_m"]["files"][0].pop("source"), ["file 'tiny-q4.gguf'", "'source' is required"]),
    (lambda e: e["artifacts"]["q4_k_m"]["files"][0].update(source={"hf": {"repo": "noslash", "file": "x"}}),
     ["file 'tiny-q4.gguf'", "org/name"]),
    (lambda e: e["artifacts"]["q4_k_m"]["files"][0].update(source={"url": "ftp://x/y"}), ["'source.url'", "http"]),
    (lambda e: e["artifacts"]["q4_k_m"]["files"][0].update(
        source={"pypi": [{"package": "p", "version": "1", "membr": "m"}]}), ["unknown field 'membr'"]),
    (lambda e: e["artifacts"]["q4_k_m"].update(model="../x.gguf"), ["'model'", "relative path"]),
])
def test_validation_errors_name_alias_and_field(home, tmp_path, mutate, words):
    path = write(tmp_path / "bad.yaml", {"tiny": _broken(mutate)})
    with pytest.raises(RegistryError) as ei:
        Registry.load(home, shipped=path)
    msg = str(ei.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)
    assert isinstance(ei.value, UsageError) and str(path) in ei.value.hint


def test_bad_alias_bad_version_bad_yaml(home, tmp_path):
    with pytest.raises(RegistryError, match="alias 'Tiny_LM'"):
        Registry.load(home, shipped=write(tmp_path / "a.yaml", {"Tiny_LM": entry()}))
    with pytest.raises(RegistryError, match="version 2 is not supported"):
        Registry.load(home, shipped=write(tmp_path / "b.yaml", {"tiny": entry()}, version=2))
    bad = tmp_path / "c.yaml"
    bad.write_text("models:\n  tiny: [unclosed\n")
    with pytest.raises(RegistryError, match=f"{bad} is not valid YAML"):
        Registry.load(home, shipped=bad)


def test_broken_overlay_names_the_overlay(home, shipped):
    write(home / "models.yaml", {"tiny": _broken(lambda e: e.update(kind="audio"))})
    with pytest.raises(RegistryError, match=str(home / "models.yaml") + ".*model 'tiny'.*'kind'"):
        Registry.load(home, shipped=shipped)


def test_register_user_model(home, shipped):
    write(home / "models.yaml", {"keep": entry(name="Keep me")})
    spec = register_user_model(home, "tiny-q", entry(name="Quantized here"))
    assert spec.alias == "tiny-q" and spec.origin == "user"
    reg = Registry.load(home, shipped=shipped)
    assert reg.get("tiny-q").name == "Quantized here" and reg.get("keep").name == "Keep me"
    register_user_model(home, "tiny-q", entry(name="Again"))         # replaces
    assert Registry.load(home, shipped=shipped).get("tiny-q").name == "Again"
    before = (home / "models.yaml").read_text()
    with pytest.raises(RegistryError, match="model 'bad'.*'kind'"):
        register_user_model(home, "bad", entry(kind="nope"))
    assert (home / "models.yaml").read_text() == before
    assert sorted(p.name for p in home.iterdir()) == ["locks", "models.yaml"]   # no temp files left


def test_config_roundtrip_and_errors(home):
    assert vlm_home() == home
    assert load_config() == Config()
    path = save_config(Config(default_text_model="tiny", max_image_pixels=4_000_000))
    assert path == home / "config.yaml"
    assert load_config() == Config(default_text_model="tiny", max_image_pixels=4_000_000)
    path.write_text("max_image_pixels: 2048\ndefault_txt_model: tiny\n")
    with pytest.raises(UsageError, match="unknown setting 'default_txt_model'") as ei:
        load_config()
    assert "default_text_model" in ei.value.hint
    path.write_text("max_image_pixels: [1, 2\n")
    with pytest.raises(UsageError, match=f"{path} is not valid YAML"):
        load_config()
    path.write_text("max_image_pixels: -5\n")
    with pytest.raises(UsageError, match="'max_image_pixels' must be a positive whole number"):
        load_config(home)
    path.write_text("")
    assert load_config(home) == Config()


def test_vlm_home_default_is_platform_data_dir(monkeypatch):
    import platformdirs

    monkeypatch.delenv("VLM_HOME", raising=False)
    assert vlm_home() == Path(platformdirs.user_data_dir("edgevlm", appauthor=False))


def test_shipped_registry_loads_and_every_entry_validates(home):
    assert shipped_registry_path().is_file(), "models.yaml is not installed with the package"
    reg = Registry.load(home)                                     # validates every entry on load
    models = reg.models()
    assert models
    for m in models:
        assert m.origin == "shipped" and m.default in m.artifacts
        for a in m.artifacts.values():
            assert reg.resolve(f"{m.alias}:{a.key}") == (m, a)
    for kind in ("text", "vision"):
        spec, _ = reg.resolve(reg.default_ref(kind))
        assert spec.kind == kind


def test_estimate_before_pull_with_unknown_sizes_counts_parameters(tmp_path, monkeypatch):
    """onnx-community files whose sizes the registry does not know yet must not be estimated as zero
    bytes: the estimate falls back to parameters x bits per weight (model_q4.onnx of Llama 3.2 1B is
    1.66 GB), and onnxruntime's load-time copies come on top."""
    from edgevlm.runtime.loader import estimate_memory, resolve

    monkeypatch.setenv("VLM_HOME", str(tmp_path))
    q4 = estimate_memory(resolve("llama3.2-1b:onnx-int4", want_vision=False), 4096)
    g = resolve("llama3.2-1b:q4_k_m", want_vision=False)
    gguf = estimate_memory(g, 4096)
    assert q4.weights >= 1.5e9 and q4.kv_cache > 0
    assert q4.total > q4.weights + q4.kv_cache + gguf.overhead       # onnxruntime costs more than llama.cpp
    assert gguf.weights == sum(f.size for f in g.artifact_spec.files)  # known sizes are used as they are


def test_projector_beside_a_model_file(tmp_path):
    """One mmproj beside a .gguf is its projector; of several, the one named after the model file."""
    from edgevlm.runtime.loader import artifact_from_path

    model = tmp_path / "smolvlm-Q8_0.gguf"
    for p in (model, tmp_path / "mmproj-smolvlm-F16.gguf"):
        p.write_bytes(b"GGUF")
    assert artifact_from_path(model, None, True).mmproj == tmp_path / "mmproj-smolvlm-F16.gguf"
    assert artifact_from_path(model, None, False).mmproj is None
    (tmp_path / "mmproj-smolvlm-Q8_0.gguf").write_bytes(b"GGUF")
    assert artifact_from_path(model, None, True).mmproj == tmp_path / "mmproj-smolvlm-Q8_0.gguf"
    (tmp_path / "mmproj-smolvlm-Q8_0.gguf").unlink()
    (tmp_path / "mmproj-other-Q8_0.gguf").write_bytes(b"GGUF")
    assert artifact_from_path(model, None, True).mmproj is None          # two, neither named after it: ambiguous


# --------------------------------------------------------------------------------------------------
# The small-VLM catalogue (docs/vision-models.md): well-formed, pinned, and its hashes where published

NEW_VLMS = ("lfm2.5-vl-450m", "lfm2.5-vl-1.6b", "qwen3-vl-2b", "qwen3.5-0.8b", "internvl3.5-1b", "gemma4-e2b")
# Files whose size and sha256 were not published anywhere public: the hub's checksum is checked and
# recorded at the first download (see test_hf_file_without_a_registry_sha256_*).
UNPUBLISHED = {("internvl3.5-1b", "OpenGVLab_InternVL3_5-1B-Q4_K_M.gguf"),
               ("internvl3.5-1b", "mmproj-OpenGVLab_InternVL3_5-1B-f16.gguf"),
               ("lfm2.5-vl-450m", "LFM2.5-VL-450M-Q4_K_M.gguf")}


@pytest.mark.parametrize("alias", NEW_VLMS)
def test_small_vlm_entries_are_complete(home, alias):
    import re

    reg = Registry.load(home)
    m = reg.get(alias)
    assert m.kind == "vision" and m.license and m.homepage.startswith("https://huggingface.co/")
    assert m.parameters and m.context_length and m.kv
    for a in m.artifacts.values():
        assert a.format == "gguf" and a.mmproj and a.model != a.mmproj
        names = [f.name for f in a.files]
        assert a.model in names and a.mmproj in names and len(names) == 2
        for f in a.files:
            hf = f.source["hf"]
            assert hf["repo"] and hf["file"].endswith(".gguf")
            if (alias, f.name) in UNPUBLISHED:
                assert f.sha256 is None
                continue
            # a published hash belongs to one upload: the revision it was published at is pinned
            assert f.sha256 and re.fullmatch(r"[0-9a-f]{64}", f.sha256), (alias, f.name)
            assert f.size and f.size > 10_000_000, (alias, f.name)
            assert re.fullmatch(r"[0-9a-f]{40}", hf["revision"]), (alias, f.name, hf["revision"])
        assert a.total_size is None or a.total_size > 0


def test_a_projector_shared_by_two_artifacts_is_the_same_file(home):
    """Two artifacts of one model naming the same projector file agree on where it comes from, so the
    store can link one download into both (store.Store._reuse)."""
    reg = Registry.load(home)
    for alias in NEW_VLMS:
        seen: dict = {}
        for a in reg.get(alias).artifacts.values():
            f = next(f for f in a.files if f.name == a.mmproj)
            key = (f.name, f.size, f.sha256, tuple(sorted(f.source["hf"].items())))
            assert seen.setdefault(f.name, key) == key, (alias, f.name)


# --------------------------------------------------------------------------------------------------
# A file the registry has no sha256 for: the hub's checksum is checked, and the manifest records the
# sha256 and what it was checked against; without any checksum the file is refused, never installed.


def _hf_entry(file: str, **fields):
    from edgevlm.runtime.models.registry import validate_model

    return validate_model("tiny", {"name": "Tiny", "kind": "text", "default": "q4_0", "artifacts": {"q4_0": {
        "format": "gguf", "quantization": "Q4_0", "model": "tiny.gguf",
        "files": [{"name": "tiny.gguf", "source": {"hf": {"repo": "org/tiny-GGUF", "file": file}}, **fields}]}}})


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from test_store import FileServer

    s = FileServer()
    s.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("VLM_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _serve(hub, file: str, data: bytes, etag: str) -> None:
    from test_store import COMMIT

    for rev in ("main", COMMIT):
        hub.add(f"/org/tiny-GGUF/resolve/{rev}/{file}", data, ETag=f'"{etag}"', **{"X-Repo-Commit": COMMIT})


def test_hf_file_without_a_registry_sha256_is_checked_against_the_lfs_sha256(hub, home):
    import hashlib

    from edgevlm.runtime.models.store import Store

    data = b"GGUF" + bytes(range(256)) * 40
    _serve(hub, "a.gguf", data, hashlib.sha256(data).hexdigest())
    store = Store(home)
    store.pull(_hf_entry("a.gguf"))
    rec = store.manifest("tiny", "q4_0")["files"][0]
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["verified_by"] == "hub LFS sha256"
    assert rec["source"]["hf"]["commit"]                                    # the revision it came from


def test_hf_file_with_a_registry_sha256_records_that(hub, home):
    import hashlib

    from edgevlm.runtime.models.store import Store

    data = b"GGUF" + b"\x01" * 5000
    digest = hashlib.sha256(data).hexdigest()
    _serve(hub, "a.gguf", data, digest)
    store = Store(home)
    store.pull(_hf_entry("a.gguf", sha256=digest, size=len(data)))
    assert store.manifest("tiny", "q4_0")["files"][0]["verified_by"] == "registry sha256"


def test_hf_file_outside_lfs_is_checked_against_its_git_blob_sha1(hub, home):
    import hashlib

    from edgevlm.runtime.errors import ChecksumMismatch
    from edgevlm.runtime.models.store import Store

    data = b'{"architectures": ["Tiny"]}\n'
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    _serve(hub, "config.json", data, git_sha1)
    store = Store(home)
    store.pull(_hf_entry("config.json"))
    rec = store.manifest("tiny", "q4_0")["files"][0]
    assert rec["verified_by"] == "hub git blob sha1" and rec["sha256"] == hashlib.sha256(data).hexdigest()
    store.remove("tiny")
    _serve(hub, "config.json", data.replace(b"Tiny", b"Tinx"), git_sha1)     # the bytes changed, not the ETag
    with pytest.raises(ChecksumMismatch, match="git blob sha1"):
        store.pull(_hf_entry("config.json"))
    assert not store.is_installed("tiny", "q4_0")


def test_hf_file_with_no_checksum_anywhere_is_refused(hub, home):
    from edgevlm.runtime.errors import DownloadError
    from edgevlm.runtime.models.store import Store

    _serve(hub, "a.gguf", b"GGUF" + b"\x00" * 100, "W/not-a-checksum")
    store = Store(home)
    with pytest.raises(DownloadError, match="cannot be verified") as ei:
        store.pull(_hf_entry("a.gguf"))
    assert "sha256" in ei.value.hint
    assert not store.is_installed("tiny", "q4_0")
    assert not any(p.is_file() for p in home.rglob("*.gguf"))              # nothing downloaded


# The projector type each vision model's mmproj declares (clip.projector_type), as llama.cpp names it.
PROJECTOR_TYPES = {
    "smolvlm-256m": "idefics3", "smolvlm-500m": "idefics3", "qwen2.5-vl-3b": "qwen2.5vl_merger",
    "gemma3-4b": "gemma3", "moondream2": "mlp", "internvl3-1b": "internvl", "llava1.5-7b": "mlp",
    "lfm2.5-vl-450m": "lfm2", "lfm2.5-vl-1.6b": "lfm2", "qwen3-vl-2b": "qwen3vl_merger",
    "qwen3.5-0.8b": "qwen3vl_merger", "internvl3.5-1b": "internvl", "gemma4-e2b": "gemma4v",
}


def test_every_vision_model_has_a_projector_type_the_engine_knows(home):
    """libmtmd looks a projector type up by name (clip-impl.h, PROJECTOR_TYPE_NAMES): each name the
    registry's vision models need is in the libmtmd that llama-cpp-python built here."""
    import llama_cpp

    reg = Registry.load(home)
    vision = {m.alias for m in reg.models() if m.kind == "vision"}
    assert vision == set(PROJECTOR_TYPES), "a vision model without a known projector type: add it here"
    libs = list((Path(llama_cpp.__file__).parent / "lib").glob("libmtmd.*")) or list(
        Path(llama_cpp.__file__).parent.glob("**/*mtmd*"))
    assert libs, "llama-cpp-python was built without libmtmd"
    blob = libs[0].read_bytes()
    for alias, name in PROJECTOR_TYPES.items():      # (a linker may share "mlp" with a longer string's tail)
        assert name.encode() + b"\0" in blob, (alias, name)
