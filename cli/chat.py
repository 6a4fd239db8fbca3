"""vlm chat: an interactive conversation about images (or text), streamed, with slash commands."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgevlm.runtime.errors import EdgeVLMError

from . import console
from .console import boundary
from .options import GpuLayers, Rpc, TensorSplit
from .options import KvType
from .options import Guard, GuardCategories, GuardModel
from .options import Detail, ImageBudget, ImageTokens, NoCache
from .options import (Ctx, Fps, Frames, IgnoreMemory, MaxTokens, MMProj, Model, Quiet, Raw, Seed, Stop, System, Temperature,
                      Threads, MinP, RepeatPenalty, TopK, TopP, Yes)

HELP = """Commands:
  /image PATH   add an image (file, URL) to your next message
  /clear        forget the conversation (and pending images)
  /system TEXT  set the system prompt (empty: remove it)
  /save FILE    save the conversation as JSON (images by path and sha256)
  /help         this help
  /exit         leave (or Ctrl-D). Ctrl-C stops an answer and keeps the conversation."""


def _setup_readline() -> None:
    try:
        import atexit
        import readline

        from edgevlm.runtime.config import vlm_home

        hist = vlm_home() / "chat_history"
        hist.parent.mkdir(parents=True, exist_ok=True)
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
        readline.set_history_length(1000)
        atexit.register(lambda: _save_history(readline, hist))
    except Exception:  # no readline on this platform: plain input() still works
        pass


def _save_history(readline, hist: Path) -> None:
    try:
        readline.write_history_file(hist)
    except OSError:
        pass


def _read_line(tty: bool) -> Optional[str]:
    if tty:
        return input(">>> ")
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def _stream_answer(session, text: str, images) -> None:
    last = None
    try:
        for chunk in session.send(text, images):
            if last is None:
                from .detail import notice_images

                notice_images(session.backend)          # the prefill is done: before the answer
            if chunk.text:
                console.write_out(chunk.text)
            last = chunk
    except KeyboardInterrupt:
        console.write_out("\n")
        console.err.print("[dim](answer stopped; the conversation continues)[/]")
        return
    console.write_out("\n")
    if last is not None and last.finish_reason == "length":
        console.info("[dim](stopped at --max-tokens or the context limit)[/]")


def _command(session, line: str, tty: bool) -> bool:
    """Handle a /command. Returns False to leave the chat."""
    from edgevlm.runtime.inputs.attachments import load_media

    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("/exit", "/quit", "/bye"):
        return False
    if cmd == "/help":
        console.err.print(HELP, markup=False)
    elif cmd == "/clear":
        session.clear()
        console.info("[dim]Conversation cleared.[/]")
    elif cmd == "/system":
        session.set_system(arg)
        console.info("[dim]System prompt " + ("set." if arg else "removed.") + "[/]")
    elif cmd == "/image":
        if not arg:
            console.warn("usage: /image PATH")
        elif not session.backend.has_vision:
            console.warn("this model has no vision projector; start the chat with an image or -m a vision model.")
        else:
            try:
                img = load_media([arg])[0]
            except EdgeVLMError as e:
                console.err.print(f"[bold red]Error:[/] {e.message}")
            else:
                session.add_image(img)
                console.info(f"[dim]Added {arg} ({img.width}x{img.height}); it goes with your next message.[/]")
    elif cmd == "/save":
        if not arg:
            console.warn("usage: /save FILE")
        else:
            try:
                p = session.save(arg)
                console.info(f"[dim]Saved to {p}[/]")
            except EdgeVLMError as e:
                console.err.print(f"[bold red]Error:[/] {e.message}")
    else:
        console.warn(f"unknown command {cmd}; /help lists them.")
    return True


@boundary
def chat(
    media: Annotated[Optional[list[str]], typer.Argument(help="Images to talk about (files, URLs).", show_default=False)] = None,
    model: Model = None,
    mmproj: MMProj = None,
    system: System = None,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.95,
    top_k: TopK = 40,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    max_tokens: MaxTokens = 1024,
    seed: Seed = None,
    ctx: Ctx = None,
    threads: Threads = None,
    stop: Stop = None,
    raw: Raw = False,
    schema: Annotated[Optional[str], typer.Option("--schema", help="Constrain every answer to this JSON schema (file or JSON text).")] = None,
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
    """Chat with a model; give images to talk about them. /help inside lists the commands."""
    from edgevlm.runtime.generation.session import ChatSession
    from edgevlm.runtime.protocol import GenerationOptions

    from .acquire import open_model, warn_unenforced
    from .detail import image_detail
    from edgevlm.runtime.inputs.attachments import load_media

    from edgevlm.runtime.generation.schema import load_schema

    from .options import DEFAULT_CTX

    console.set_quiet(quiet)
    json_schema = load_schema(schema) if schema else None
    idetail = image_detail(detail, image_tokens, image_budget, no_cache)       # a bad --detail too
    images = load_media(list(media or []), frames=frames, fps=fps, n_ctx=ctx or DEFAULT_CTX)
    from .guard import chat_turn, load_guard, memory_pair, plan_guard

    gplan = plan_guard(guard, guard_model, guard_categories, main_ctx=ctx or DEFAULT_CTX, yes=yes)
    backend, resolved = open_model(model, want_vision=bool(images), mmproj=mmproj, ctx=ctx, threads=threads,
                                   yes=yes, ignore_memory=ignore_memory, rpc=rpc, tensor_split=tensor_split,
                                       gpu_layers=gpu_layers, kv_type=kv_type,
                                   with_model=memory_pair(gplan))
    tty = sys.stdin.isatty()
    runner = None
    try:
        runner = load_guard(gplan, threads=threads, quiet=quiet)
        opts = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 min_p=min_p, repeat_penalty=repeat_penalty,
                                 seed=seed, stop=list(stop or []), raw=raw, json_schema=json_schema,
                                 image_detail=idetail)
        session = ChatSession(backend, resolved.alias_ref, system=system, options=opts)
        warn_unenforced(backend, json_schema)
        for img in images:
            session.add_image(img)
        if tty:
            _setup_readline()
            console.info(f"[bold]{resolved.alias_ref}[/] ready. /help for commands, Ctrl-D to leave.")
        while True:
            try:
                line = _read_line(tty)
            except KeyboardInterrupt:
                console.err.print("")
                continue
            except EOFError:
                break
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not _command(session, line, tty):
                    break
                continue
            chat_turn(session, runner, line, [], _stream_answer)
    finally:
        if tty:
            console.err.print("")
        if runner is not None:
            runner.close()
        backend.close()
