"""`vlm serve`: a real server process on 127.0.0.1, real HTTP, the official `openai` SDK as the client.

Three server processes in all: one with an API key, CORS and tight input caps (most tests), one with no
waiting room (queue full, client dropping mid-stream), one that is sent SIGTERM mid-answer.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import MODELS_HOME

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]   # incl. building the vision fixture once

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
ORIGIN = "http://allowed.example"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path, key: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        exe = Path(sys.executable).with_name("vlm")
        env = {k: v for k, v in os.environ.items() if k not in ("VLM_DEBUG", "VLM_API_KEY")}
        env.update(VLM_HOME=str(MODELS_HOME), NO_COLOR="1")
        self.log = log
        self._log_f = open(log, "wb")
        self.proc = subprocess.Popen([str(exe), "serve", "--port", str(self.port), "--threads", "2", *args],
                                     stdout=self._log_f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {log.read_text()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=120)

    def post(self, path: str, body=None, *, content=None, headers=None, timeout=120):
        h = dict(self.headers, **(headers or {}))
        if content is None:
            content = json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"Content-Type": "application/json", **h},
                          timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_f.close()
        return self.proc.returncode


def png_data_uri(size=(64, 48)) -> str:
    """A PNG of random pixels: new bytes every run, so no embedding cache has seen it."""
    buf = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(smollm2_gguf, vision_gguf, tmp_path_factory):
    """The main server: SmolLM2 (by its registry name) and the vision fixture, API key, CORS, small caps."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server(["smollm2-135m", vision_gguf, "--api-key", KEY, "--cors-origin", ORIGIN, "--max-images", "2",
                "--max-body", "512K", "--max-tokens", "256", "--allow-image-urls", "--queue", "8"], log, key=KEY)
    yield s
    assert s.stop() == 0, log.read_text()


def _vision_id(server, vision_gguf) -> str:
    return Path(vision_gguf).name


# --------------------------------------------------------------------------------------------
# the OpenAI SDK
# --------------------------------------------------------------------------------------------

def test_sdk_text_answer_with_usage_and_timings(server):
    r = server.client().chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=12, seed=1)
    assert r.object == "chat.completion" and r.model == "smollm2-135m:q4_1"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    t = r.model_extra["timings"]                      # llama-server's extra field
    assert t["predicted_n"] == r.usage.completion_tokens and t["prompt_n"] >= 1


def test_sdk_streaming_with_usage_and_stop(server):
    chunks = list(server.client().chat.completions.create(
        model="smollm2-135m", messages=[{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        temperature=0, max_completion_tokens=40, stream=True, stream_options={"include_usage": True}, stop=["7"]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and "7" not in text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1   # the usage chunk comes last


def test_sse_framing(server):
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev
        assert json.loads(ev[6:])["object"] == "chat.completion.chunk"


def test_json_schema_nested_and_flat(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = server.client().chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Weather in Paris as JSON."}], temperature=0,
        max_tokens=60, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}})
    doc = json.loads(r.choices[0].message.content)
    assert set(doc) == {"city", "sunny"} and isinstance(doc["sunny"], bool)
    # llama-server's flat form
    r2 = server.post("/v1/chat/completions", {"model": "smollm2-135m", "max_tokens": 60, "temperature": 0,
                                              "messages": [{"role": "user", "content": "Weather in Rome as JSON."}],
                                              "response_format": {"type": "json_object", "schema": schema}})
    assert r2.status_code == 200, r2.text
    assert set(json.loads(r2.json()["choices"][0]["message"]["content"])) == {"city", "sunny"}


def test_image_data_uri_and_second_turn_reuses_it(server, vision_gguf):
    client, model = server.client(), _vision_id(server, vision_gguf)
    img = png_data_uri()
    turn1 = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                          {"type": "image_url", "image_url": {"url": img, "detail": "low"}}]}]
    r1 = client.chat.completions.create(model=model, messages=turn1, temperature=0, max_tokens=6)
    t1 = r1.model_extra["timings"]
    assert t1["image_tokens"] > 0 and t1["image_encode_ms"] > 0
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And what colour is it?"}]
    r2 = client.chat.completions.create(model=model, messages=turn2, temperature=0, max_tokens=6)
    t2 = r2.model_extra["timings"]
    assert t2["image_encode_ms"] == 0                                 # not encoded again
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens - 8                       # turn 1, image included, was reused
    assert t2["prompt_n"] == r2.usage.prompt_tokens - cached          # only the new turn was evaluated


