"""vlm ask: one answer on stdout and nothing else there."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer


from .common import console
from .common.console import boundary
from .common.options import (Guarding, Images, Loading, OneShotCtx, Quiet, Raw, Sampling, System, Tooling, Video,
                             flag_groups)


# Template text a chat format may add around one question (role markers, a default system prompt
# such as SmolLM2's or Llama 3.2's dated one): tokens beyond the question's own bytes.
_TEMPLATE_SLACK = 256


def one_shot_ctx(texts: list[str], max_tokens: int) -> int:
    """Context for one text-only answer when --ctx is not given: enough for the prompt (a token holds at
    least one UTF-8 byte, so its bytes bound its tokens) plus the template and the answer, rounded up to
    256 and never above the usual default. A 4096-token context costs llama.cpp ~40 ms to set up and
    ~94 MB of KV cache on SmolLM2; one question rarely needs a fifth of it."""
    from .common.options import DEFAULT_CTX

    need = sum(len(t.encode("utf-8")) for t in texts) + _TEMPLATE_SLACK + max(0, max_tokens)
    return min(DEFAULT_CTX, max(512, -(-need // 256) * 256))


@boundary
@flag_groups(ctx=OneShotCtx)
def ask(
    args: Annotated[Optional[list[str]], typer.Argument(help="Images (files, URLs, - for stdin) then the question.", show_default=False)] = None,
    sampling: Sampling = None,
    loading: Loading = None,
    system: System = None,
    raw: Raw = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: answer, model, usage, timings.")] = False,
    schema: Annotated[Optional[str], typer.Option("--schema", help="JSON schema (file or JSON text): the answer is constrained to it and validated.")] = None,
    video: Video = None,
    image_flags: Images = None,
    guarding: Guarding = None,
    tooling: Tooling = None,
    tool_calls: Annotated[Optional[str], typer.Option(
        "--tool-calls", help="With --tool-result: the calls an earlier `vlm ask --tools` printed (JSON or a file).")] = None,
    tool_result: Annotated[Optional[list[str]], typer.Option(
        "--tool-result", help="NAME=VALUE (or ID=VALUE; VALUE @FILE reads a file): a call's result, to continue (repeatable).")] = None,
    quiet: Quiet = False,
) -> None:
    """Ask one question, about images or text, and print the answer.

    Examples: vlm ask photo.jpg "How many people are here?" ; vlm ask "Why is the sky blue?" ;
    cat notes.txt | vlm ask "Summarize this"
    """
    from edgevlm.runtime.generation.schema import parse_and_validate

    from .common.detail import notice_images
    from .common.guard import holds_answer, judge_answer, judge_question
    from .common.inputs import combine, read_stdin_text, split_args
    from .common.session import Setup

    setup = Setup(sampling=sampling, loading=loading, images=image_flags, guarding=guarding, schema=schema, quiet=quiet,
                  tooling=tooling)
    json_schema = setup.json_schema
    if setup.tools is None and (tool_calls or tool_result):
        from edgevlm.runtime.errors import UsageError

        raise UsageError("--tool-calls and --tool-result need --tools.", hint="Give the same --tools as the first call.")
    earlier = []
    if setup.tools is not None:
        from .common.tool_turns import earlier_calls

        earlier = earlier_calls(tool_calls, list(tool_result or []), setup.tools)    # checked before loading
    max_tokens = sampling.max_tokens
    inp = split_args(list(args or []))
    context = None if "-" in inp.media else read_stdin_text()
    prompt = combine(inp.prompt, context)
    images = setup.media(inp.media, video) if inp.media else []
    if loading.ctx is None and not images:
        loading.ctx = one_shot_ctx([prompt, system or ""], max_tokens)
    with setup.open(want_vision=bool(images)) as opened:
        backend, resolved, runner = opened.backend, opened.resolved, opened.runner
        completion_only = (resolved.model is not None and resolved.model.completion_only) or not backend.chat_template
        if completion_only and not raw and not quiet:
            console.info(f"[dim]{resolved.name} has no chat template: running as plain completion.[/]")
        session = setup.session(opened, system=system, raw=raw or completion_only)
        image_docs = [{"source": i.source, "sha256": i.sha256, "width": i.width, "height": i.height,
                       **({"label": i.label} if i.label else {})} for i in images]
        asked = session.pending_messages(prompt, images)
        judge_question(runner, asked, json_base={"model": resolved.alias_ref, "images": image_docs} if as_json else None)
        if session.tools is not None:
            _tool_turn(session, prompt, images, earlier, runner, asked, as_json=as_json,
                       base={"model": resolved.alias_ref, "images": image_docs})
            return
        if as_json or json_schema is not None or holds_answer(runner):
            result = session.ask(prompt, images)
            rep = notice_images(backend, quiet)
            timings = result.timings
            if rep:
                timings["images"] = rep["images"]        # per image: detail chosen, tiles, encode, cache
            judge_answer(runner, asked, result.text, json_base={
                "model": resolved.alias_ref, "usage": result.usage, "timings": timings,
                "images": image_docs} if as_json else None)
            answer = parse_and_validate(result.text, json_schema, result.final.finish_reason) if json_schema is not None else result.text
            if not as_json:
                console.write_out((json.dumps(answer, ensure_ascii=False) if json_schema is not None else answer) + "\n")
                return
            doc = {"answer": answer, "model": resolved.alias_ref, "finish_reason": result.final.finish_reason,
                   "usage": result.usage, "timings": timings, "images": image_docs}
            if runner is not None:
                doc["guard"] = runner.public()
            console.write_out(json.dumps(doc, ensure_ascii=False) + "\n")
            return
        last = None
        try:
            for chunk in session.send(prompt, images):
                if last is None:
                    notice_images(backend, quiet)      # the prefill is done: before the answer
                if chunk.text:
                    console.write_out(chunk.text)
                last = chunk
        finally:
            if last is not None and last.finish_reason is not None:
                console.write_out("\n")
        if last is not None and last.finish_reason == "length" and not quiet:
            console.info(f"[dim](stopped at --max-tokens {max_tokens} or the context limit)[/]")


def _tool_turn(session, prompt: str, images, earlier, runner, asked, *, as_json: bool, base: dict) -> None:
    """An answer that may call the tools: generated whole, its calls validated, then judged by the guard (the
    calls as the answer). Calls go to stdout as OpenAI's JSON (--json: the `tool_calls` field) and exit 15."""
    from edgevlm.runtime.protocol import Message

    from .common.detail import notice_images
    from .common.guard import judge_answer
    from .common.tool_turns import TOOL_CALL_EXIT, calls_json, judged_text

    if earlier:                   # the question, the calls made, their results; then the answer that follows
        session.history.append(Message("user", prompt, list(images)))
        for call, _ in earlier:
            session.add_tool_call(call)
        for call, value in earlier:
            session.add_tool_result(call["id"], call["function"]["name"], value)
        result = session.ask(None)
    else:
        result = session.ask(prompt, images)
    rep = notice_images(session.backend, console.QUIET)
    timings = result.timings
    if rep:
        timings["images"] = rep["images"]
    answer = session.tool_answer(result)
    judge_answer(runner, asked, judged_text(answer),
                 json_base={**base, "usage": result.usage, "timings": timings} if as_json else None)
    finish = "tool_calls" if answer.calls else result.final.finish_reason
    if as_json:
        doc = {"answer": answer.content if (answer.content or not answer.calls) else None,
               "tool_calls": [c.openai() for c in answer.calls], **{"model": base["model"]}, "finish_reason": finish,
               "usage": result.usage, "timings": timings, "images": base["images"]}
        if runner is not None:
            doc["guard"] = runner.public()
        console.write_out(json.dumps(doc, ensure_ascii=False) + "\n")
    elif answer.calls:
        console.write_out(calls_json(answer) + "\n")
    else:
        console.write_out(answer.content + "\n")
    if answer.calls:
        raise typer.Exit(TOOL_CALL_EXIT)
