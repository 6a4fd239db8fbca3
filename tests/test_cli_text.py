"""`vlm ask` / `vlm chat` / `vlm info` on real small text models, as a shell script sees them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import assert_clean_error, vlm

pytestmark = pytest.mark.model


def test_raw_completion_paris_smollm2(smollm2_gguf):
    r = vlm("ask", "-m", str(smollm2_gguf), "--raw", "-t", "0", "-n", "4", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris"), r.stdout


def test_registry_alias_and_completion_only_model(gemma_gguf):
    # gemma3-270m is a base model with no chat template: ask runs plain completion by itself
    r = vlm("ask", "-m", "gemma3-270m", "-t", "0", "-n", "3", "Question: What is the capital of France?\nAnswer:")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris"), r.stdout
    r = vlm("ask", "-m", str(gemma_gguf), "--raw", "-t", "0", "-n", "12", "The capital of France is")
    assert r.returncode == 0 and "France" in r.stdout + "Paris", r.stdout


def test_json_output_parses(smollm2_gguf):
    r = vlm("ask", "-m", "smollm2-135m", "--json", "-t", "0", "-n", "16", "Why is the sky blue?")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)           # stdout is exactly one JSON object
    assert doc["model"] == "smollm2-135m:q4_1"
    assert doc["answer"].strip()
    assert doc["usage"]["completion_tokens"] == 16 and doc["finish_reason"] == "length"
    assert doc["usage"]["prompt_tokens"] > 5
    assert doc["timings"]["decode_tokens_per_s"] > 0


def test_stdin_becomes_context(smollm2_gguf):
    notes = "The meeting is on Tuesday at 10am in room 4B. Bring the budget report."
    r = vlm("ask", "-m", str(smollm2_gguf), "--json", "-t", "0", "-n", "8", "Summarize this", input=notes)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    r2 = vlm("ask", "-m", str(smollm2_gguf), "--json", "-t", "0", "-n", "8", "Summarize this")
    # the piped notes really reached the prompt
    assert doc["usage"]["prompt_tokens"] > json.loads(r2.stdout)["usage"]["prompt_tokens"] + 15


def test_closed_pipe_exits_quietly(smollm2_gguf):
    cmd = f"'{sys.executable}' -m edgevlm.cli.main ask -m '{smollm2_gguf}' -t 0 -n 300 'Write a long story about a cat' | head -c 10"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True, timeout=120)
    assert len(r.stdout) == 10
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert r.returncode == 141


def test_one_shot_context_holds_question_template_and_answer(smollm2_gguf):
    """Without --ctx, `vlm ask` sizes the context from the question's bytes: never smaller than the
    templated prompt plus --max-tokens, even for token-dense text, and at most the usual 4096."""
    from edgevlm.cli.ask import one_shot_ctx

    assert one_shot_ctx(["hi", ""], 8) == 512
    assert one_shot_ctx(["x" * 5000, ""], 512) == 4096
    assert one_shot_ctx(["é" * 300, ""], 100) == 1024       # bytes, not characters: 600 + 256 + 100 -> 1024
    dense = "0 1 2 3 4 5 6 7 8 9 ; : ! ? " * 16 + "🙂🚀✨" * 12        # short tokens, emoji split into bytes
    for prompt, system in ((dense, ""), ("Why?", "You are terse.")):
        args = ["-s", system] if system else []
        r = vlm("ask", "-m", str(smollm2_gguf), "--json", "-t", "0", "-n", "64", *args, prompt)
        assert r.returncode == 0, r.stderr
        usage = json.loads(r.stdout)["usage"]
        assert usage["prompt_tokens"] + 64 <= one_shot_ctx([prompt, system], 64), usage


def test_prompt_longer_than_context(smollm2_gguf):
    long = "word " * 3000
    r = vlm("ask", "-m", str(smollm2_gguf), "--ctx", "512", long)
    assert_clean_error(r, 6, "context")


def test_unknown_model():
    r = vlm("ask", "-m", "no-such-model", "hi")
    assert_clean_error(r, 3, "no-such-model")


def test_truncated_model_file(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        cut.write_bytes(f.read(smollm2_gguf.stat().st_size // 2))
    r = vlm("ask", "-m", str(cut), "hi")
    assert_clean_error(r, 4, "truncated")
    r = vlm("ask", "-m", str(tmp_path / "missing.gguf"), "hi")
    assert_clean_error(r, 3, "no such model file")


def test_debug_shows_traceback(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"hello")
    r = vlm("ask", "-m", str(bad), "hi", env={"VLM_DEBUG": "1"})
    assert r.returncode == 4 and "Traceback" in r.stderr


def test_info_on_gguf(smollm2_gguf):
    r = vlm("info", str(smollm2_gguf), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["architecture"] == "llama" and doc["quantization"] == "Q4_1"
    assert doc["chat_template"] == "yes" and doc["context_length"] == 8192
    import hashlib
    h = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert doc["files"][0]["sha256"] == h and doc["files"][0]["size"] == smollm2_gguf.stat().st_size


def test_chat_from_a_script(smollm2_gguf, tmp_path):
    save = tmp_path / "conv.json"
    script = f"What is 2+2?\n/system You are terse.\nAnd 3+3?\n/save {save}\n/exit\n"
    r = vlm("chat", "-m", str(smollm2_gguf), "-t", "0", "-n", "12", input=script)
    assert r.returncode == 0, r.stderr
    doc = json.loads(save.read_text())
    assert doc["system"] == "You are terse."
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "user", "assistant"]
    assert doc["messages"][2]["content"] == "And 3+3?"
    assert doc["messages"][1]["content"].strip() and doc["messages"][1]["content"] in r.stdout


def _start(args, **kw):
    env = dict(os.environ, VLM_HOME=kw.pop("home"), NO_COLOR="1")
    env.pop("VLM_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "edgevlm.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)


def _wait_for_output(p, timeout=60):
    """Block until the child has written some of its answer (so the signal lands mid-answer)."""
    import select

    ready, _, _ = select.select([p.stdout], [], [], timeout)
    return os.read(p.stdout.fileno(), 64) if ready else b""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_mid_answer(smollm2_gguf, models_home, sig, code):
    p = _start(["ask", "-m", str(smollm2_gguf), "-t", "0.8", "--seed", "1", "-n", "4000", "--ctx", "8192",
                "Write a very long story about the sea."], home=str(models_home))
    assert _wait_for_output(p), "no answer started"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == code, (p.returncode, err)
    assert "Traceback" not in err, err
