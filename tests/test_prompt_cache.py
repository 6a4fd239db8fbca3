"""The prompt cache (backends/prompt_cache.py): a conversation set aside when its KV cache serves another
one comes back without being evaluated again, and answers exactly as if it had never left (GGUF and
both ONNX KV layouts)."""
from __future__ import annotations

import pytest

from edgevlm.runtime.generation.core import generate
from edgevlm.runtime.loader import artifact_from_path, load_backend
from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, LoadOptions, Message
from test_onnx_backend import smollm2_onnx, smollm2_onnx_optimum  # noqa: F401 - fixtures

pytestmark = pytest.mark.model

MiB = 1 << 20


def _load(path, cache_bytes: int, n_ctx: int = 2048):
    return load_backend(artifact_from_path(path, None, False),
                        LoadOptions(n_ctx=n_ctx, n_threads=2, prompt_cache_bytes=cache_bytes))


def _ask(backend, messages: list[Message], max_tokens: int = 12):
    text, last = "", None
    for c in generate(backend, ChatRequest(messages, GenerationOptions(temperature=0, max_tokens=max_tokens))):
        text, last = text + c.text, c
    return text, last


A1 = [Message("user", "List three fruits.")]
B1 = [Message("user", "Write a haiku about rain on a tin roof.")]


def _a2(a1_answer: str) -> list[Message]:
    return A1 + [Message("assistant", a1_answer), Message("user", "And three vegetables?")]


def _alternate(backend) -> list:
    """Conversation A, then B (sharing only the template's head), A's second turn, then B's first prompt again."""
    out = [_ask(backend, A1), _ask(backend, B1)]
    out.append(_ask(backend, _a2(out[0][0])))
    out.append(_ask(backend, B1))
    return out


def _uninterrupted(path) -> list:
    """The same four answers when nothing interrupts a conversation (no cache): A's two turns in a row
    on one backend; B (after A's first turn, as in _alternate) asked twice in a row on another. Every
    evaluation then starts from the KV a restore gives back, so the answers must match exactly (a batch
    and a one-token evaluation of one position may differ in the last bits, enough to flip a near-tie)."""
    r1, r2 = _load(path, 0), _load(path, 0)
    try:
        a1 = _ask(r1, A1)
        a2 = _ask(r1, _a2(a1[0]))
        _ask(r2, A1)
        b1 = _ask(r2, B1)
        return [a1, b1, a2, _ask(r2, B1)]
    finally:
        r1.close()
        r2.close()


@pytest.fixture(scope="module")
def plain(smollm2_gguf):
    b = _load(smollm2_gguf, 0)
    yield _alternate(b)
    b.close()


def _check_restored(got: list, want: list, without: list) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]                     # the answers of an uninterrupted chat
    (_, a1), _, (_, a2), (_, b1_again) = got
    # A's second turn: its first turn and answer came back from RAM, as if B had never been there;
    # without the cache, B had overwritten all but the template's head
    assert a2.prompt_eval_tokens == want[2][1].prompt_eval_tokens < a2.prompt_tokens - a1.prompt_tokens
    assert without[2][1].prompt_eval_tokens > a2.prompt_eval_tokens + a1.prompt_tokens // 2
    assert b1_again.prompt_eval_tokens == 1                                 # the same prompt: one token for its logits


def test_conversation_set_aside_comes_back_evaluating_only_its_new_turn(smollm2_gguf, plain):
    b = _load(smollm2_gguf, 64 * MiB)
    try:
        _check_restored(_alternate(b), _uninterrupted(smollm2_gguf), plain)
        pc = b._prompt_cache
        assert pc.restored == 2 and pc.saved == 3 and 0 < pc.used <= 64 * MiB
        # asking B's question again drops only the few tokens of its answer: nothing is saved for that
        _ask(b, B1, max_tokens=4)
        assert pc.saved == 3
    finally:
        b.close()


def test_a_cache_too_small_for_a_conversation_keeps_nothing(smollm2_gguf, plain):
    b = _load(smollm2_gguf, 64 * 1024)               # one token of SmolLM2-135M's KV is 22.5 KiB
    try:
        got = _alternate(b)
        assert [t for t, _ in got] == [t for t, _ in plain]
        assert b._prompt_cache.saved == 0 and b._prompt_cache.used == 0
        assert [c.prompt_eval_tokens for _, c in got] == [c.prompt_eval_tokens for _, c in plain]
    finally:
        b.close()


@pytest.mark.slow      # three Gemma 3 contexts and ~3,000 prompt tokens: the full suite's
def test_sliding_window_model_restores_only_what_it_can_continue(gemma_gguf):
    """Gemma 3 attends over a 512-token window in most layers, and llama.cpp saves only the window's
    cells of those layers: a saved conversation within the window comes back whole; a longer one would
    serve only its exact continuation, so a prompt sharing a shorter prefix with it is evaluated (it
    would attend to cells that are not there). Answers match a backend without the cache (for the
    restored turn: one where the short conversation was not interrupted)."""
    long_text = " ".join(f"Item {i}: a short note about the sea." for i in range(70))   # > 512 tokens
    question = "In two sentences, and without using the letter z, tell me why lighthouses were painted in stripes."
    long = [Message("user", long_text + " Summarize.")]
    short = [Message("user", question)]

    def follow(answer: str) -> list[Message]:
        return short + [Message("assistant", answer), Message("user", "Shorter.")]

    def run(backend, interrupt: bool = True):
        out = [_ask(backend, long, 4), _ask(backend, short, 4)]
        if interrupt:
            out.append(_ask(backend, [Message("user", long_text + " List the items.")], 4))   # shares a prefix
        out.append(_ask(backend, follow(out[1][0]), 4))
        return out

    b0, b1, b2 = _load(gemma_gguf, 0), _load(gemma_gguf, 64 * MiB), _load(gemma_gguf, 0)
    try:
        assert b1._n_swa > 0
        want, got, straight = run(b0), run(b1), run(b2, interrupt=False)
        assert [t for t, _ in got[:3]] == [t for t, _ in want[:3]] and got[3][0] == straight[2][0]
        assert got[2][1].prompt_eval_tokens == want[2][1].prompt_eval_tokens > 500    # the long one did not
        assert got[3][1].prompt_eval_tokens == straight[2][1].prompt_eval_tokens       # the short one came back
        assert got[3][1].prompt_eval_tokens + 20 < want[3][1].prompt_eval_tokens
        assert b1._prompt_cache.restored == 1
    finally:
        b0.close()
        b1.close()
        b2.close()


@pytest.mark.parametrize("export", ["fused", "optimum"])
def test_onnx_conversation_comes_back_in_both_kv_layouts(export, request):
    """The fused export keeps its past in shared preallocated buffers, optimum's in ORT's outputs: a
    restored past answers as the evaluated one did, in both."""
    d = request.getfixturevalue("smollm2_onnx" if export == "fused" else "smollm2_onnx_optimum")
    path = d / "model_q4.onnx"
    b0, b1 = _load(path, 0), _load(path, 64 * MiB)
    try:
        assert ("shared buffer" in b1.describe()["kv"]) == (export == "fused")
        _check_restored(_alternate(b1), _uninterrupted(path), _alternate(b0))
        assert b1._prompt_cache.restored == 2
    finally:
        b0.close()
        b1.close()
