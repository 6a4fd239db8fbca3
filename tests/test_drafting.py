"""Draftless drafting (--draft): tokens proposed from n-grams of the context, verified in one batch -- on
real SmolLM2-135M and Gemma 3 270M weights (GGUF), the ONNX refusal, and the sampler's acceptance rule."""
from __future__ import annotations

import json

import pytest

from conftest import assert_clean_error, vlm

jsonschema = pytest.importorskip("jsonschema")

TEXT = ("The town of Marrowby sits at the mouth of the river Esk, where the valley opens onto a wide grey bay. "
        "For three hundred years its people lived from fishing, and the old stone cottages still crowd the slope "
        "above the water, their red roofs stacked one above the other. In 1842 the council built a new harbour "
        "wall of granite blocks brought by ship from Cornwall, and the fleet grew to more than ninety boats. The "
        "railway arrived in 1871, and the grand hotel on the west cliff opened in 1874 with 120 rooms.")
RECORD = {"type": "object",
          "properties": {"town": {"type": "string"}, "river": {"type": "string"}, "wall_year": {"type": "integer"},
                         "wall_stone": {"type": "string"}, "hotel_rooms": {"type": "integer"},
                         "first_sentence": {"type": "string", "maxLength": 160}},
          "required": ["town", "river", "wall_year", "wall_stone", "hotel_rooms", "first_sentence"],
          "additionalProperties": False}


def _prompt(backend, task: str) -> str:
    if task == "record":
        return TEXT + "\n\nFill in the record from the text above, copying its words."
    if backend.chat_template:
        return TEXT + "\n\nCopy the text above exactly."
    return TEXT + "\n\nThe text above, quoted word for word:\n\n\""        # a base model continues a document


@pytest.fixture(scope="module", params=["gguf", pytest.param("gemma-gguf", marks=pytest.mark.slow)])   # Gemma: full suite
def backend(request, smollm2_gguf):
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    path = smollm2_gguf if request.param == "gguf" else request.getfixturevalue("gemma_gguf")
    b = load_backend(artifact_from_path(path, None, False), LoadOptions(n_ctx=2048, n_threads=2))
    yield b
    b.close()


def _answer(backend, prompt: str, draft: str, *, schema=None, temperature=0.0, seed=None, max_tokens=80, **kw):
    from edgevlm.runtime.generation.core import generate
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    backend.reset()
    req = ChatRequest([Message("user", prompt)],
                      GenerationOptions(temperature=temperature, seed=seed, max_tokens=max_tokens, json_schema=schema,
                                        draft=draft, raw=not backend.chat_template, **kw))
    parts, last = [], None
    for chunk in generate(backend, req):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


@pytest.mark.model
@pytest.mark.parametrize("task", ["quote", "record"])
def test_greedy_identical_with_and_without_drafting(backend, task):
    schema = RECORD if task == "record" else None
    prompt = _prompt(backend, task)
    plain, p = _answer(backend, prompt, "off", schema=schema)
    assert p.draft_tokens == 0
    for mode in ("ngram", "auto"):
        text, last = _answer(backend, prompt, mode, schema=schema)
        assert text == plain, mode
        assert last.token_ids == p.token_ids and last.finish_reason == p.finish_reason
        assert backend.kv_used() == len(backend.kv_keys())
    _, ng = _answer(backend, prompt, "ngram", schema=schema)
    assert ng.draft_tokens > 0 and ng.draft_accepted > 0      # the answer copies its context: drafts were checked


@pytest.mark.model
def test_drafting_respects_limits_and_repeat_penalty(backend):
    """Drafted tokens never run past --max-tokens or a stop string, and the repeat penalty sees every token
    in order: the same answers as plain decoding at every cut."""
    prompt = _prompt(backend, "quote")
    for kw in ({"max_tokens": 7}, {"max_tokens": 23}, {"stop": ["river"]}, {"repeat_penalty": 1.3}):
        plain, p = _answer(backend, prompt, "off", **kw)
        text, d = _answer(backend, prompt, "ngram", **kw)
        assert (text, d.completion_tokens, d.finish_reason) == (plain, p.completion_tokens, p.finish_reason), kw


@pytest.mark.model
def test_kv_cache_left_as_plain_decoding_leaves_it(backend):
    """An answer that ends inside a verified draft drops the drafted positions: a follow-up turn reuses the
    same prefix with or without drafting."""
    prompt = _prompt(backend, "quote")
    for mode in ("off", "ngram"):
        _answer(backend, prompt, mode, max_tokens=30)
        keys = list(backend.kv_keys())
        if mode == "off":
            want = keys
    assert keys == want


