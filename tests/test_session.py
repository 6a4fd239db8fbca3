"""Chat sessions on the real GGUF backend: KV reuse between turns, interruption, stop strings, schema."""
from __future__ import annotations

import json

import pytest

from edgevlm.runtime.loader import artifact_from_path, load_backend
from edgevlm.runtime.generation.core import generate
from edgevlm.runtime.protocol import ChatRequest, LoadOptions, Message
from edgevlm.runtime.generation.session import ChatSession, GenerationOptions

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def backend(smollm2_gguf):
    b = load_backend(artifact_from_path(smollm2_gguf, None, False), LoadOptions(n_ctx=2048, n_threads=2))
    yield b
    b.close()


def test_second_turn_evaluates_only_new_tokens(backend):
    s = ChatSession(backend, "smollm2", options=GenerationOptions(temperature=0, max_tokens=16))
    s.clear()
    first = s.ask("What is the capital of France?")
    assert first.final.prompt_eval_tokens == first.final.prompt_tokens   # fresh cache: everything evaluated
    second = s.ask("And of Germany?")
    f = second.final
    assert f.prompt_tokens > first.final.prompt_tokens + first.final.completion_tokens
    # only the new user turn (plus template glue and the previous answer's end) is evaluated
    assert f.prompt_eval_tokens < f.prompt_tokens - first.final.prompt_tokens
    assert f.prompt_eval_tokens <= 30, f


def test_reply_cut_at_max_tokens_evaluates_nothing_after_it(backend):
    """The last token of a reply that hits max_tokens is not run through the model (nothing reads
    those logits); the next turn evaluates it with the new prompt."""
    backend.reset()
    req = ChatRequest([Message("user", "Count: 1, 2, 3,")], GenerationOptions(raw=True, temperature=0, max_tokens=6))
    last = list(generate(backend, req))[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 6
    assert backend.kv_used() == last.prompt_tokens + 5


def test_interrupted_turn_keeps_session_consistent(backend):
    s = ChatSession(backend, "smollm2", options=GenerationOptions(temperature=0, max_tokens=200))
    s.clear()
    gen = s.send("Tell me a long story about a dragon.")
    got = [next(gen).text for _ in range(5)]
    gen.close()                                        # what Ctrl-C does to the stream
    assert len(s.history) == 2 and s.history[1].content == "".join(got)
    nxt = s.ask("Now say hello.")
    assert nxt.final.finish_reason in ("stop", "length") and nxt.text.strip()
    assert nxt.final.prompt_eval_tokens < nxt.final.prompt_tokens


def test_greedy_is_deterministic_and_cache_independent(backend):
    req = ChatRequest([Message("user", "The capital of France is")], GenerationOptions(raw=True, temperature=0, max_tokens=6))
    backend.reset()
    a = "".join(c.text for c in generate(backend, req))
    b = "".join(c.text for c in generate(backend, req))    # prompt fully cached, one token re-evaluated
    assert a == b and a.startswith(" Paris")


def test_stop_strings(backend):
    req = ChatRequest([Message("user", "Count: 1, 2, 3, 4,")], GenerationOptions(raw=True, temperature=0, max_tokens=30, stop=[" 7"]))
    chunks = list(generate(backend, req))
    text = "".join(c.text for c in chunks)
    assert " 7" not in text and " 6" in text and chunks[-1].finish_reason == "stop"


def test_json_schema_constrains_output(backend):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    req = ChatRequest([Message("user", "Give the largest city of France as JSON.")], GenerationOptions(temperature=0, max_tokens=60, json_schema=schema))
    text = "".join(c.text for c in generate(backend, req))
    doc = json.loads(text)
    import jsonschema
    jsonschema.validate(doc, schema)


def test_save_conversation(backend, tmp_path):
    s = ChatSession(backend, "smollm2", system="Be brief.", options=GenerationOptions(temperature=0, max_tokens=8))
    s.clear()
    s.ask("Hi")
    p = s.save(tmp_path / "c.json")
    doc = json.loads(p.read_text())
    assert doc["system"] == "Be brief." and doc["messages"][0] == {"role": "user", "content": "Hi"}
