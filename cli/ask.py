"""vlm ask: one answer on stdout and nothing else there."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer


from . import console
from .console import boundary
from .options import GpuLayers, Rpc, TensorSplit
from .options import KvType
from .options import Guard, GuardCategories, GuardModel
from .options import Detail, ImageBudget, ImageTokens, NoCache
from .options import (Fps, Frames, IgnoreMemory, MaxTokens, MMProj, Model, OneShotCtx, Quiet, Raw, Seed, Stop, System,
                      Temperature, Threads, MinP, RepeatPenalty, TopK, TopP, Yes)


# Template text a chat format may add around one question (role markers, a default system prompt
# such as SmolLM2's or Llama 3.2's dated one): tokens beyond the question's own bytes.
_TEMPLATE_SLACK = 256


def one_shot_ctx(texts: list[str], max_tokens: int) -> int:
    """Context for one text-only answer when --ctx is not given: enough for the prompt (a token holds at
    least one UTF-8 byte, so its bytes bound its tokens) plus the template and the answer, rounded up to
    256 and never above the usual default. A 4096-token context costs llama.cpp ~40 ms to set up and
    ~94 MB of KV cache on SmolLM2; one question rarely needs a fifth of it."""
    from .options import DEFAULT_CTX

    need = sum(len(t.encode("utf-8")) for t in texts) + _TEMPLATE_SLACK + max(0, max_tokens)
    return min(DEFAULT_CTX, max(512, -(-need // 256) * 256))


@boundary
def ask(
    args: Annotated[Optional[list[str]], typer.Argument(help="Images (files, URLs, - for stdin) then the question.", show_default=False)] = None,
    model: Model = None,
    mmproj: MMProj = None,
    system: System = None,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.95,
    top_k: TopK = 40,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    max_tokens: MaxTokens = 512,
    seed: Seed = None,
    ctx: OneShotCtx = None,
    threads: Threads = None,
    stop: Stop = None,
    raw: Raw = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: answer, model, usage, timings.")] = False,
    schema: Annotated[Optional[str], typer.Option("--schema", help="JSON schema (file or JSON text): the answer is constrained to it and validated.")] = None,
    frames: Frames = None,
    fps: Fps = None,
    detail: Detail = "auto",
    image_tokens: ImageTokens = None,
    image_budget: ImageBudget = None,
    no_cache: NoCache = False,
    yes: Yes = False,
    ignore_memory: IgnoreMemory = False,
    rpc: Rpc = None,
    tensor_split: TensorSplit = None,
    gpu_layers: GpuLayers = None,
    kv_type: KvType = None,
    guard: Guard = None,
    guard_model: GuardModel = None,
    guard_categories: GuardCategories = None,
    quiet: Quiet = False,
) -> None:
    """Ask one question, about images or text, and print the answer.

    Examples: vlm ask photo.jpg "How many people are here?" ; vlm ask "Why is the sky blue?" ;
    cat notes.txt | vlm ask "Summarize this"
    """
    from edgevlm.runtime.generation.session import ChatSession
    from edgevlm.runtime.inputs.attachments import load_media
    from edgevlm.runtime.protocol import GenerationOptions

    from .acquire import open_model, warn_unenforced
    from .detail import image_detail, notice_images
    from .inputs import combine, read_stdin_text, split_args

    from edgevlm.runtime.generation.schema import load_schema, parse_and_validate

    from .options import DEFAULT_CTX

    console.set_quiet(quiet)
    json_schema = load_schema(schema) if schema else None       # a bad schema fails before the model loads
    idetail = image_detail(detail, image_tokens, image_budget, no_cache)       # a bad --detail too
    inp = split_args(list(args or []))
    context = None if "-" in inp.media else read_stdin_text()
    prompt = combine(inp.prompt, context)
    images = load_media(inp.media, frames=frames, fps=fps, n_ctx=ctx or DEFAULT_CTX) if inp.media else []
    if ctx is None and not images:
        ctx = one_shot_ctx([prompt, system or ""], max_tokens)
    from .guard import holds_answer, judge_answer, judge_question, load_guard, memory_pair, plan_guard

    gplan = plan_guard(guard, guard_model, guard_categories, main_ctx=ctx or DEFAULT_CTX, yes=yes)
    backend, resolved = open_model(model, want_vision=bool(images), mmproj=mmproj, ctx=ctx, threads=threads,
                                   yes=yes, ignore_memory=ignore_memory, rpc=rpc, tensor_split=tensor_split,
                                       gpu_layers=gpu_layers, kv_type=kv_type,
                                   with_model=memory_pair(gplan))
    runner = None
    try:
        runner = load_guard(gplan, threads=threads, quiet=quiet)
        completion_only = (resolved.model is not None and resolved.model.completion_only) or not backend.chat_template
        if completion_only and not raw and not quiet:
            console.info(f"[dim]{resolved.name} has no chat template: running as plain completion.[/]")
        opts = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 min_p=min_p, repeat_penalty=repeat_penalty,
                                 seed=seed, stop=list(stop or []), raw=raw or completion_only, json_schema=json_schema,
                                 image_detail=idetail)
        session = ChatSession(backend, resolved.alias_ref, system=system, options=opts)
        warn_unenforced(backend, json_schema)
        image_docs = [{"source": i.source, "sha256": i.sha256, "width": i.width, "height": i.height,
                       **({"label": i.label} if i.label else {})} for i in images]
        asked = session.pending_messages(prompt, images)
        judge_question(runner, asked, json_base={"model": resolved.alias_ref, "images": image_docs} if as_json else None)
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
    finally:
        if runner is not None:
            runner.close()
        backend.close()
