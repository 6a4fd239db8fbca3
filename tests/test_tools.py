"""Tool calling (runtime/generation/tools.py, tool_formats.py): the tool list's checks, which templates render
tools themselves, each family's syntax read back, and the guarantee: whatever the model samples, a call it
emits parses and validates against its tool's parameters.

Adversaries: random logits under the real SmolLM2 vocabulary (the grammar alone decides what is left), SmolLM2
sampled at temperature 2 through the real decode loop, and (slow) the random-weight vision fixture on both
backends.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from edgevlm.runtime.generation.tools import (  # noqa: E402
    ToolCallViolation, ToolListError, ToolPlan, check_choice, check_tools, plan_tools, template_format)
from edgevlm.runtime.generation.tool_formats import FORMATS  # noqa: E402
from edgevlm.runtime.protocol import GenerationOptions, Message  # noqa: E402

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -100, "maximum": 100},
                                                    "b": {"type": "integer", "minimum": -100, "maximum": 100}},
                   "required": ["a", "b"], "additionalProperties": False}}}
FLAGS = {"type": "function", "function": {
    "name": "set-flags", "parameters": {"type": "object", "properties": {
        "on": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                            "minItems": 1, "maxItems": 3},
        "level": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["on", "tags"], "additionalProperties": False}}}
NOARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, ADD, FLAGS, NOARGS]


# ------------------------------------------------------------------------------------------ the tool list

@pytest.mark.parametrize("bad, needle", [
    ({"type": "function"}, "must be a list"),
    ([], "empty list"),
    ("weather", "must be a list"),
    ([{"type": "function"}], "tools[0]"),
    ([{"type": "retrieval", "function": {"name": "x"}}], "tools[0].type"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "x" * 65}}], "1 to 64"),
    ([WEATHER, WEATHER], "two tools are named 'get_weather'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "not a valid JSON Schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "a"}}}],
     "not a valid JSON Schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "must describe an object"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "JSON Schema object"),
])
def test_bad_tool_lists_are_one_clear_error(bad, needle):
    with pytest.raises(ToolListError) as e:
        check_tools(bad)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.param.startswith("tools")


def test_tool_choice_forms():
    tools = check_tools(TOOLS)
    assert check_choice(None, tools) == ("auto", None)
    assert check_choice("required", tools) == ("required", None)
    assert check_choice({"type": "function", "function": {"name": "add"}}, tools) == ("function", "add")
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"function": "add"}, 3):
        with pytest.raises(ToolListError):
            check_choice(bad, tools)


# ------------------------------------------------------------------------------------------ templates

@pytest.mark.parametrize("name, fmt, native", [
    ("meta-llama-Llama-3.2-3B-Instruct", "llama3", True),
    ("Qwen-Qwen2.5-7B-Instruct", "hermes", True),
    ("LFM2-8B-A1B", "lfm2", True),
    ("google-gemma-2-2b-it", "hermes", False),        # no tool support: the preamble
    ("HuggingFaceTB-SmolLM3-3B", "hermes", False),    # its tools go in `xml_tools`, not `tools`: the preamble
])
def test_which_templates_render_tools(name, fmt, native):
    found, is_native = template_format((TEMPLATES / f"{name}.jinja").read_text())
    assert (found.name, is_native) == (fmt, native)


class _TemplateOnly:
    """What plan_tools reads of a backend: its chat template."""

    def __init__(self, template):
        self.chat_template = template


def _history():
    return [Message("user", "Weather in Paris?"),
            Message("assistant", "", tool_calls=[{"id": "c1", "type": "function",
                                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
            Message("tool", "18 C, clear", tool_call_id="c1", name="get_weather")]


@pytest.mark.parametrize("name", ["meta-llama-Llama-3.2-3B-Instruct", "Qwen-Qwen2.5-7B-Instruct", "LFM2-8B-A1B",
                                  "google-gemma-2-2b-it", None])
def test_history_with_calls_and_results_renders(name):
    from edgevlm.runtime.generation.prompt import render_chat

    template = (TEMPLATES / f"{name}.jinja").read_text() if name else None
    plan = plan_tools(_TemplateOnly(template), check_tools(TOOLS))
    req = plan.request(_history(), GenerationOptions())
    if template is None:                           # plain completion: the preamble leads the first user turn
        assert req.messages[0].role == "user" and req.messages[0].content.startswith("You can call functions")
        return
    text = render_chat(template, req.messages, bos_token="", eos_token="", tools=req.tools)
    assert "get_weather" in text and "Paris" in text and "18 C, clear" in text
    assert "set-flags" in text                     # the tools are in the prompt
    if not plan.native:
        assert "<tool_call>" in text and "<tool_response>" in text


# ------------------------------------------------------------------------------------------ reading calls

def _plan(fmt, mode="auto", name=None, tools=TOOLS):
    return ToolPlan(check_tools(tools), FORMATS[fmt], False, True, mode, name)


def test_parse_each_family():
    h = _plan("hermes").parse('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                              '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', "stop")
    assert h.content == "Sure." and [(c.name, c.args) for c in h.calls] == [("add", {"a": 1, "b": 2}), ("now", {})]
    l3 = _plan("llama3").parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "stop")
    assert [(c.name, c.args) for c in l3.calls] == [("get_weather", {"city": "Oslo"})]
    lf = _plan("lfm2").parse('<|tool_call_start|>[add(a=1, b=-2), now()]<|tool_call_end|>', "stop")
    assert [(c.name, c.args) for c in lf.calls] == [("add", {"a": 1, "b": -2}), ("now", {})]
    assert _plan("hermes").parse("just text", "stop").calls == []
    with pytest.raises(ToolCallViolation, match="do not match"):     # never returned: validated first
        _plan("hermes").parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', "stop")
    with pytest.raises(ToolCallViolation, match="cut off"):
        _plan("hermes").parse('<tool_call>\n{"name": "add", "argum', "length")


def test_stream_events_assemble_to_the_parsed_answer():
    plan = _plan("hermes")
    text = 'Let me see.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome {x}"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    stream = plan.stream()
    events = []
    for i in range(0, len(text), 3):               # pieces that split the marker and the JSON anywhere
        events += stream.feed(text[i:i + 3])
    answer = stream.finish("stop")
    content = "".join(e[1] for e in events if e[0] == "content")
    calls: dict = {}
    for e in events:
        if e[0] == "call":
            calls[e[1]] = [e[2], e[3], ""]
        elif e[0] == "arguments":
            calls[e[1]][2] += e[2]
    assert content.strip() == answer.content == "Let me see."
    assert [tuple(v) for v in calls.values()] == [(c.id, c.name, c.arguments) for c in answer.calls]
    assert json.loads(calls[0][2]) == {"city": "Rome {x}"}


# ------------------------------------------------------------------------------------------ the guarantee

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    b = load_backend(artifact_from_path(smollm2_gguf, None, False), LoadOptions(n_ctx=2048, n_threads=2))
    yield b
    b.close()


@pytest.mark.model
@pytest.mark.parametrize("fmt", ["hermes", "llama3", "lfm2"])
@pytest.mark.parametrize("mode", ["auto", "required"])
def test_random_logits_never_write_an_invalid_call(smollm2, fmt, mode):
    """The grammar alone against random logits over SmolLM2's real vocabulary: 40 answers per family and
    mode; every call that comes out parses and validates, and required/named answers are always calls."""
    import numpy as np

    plan = ToolPlan(check_tools(TOOLS), FORMATS[fmt], False, True, mode)
    rng = np.random.default_rng(7)
    trigger = smollm2.tokenize(plan.fmt.trigger, add_special=False, parse_special=False)
    n_calls = 0
    for run in range(40):
        c = plan.constraint(smollm2)
        out: list[int] = []
        start = 0 if fmt == "llama3" else run % 5     # where half the auto runs are pushed to open a call
        for step in range(400):
            logits = rng.standard_normal(smollm2._n_vocab).astype(np.float32) * 4
            if run % 2 and mode == "auto" and 0 <= step - start < len(trigger):
                logits[trigger[step - start]] += 50
            c.mask(logits)
            tok = int(np.argmax(logits))
            c.advance(tok)
            if tok in c.eos_ids:
                break
            out.append(tok)
            if c.is_done():
                break
        else:
            continue                             # cut by the limit: nothing returned as a call (see parse)
        answer = plan.parse(smollm2.detokenize(out), "stop")
        n_calls += len(answer.calls)
        if mode == "required":
            assert answer.calls
        for call in answer.calls:
            tool = next(t for t in TOOLS if t["function"]["name"] == call.name)
            jsonschema.validate(call.args, tool["function"].get("parameters", {"type": "object"}))
    assert n_calls > 0


@pytest.mark.model
@pytest.mark.slow            # ~100 s: many sampled answers; the full suite runs it
def test_sampled_hot_every_call_is_valid(smollm2):
    """SmolLM2 at temperature 2 through the real decode loop: forced calls are always complete and valid."""
    from edgevlm.runtime.generation.core import complete

    tools = check_tools(TOOLS)
    for seed in range(4):
        choice = ["required", {"type": "function", "function": {"name": "set-flags"}}][seed % 2]
        plan = plan_tools(smollm2, tools, choice, parallel=False)     # (parallel calls: the test above)
        req = plan.request([Message("user", "Do something useful.")],
                           GenerationOptions(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=200))
        smollm2.reset()
        text, last = complete(smollm2, req)
        answer = plan.parse(text, last.finish_reason)
        assert answer.calls, text
        if seed % 2:
            assert [c.name for c in answer.calls] == ["set-flags"]


@pytest.mark.model
@pytest.mark.slow            # ~100 s: many sampled answers; the full suite runs it
def test_auto_leaves_text_free_and_required_calls(smollm2):
    from edgevlm.runtime.generation.core import complete

    tools = check_tools([WEATHER])
    texts = {}
    for choice in ("auto", "none", "required"):
        plan = plan_tools(smollm2, tools, choice)
        assert (plan.fmt.name, plan.native) == ("hermes", False)   # SmolLM2's template has no tools: preamble
        req = plan.request([Message("user", "What is the weather in Paris?")],
                           GenerationOptions(temperature=0, max_tokens=40, seed=1))
        smollm2.reset()
        text, last = complete(smollm2, req)
        texts[choice] = plan.parse(text, last.finish_reason)
    assert texts["auto"].content and not texts["auto"].calls        # this model answers in prose
    assert not texts["none"].calls
    (call,) = texts["required"].calls
    assert call.name == "get_weather" and call.args["city"] == "Paris"


@pytest.mark.model
def test_grammar_compiled_once_per_tool_set(smollm2):
    from edgevlm.runtime.generation import tools as tools_mod

    plan = plan_tools(smollm2, check_tools(TOOLS), "required")
    plan.constraint(smollm2)
    n = len(tools_mod._MATCHERS)
    a, b = plan.constraint(smollm2), plan.constraint(smollm2)
    assert len(tools_mod._MATCHERS) == n and a._m is not b._m


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_random_weight_model_never_writes_an_invalid_call(vision_model, kind):
    """The random-weight fixture on both backends, sampled at temperature 1, 16 answers each."""
    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    art = (artifact_from_path(vision_model["gguf"], vision_model["mmproj"], True) if kind == "gguf" else
           artifact_from_path(vision_model["onnx"] / "decoder_model_merged_int8.onnx", None, True))
    b = load_backend(art, LoadOptions(n_ctx=4096, n_threads=2))
    try:
        tools = check_tools(TOOLS)
        for seed in range(16):
            plan = plan_tools(b, tools, ["auto", "required"][seed % 2])
            req = plan.request([Message("user", "Call something.")],
                               GenerationOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=250))
            b.reset()
            text, last = complete(b, req)
            try:
                answer = plan.parse(text, last.finish_reason)
            except ToolCallViolation:
                assert last.finish_reason == "length"   # only a call the token limit cut; never returned
                continue
            if seed % 2:
                assert answer.calls
    finally:
        b.close()


@pytest.mark.model
@pytest.mark.parametrize("fmt", ["hermes", "llama3", "lfm2"])
def test_keywords_the_engine_cannot_enforce_still_compile(smollm2, fmt):
    """uniqueItems and not are not llguidance's: the grammar is lenient (as --schema), parse validates them."""
    tools = check_tools([
        {"type": "function", "function": {"name": "tags", "parameters": {"type": "object", "properties": {
            "t": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}, "required": ["t"]}}},
        {"type": "function", "function": {"name": "any", "parameters": {"type": "object", "properties": {
            "v": {"not": {"type": "null"}}}, "required": ["v"]}}}])
    plan = ToolPlan(tools, FORMATS[fmt], False, True, "required")
    assert plan.constraint(smollm2) is not None
    if fmt == "hermes":
        with pytest.raises(ToolCallViolation, match="do not match"):
            plan.parse('<tool_call>\n{"name": "tags", "arguments": {"t": ["a", "a"]}}\n</tool_call>', "stop")


