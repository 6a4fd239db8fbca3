"""Doing less work per token: forced-token runs under --schema, llguidance's tokenizer cached on disk,
and --kv-type (a quantized KV cache) -- on real SmolLM2-135M weights, GGUF and ONNX."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import assert_clean_error, vlm

jsonschema = pytest.importorskip("jsonschema")

# A caption-style record: fixed keys, enums, numbers, a boolean, one free string.
PET = {"type": "object",
       "properties": {"name": {"type": "string"}, "species": {"enum": ["cat", "dog", "bird", "fish"]},
                      "age": {"type": "integer"}, "color": {"enum": ["black", "white", "brown", "grey", "orange"]},
                      "indoor": {"type": "boolean"}, "weight_kg": {"type": "number"}},
       "required": ["name", "species", "age", "color", "indoor", "weight_kg"], "additionalProperties": False}
QUESTIONS = ["Describe a pet as a JSON record: Rex is a 5 year old brown dog who lives indoors and weighs 12 kg.",
             "Milo the cat is orange, two years old, 4 kg, and goes outside every day. Give his record.",
             "A record for a grey parrot called Kiki, aged 31, weighing 0.4 kg, kept indoors."]


@pytest.fixture(scope="module")
def smollm2_onnx_dir(smollm2_hf) -> Path:
    from test_onnx_backend import _cached_build

    return _cached_build("smollm2-135m-onnx", smollm2_hf, "auto", ("int8", "int4"))


# Gemma (ggml's batched kernels from 4 rows on) and the unconstrained runs (forced runs change nothing
# there) are the full suite's; the quick subset keeps SmolLM2 on both backends under the schema.
@pytest.fixture(scope="module", params=["gguf", pytest.param("gemma-gguf", marks=pytest.mark.slow), "onnx"])
def backend(request, smollm2_gguf):
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    # ONNX: the fp32 export. The int8 and int4 ones quantize activations over the whole run, so their
    # logits depend on how many tokens one run evaluates (measured: up to ~0.5 apart after a run of 2-8
    # tokens, 2e-5 in fp32, exactly 0 in llama.cpp): batched and stepwise answers may part at a near-tie
    # there, as their prompt evaluation already does (quantize/verify.py reports it for the int8 export).
    # Gemma 3 270M Q4_K_M: its Q5_0 / Q8_0 tensors take ggml's batched kernels from 4 rows on (GGUFBackend.eval_tokens).
    path = {"gguf": lambda: smollm2_gguf, "gemma-gguf": lambda: request.getfixturevalue("gemma_gguf"),
            "onnx": lambda: request.getfixturevalue("smollm2_onnx_dir") / "model.onnx"}[request.param]()
    b = load_backend(artifact_from_path(path, None, False), LoadOptions(n_ctx=2048, n_threads=2))
    yield b
    b.close()


def _answer(backend, question: str, *, schema=None, forced_runs=True, temperature=0.0, seed=None, max_tokens=96):
    from edgevlm.runtime.generation.core import generate
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    backend.reset()
    req = ChatRequest([Message("user", question)],
                      GenerationOptions(temperature=temperature, seed=seed, max_tokens=max_tokens, json_schema=schema,
                                        raw=not backend.chat_template,         # Gemma 3 270M: a base model
                                        draft="off"))     # forced runs alone (drafting: test_drafting.py)
    parts, last = [], None
    for chunk in generate(backend, req, forced_runs=forced_runs):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


class _Counted:
    """Counts the backend's evaluation calls (the real backend does the work)."""

    def __init__(self, backend) -> None:
        self.b, self.single, self.runs, self.run_tokens = backend, 0, 0, 0

    def __enter__(self):
        b = self.b
        self._eval, self._eval_tokens = b.eval, b.eval_tokens

        def one(tok):
            self.single += 1
            return self._eval(tok)

        def many(toks):
            self.runs += 1
            self.run_tokens += len(toks)
            return self._eval_tokens(toks)

        b.eval, b.eval_tokens = one, many
        return self

    def __exit__(self, *exc) -> None:
        del self.b.eval, self.b.eval_tokens


