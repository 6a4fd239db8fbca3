"""HF checkpoint -> GGUF (+ mmproj) -> quantized GGUF, end to end on the tiny Idefics3 fixture.

The fixture itself is built with the code under test (``edgevlm.quantize.gguf``) and cached by content
hash, so a warm run spends its time on the cases below, not on rebuilding it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgevlm.quantize.gguf import (
    IMATRIX_TYPES,
    QUANT_TYPES,
    ConvertResult,
    convert_hf_to_gguf,
    quant_type,
    quantize_gguf,
)
from edgevlm.runtime.errors import BackendError, BadModelFile, EdgeVLMError, ModelNotFound, UsageError
from edgevlm.runtime.formats.gguf_file import read_gguf

# ------------------------------------------------------------------------------------ helpers

def _image(width: int = 200, height: int = 120):
    from PIL import Image

    from edgevlm.runtime.protocol import ImageInput

    img = Image.new("RGB", (width, height))
    px = img.load()
    for x in range(width):
        for y in range(height):
            px[x, y] = (x * 255 // width, y * 255 // height, (x + y) % 256)
    rgb = img.tobytes()
    return ImageInput(rgb=rgb, width=width, height=height, source="gradient.png",
                      sha256=hashlib.sha256(rgb).hexdigest())


def _ask(model: Path, mmproj: Path | None, text: str, images=(), max_tokens: int = 8):
    from edgevlm.runtime.backends.gguf import GGUFBackend
    from edgevlm.runtime.generation.core import generate
    from edgevlm.runtime.protocol import Artifact, ChatRequest, GenerationOptions, LoadOptions, Message

    backend = GGUFBackend()
    try:
        backend.load(Artifact(format="gguf", path=model, name=model.name, mmproj=mmproj),
                     LoadOptions(n_ctx=1024, n_threads=2))
        req = ChatRequest([Message(role="user", content=text, images=list(images))], GenerationOptions(temperature=0, max_tokens=max_tokens))
        return list(generate(backend, req))
    finally:
        backend.close()


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(d.rglob("*"))} | {".": (0, d.stat().st_mtime_ns, d.stat().st_mode)}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _make_unwritable(d: Path):
    """Make folder ``d`` refuse new entries; returns an undo function, or None if we cannot (root
    ignores permission bits, so fall back to the immutable attribute)."""
    def writable() -> bool:
        probe = d / ".probe"
        try:
            probe.mkdir()
        except OSError:
            return False
        probe.rmdir()
        return True

    d.chmod(0o555)
    if not writable():
        return lambda: d.chmod(0o755)
    d.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        if not writable():
            return lambda: subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    return None


# ------------------------------------------------------------------------- the vision fixture

@pytest.mark.slow
def test_vision_fixture_builds(vision_model):
    hf = vision_model["hf_dir"]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "idefics3"
    assert cfg["text_config"]["architectures"] == ["VLlama3ForCausalLM"]
    assert cfg["vision_config"]["patch_size"] == 16 and cfg["vision_config"]["image_size"] == 64
    pre = json.loads((hf / "preprocessor_config.json").read_text())
    assert pre["max_image_size"] == {"longest_edge": 64} and pre["image_processor_type"] == "Idefics3ImageProcessor"

    text, mm = read_gguf(vision_model["gguf"]), read_gguf(vision_model["mmproj"])
    assert text.architecture == "llama" and text.quantization == "Q8_0"
    assert text.get("tokenizer.ggml.pre") == "smollm"          # the repaired tokenizer was recognised
    assert "is string" in text.chat_template and "<end_of_utterance>" in text.chat_template
    assert mm.is_mmproj and mm.get("clip.projector_type") == "idefics3"
    assert mm.projector_dim == text.get("llama.embedding_length") == 64
    assert read_gguf(vision_model["gguf_f16"]).quantization == "F16"
    assert vision_model["mmproj"].stat().st_size < 2 * 2**20 and vision_model["gguf_f16"].stat().st_size < 40 * 2**20


@pytest.mark.slow
def test_vision_fixture_is_cached(vision_model, smollm2_gguf):
    from fixtures import vision_fixture

    again = vision_fixture(vision_model["dir"].parent, smollm2_gguf)
    assert again == vision_model
    assert not list(vision_model["dir"].parent.glob(".*.partial"))


@pytest.mark.slow
@pytest.mark.model
def test_backend_reads_the_image(vision_model):
    img = _image()
    chunks = _ask(vision_model["gguf"], vision_model["mmproj"], "What is in this image?", images=[img])
    last = chunks[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.completion_tokens > 0
    # 200x120 -> longest edge 128 -> 2x2 tiles of 64 px plus the global image, 4 tokens each
    assert last.image_tokens == 20
    assert last.prompt_tokens > last.image_tokens
    # deterministic: the same request gives the same answer
    again = _ask(vision_model["gguf"], vision_model["mmproj"], "What is in this image?", images=[img])
    assert "".join(c.text for c in again) == "".join(c.text for c in chunks)


@pytest.mark.slow
def test_transformers_loads_the_checkpoint(vision_model):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image

    hf = vision_model["hf_dir"]
    proc = AutoProcessor.from_pretrained(hf)
    assert type(proc).__name__ == "Idefics3Processor"
    listed = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                      add_generation_prompt=True)
    plain = proc.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert listed == "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:"
    assert plain == "<|im_start|>User: Hi<end_of_utterance>\nAssistant:"
    enc = proc(text=listed, images=[Image.new("RGB", (200, 120), (10, 200, 30))], return_tensors="pt")
    assert tuple(enc["pixel_values"].shape) == (1, 5, 3, 64, 64)
    assert int((enc["input_ids"] == proc.image_token_id).sum()) == 20
    model = AutoModelForImageTextToText.from_pretrained(hf)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3


# ------------------------------------------------------------------------------- quantize_gguf

@pytest.mark.slow
@pytest.mark.model
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantize_fixture_text_model(vision_model, tmp_path, qtype, capfd):
    seen = []
    capfd.readouterr()
    out = quantize_gguf(vision_model["gguf_f16"], tmp_path / f"tiny-{qtype}.gguf", qtype,
                        on_progress=lambda *a: seen.append(a))
    assert capfd.readouterr() == ("", "")                         # llama.cpp's log stays out of stdout/stderr
    info = read_gguf(out)
    assert info.quantization == qtype
    assert out.stat().st_size < vision_model["gguf_f16"].stat().st_size
    assert _leftovers(tmp_path) == [out.name]                      # no .tmp left behind
    n = len(info.tensors)
    assert seen[0] == ("quantize", 0, n) and seen[-1] == ("quantize", n, n)
    assert all(stage == "quantize" for stage, _, _ in seen)
    chunks = _ask(out, vision_model["mmproj"], "Describe it.", images=[_image(64, 64)], max_tokens=4)
    assert chunks[-1].completion_tokens > 0 and chunks[-1].image_tokens > 0


@pytest.mark.slow
def test_interrupted_quantize_leaves_nothing(vision_model, tmp_path):
    def interrupt(stage, done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(vision_model["gguf_f16"], tmp_path / "out.gguf", "Q8_0", on_progress=interrupt)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_quantize_refuses_requantizing_unless_allowed(vision_model, tmp_path):
    with pytest.raises(UsageError, match="already quantized") as e:
        quantize_gguf(vision_model["gguf"], tmp_path / "q4.gguf", "Q4_0")
    assert "requantize" in e.value.hint
    assert _leftovers(tmp_path) == []
    out = quantize_gguf(vision_model["gguf"], tmp_path / "q4.gguf", "Q4_0", allow_requantize=True)
    assert read_gguf(out).quantization == "Q4_0"


@pytest.mark.slow
def test_quantize_refuses_a_projector(vision_model, tmp_path):
    with pytest.raises(BadModelFile, match="vision projector"):
        quantize_gguf(vision_model["mmproj"], tmp_path / "mm.gguf", "Q8_0")
    assert _leftovers(tmp_path) == []


def test_unknown_quant_type_lists_the_valid_ones(tmp_path):
    with pytest.raises(UsageError) as e:
        quantize_gguf(tmp_path / "absent.gguf", tmp_path / "out.gguf", "Q9_X")
    assert "Q9_X" in str(e.value)
    for name in ("Q4_K_M", "Q8_0", "IQ4_XS", "BF16"):
        assert name in e.value.hint
    assert isinstance(e.value, ValueError)


def test_quant_type_names():
    assert quant_type("q4_k_m") == "Q4_K_M"
    assert quant_type("Q4_K") == "Q4_K_M"
    assert quant_type("f16") == "F16"
    for name, (const, bpw) in QUANT_TYPES.items():
        assert const.startswith("LLAMA_FTYPE_") and 1 < bpw <= 32, name
    import llama_cpp

    missing = [c for c, _ in list(QUANT_TYPES.values()) + list(IMATRIX_TYPES.values()) if not hasattr(llama_cpp, c)]
    assert not missing


@pytest.mark.parametrize("qtype", sorted(IMATRIX_TYPES))
def test_imatrix_types_fail_clearly(tmp_path, qtype):
    with pytest.raises(UsageError, match="importance matrix"):
        quantize_gguf(tmp_path / "absent.gguf", tmp_path / "out.gguf", qtype)


def test_quantize_missing_or_bad_input(tmp_path):
    with pytest.raises(BadModelFile, match="not found"):
        quantize_gguf(tmp_path / "absent.gguf", tmp_path / "out.gguf", "Q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all, just text")
    with pytest.raises(BadModelFile, match="not a valid GGUF"):
        quantize_gguf(bad, tmp_path / "out.gguf", "Q8_0")
    assert _leftovers(tmp_path) == ["bad.gguf"]


@pytest.mark.slow
def test_quantize_into_unwritable_folder(vision_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _make_unwritable(ro)
    if undo is None:
        pytest.skip("cannot make a folder unwritable here")
    try:
        with pytest.raises(UsageError, match="Cannot write to") as e:
            quantize_gguf(vision_model["gguf_f16"], ro / "out.gguf", "Q8_0")
        assert "write to" in e.value.hint
    finally:
        undo()
    assert _leftovers(ro) == []


# -------------------------------------------------------------------------- convert_hf_to_gguf

def test_convert_rejects_missing_folder(tmp_path):
    with pytest.raises(ModelNotFound, match="not found"):
        convert_hf_to_gguf(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_rejects_folder_without_config(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(BadModelFile, match="no config.json") as e:
        convert_hf_to_gguf(src, tmp_path / "out")
    assert "config.json" in e.value.hint
    assert _leftovers(tmp_path) == ["ckpt"]


def test_convert_rejects_config_without_weights(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(BadModelFile, match="no weights"):
        convert_hf_to_gguf(src, tmp_path / "out")


def test_convert_rejects_bad_arguments(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (src / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UsageError, match="output type"):
        convert_hf_to_gguf(src, tmp_path / "out", outtype="q4_k_m")
    with pytest.raises(UsageError, match="no vision_config"):
        convert_hf_to_gguf(src, tmp_path / "out", mmproj=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        convert_hf_to_gguf(src, tmp_path / "full")
    with pytest.raises(UsageError, match="inside the checkpoint"):
        convert_hf_to_gguf(src, src / "out")
    assert _leftovers(tmp_path) == ["ckpt", "full"]


@pytest.mark.slow
def test_convert_into_unwritable_folder(vision_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _make_unwritable(ro)
    if undo is None:
        pytest.skip("cannot make a folder unwritable here")
    try:
        with pytest.raises(UsageError, match="Cannot write to"):
            convert_hf_to_gguf(vision_model["hf_dir"], ro / "out")
    finally:
        undo()
    assert _leftovers(ro) == []


@pytest.mark.slow
@pytest.mark.model
def test_convert_text_only_q8_leaves_source_untouched(vision_model, tmp_path, capfd):
    hf = vision_model["hf_dir"]
    before = _snapshot(hf)
    stages = set()
    capfd.readouterr()
    res = convert_hf_to_gguf(hf, tmp_path / "out", outtype="q8_0", mmproj=False,
                             on_progress=lambda stage, done, total: stages.add(stage))
    assert capfd.readouterr() == ("", "")                         # the converter's log is captured
    assert isinstance(res, ConvertResult) and res.mmproj is None
    assert res.model == tmp_path / "out" / "tiny-idefics3-Q8_0.gguf"
    assert _leftovers(tmp_path) == ["out"] and _leftovers(tmp_path / "out") == [res.model.name]
    assert oct((tmp_path / "out").stat().st_mode & 0o777) != oct(0o700)   # not mkdtemp's private mode
    assert read_gguf(res.model).quantization == "Q8_0"
    assert stages == {"convert"}
    assert _snapshot(hf) == before
    chunks = _ask(res.model, None, "Hello", max_tokens=4)
    assert chunks[-1].completion_tokens > 0 and chunks[-1].image_tokens == 0


@pytest.mark.slow
def test_failed_conversion_leaves_nothing(vision_model, tmp_path):
    """The text model converts, then the projector fails: no file or folder may look finished."""
    src = tmp_path / "ckpt"
    shutil.copytree(vision_model["hf_dir"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"]["architectures"] = ["NoSuchVisionTower"]
    (src / "config.json").write_text(json.dumps(cfg))
    stages = []
    with pytest.raises(BackendError) as e:
        convert_hf_to_gguf(src, tmp_path / "out", on_progress=lambda s, d, t: stages.append(s))
    assert "NoSuchVisionTower" in str(e.value) and "not supported" in str(e.value)
    assert e.value.hint
    assert "convert-mmproj" in stages                # it failed in the second step, after the first
    assert _leftovers(tmp_path) == ["ckpt"]


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing(vision_model, tmp_path):
    def interrupt(stage, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_gguf(vision_model["hf_dir"], tmp_path / "out", on_progress=interrupt)
    assert _leftovers(tmp_path) == []


def test_errors_are_edgevlm_errors():
    for cls in (UsageError, BadModelFile, BackendError, ModelNotFound):
        assert issubclass(cls, EdgeVLMError)
