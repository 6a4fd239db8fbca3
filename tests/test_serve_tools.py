"""Tool calling through a real `vlm serve` (SmolLM2 GGUF, real weights) with the official `openai` SDK as the
client: calls streamed and not, the tool_choice forms, a history with tool results, parallel calls, Ollama's
shape, and bad tool lists refused with a 400 before anything runs. The CLI's `vlm ask --tools` is here too."""
from __future__ import annotations

import json

import pytest

from conftest import assert_clean_error, vlm
from test_serve import Server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
Q = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-tools") / "server.log"
    s = Server(["smollm2-135m", "--max-tokens", "200"], log)
    yield s
    assert s.stop() == 0, log.read_text()


def _valid(call) -> dict:
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.mark.slow
def test_required_call_whole_and_streamed_agree(server):
    c = server.client()
    whole = c.chat.completions.create(model="smollm2-135m", messages=Q, tools=TOOLS, tool_choice="required",
                                      temperature=0, parallel_tool_calls=False, max_tokens=120)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and _valid(call)["city"] == "Paris"
    assert not choice.message.content

    # streamed: the SDK assembles the deltas (index, id, type, name, then argument fragments)
    with c.chat.completions.stream(model="smollm2-135m", messages=Q, tools=TOOLS, tool_choice="required",
                                   temperature=0, parallel_tool_calls=False, max_tokens=120) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    sc = final.choices[0]
    assert sc.finish_reason == "tool_calls"
    (scall,) = sc.message.tool_calls
    assert (scall.function.name, scall.function.arguments) == (call.function.name, call.function.arguments)

    # raw deltas: the name comes first, in its own chunk, then the arguments whole, once validated
    raw = c.chat.completions.create(model="smollm2-135m", messages=Q, tools=TOOLS, tool_choice="required",
                                    temperature=0, parallel_tool_calls=False, max_tokens=120, stream=True)
    deltas = [ch.choices[0].delta.tool_calls[0] for ch in raw if ch.choices and ch.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather" and deltas[0].id == deltas[0].id and deltas[0].index == 0
    assert len(deltas) == 2 and deltas[1].function.name is None
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_tool_choice_forms(server):
    c = server.client()
    named = c.chat.completions.create(model="smollm2-135m", messages=Q, tools=TOOLS, temperature=0, max_tokens=120,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [t.function.name for t in named.choices[0].message.tool_calls] == ["get_time"]
    _valid(named.choices[0].message.tool_calls[0])
    none = c.chat.completions.create(model="smollm2-135m", messages=Q, tools=TOOLS, tool_choice="none",
                                     temperature=0, max_tokens=30)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = c.chat.completions.create(model="smollm2-135m", messages=Q, tools=TOOLS, temperature=0, max_tokens=30)
    m = auto.choices[0].message          # this model answers in prose; whatever it does, a call is valid
    assert m.content or m.tool_calls
    for call in m.tool_calls or []:
        _valid(call)


def test_parallel_calls(server):
    c = server.client()
    r = c.chat.completions.create(model="smollm2-135m", tools=TOOLS, tool_choice="required", temperature=1.0, seed=3,
                                  messages=[{"role": "user", "content": "Weather in Paris and in Rome, and the time in Tokyo?"}],
                                  max_tokens=200)
    calls = r.choices[0].message.tool_calls
    assert calls and len({t.id for t in calls}) == len(calls)
    for t in calls:
        _valid(t)
    one = c.chat.completions.create(model="smollm2-135m", tools=TOOLS, tool_choice="required", temperature=1.0, seed=3,
                                    messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
                                    parallel_tool_calls=False, max_tokens=200)
    assert len(one.choices[0].message.tool_calls) == 1


def test_history_with_tool_results(server):
    c = server.client()
    first = c.chat.completions.create(model="smollm2-135m", messages=Q, tools=TOOLS, tool_choice="required",
                                      temperature=0, parallel_tool_calls=False, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    history = Q + [first.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "clear"}'}]
    follow = c.chat.completions.create(model="smollm2-135m", messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.content and follow.choices[0].message.tool_calls is None
    # the call and its result reached the prompt: longer than the question alone by their tokens
    alone = c.chat.completions.create(model="smollm2-135m", messages=Q, tools=TOOLS, tool_choice="none",
                                      temperature=0, max_tokens=1)
    assert follow.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_ollama_shape(server):
    body = {"model": "smollm2-135m", "messages": Q, "tools": [WEATHER], "stream": False,
            "options": {"temperature": 0, "num_predict": 120}}
    r = server.post("/api/chat", body)
    assert r.status_code == 200, r.text
    doc = r.json()
    # Ollama has no tool_choice: its models answer in prose or call; a call's arguments are an object
    for call in doc["message"].get("tool_calls", []):
        assert call["function"]["name"] == "get_weather" and isinstance(call["function"]["arguments"], dict)
    # a history with an Ollama-shaped call (arguments as an object) and a tool message
    hist = Q + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C and clear", "tool_name": "get_weather"}]
    r = server.post("/api/chat", {**body, "messages": hist, "stream": True})
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert lines[-1]["done"] is True


def test_ollama_call_streamed(server):
    """A call forced through the OpenAI route's sibling: the Ollama stream ends with the calls."""
    body = {"model": "smollm2-135m", "stream": True, "tools": [WEATHER], "options": {"temperature": 0, "num_predict": 120},
            "messages": [{"role": "system", "content": "Always call a function."}] + Q}
    r = server.post("/api/chat", body)
    assert r.status_code == 200
    last = [json.loads(x) for x in r.text.splitlines() if x.strip()][-1]
    for call in last["message"].get("tool_calls", []):
        jsonschema.validate(call["function"]["arguments"], WEATHER["function"]["parameters"])


@pytest.mark.parametrize("tools, needle", [
    ({"type": "function"}, "must be a list"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "not a valid JSON Schema"),
    ([WEATHER, WEATHER], "two tools are named"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "function.name"),
])
def test_bad_tool_lists_are_400(server, tools, needle):
    r = server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": Q, "tools": tools})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["param"].startswith("tools")
    r = server.post("/api/chat", {"model": "smollm2-135m", "messages": Q, "tools": tools, "stream": False})
    assert r.status_code == 400 and needle in r.json()["error"]
    r = server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": Q, "tools": [WEATHER],
                                             "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and "not in the tool list" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", {"model": "smollm2-135m", "messages": Q + [
        {"role": "assistant", "tool_calls": [{"id": "x", "function": {"arguments": "{}"}}]}]})
    assert r.status_code == 400


# ------------------------------------------------------------------------------------------ vlm ask --tools

def test_cli_ask_tools(smollm2_gguf, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    common = ["ask", "-m", "smollm2-135m", "--tools", str(tools), "-t", "0", "-n", "120", "-q"]
    r = vlm(*common, "--tool-choice", "get_weather", "What is the weather in Paris?")
    assert r.returncode == 15, r.stderr
    (call,) = json.loads(r.stdout)
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])["city"] == "Paris"
    r = vlm(*common, "--tool-choice", "required", "--json", "What is the weather in Paris?")
    assert r.returncode == 15
    doc = json.loads(r.stdout)
    assert doc["finish_reason"] == "tool_calls" and doc["tool_calls"] and doc["answer"] is None
    # continue with the result: a text answer, exit 0
    r2 = vlm(*common, "-n", "40", "--tool-choice", "none", "--tool-calls", json.dumps([call]),
             "--tool-result", 'get_weather={"temperature_c": 18}', "What is the weather in Paris?")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.strip()


def test_cli_ask_tools_errors_before_loading(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([WEATHER, WEATHER]))
    assert_clean_error(vlm("ask", "-m", "/nonexistent.gguf", "--tools", str(bad), "hi"), 2, "two tools are named")
    assert_clean_error(vlm("ask", "--tools", '{"a": 1}', "hi"), 2, "must be a list")
    assert_clean_error(vlm("ask", "--tool-choice", "required", "hi"), 2, "--tool-choice needs --tools")
    assert_clean_error(vlm("ask", "--tools", json.dumps(TOOLS), "--tool-choice", "nope", "hi"), 2, "not in the tool list")
    assert_clean_error(vlm("ask", "--tools", json.dumps(TOOLS), "--tool-result", "get_weather=1", "hi"), 2,
                       "needs --tool-calls")


def test_cli_chat_tools_reads_results_without_prompting(smollm2_gguf, tmp_path):
    """stdin not a terminal: each call is a JSON line on stdout and its result is the next input line; no
    prompt is written anywhere; input ending before a result ends the chat cleanly."""
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    r = vlm("chat", "-m", "smollm2-135m", "--tools", str(tools), "--tool-choice", "get_weather", "-t", "0", "-n", "60",
            input='What is the weather in Paris?\n{"temperature_c": 18}\n')
    assert r.returncode == 0, r.stderr
    calls = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(calls) == 2 and all(c["call"] == "get_weather" and c["arguments"]["city"] for c in calls)
    assert "Result of" not in r.stderr and ">>>" not in r.stdout


def test_cli_chat_tools_a_cut_off_call_is_dropped_and_the_chat_goes_on(smollm2_gguf, tmp_path):
    """A call cut off by --max-tokens is one line on stderr; that answer leaves the history and the chat
    reads the next question (it used to exit 11 and lose the conversation)."""
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    r = vlm("chat", "-m", "smollm2-135m", "--tools", str(tools), "--tool-choice", "required", "-t", "0", "-n", "12",
            input="What is the weather in Paris?\nAnd in Rome?\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("The answer was dropped; the conversation continues.") == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout.strip() == ""
