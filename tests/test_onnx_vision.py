"""Vision-language models on the ONNX backend: the tiny random-weight Idefics3 fixture exported to the
three-part layout (vision_encoder / embed_tokens / decoder_model_merged) by
``edgevlm.quantize.onnx_vision``, images prepared without torch by ``edgevlm.runtime.inputs.idefics3``.

Checked against transformers on the same checkpoint: the preprocessing (pixels and token ids) exactly,
and greedy generation token for token. Random weights give gibberish, so token ids are compared, not text.
The export is the vision fixture's, built by `vlm quantize` once per machine and cached by content hash.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from edgevlm.runtime.backends.onnx import ONNXBackend  # noqa: E402
from edgevlm.runtime.errors import BadModelFile, UsageError  # noqa: E402
from edgevlm.runtime.inputs.idefics3 import Idefics3Preprocessor  # noqa: E402
from edgevlm.runtime.generation.core import generate  # noqa: E402
from edgevlm.runtime.protocol import Artifact, ChatRequest, GenerationOptions, ImageInput, LoadOptions, Message  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]

QUESTION = "What is in this image?"
# (width, height) sets: a wide image cut into tiles, a tall one plus a small square, three mixed sizes.
IMAGE_SETS = [[(200, 100)], [(37, 90), (64, 64)], [(300, 301), (20, 10), (129, 50)]]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def vision_onnx(vision_model) -> Path:
    """The folder `vlm quantize` wrote for the fixture (conftest): sidecars and onnx/ with the three
    parts in fp32, _int8 and _q4."""
    return Path(vision_model["out"])


@pytest.fixture(scope="module")
def hf(vision_model):
    """transformers' processor and model on the same checkpoint (the reference)."""
    torch = pytest.importorskip("torch")
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    d = str(vision_model["hf_dir"])
    torch.manual_seed(0)
    return Idefics3Processor.from_pretrained(d), Idefics3ForConditionalGeneration.from_pretrained(d).eval()


def _load(path: Path) -> ONNXBackend:
    b = ONNXBackend()
    b.load(Artifact(format="onnx", path=path, name=path.name), LoadOptions(n_threads=2))
    return b


@pytest.fixture(scope="module")
def fp32(vision_onnx):
    b = _load(vision_onnx)
    yield b
    b.close()


def _image(width: int, height: int, seed: int):
    """A deterministic noisy gradient as (PIL image, ImageInput)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    raw = arr.tobytes()
    return Image.fromarray(arr), ImageInput(raw, width, height, f"test-{seed}.png", hashlib.sha256(raw).hexdigest())


def _hf_inputs(processor, images, question: str = QUESTION):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[[im for im, _ in images]], text=[prompt], return_tensors="pt")


def _run(backend: ONNXBackend, request: ChatRequest):
    chunks = list(generate(backend, request))
    return chunks[-1], list(chunks[-1].token_ids)


def _ask(images, question: str = QUESTION, n: int = 12) -> ChatRequest:
    """--detail high (transformers' own processing, the reference) without the embedding cache."""
    from edgevlm.runtime.protocol import ImageDetail

    return ChatRequest([Message("user", question, [img for _, img in images])],
                       GenerationOptions(temperature=0, max_tokens=n, image_detail=ImageDetail(level="high", cache=False)))


# ---------------------------------------------------------------------------------------------- unit
def test_export_refuses_other_architectures(tmp_path):
    from edgevlm.quantize.onnx_vision import export_vision

    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError) as e:
        export_vision(src, tmp_path / "out")
    assert "idefics3" in str(e.value) and e.value.hint


def test_unsupported_image_processor_is_named():
    with pytest.raises(BadModelFile) as e:
        Idefics3Preprocessor({"image_processor_type": "SiglipImageProcessor"})
    assert "SiglipImageProcessor" in str(e.value) and "Idefics3ImageProcessor" in str(e.value) and e.value.hint


# ---------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("sizes", IMAGE_SETS, ids=lambda s: "+".join(f"{w}x{h}" for w, h in s))
def test_preprocessing_matches_transformers(vision_model, hf, sizes):
    import numpy as np
    from tokenizers import Tokenizer

    processor, _ = hf
    hf_dir = Path(vision_model["hf_dir"])
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ref = _hf_inputs(processor, images)

    ours = Idefics3Preprocessor.from_dirs([hf_dir], json.loads((hf_dir / "config.json").read_text()))
    got = ours.preprocess([img for _, img in images])
    assert got.pixel_values.shape == tuple(ref["pixel_values"].shape)
    assert got.pixel_values.dtype == np.float32
    np.testing.assert_allclose(got.pixel_values, ref["pixel_values"].numpy(), rtol=0, atol=1e-6)
    assert (got.pixel_attention_mask == ref["pixel_attention_mask"].numpy().astype(bool)).all()
    assert [ours.plan(img.width, img.height) for _, img in images] == got.plans   # geometry without pixels

    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = tok.encode(ours.expand(prompt, got.plans), add_special_tokens=False).ids
    assert ids == ref["input_ids"][0].tolist()