CODE = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]}}}


def _streamed(plan, text, finish_reason, step=3):
    stream = plan.stream()
    events = []
    for i in range(0, len(text), step):
        events += stream.feed(text[i:i + step])
    return events, stream.finish(finish_reason)


@pytest.mark.parametrize("fmt, text, finish_reason, n_calls", [
    ("hermes", 'Ok.<tool_call>\n{"name": "lookup", "arguments": {"code": "abc"}}\n</tool_call>', "stop", 0),
    ("hermes", '<tool_call>\n{"name": "lookup", "arguments": {"code": "ABC"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "lookup", "arguments": {"code": "abc"}}\n</tool_call>', "stop", 1),
    ("hermes", '<tool_call>\n{"name": "lookup", "arguments": {"code": "ABC"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "lookup", "argu', "length", 1),
    ("hermes", '<tool_call>\n{"name": "lookup", "arguments": {"co', "length", 0),
    ("llama3", '{"name": "lookup", "parameters": {"code": "abc"}}', "stop", 0),
    ("lfm2", '<|tool_call_start|>[lookup(code="ABC"), lookup(code="abc")]<|tool_call_end|>', "stop", 1),
    ("lfm2", '<|tool_call_start|>[lookup(code="AB', "length", 0),
])
def test_stream_sends_only_complete_valid_calls_and_ends_as_read_whole(fmt, text, finish_reason, n_calls):
    """A call that fails validation (a dropped pattern) or is cut off is never sent, nor any after it; the
    streamed answer is the answer read whole (what the server returns not streamed), never an error."""
    plan = ToolPlan(check_tools([CODE]), FORMATS[fmt], False, True)
    whole = plan.read(text, finish_reason)
    events, answer = _streamed(plan, text, finish_reason)
    assert len(whole.calls) == len(answer.calls) == n_calls
    assert [(c.name, c.arguments) for c in answer.calls] == [(c.name, c.arguments) for c in whole.calls]
    assert answer.content == whole.content
    sent = [e for e in events if e[0] != "content"]
    assert sent == [ev for i, c in enumerate(answer.calls)
                    for ev in (("call", i, c.id, c.name), ("arguments", i, c.arguments))]