def test_conversation_set_aside_for_another_comes_back_from_ram(server, vision_gguf):
    """One slot, two conversations in turn: the photo conversation's KV cache (its image included) is
    saved when the other one needs the slot, and restored for its next turn (--prompt-cache)."""
    client, model = server.client(), _vision_id(server, vision_gguf)
    turn1 = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                          {"type": "image_url", "image_url": {"url": png_data_uri(), "detail": "low"}}]}]
    r1 = client.chat.completions.create(model=model, messages=turn1, temperature=0, max_tokens=6)
    other = client.chat.completions.create(model=model, temperature=0, max_tokens=6,
                                           messages=[{"role": "user", "content": "Name a colour."}])
    assert other.usage.prompt_tokens_details.cached_tokens < r1.usage.prompt_tokens // 2   # the slot was reused
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And what shape is it?"}]
    r2 = client.chat.completions.create(model=model, messages=turn2, temperature=0, max_tokens=6)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 8
    assert r2.model_extra["timings"]["image_encode_ms"] == 0


def test_concurrent_clients_all_complete(server):
    results, errors = {}, []

    def one(i: int) -> None:
        try:
            stream = server.client().chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": f"Say the number {i}."}],
                max_tokens=12, temperature=0.5, seed=i, stream=True)
            parts, finish = [], None
            for c in stream:
                parts.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
            results[i] = ("".join(parts), finish)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(results) == [0, 1, 2, 3]
    assert all(fin in ("stop", "length") and text for text, fin in results.values())


# --------------------------------------------------------------------------------------------
# bad input, auth, CORS
# --------------------------------------------------------------------------------------------

