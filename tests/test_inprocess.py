"""In-process tests: the CLI through Typer's runner and the HTTP app through Starlette's TestClient (ASGI, no
socket, no model). They cover flag parsing, request parsing and error mapping quickly; the real processes in
the other test files stay for signals, pipes, TTYs and the end-to-end paths."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgevlm.cli.main import app as cli_app


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(cli_app, list(args), catch_exceptions=False)
    return run


@pytest.mark.parametrize("args, needle", [
    (("ask", "--detail", "bogus", "hi"), "Unknown --detail 'bogus'"),
    (("ask", "-m", "smollm2-135m", "--schema", "{bad", "hi"), "--schema is not valid JSON"),
    (("ask", "--top-p", "7", "hi"), "--top-p"),
    (("ask", "--min-p", "2", "hi"), "--min-p"),
    (("chat", "--repeat-penalty", "-1"), "--repeat-penalty"),
    (("caption", "--shard", "3/2", "x.jpg", "--out", "x.jsonl"), "--shard 3/2"),
    (("caption",), "Missing argument"),
    (("serve", "--prompt-cache", "-1"), "--prompt-cache '-1' is negative"),
])
def test_usage_errors_exit_2_with_one_line(cli, args, needle):
    r = cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert needle in r.output and "Traceback" not in r.output


def test_unknown_model_has_its_own_exit_code(cli):
    r = cli("ask", "-m", "no-such-model-anywhere", "hi")
    assert r.exit_code == 3 and "No model named 'no-such-model-anywhere'" in r.output and "Hint:" in r.output


def test_a_sampling_flag_is_one_field_on_every_command(cli):
    """The shared flag groups: each field of Sampling is a GenerationOptions field and a flag of ask, chat
    and caption, with the command's own defaults where it has them."""
    import dataclasses

    import typer

    from edgevlm.cli.common.options import Sampling
    from edgevlm.runtime.protocol import GenerationOptions

    engine = {f.name for f in dataclasses.fields(GenerationOptions)}
    commands = typer.main.get_command(cli_app).commands
    for cmd in ("ask", "chat", "caption"):
        params = {p.name: p for p in commands[cmd].params}
        for f in dataclasses.fields(Sampling):
            assert f.name in engine and f.name in params, (cmd, f.name)
    assert params["temperature"].default == 0.0 and params["max_tokens"].default == 128       # caption's own
    assert {p.name: p.default for p in commands["chat"].params}["max_tokens"] == 1024
    assert {p.name: p.default for p in commands["ask"].params}["max_tokens"] == 512


def test_the_session_setup_builds_the_options_from_the_flags(cli):
    from edgevlm.cli.common.options import Guarding, Images, Loading, Sampling
    from edgevlm.cli.common.session import Setup

    setup = Setup(sampling=Sampling(top_k=3, min_p=0.2, stop=["x"], max_tokens=9), loading=Loading(ctx=1024),
                  images=Images(detail="low", no_cache=True), guarding=Guarding(), schema='{"type": "integer"}',
                  quiet=True)
    o = setup.options(raw=True)
    assert (o.top_k, o.min_p, o.stop, o.max_tokens, o.raw) == (3, 0.2, ["x"], 9, True)
    assert o.json_schema == {"type": "integer"} and o.image_detail.level == "low" and not o.image_detail.cache
    assert setup.n_ctx == 1024 and setup.guard_plan() is None


def test_help_lists_every_command(cli):
    r = cli("--help")
    assert r.exit_code == 0
    for cmd in ("ask", "chat", "caption", "serve", "quantize", "bench", "doctor", "pull", "list", "rm", "info"):
        assert cmd in r.output