@pytest.mark.model
@pytest.mark.parametrize("schema", [PET, pytest.param(None, marks=pytest.mark.slow)], ids=["schema", "free"])
def test_greedy_identical_with_and_without_forced_runs(backend, schema):
    """Same tokens, same text; under the schema in fewer evaluation steps."""
    for q in QUESTIONS[::2]:
        with _Counted(backend) as fast:
            text, last = _answer(backend, q, schema=schema)
        with _Counted(backend) as slow:
            ref_text, ref_last = _answer(backend, q, schema=schema, forced_runs=False)
        assert last.token_ids == ref_last.token_ids and text == ref_text, (q, text, ref_text)
        assert last.finish_reason == ref_last.finish_reason
        assert slow.runs == 0
        if schema is None:
            assert fast.runs == 0 and fast.single == slow.single
            continue
        jsonschema.validate(json.loads(text), schema)
        steps = fast.single + fast.runs
        assert fast.runs > 0 and fast.run_tokens > fast.runs
        assert steps + fast.run_tokens - fast.runs == slow.single          # every token evaluated once
        assert steps <= 0.67 * slow.single, (steps, slow.single)          # most of a record is forced


@pytest.mark.model
def test_sampled_answers_still_valid_under_the_schema(backend):
    for seed in range(2):
        text, last = _answer(backend, QUESTIONS[seed], schema=PET, temperature=1.0, seed=seed, max_tokens=120)
        if last.finish_reason == "stop":
            jsonschema.validate(json.loads(text), PET)


@pytest.mark.model
def test_forced_run_respects_max_tokens(backend):
    """A run the schema forces stops at --max-tokens exactly as token-by-token decoding does."""
    for n in (1, 3, 7):
        text, last = _answer(backend, QUESTIONS[0], schema=PET, max_tokens=n)
        ref, ref_last = _answer(backend, QUESTIONS[0], schema=PET, max_tokens=n, forced_runs=False)
        assert last.token_ids == ref_last.token_ids and len(last.token_ids) == n
        assert last.finish_reason == ref_last.finish_reason == "length" and text == ref


@pytest.mark.model
def test_mask_matches_llguidance_reference(backend):
    """Our numpy mask (one allowed token, a few, many, all) against llguidance's own bitmask helper, at
    every step of a record: same -inf positions, allowed logits untouched."""
    import llguidance.numpy as lnp
    import numpy as np

    from edgevlm.runtime.generation.constrain import JSONSchemaConstraint

    c = JSONSchemaConstraint.for_backend(backend, PET)
    doc = '{"name": "Rex the dog", "species": "dog", "age": 5, "color": "brown", "indoor": true, "weight_kg": 12.5}'
    ids = c._tok.tokenize_str(doc)
    rng = np.random.default_rng(0)
    width = c._tok.vocab_size + 5
    seen = set()
    for t in ids:
        row = rng.standard_normal(width).astype(np.float32)
        ref = row.copy()[None, :]
        c.mask(row)
        lnp.apply_token_bitmask_inplace(ref, c._bits)
        ref[0, c._tok.vocab_size:] = -np.inf
        assert np.array_equal(row, ref[0])
        n = int(np.isfinite(row).sum())
        seen.add("one" if n == 1 else "few" if n <= 64 else "all" if n >= c._tok.vocab_size - 64 else "many")
        c.advance(t)
    assert {"one", "few", "many"} <= seen, seen


# ---------------------------------------------------------------------------------------------- tokenizer cache
def _retoken(src: Path, dst: Path, old: bytes, new: bytes) -> None:
    """A copy of the GGUF whose vocabulary has one token's text changed (same length: offsets hold)."""
    assert len(old) == len(new)
    data = bytearray(src.read_bytes())
    needle = struct.pack("<Q", len(old)) + old
    i = data.find(needle)
    assert i > 0
    data[i + 8: i + 8 + len(old)] = new
    dst.write_bytes(bytes(data))