@pytest.mark.model
def test_kv_cache_after_a_stop_inside_a_draft(backend):
    """An answer cut by a stop string (or ended by an end-of-generation token) inside an accepted draft leaves
    the KV cache as plain decoding does: the drafted positions go, the token before the stop stays."""
    prompt = _prompt(backend, "quote")
    plain, _ = _answer(backend, prompt, "off", max_tokens=60)
    words = [w for w in plain.split() if len(w) > 3][6:9]
    assert words, plain
    for w in words:
        keys = {}
        for mode in ("off", "ngram"):
            text, last = _answer(backend, prompt, mode, max_tokens=60, stop=[w])
            keys[mode] = (text, list(backend.kv_keys()))
        assert keys["ngram"] == keys["off"], w


@pytest.mark.model
def test_sampled_answers_valid_under_the_schema(backend):
    prompt = _prompt(backend, "record")
    checked = 0
    for seed in (1, 2):
        text, last = _answer(backend, prompt, "ngram", schema=RECORD, temperature=0.8, seed=seed, max_tokens=240)
        assert last.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), RECORD)
        checked += last.draft_tokens
        again, _ = _answer(backend, prompt, "ngram", schema=RECORD, temperature=0.8, seed=seed, max_tokens=240)
        assert again == text                          # a seed still gives one answer
    assert checked > 0


@pytest.mark.model
def test_auto_turns_itself_off_when_every_draft_is_rejected(backend, monkeypatch):
    """Drafts that the model never takes (a token absent from the greedy answer): auto checks a handful and
    stops; ngram keeps checking one per step; the answer is the plain one either way."""
    from edgevlm.runtime.generation import draft

    prompt = "Write a story about a dragon who learns to bake bread."
    plain, p = _answer(backend, prompt, "off", max_tokens=120)
    wrong = next(t for t in range(1000, 2000) if t not in p.token_ids and not backend.is_eog(t))
    monkeypatch.setattr(draft.NgramIndex, "match", lambda self, k: (3, [wrong] * k))
    text, auto = _answer(backend, prompt, "auto", max_tokens=120)
    assert text == plain
    assert auto.draft_accepted == 0 and 0 < auto.draft_tokens <= 12, auto.draft_tokens
    text, ngram = _answer(backend, prompt, "ngram", max_tokens=120)
    assert text == plain and ngram.draft_accepted == 0 and ngram.draft_tokens >= 100


def test_ngram_index_proposes_what_followed_the_longest_match():
    from edgevlm.runtime.generation.draft import NgramIndex

    gen: list[int] = []
    keys = [1, 2, 3, 4, 5, 6, ("img", "x", 0), 9, 2, 3, 7, 8]
    idx = NgramIndex(keys, gen)
    assert idx.match(3) == (0, [])                        # ... 7 8: never seen before
    gen += [2, 3]                                          # ... 2 3: last followed by 7 8 (not 4 5)
    assert idx.match(3) == (2, [7, 8, 2])
    gen += [4]                                             # 2 3 4 occurred once: followed by 5 6, then the image
    assert idx.match(5) == (3, [5, 6])
    gen += [5, 6]
    assert idx.match(2) == (4, [])                         # 4-gram 3 4 5 6 matched; an image position ends a draft


def test_speculative_rule_keeps_the_distribution():
    """Sampling with a drafted token gives each token its own probability (min-p, top-k, temperature as in
    plain sampling): frequencies over many draws against the plain sampler's."""
    import numpy as np

    from edgevlm.runtime.generation.sampling import Sampler
    from edgevlm.runtime.protocol import GenerationOptions

    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=np.float32))
    opts = GenerationOptions(temperature=0.9, top_k=5, top_p=1.0, min_p=0.2, seed=7)
    n = 20000
    s = Sampler(opts)
    plain = np.bincount([s(logits.copy()) for _ in range(n)], minlength=6) / n
    for draft in (0, 2, 4, 5):
        s = Sampler(opts)
        got = np.bincount([s(logits.copy(), draft) for _ in range(n)], minlength=6) / n
        assert np.abs(got - plain).max() < 0.015, (draft, got, plain)
    assert plain[4] == 0 and plain[5] == 0                  # min-p cut them: a draft of them is never taken


