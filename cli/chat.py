"""vlm chat: an interactive conversation about images (or text), streamed, with slash commands."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgevlm.runtime.errors import EdgeVLMError

from .common import console
from .common.console import boundary
from .common.options import Guarding, Images, Loading, Quiet, Raw, Sampling, System, Tooling, Video, flag_groups

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
                from .common.detail import notice_images

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


MAX_TOOL_ROUNDS = 8     # calls answered in one turn before the chat hands the turn back


def _tool_turn(session, runner, text: str, tty: bool) -> bool:
    """A turn with --tools: each call is shown (stdout, one JSON line) and its result asked for: on a terminal
    with a prompt on stderr; otherwise read from the next input line, without a prompt. Nothing is run here.
    The answer that follows the results may call again, up to MAX_TOOL_ROUNDS times. --guard judges the
    question, and each answer with its calls as the answer. A call that was cut off or does not validate is
    one line on stderr: that answer leaves the history and the chat goes on. False: the input ended."""
    import json

    from edgevlm.runtime.generation.tools import ToolCallViolation

    from .common.tool_turns import judged_text

    asked = session.pending_messages(text, [])
    if runner is not None:
        runner.fresh()
        v = runner.check_input(asked)
        if v is not None and not v.safe:
            session.withhold_question()
            console.err.print(f"[bold yellow]{runner.error(v).message}[/]")
            return True
    user: Optional[str] = text
    for _ in range(MAX_TOOL_ROUNDS):
        if user is None and runner is not None:     # tool results are user-side content: judged as the server does
            asked = session.messages_for(None, [])
            v = runner.check_input(asked)
            if v is not None and not v.safe:
                console.err.print(f"[bold yellow]{runner.error(v).message}[/]")
                return True
        try:
            result = session.ask(user)
        except KeyboardInterrupt:
            console.err.print("[dim](answer stopped; the conversation continues)[/]")
            return True
        try:
            answer = session.tool_answer(result)
        except ToolCallViolation as e:
            session.drop_answer(with_question=user is not None)
            console.err.print(f"{e.message} The answer was dropped; the conversation continues.",
                              markup=False, highlight=False)
            return True
        user = None
        if runner is not None and runner.plan.checks_output:
            v = runner.check_output(asked, judged_text(answer))
            if v is not None and not v.safe:
                session.withhold_answer()
                console.err.print(f"[bold yellow]{runner.error(v).message}[/]")
                return True
        if answer.content:
            console.write_out(answer.content + "\n")
        if not answer.calls:
            return True
        for call in answer.calls:
            console.write_out(json.dumps({"call": call.name, "arguments": call.args, "id": call.id},
                                         ensure_ascii=False) + "\n")
            if tty:
                console.err.print(f"[dim]Result of {call.name} (one line; the chat runs nothing itself):[/]")
            try:
                line = _read_line(tty)
            except EOFError:               # (Ctrl-D at the prompt)
                line = None
            if line is None:               # end of input: the call stays unanswered, the chat ends
                return False
            session.add_tool_result(call.id, call.name, line)
    console.info(f"[dim](stopped after {MAX_TOOL_ROUNDS} rounds of calls)[/]")
    return True


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
@flag_groups(max_tokens=1024)
def chat(
    media: Annotated[Optional[list[str]], typer.Argument(help="Images to talk about (files, URLs).", show_default=False)] = None,
    sampling: Sampling = None,
    loading: Loading = None,
    system: System = None,
    raw: Raw = False,
    schema: Annotated[Optional[str], typer.Option("--schema", help="Constrain every answer to this JSON schema (file or JSON text).")] = None,
    video: Video = None,
    image_flags: Images = None,
    guarding: Guarding = None,
    tooling: Tooling = None,
    quiet: Quiet = False,
) -> None:
    """Chat with a model; give images to talk about them. /help inside lists the commands. With --tools each
    call is shown and its result asked for (read from the next input line when stdin is not a terminal)."""
    from .common.guard import chat_turn
    from .common.session import Setup

    setup = Setup(sampling=sampling, loading=loading, images=image_flags, guarding=guarding, schema=schema, quiet=quiet,
                  tooling=tooling)
    images = setup.media(list(media or []), video)
    tty = sys.stdin.isatty()
    with setup.open(want_vision=bool(images)) as opened:
        try:
            session = setup.session(opened, system=system, raw=raw)
            for img in images:
                session.add_image(img)
            if tty:
                _setup_readline()
                console.info(f"[bold]{opened.name}[/] ready. /help for commands, Ctrl-D to leave.")
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
                if session.tools is not None:
                    if not _tool_turn(session, opened.runner, line, tty):
                        break
                else:
                    chat_turn(session, opened.runner, line, [], _stream_answer)
        finally:
            if tty:
                console.err.print("")