@pytest.mark.model
def test_tokenizer_cache_hit_and_invalidated_by_another_vocabulary(smollm2_gguf, tmp_path, monkeypatch):
    from edgevlm.runtime.generation import vocab_cache
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    root = vocab_cache.cache_dir()
    calls = []
    real = vocab_cache._pieces
    monkeypatch.setattr(vocab_cache, "_pieces", lambda *a: calls.append(1) or real(*a))

    def tokenizer(path: Path):
        """What llguidance's tokenizer says, read while the model is loaded (it tokenizes through llama.cpp)."""
        b = load_backend(artifact_from_path(path, None, False), LoadOptions(n_ctx=256, n_threads=1))
        try:
            t = b.constraint_tokenizer()
            pieces = [t.decode_bytes([i]) for i in range(b._n_vocab)]
            return pieces, t.tokenize_str('{"a": "hello"}'), t.eos_tokens
        finally:
            b.close()

    pieces, ids, eos = tokenizer(smollm2_gguf)
    assert len(calls) == 1 and len(list(root.glob("*.bin"))) == 1
    assert tokenizer(smollm2_gguf) == (pieces, ids, eos)         # a new backend: read from disk
    assert len(calls) == 1

    other = tmp_path / "other.gguf"
    _retoken(smollm2_gguf, other, b"hello", b"zqzqz")
    other_pieces, _, _ = tokenizer(other)
    assert len(calls) == 2 and len(list(root.glob("*.bin"))) == 2     # its own entry, not the first one's
    changed = [i for i, (a, b) in enumerate(zip(pieces, other_pieces)) if a != b]
    assert len(changed) == 1 and pieces[changed[0]] == b"hello" and other_pieces[changed[0]] == b"zqzqz"

    for entry in root.glob("*.bin"):                             # a damaged entry is rebuilt, not trusted
        entry.write_bytes(entry.read_bytes()[:1000])
    assert tokenizer(smollm2_gguf)[0] == pieces and len(calls) == 3


# ---------------------------------------------------------------------------------------------- KV cache types
def test_kv_types_in_the_memory_estimate():
    from edgevlm.runtime.device.memory import KV_TYPES, estimate, kv_cache_bytes, kv_type
    from edgevlm.runtime.errors import UsageError

    f16 = kv_cache_bytes(8192, 30, 3, 64)
    assert kv_cache_bytes(8192, 30, 3, 64, KV_TYPES["q8_0"]) / f16 == pytest.approx(0.53125)
    assert kv_cache_bytes(8192, 30, 3, 64, KV_TYPES["q4_0"]) / f16 == pytest.approx(0.28125)
    a, b = estimate(10 ** 8, 8192, (30, 3, 64)), estimate(10 ** 8, 8192, (30, 3, 64), kv_bytes_per_elem=KV_TYPES["q8_0"])
    assert a.total - b.total == f16 - b.kv_cache and b.weights == a.weights
    assert kv_type(None) == "f16" and kv_type(" Q8_0 ") == "q8_0"
    with pytest.raises(UsageError, match="f16, q8_0, q4_0"):
        kv_type("q5_k")


@pytest.mark.model
def test_kv_type_counted_by_the_memory_check(smollm2_gguf):
    from edgevlm.runtime.errors import InsufficientMemory
    from edgevlm.runtime.loader import check_memory, estimate_memory, resolve

    r = resolve(str(smollm2_gguf), want_vision=False)
    f16, q8 = estimate_memory(r, 8192), estimate_memory(r, 8192, "q8_0")
    assert q8.kv_cache / f16.kv_cache == pytest.approx(0.53125, abs=1e-3)
    check_memory(r, 8192, available=q8.total + 1, kv_type="q8_0")       # fits with q8_0 ...
    with pytest.raises(InsufficientMemory):
        check_memory(r, 8192, available=q8.total + 1)                    # ... not with f16


@pytest.mark.model
def test_doctor_names_the_kv_type_that_fits(home):
    from edgevlm.runtime.reports.doctor import model_fits

    rows = {r["model"]: r for r in model_fits(8192, available=1 << 62)}
    row = next(r for r in rows.values() if r["format"] == "gguf" and r["estimate"] and r["kind"] == "text")
    q8 = next(r for r in model_fits(8192, available=1 << 62, kv_type="q8_0") if r["model"] == row["model"])
    assert q8["estimate"] < row["estimate"]
    between = (q8["estimate"] + row["estimate"]) // 2
    got = next(r for r in model_fits(8192, available=between) if r["model"] == row["model"])
    assert got["fits"] is False and got["fits_with_kv_type"] == "q8_0"