def test_stream_holds_a_call_until_it_is_complete():
    plan = ToolPlan(check_tools([CODE]), FORMATS["hermes"], False, True)
    stream = plan.stream()
    assert stream.feed('<tool_call>\n{"name": "lookup", "arguments": {"code": "AB') == []
    assert [e[0] for e in stream.feed('C"}}\n</tool_call>')] == ["call", "arguments"]


def test_deeply_nested_output_is_an_invalid_call_not_a_crash():
    plan = ToolPlan(check_tools(TOOLS), FORMATS["hermes"], False, True)
    deep = '<tool_call>\n{"name": "now", "arguments": {"a": ' + "[" * 100000 + "]" * 100000 + "}}\n</tool_call>"
    assert plan.read(deep, "stop").calls == []
    with pytest.raises(ToolCallViolation):
        plan.parse(deep, "stop")
    assert _streamed(plan, deep, "stop", step=4000)[1].calls == []


def test_deeply_nested_history_arguments_are_a_400_not_a_crash():
    """A history's arguments string is parsed and depth-checked when the request is read (400); the
    prompt helpers that read it again never raise RecursionError."""
    from edgevlm.runtime.generation.prompt import _tool_fields
    from edgevlm.runtime.generation.tools import _as_dict
    from edgevlm.runtime.serving.apierror import APIError
    from edgevlm.runtime.serving.tool_calls import history_fields

    for deep in ("[" * 50000 + "]" * 50000, "[" * 100 + "]" * 100):
        m = {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": deep}}]}
        with pytest.raises(APIError) as e:
            history_fields(m, 1, "assistant", {})
        assert e.value.status == 400 and "nested too deeply" in str(e.value.message)
        assert isinstance(_as_dict(deep), dict)
        _tool_fields(Message("assistant", "", tool_calls=[{"function": {"name": "f", "arguments": deep}}]))
    ok = {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a": [1]}'}}]}
    assert history_fields(ok, 1, "assistant", {})["tool_calls"][0]["function"]["arguments"] == '{"a": [1]}'


def test_tool_schemas_are_capped_in_size():
    from edgevlm.runtime.generation.tools import MAX_SCHEMA_NODES

    props = {f"p{i}": {"type": "object", "properties": {}} for i in range(MAX_SCHEMA_NODES)}
    big = {"type": "function", "function": {"name": "big", "parameters": {"type": "object", "properties": props}}}
    with pytest.raises(ToolListError, match="too large"):
        check_tools([big])
    halves = [{"type": "function", "function": {"name": f"h{k}", "parameters": {"type": "object", "properties": {
        f"p{i}": {"type": "object"} for i in range(MAX_SCHEMA_NODES // 2)}}}} for k in range(2)]
    with pytest.raises(ToolListError, match="too large"):       # counted across the tools, not per tool
        check_tools(halves)
    assert check_tools(TOOLS)


def test_tool_calls_with_a_non_string_name_is_a_usage_error():
    from edgevlm.cli.common.tool_turns import earlier_calls
    from edgevlm.runtime.errors import UsageError

    bad = json.dumps([{"id": "c", "function": {"name": ["get_weather"], "arguments": "{}"}}])
    with pytest.raises(UsageError, match="not a call of a function"):
        earlier_calls(bad, ["get_weather=1"], check_tools(TOOLS))


@pytest.mark.model
def test_lfm2_parameter_names(smollm2):
    """Quotes in a parameter name are escaped in the grammar; names the Pythonic syntax cannot carry are
    one clear error when the plan is made."""
    quoted = check_tools([{"type": "function", "function": {"name": "q", "parameters": {
        "type": "object", "properties": {'a"b': {"type": "integer"}, "c\\\\d": {"type": "string"}}, "required": ['a"b']}}}])
    plan = plan_tools(smollm2, quoted, "required", fmt="lfm2")
    assert plan.constraint(smollm2) is not None
    spaced = check_tools([{"type": "function", "function": {"name": "s", "parameters": {
        "type": "object", "properties": {"a b": {"type": "integer"}}}}}])
    with pytest.raises(ToolListError, match="cannot be written"):
        plan_tools(smollm2, spaced, fmt="lfm2")
    assert plan_tools(smollm2, spaced, fmt="hermes")


@pytest.mark.model
def test_raw_prompt_keeps_the_tools(smollm2):
    """--raw (or a completion-only model): planned as without a template, so the preamble and the history's
    calls and results are in the plain-text prompt the backend renders."""
    plan = plan_tools(smollm2, check_tools([WEATHER]), raw=True)
    assert (plan.fmt.name, plan.native, plan.has_template) == ("hermes", False, False)
    history = [Message("system", "Be brief."), Message("user", "Weather in Oslo?"),
               Message("assistant", "", tool_calls=[{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]),
               Message("tool", '{"temp_c": 3}', tool_call_id="c1", name="get_weather")]
    req = plan.request(history, GenerationOptions(raw=True))
    prompt = smollm2.render(req)
    assert "get_weather" in prompt and "<tools>" in prompt and "Weather in Oslo?" in prompt
    assert '<tool_response>' in prompt and 'temp_c' in prompt and '"city": "Oslo"' in prompt


def test_a_template_that_refuses_the_conversation_is_a_400():
    """Gemma's template raises on roles that do not alternate: the request's shape, so a 400 (not a 500)."""
    from edgevlm.runtime.errors import TemplateRefused
    from edgevlm.runtime.generation.prompt import render_chat
    from edgevlm.runtime.serving.apierror import from_error

    gemma = (TEMPLATES / "google-gemma-2-2b-it.jinja").read_text()
    with pytest.raises(TemplateRefused) as e:
        render_chat(gemma, [Message("user", "hi"), Message("user", "again")], bos_token="", eos_token="")
    err = from_error(e.value)
    assert err.status == 400 and "alternate" in err.message
