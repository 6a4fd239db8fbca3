"""The GGUF prompt cache (backends/gguf_cache.py): a conversation set aside when its sequence serves
another one comes back without being evaluated again, and answers exactly as if it had never left."""
from __future__ import annotations

import pytest

from edgevlm.runtime.generation.core import generate
from edgevlm.runtime.loader import artifact_from_path, load_backend
from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, LoadOptions, Message

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


def _alternate(backend) -> list:
    """Conversation A, then B (sharing only the template's head), A's second turn, then B's first prompt again."""
    a1 = [Message("user", "List three fruits.")]
    b1 = [Message("user", "Write a haiku about rain on a tin roof.")]
    out = [_ask(backend, a1), _ask(backend, b1)]
    a2 = a1 + [Message("assistant", out[0][0]), Message("user", "And three vegetables?")]
    out.append(_ask(backend, a2))
    out.append(_ask(backend, b1))
    return out


@pytest.fixture(scope="module")
def plain(smollm2_gguf):
    b = _load(smollm2_gguf, 0)
    yield _alternate(b)
    b.close()


def test_conversation_set_aside_comes_back_evaluating_only_its_new_turn(smollm2_gguf, plain):
    b = _load(smollm2_gguf, 64 * MiB)
    try:
        got = _alternate(b)
        pc = b._prompt_cache
        assert [t for t, _ in got] == [t for t, _ in plain]                 # the same greedy answers
        (_, a1), _, (_, a2), (_, b1_again) = got
        # A's second turn: its first turn and answer came back from RAM; without the cache, B had
        # overwritten all but the template's head
        assert a2.prompt_eval_tokens < a2.prompt_tokens - a1.prompt_tokens
        assert plain[2][1].prompt_eval_tokens > a2.prompt_eval_tokens + a1.prompt_tokens // 2
        assert b1_again.prompt_eval_tokens == 1                            # the same prompt: one token for its logits
        assert pc.restored == 2 and pc.saved == 3 and 0 < pc.used <= 64 * MiB
        # asking B's question again drops only the few tokens of its answer: nothing is saved for that
        _ask(b, [Message("user", "Write a haiku about rain on a tin roof.")], max_tokens=4)
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


def test_sliding_window_model_restores_only_what_it_can_continue(gemma_gguf):
    """Gemma 3 attends over a 512-token window in most layers, and llama.cpp saves only the window's
    cells of those layers: a saved conversation within the window comes back whole; a longer one would
    serve only its exact continuation, so a prompt sharing a shorter prefix with it is evaluated (it
    would attend to cells that are not there). Answers match a backend without the cache throughout."""
    long_text = " ".join(f"Item {i}: a short note about the sea." for i in range(70))   # > 512 tokens
    question = "In two sentences, and without using the letter z, tell me why lighthouses were painted in stripes."

    def run(backend):
        short = [Message("user", question)]
        out = [_ask(backend, [Message("user", long_text + " Summarize.")], 4), _ask(backend, short, 4)]
        out.append(_ask(backend, [Message("user", long_text + " List the items.")], 4))   # shares a prefix
        out.append(_ask(backend, short + [Message("assistant", out[1][0]), Message("user", "Shorter.")], 4))
        return out

    b0, b1 = _load(gemma_gguf, 0), _load(gemma_gguf, 64 * MiB)
    try:
        assert b1._n_swa > 0
        want, got = run(b0), run(b1)
        assert [t for t, _ in got] == [t for t, _ in want]
        assert got[2][1].prompt_eval_tokens == want[2][1].prompt_eval_tokens > 500    # the long one did not
        assert got[3][1].prompt_eval_tokens + 20 < want[3][1].prompt_eval_tokens      # the short one came back
        assert b1._prompt_cache.restored == 1
    finally:
        b0.close()
        b1.close()