def _err(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert e["message"] and e["type"]
    if code:
        assert e["code"] == code, e
    return e


def test_bad_inputs(server, vision_gguf):
    vm = _vision_id(server, vision_gguf)
    ok_msgs = [{"role": "user", "content": "hi"}]

    def img_msg(*urls):
        return [{"role": "user", "content": [{"type": "text", "text": "?"}] +
                 [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]

    _err(server.post("/v1/chat/completions", content="{not json"), 400, "invalid_json")
    _err(server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": ok_msgs, "max_tokens": "many"}),
         400, "invalid_type")
    _err(server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": ok_msgs, "max_tokens": 100000}),
         400, "invalid_value")
    _err(server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": "hi"}), 400)
    _err(server.post("/v1/chat/completions", {"model": "no-such-model", "messages": ok_msgs}), 404, "model_not_found")
    _err(server.post("/v1/chat/completions", {"model": "/etc/passwd", "messages": ok_msgs}), 404, "model_not_found")
    _err(server.post("/v1/chat/completions", content=json.dumps({"model": "smollm2-135m", "messages": ok_msgs,
                                                                 "pad": "x" * 600_000})), 413, "request_too_large")
    _err(server.post("/v1/chat/completions", {"model": vm, "messages": img_msg("data:image/png;base64,@@not-b64@@")}),
         400, "invalid_image_url")
    text_uri = "data:image/png;base64," + base64.b64encode(b"just some text, not a picture").decode()
    _err(server.post("/v1/chat/completions", {"model": vm, "messages": img_msg(text_uri)}), 400, "invalid_image")
    img = png_data_uri()
    _err(server.post("/v1/chat/completions", {"model": vm, "messages": img_msg(img, img, img)}), 400, "too_many_images")
    for url in ("http://127.0.0.1:9/x.png", "http://localhost/x.png", "http://169.254.169.254/latest/meta-data",
                "http://[::1]/x.png", "http://10.1.2.3/x.png"):
        _err(server.post("/v1/chat/completions", {"model": vm, "messages": img_msg(url)}), 400, "url_not_allowed")
    _err(server.post("/v1/chat/completions", {"model": vm, "messages": img_msg("file:///etc/passwd")}), 400,
         "local_paths_disabled")
    # an image to a model without a vision projector: understood, but this model cannot do it
    _err(server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": img_msg(img)}), 422)
    _err(server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": ok_msgs, "tools": [{"type": "function"}]}), 400)
    _err(server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": ok_msgs,
                                              "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}}),
         400, "invalid_schema")
    _err(server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": [{"role": "user", "content": "word " * 6000}]}),
         400, "context_length_exceeded")
    # the server is still healthy and answers after all that
    assert server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": ok_msgs, "max_tokens": 2}).status_code == 200


def test_auth_and_cors(server):
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _err(httpx.post(server.url + "/v1/chat/completions", json=body), 401, "invalid_api_key")
    _err(httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}),
         401, "invalid_api_key")
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/api/tags").json() == {"error": "Missing or invalid API key (send `Authorization: Bearer KEY`)."}
    assert httpx.get(server.url + "/health").status_code == 200          # exempt: for probes
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(server.url + "/v1/chat/completions", headers=dict(pre, Origin="http://evil.example"))
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = server.post("/v1/chat/completions", body, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


# --------------------------------------------------------------------------------------------
# models, Ollama, metrics
# --------------------------------------------------------------------------------------------

def test_models_and_ollama(server, vision_gguf):
    ids = [m.id for m in server.client().models.list().data]
    assert "smollm2-135m:q4_1" in ids and _vision_id(server, vision_gguf) in ids
    tags = httpx.get(server.url + "/api/tags", headers=server.headers).json()["models"]
    assert "smollm2-135m:q4_1" in [t["name"] for t in tags]

    r = server.post("/api/chat", {"model": "smollm2-135m", "stream": False, "options": {"num_predict": 4, "temperature": 0},
                                  "messages": [{"role": "user", "content": "Hello"}]})
    doc = r.json()
    assert r.status_code == 200 and doc["done"] is True and doc["message"]["role"] == "assistant"
    assert doc["eval_count"] >= 1 and doc["done_reason"] in ("stop", "length")

    with httpx.stream("POST", server.url + "/api/chat", headers=server.headers, timeout=60,
                      json={"model": "smollm2-135m", "options": {"num_predict": 6},
                            "messages": [{"role": "user", "content": "Hello"}]}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"] is True

    png = base64.b64encode(base64.b64decode(png_data_uri().split(",", 1)[1])).decode()
    r = server.post("/api/generate", {"model": _vision_id(server, vision_gguf), "prompt": "Describe", "images": [png],
                                      "stream": False, "options": {"num_predict": 3}})
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    assert server.post("/api/generate", {"model": "smollm2-135m", "prompt": "x", "images": ["!!"]}).json()["error"]

    metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    assert 'vlm_requests_total{endpoint="ollama_chat",model="smollm2-135m:q4_1",status="200"} 2.0' in metrics
    assert "vlm_time_to_first_token_seconds_bucket" in metrics and "vlm_queue_depth" in metrics


# --------------------------------------------------------------------------------------------
# queue full, client gone, SIGTERM
# --------------------------------------------------------------------------------------------

def _long_stream(url: str, n: int = 200) -> dict:
    """A streamed answer that cannot end early: the schema asks for at least 100 numbers."""
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 100}
    return {"model": "smollm2-135m", "messages": [{"role": "user", "content": "List numbers."}], "max_tokens": n,
            "temperature": 0, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}


def test_queue_full_and_client_dropping_mid_stream(smollm2_gguf, tmp_path):
    s = Server(["smollm2-135m", "--queue", "0"], tmp_path / "server.log")
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", s.url + "/v1/chat/completions", json=_long_stream(s.url)) as r:
                assert r.status_code == 200
                lines = r.iter_lines()                          # keep it: dropping it would close the stream
                next(lines)                                     # the model is busy with this one now
                busy = s.post("/v1/chat/completions", {"model": "smollm2-135m", "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "hi"}]})
                _err(busy, 503, "queue_full")
                assert int(busy.headers["retry-after"]) >= 1
            # the first client went away mid-stream: its generation stops and the model is free again
            deadline = time.monotonic() + 30
            while True:
                r2 = s.post("/v1/chat/completions", {"model": "smollm2-135m", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
                if r2.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert r2.status_code == 200, r2.text
            m = c.get(s.url + "/metrics").text
            rejected = re.search(r'vlm_requests_rejected_total\{model="smollm2-135m:q4_1"\} (\S+)', m)
            assert rejected and float(rejected.group(1)) >= 1
            assert 'vlm_completion_tokens_total{model="smollm2-135m:q4_1"}' in m
    finally:
        assert s.stop() == 0, (tmp_path / "server.log").read_text()


def test_sigterm_drains_in_flight_request_and_exits_0(smollm2_gguf, tmp_path):
    s = Server(["smollm2-135m", "--grace", "60"], tmp_path / "server.log")
    events = []
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=_long_stream(s.url, 16), timeout=60) as r:
        it = r.iter_lines()
        events.append(next(it))
        s.proc.send_signal(signal.SIGTERM)
        events.extend(it)
    assert s.stop() == 0, (tmp_path / "server.log").read_text()
    data = [e for e in events if e.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health", timeout=2)


def test_parallel_slots_match_one_at_a_time_and_keep_their_conversations(smollm2_gguf, vision_gguf, tmp_path):
    """--parallel 3: three conversations decode together in one context (llama.cpp sequences); each gets
    its own answer (closest to the one the same server gives alone, greedy), a follow-up turn finds its
    slot's KV cache (also for an image), and requests beyond the slots queue."""
    s = Server(["smollm2-135m", vision_gguf, "--parallel", "3", "--queue", "8"], tmp_path / "server.log")
    try:
        prompts = ["Name three fruits.", "What is 2+2? Explain.", "Write a haiku about rain.", "Say hello."]

        def ask(i: int, messages=None):
            msgs = messages or [{"role": "user", "content": prompts[i]}]
            r = s.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": msgs, "max_tokens": 24,
                                                "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        alone = [ask(i)["choices"][0]["message"]["content"] for i in range(len(prompts))]
        together, errors = {}, []

        def worker(i: int) -> None:
            try:
                together[i] = ask(i)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        img = png_data_uri()
        look = [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                             {"type": "image_url", "image_url": {"url": img, "detail": "low"}}]}]
        seen = {}

        def vision() -> None:
            try:
                seen["r"] = s.post("/v1/chat/completions", {"model": Path(vision_gguf).name, "messages": look,
                                                            "max_tokens": 6, "temperature": 0}).json()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        threads.append(threading.Thread(target=vision))
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        # Each conversation got its own answer: closest to the one the same server gives it alone. Not
        # equal: batched steps (and attention over the shared KV buffer) sum in another order, so greedy
        # answers may drift on near-ties, as llama-server's do.
        from difflib import SequenceMatcher

        for i in range(len(prompts)):
            got = together[i]["choices"][0]["message"]["content"]
            sim = [SequenceMatcher(None, got, a).ratio() for a in alone]
            assert max(range(len(alone)), key=sim.__getitem__) == i and sim[i] > 0.5, (i, got, alone)
        # a follow-up turn goes to the slot that holds its conversation
        first = together[2]
        follow = ask(2, [{"role": "user", "content": prompts[2]},
                         {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "Another one."}])
        assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 4
        look2 = look + [{"role": "assistant", "content": seen["r"]["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "And the colours?"}]
        r2 = s.post("/v1/chat/completions", {"model": Path(vision_gguf).name, "messages": look2, "max_tokens": 4,
                                             "temperature": 0}).json()
        assert seen["r"]["timings"]["image_tokens"] > 0 and r2["timings"]["image_encode_ms"] == 0
    finally:
        assert s.stop() == 0, (tmp_path / "server.log").read_text()


@pytest.fixture(scope="module")
def guard_gguf() -> str:
    from conftest import CACHE
    from fixtures.guard_models import guard_fixture

    return str(guard_fixture(CACHE / "fixtures")["gguf"])


def test_guard_blocks_questions_and_holds_answers(smollm2_gguf, guard_gguf, tmp_path):
    """--guard both: an unsafe question never reaches the model (finish_reason content_filter, the verdict
    in `guard`); a safe answer is judged before any of it is sent, streamed or not. The guard fixture
    judges text unsafe exactly when it holds " bomb"."""
    s = Server(["smollm2-135m", "--guard", "both", "--guard-model", guard_gguf], tmp_path / "server.log")
    try:
        client = s.client()
        r = client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "How do I build a bomb?"}])
        assert r.choices[0].finish_reason == "content_filter" and not r.choices[0].message.content
        g = r.model_extra["guard"]
        assert g["input"] == "unsafe" and g["output"] is None and g["categories"] == ["S9", "S1"]
        r = client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Why is the sky blue?"}])
        assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
        assert r.model_extra["guard"]["input"] == "safe" and r.model_extra["guard"]["output"] == "safe"
        chunks = list(client.chat.completions.create(
            model="smollm2-135m", max_tokens=8, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Why is the sky blue?"}]))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(pieces) == 1 and pieces[0] == r.choices[0].message.content      # held, then sent whole
        assert chunks[-1].model_extra["guard"]["output"] == "safe"
        o = s.post("/api/chat", {"model": "smollm2-135m", "stream": False,
                                 "messages": [{"role": "user", "content": "How do I build a bomb?"}]})
        assert o.status_code == 200 and o.json()["done_reason"] == "content_filter", o.text
    finally:
        assert s.stop() == 0, (tmp_path / "server.log").read_text()


def test_cli_checks_every_slot_and_refuses_unknown_models(smollm2_gguf, tmp_path):
    from conftest import assert_clean_error, vlm

    # each slot has its own KV cache: 64 slots of 32k tokens do not fit 1 GB
    assert_clean_error(vlm("serve", "--parallel", "64", "--ctx", "32768", "--memory-budget", "1G",
                           "--port", str(_free_port()), "smollm2-135m"), 7, "slots")
    assert_clean_error(vlm("serve", "--port", str(_free_port()), "no-such-model"), 3, "no-such-model")
    for bad in ("lots", "-1"):
        assert_clean_error(vlm("serve", "--prompt-cache", bad, "--port", str(_free_port()), "smollm2-135m"), 2,
                           "--prompt-cache")
    # a CPU-only llama.cpp build cannot put layers on a GPU: said before the server binds
    from edgevlm.runtime.reports.gpu import offload_device

    if offload_device()[0] is None:
        assert_clean_error(vlm("serve", "--gpu-layers", "7", "--port", str(_free_port()), "smollm2-135m"), 2,
                           "--gpu-layers")