# ---------------------------------------------------------------------------------------------- the app
@pytest.fixture
def client(tmp_path, monkeypatch):
    from starlette.testclient import TestClient

    from edgevlm.runtime.serving.app import create_app
    from edgevlm.runtime.serving.settings import ServeSettings

    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    app = create_app(ServeSettings(allowed_hosts=["testserver"], home=tmp_path / "home"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _chat(model: str = "smollm2-135m", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_health(client):
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_deep_bodies_are_400(client, path):
    body = "[" * 100_000 + "]" * 100_000
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_lone_surrogates_are_400(client, path):
    body = json.dumps(_chat()).replace('"hi"', '"\\ud800"')
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and ("surrogate" in r.text.lower() or "D800" in r.text.upper())


def test_non_finite_numbers_are_400(client):
    body = json.dumps(_chat()).replace("}", ', "temperature": Infinity}', 1)
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_unknown_model_is_404(client):
    r = client.post("/v1/chat/completions", json=_chat("no-such-model-anywhere"))
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_rebinding_host_is_403(client):
    r = client.post("/v1/chat/completions", json=_chat(), headers={"host": "evil.example"})
    assert r.status_code == 403


def test_cross_origin_text_plain_is_415(client):
    r = client.post("/v1/chat/completions", content=json.dumps(_chat()),
                    headers={"content-type": "text/plain", "origin": "https://evil.example"})
    assert r.status_code == 415


def test_keep_alive_of_hundreds_of_digits_is_not_a_500(client):
    body = json.dumps(_chat()).replace("}", ', "keep_alive": 1' + "0" * 400 + "}", 1)
    r = client.post("/api/chat", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("ref", ["/x\x00y.png", "file:///x%00y.png", "~no-such-user-here/a.png"])
def test_local_image_paths_that_are_no_paths_are_400(tmp_path, ref):
    from edgevlm.runtime.serving.apierror import APIError
    from edgevlm.runtime.serving.images import _local
    from edgevlm.runtime.serving.settings import ServeSettings

    with pytest.raises(APIError) as e:
        _local(ref, ServeSettings(media_dir=tmp_path), "messages[0].content[0].image_url")
    assert 400 <= e.value.status < 500


# ---------------------------------------------------------------------------------------------- the writers
def _final(**kw):
    from edgevlm.runtime.protocol import Chunk
    from edgevlm.runtime.serving.answer import Final

    last = Chunk(text="", finish_reason="stop", prompt_tokens=7, prompt_eval_tokens=5, completion_tokens=3)
    return Final(**{"model": "m", "last": last, "finish_reason": "stop", "text": "ab", **kw})


def _events(frames) -> list:
    out = []
    for f in frames:
        f = f.decode() if isinstance(f, bytes) else f
        assert f.startswith("data: ") and f.endswith("\n\n")
        out.append(f[6:-2] if f[6:-2] == "[DONE]" else json.loads(f[6:-2]))
    return out


def test_openai_writer_whole_and_streamed():
    """The one answer path's OpenAI writer: a chat.completion, or events: role, text, finish with timings,
    usage (when asked), [DONE]; more of the message (Final.message) and a finish reason of the caller's."""
    from edgevlm.runtime.serving.apierror import APIError
    from edgevlm.runtime.serving.openai_api import OpenAIWriter, parse_openai
    from edgevlm.runtime.serving.settings import ServeSettings

    parsed = parse_openai(_chat(stream=True, stream_options={"include_usage": True}), ServeSettings())
    w = OpenAIWriter(parsed)
    doc = w.whole(_final(extra={"guard": {"input": "safe"}}))
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "ab"} and doc["guard"] == {"input": "safe"}
    assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 and doc["choices"][0]["finish_reason"] == "stop"
    ev = _events([*w.start("m"), w.text("a"), w.text("b\u00e9\n"), *w.end(_final(message={"x": [1]}, finish_reason="other"))])
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"] for e in ev[1:3]] == [{"content": "a"}, {"content": "b\u00e9\n"}]
    assert ev[3]["choices"][0]["delta"] == {"x": [1]}
    assert ev[4]["choices"][0]["finish_reason"] == "other" and ev[4]["timings"]["predicted_n"] == 3
    assert ev[5]["usage"]["total_tokens"] == 10 and ev[5]["choices"] == [] and ev[6] == "[DONE]"
    assert w.whole(_final(message={"x": [1]}))["choices"][0]["message"] == {"role": "assistant", "content": "ab", "x": [1]}
    assert _events([w.failed(APIError(503, "gone"))])[0]["error"]["message"] == "gone"


def test_ollama_writer_whole_and_streamed():
    from edgevlm.runtime.serving.apierror import APIError
    from edgevlm.runtime.serving.ollama_api import OllamaWriter

    chat, gen = OllamaWriter("message"), OllamaWriter("response")
    doc = chat.whole(_final(total_s=1.5, load_s=0.5, extra={"guard": {}}))
    assert doc["message"] == {"role": "assistant", "content": "ab"} and doc["done"] and doc["done_reason"] == "stop"
    assert doc["total_duration"] == 1_500_000_000 and doc["load_duration"] == 500_000_000 and "guard" in doc
    assert gen.whole(_final())["response"] == "ab"
    assert list(chat.start("m")) == []
    lines = [json.loads(x) for x in (chat.text("a"), *chat.end(_final(message={"x": 1}, finish_reason="other")))]
    assert lines[0] == {**lines[0], "message": {"role": "assistant", "content": "a"}, "done": False, "model": "m"}
    assert lines[1]["message"] == {"role": "assistant", "content": "", "x": 1} and lines[1]["done_reason"] == "other"
    assert json.loads(gen.failed(APIError(400, "no")))["error"] == "no"


def test_the_backend_table_says_which_kv_types_each_format_takes():
    """--kv-type is asked of the backend table (Capabilities.kv_types), not of the format's name."""
    from edgevlm.runtime.backends import capabilities, check_kv_type, kv_type_for
    from edgevlm.runtime.errors import UsageError

    assert capabilities("gguf").kv_types == ("f16", "q8_0", "q4_0") and capabilities("onnx").kv_types == ("f16",)
    assert (kv_type_for("onnx", "q8_0"), kv_type_for("gguf", "q4_0"), kv_type_for("no-such", "q8_0")) == \
        ("f16", "q4_0", "f16")
    check_kv_type("onnx", "f16")
    with pytest.raises(UsageError, match="--kv-type q8_0 is for GGUF models: an ONNX model keeps its KV cache"):
        check_kv_type("onnx", "q8_0")