def test_draft_refused_where_it_cannot_run(smollm2_gguf):
    """ngram on a backend that cannot verify drafts is one UsageError; auto is silently off there."""
    from edgevlm.runtime.errors import UsageError
    from edgevlm.runtime.generation.core import generate
    from edgevlm.runtime.generation.draft import check_mode
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, LoadOptions, Message

    with pytest.raises(UsageError, match="--draft must be one of auto, off, ngram"):
        check_mode("fast")
    b = load_backend(artifact_from_path(smollm2_gguf, None, False), LoadOptions(n_ctx=512, n_threads=1, n_seq=2))
    try:
        slot = b.slots()[0]
        assert slot.draft_rows() == 0             # --parallel slots step one token per sequence
        req = lambda mode: ChatRequest([Message("user", "Say hi.")], GenerationOptions(max_tokens=4, draft=mode))
        last = list(generate(slot, req("auto")))[-1]
        slot.end_generation()
        assert last.draft_tokens == 0 and last.completion_tokens > 0
        with pytest.raises(UsageError, match="cannot verify drafted tokens"):
            list(generate(slot, req("ngram")))
        slot.end_generation()
    finally:
        b.close()


@pytest.mark.model
def test_onnx_drafting_off(smollm2_hf):
    """Our ONNX exports return the last position's logits only: auto decodes plainly, ngram is refused."""
    from test_onnx_backend import _cached_build

    from edgevlm.runtime.errors import UsageError
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    path = _cached_build("smollm2-135m-onnx", smollm2_hf, "auto", ("int8", "int4")) / "model.onnx"
    b = load_backend(artifact_from_path(path, None, False), LoadOptions(n_ctx=1024, n_threads=1))
    try:
        assert b.draft_rows() == 0
        plain, p = _answer(b, _prompt(b, "quote"), "off", max_tokens=24)
        text, a = _answer(b, _prompt(b, "quote"), "auto", max_tokens=24)
        assert text == plain and a.draft_tokens == 0
        with pytest.raises(UsageError, match="cannot verify drafted tokens"):
            _answer(b, _prompt(b, "quote"), "ngram", max_tokens=4)
    finally:
        b.close()


# ------------------------------------------------------------------ flags, config and the server's option
@pytest.mark.parametrize("args", [("ask", "--draft", "fast", "hi"), ("chat", "--draft", "fast"),
                                  ("caption", "x.jpg", "--out", "x.jsonl", "--draft", "fast"),
                                  ("serve", "--draft", "fast"), ("bench", "smollm2-135m", "--draft", "fast"),
                                  ("serve", "--draft", "ngram", "--parallel", "2")])
def test_bad_draft_values_are_one_line_exit_2(tmp_path, monkeypatch, args):
    from typer.testing import CliRunner

    from edgevlm.cli.main import app

    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")
    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.output.startswith("Error: --draft") and "Traceback" not in r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_config_draft_key(tmp_path, monkeypatch):
    from edgevlm.cli.common.acquire import resolve_draft
    from edgevlm.runtime.errors import UsageError

    monkeypatch.setenv("VLM_HOME", str(tmp_path))
    assert resolve_draft(None) == "auto"
    (tmp_path / "config.yaml").write_text("draft: off\n")          # YAML's bare off is a boolean
    assert resolve_draft(None) == "off" and resolve_draft("ngram") == "ngram"
    (tmp_path / "config.yaml").write_text("draft: sometimes\n")
    with pytest.raises(UsageError, match="'draft' must be auto, off or ngram"):
        resolve_draft(None)


def test_server_draft_option(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from edgevlm.runtime.serving.app import create_app
    from edgevlm.runtime.serving.settings import ServeSettings
    from edgevlm.runtime.serving.translate import draft_mode

    assert draft_mode({}, ServeSettings(draft="off"), "draft") == "off"              # vlm serve --draft off
    assert draft_mode({"draft": " NGRAM "}, ServeSettings(), "draft") == "ngram"
    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    app = create_app(ServeSettings(allowed_hosts=["testserver"], home=tmp_path / "home"))
    msgs = [{"role": "user", "content": "hi"}]
    with TestClient(app, raise_server_exceptions=False) as c:
        for bad in ("fast", 3, True):
            r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", "messages": msgs, "draft": bad})
            assert r.status_code == 400 and "`draft` must be one of auto, off, ngram" in r.text, r.text
            r = c.post("/api/chat", json={"model": "smollm2-135m", "messages": msgs, "options": {"draft": bad}})
            assert r.status_code == 400 and "`options.draft`" in r.text, r.text