@pytest.mark.model
@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_quantized_kv_cache_answers(smollm2_gguf, kv):
    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, LoadOptions, Message

    b = load_backend(artifact_from_path(smollm2_gguf, None, False), LoadOptions(n_ctx=1024, n_threads=2, kv_type=kv))
    ref = load_backend(artifact_from_path(smollm2_gguf, None, False), LoadOptions(n_ctx=1024, n_threads=2))
    try:
        assert b.describe()["kv_type"] == kv
        assert b.kv_cache_bytes() < ref.kv_cache_bytes()
        text, last = complete(b, ChatRequest([Message("user", "The capital of France is")],
                                             GenerationOptions(raw=True, temperature=0, max_tokens=4)))
        assert "Paris" in text
        if kv == "q8_0":                                # near-lossless: the held-out text agrees with f16
            from edgevlm.runtime.reports.bench import KV_HELD_OUT_TEXT, kv_agreement

            ids = b.tokenize(KV_HELD_OUT_TEXT)[:160]
            q = kv_agreement(ref.score(ids, batched=False), b.score(ids, batched=False))
            assert q["top1_agreement"] >= 0.95 and q["kl_mean"] < 0.05, q
    finally:
        b.close()
        ref.close()


def test_bad_kv_type_is_one_clear_line(tmp_path):
    r = vlm("ask", "-m", str(tmp_path / "no-such.gguf"), "--kv-type", "q5", "Hi")
    assert_clean_error(r, 2, "--kv-type", "f16, q8_0, q4_0")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for cmd in (["serve", "--port", "1"], ["doctor"], ["bench", "smollm2-135m"], ["caption", str(tmp_path / "a.png"), "--out", "-"]):
        assert_clean_error(vlm(*cmd, "--kv-type", "q5"), 2, "--kv-type 'q5'")
    (tmp_path / "config.yaml").write_text("kv_type: q3\n")
    r = vlm("ask", "-m", str(tmp_path / "no-such.gguf"), "Hi", home=tmp_path)
    assert_clean_error(r, 2, "kv_type")


@pytest.mark.model
def test_onnx_refuses_a_quantized_kv_cache(smollm2_onnx_dir):
    r = vlm("ask", "-m", str(smollm2_onnx_dir / "model_int8.onnx"), "--kv-type", "q8_0", "Hi")
    assert_clean_error(r, 2, "--kv-type q8_0 is for GGUF models")


@pytest.mark.model
@pytest.mark.slow
def test_heads_a_block_does_not_divide_are_refused(vision_model):
    """The tiny Idefics3 fixture's text model has 16-value heads: a q8_0 block holds 32."""
    r = vlm("ask", "-m", str(vision_model["gguf"]), "--kv-type", "q8_0", "-n", "2", "Hi")
    assert_clean_error(r, 2, "--kv-type q8_0 cannot store", "--kv-type f16")
    r = vlm("ask", "-m", str(vision_model["gguf"]), "--kv-type", "f16", "-n", "2", "--raw", "Hi")
    assert r.returncode == 0, r.stderr


@pytest.mark.model
@pytest.mark.slow        # a `vlm bench` run per KV type with a quality pass each: the full suite's, not the quick one's
def test_bench_reports_kv_types_against_f16(smollm2_gguf):
    from edgevlm.runtime.reports.bench import REPORT_SCHEMA

    r = vlm("bench", str(smollm2_gguf), "--kv-type", "f16", "--kv-type", "q8_0", "--json", "--repeat", "1",
            "--prompt-tokens", "16", "--gen-tokens", "4", "--threads", "1")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, REPORT_SCHEMA)
    f16, q8 = doc["results"]
    assert (f16["kv_type"], q8["kv_type"]) == ("f16", "q8_0") and f16["kv_quality"] is None
    assert q8["kv_cache_bytes"] / f16["kv_cache_bytes"] == pytest.approx(0.53125)
    assert q8["estimate_bytes"] < f16["estimate_bytes"]
    assert q8["kv_quality"]["positions"] > 100 and q8["kv_quality"]["top1_agreement"] >= 0.9