# ---------------------------------------------------------------------------------------------- export + backend
def test_layout(vision_onnx):
    import onnxruntime as ort

    d = vision_onnx / "onnx"
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (d / name).is_file(), name
    io = {}
    for part in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        s = ort.InferenceSession(str(d / f"{part}.onnx"), providers=["CPUExecutionProvider"])
        io[part] = ({i.name: i.shape for i in s.get_inputs()}, {o.name: o.shape for o in s.get_outputs()})
    ins, outs = io["vision_encoder"]
    assert set(ins) == {"pixel_values", "pixel_attention_mask"} and len(ins["pixel_values"]) == 5
    assert list(outs) == ["image_features"]
    assert io["embed_tokens"][0].keys() == {"input_ids"} and list(io["embed_tokens"][1]) == ["inputs_embeds"]
    ins, outs = io["decoder_model_merged"]
    assert {"inputs_embeds", "attention_mask", "past_key_values.0.key"} <= set(ins)
    assert "input_ids" not in ins and "position_ids" not in ins          # the fused decoder: rotary from the cache
    meta = ort.InferenceSession(str(d / "decoder_model_merged.onnx"),
                                providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta.get("edgevlm.kv_cache") == "shared"
    assert {"logits", "present.0.key", "present.1.value"} <= set(outs)
    assert ins["past_key_values.0.key"][1] == 2 and ins["past_key_values.0.key"][3] == 16   # kv_heads, head_dim


@pytest.mark.parametrize("sizes", [IMAGE_SETS[0], IMAGE_SETS[1]], ids=["one-image", "two-images"])
def test_greedy_matches_transformers(fp32, hf, sizes):
    import torch

    processor, model = hf
    images = [_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]
    ref = _hf_inputs(processor, images)
    with torch.no_grad():
        out = model.generate(**ref, do_sample=False, max_new_tokens=12)
    want = out[0, ref["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    want = want[: want.index(eos)] if eos in want else want

    fp32.reset()
    assert fp32._shared                                  # the decoder runs on one KV buffer per layer
    req = _ask(images)
    _, ids, _ = fp32._prepare(req)
    assert ids == ref["input_ids"][0].tolist()          # same prompt, same image tokens
    last, got = _run(fp32, req)
    assert got == want
    n_image = sum(1 for t in ids if t == model.config.image_token_id)
    assert last.image_tokens == n_image > 0 and last.prompt_tokens == len(ids)
    assert last.image_encode_s > 0


def test_second_turn_reuses_image_and_cache(fp32):
    images = [_image(160, 90, seed=42)]
    fp32.reset()
    first, toks = _run(fp32, _ask(images, n=6))
    assert first.image_encode_s > 0 and first.prompt_eval_tokens == first.prompt_tokens
    follow = ChatRequest([Message("user", QUESTION, [images[0][1]]),
                                   Message("assistant", fp32.tokenizer.decode(toks)),
                                   Message("user", "And what colour is it?")], GenerationOptions(temperature=0, max_tokens=6))
    second, _ = _run(fp32, follow)
    assert second.image_tokens == first.image_tokens
    assert second.prompt_tokens > first.prompt_tokens
    assert second.prompt_eval_tokens < second.prompt_tokens - first.image_tokens   # image positions reused
    assert second.image_encode_s == 0

    fp32.reset()                        # KV gone, features still cached: no second encode
    again, _ = _run(fp32, _ask(images, n=2))
    assert again.prompt_eval_tokens == again.prompt_tokens and again.image_encode_s == 0


def test_text_only_prompt_on_vision_model(fp32):
    fp32.reset()
    last, toks = _run(fp32, ChatRequest([Message("user", "Hello")], GenerationOptions(temperature=0, max_tokens=4)))
    assert last.image_tokens == 0 and last.image_encode_s == 0 and last.completion_tokens == len(toks)


@pytest.mark.parametrize("variant", ["int8", "q4"])
def test_quantized_variants_load_and_generate(vision_onnx, variant):
    b = _load(vision_onnx / "onnx" / f"decoder_model_merged_{variant}.onnx")
    try:
        assert b.has_vision
        assert {p.name for p in b.part_files.values()} == {
            f"decoder_model_merged_{variant}.onnx", f"vision_encoder_{variant}.onnx", f"embed_tokens_{variant}.onnx"}
        last, toks = _run(b, _ask([_image(120, 200, seed=7)], n=8))
        assert last.finish_reason in ("length", "stop") and last.image_tokens > 0 and last.image_encode_s > 0
        assert len(toks) == last.completion_tokens
    finally:
        b.close()


def _linked_copy(src: Path, dst: Path, skip: set[str]) -> Path:
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_file() and str(rel) not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(f)
    return dst


def test_missing_part_is_a_clear_error(vision_onnx, tmp_path):
    d = _linked_copy(vision_onnx, tmp_path / "m", {"onnx/embed_tokens.onnx"})
    with pytest.raises(BadModelFile) as e:
        _load(d)
    assert "embed_tokens.onnx" in str(e.value) and "missing" in str(e.value)
    assert "vision_encoder" in e.value.hint


def test_missing_quantized_part_falls_back_to_fp32(vision_onnx, tmp_path):
    d = _linked_copy(vision_onnx, tmp_path / "m", {"onnx/embed_tokens_int8.onnx"})
    b = _load(d / "onnx" / "decoder_model_merged_int8.onnx")
    try:
        assert b.part_files["embed_tokens"].name == "embed_tokens.onnx"
        assert b.part_files["vision_encoder"].name == "vision_encoder_int8.onnx"
    finally:
        b.close()


def test_image_marker_typed_in_text_is_refused(fp32):
    fp32.reset()
    _, img = _image(64, 64, seed=3)
    with pytest.raises(UsageError) as e:
        list(generate(fp32, ChatRequest([Message("user", "look <image> here", [img])], GenerationOptions(max_tokens=2))))
    assert "<image>" in e.value.hint
