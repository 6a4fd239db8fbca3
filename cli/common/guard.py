"""--guard on ask, chat and caption: resolve and load Llama Guard 3 beside the main model, run the checks,
say what was blocked. The prompt format and the verdict live in runtime/generation/guard.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from edgevlm.runtime.errors import Blocked, EdgeVLMError

from . import console

DEFAULT_GUARD_MODEL = "llama-guard3-1b"
# The guard's context: the main model's plus room for its own prompt (task line, categories, instruction).
GUARD_PROMPT_SLACK = 512
GUARD_MAX_CTX = 8192
_IMAGE_NOTE_SHOWN = False


@dataclass
class GuardPlan:
    """What --guard asked for, resolved before the main model loads (so the memory check counts both)."""

    mode: str                      # input | output | both
    resolved: object               # loader.ResolvedModel of the guard model
    n_ctx: int
    policy: object                 # runtime.generation.guard.Policy

    @property
    def checks_input(self) -> bool:
        from edgevlm.runtime.generation.guard import checks_input

        return checks_input(self.mode)

    @property
    def checks_output(self) -> bool:
        from edgevlm.runtime.generation.guard import checks_output

        return checks_output(self.mode)


def plan_guard(mode_opt: Optional[str], model_opt: Optional[str], categories: Optional[str], *, main_ctx: int,
               yes: bool) -> Optional[GuardPlan]:
    """Read --guard (or the config's ``guard``), parse the policy (bad flags fail before anything loads),
    resolve the guard model and install it if needed. None when the guard is off."""
    from edgevlm.runtime import loader
    from edgevlm.runtime.config import load_config
    from edgevlm.runtime.generation.guard import Policy, parse_mode

    cfg = load_config()
    mode = parse_mode(mode_opt if mode_opt is not None else cfg.guard)
    if mode is None:
        if categories is not None or model_opt is not None:
            console.warn("--guard-model / --guard-categories have no effect without --guard.")
        return None
    policy = Policy.parse(categories)
    resolved = loader.resolve(model_opt or cfg.guard_model or DEFAULT_GUARD_MODEL, want_vision=False)
    from .acquire import ensure_installed

    ensure_installed(resolved, yes=yes)
    n_ctx = min(GUARD_MAX_CTX, max(main_ctx, 1024) + GUARD_PROMPT_SLACK)
    return GuardPlan(mode=mode, resolved=resolved, n_ctx=n_ctx, policy=policy)


@dataclass
class GuardRunner:
    """A loaded guard and what the checks of one command found (for --json and caption records)."""

    plan: GuardPlan
    guard: object                  # runtime.generation.guard.Guard
    backend: object
    quiet: bool = False
    record: dict = field(default_factory=dict)

    def close(self) -> None:
        self.backend.close()

    def fresh(self) -> None:
        """Start a new record (one per answer)."""
        self.record = {"input": None, "output": None, "categories": [], "model": self.plan.resolved.alias_ref,
                       "seconds": {}}

    def _note_images(self, verdict) -> None:
        global _IMAGE_NOTE_SHOWN
        if verdict.ignored_images and not _IMAGE_NOTE_SHOWN and not self.quiet:
            _IMAGE_NOTE_SHOWN = True
            console.info("[dim]--guard: Llama Guard 3 reads text only: the question and the answer are checked, "
                         "the images are not.[/]")

    def _apply(self, which: str, verdict) -> None:
        self._note_images(verdict)
        self.record[which] = verdict.label
        self.record["seconds"][which] = round(verdict.seconds, 4)
        for c in verdict.categories:
            if c not in self.record["categories"]:
                self.record["categories"].append(c)

    def check_input(self, messages) -> Optional[object]:
        """The verdict on the question (None when the input is not checked)."""
        if not self.plan.checks_input:
            return None
        v = self.guard.check_input(messages)
        self._apply("input", v)
        return v

    def check_output(self, messages, answer: str) -> Optional[object]:
        if not self.plan.checks_output:
            return None
        v = self.guard.check_output(messages, answer)
        self._apply("output", v)
        return v

    def public(self) -> dict:
        """The record as --json and caption lines carry it."""
        return {**self.record, "categories": list(self.record["categories"]),
                "seconds": dict(self.record["seconds"])}

    def error(self, verdict) -> EdgeVLMError:
        """The typed error (exit code 13) for a blocked question or answer."""
        what = "question" if verdict.role == "User" else "answer"
        cats = f" ({', '.join(verdict.categories)})" if verdict.categories else ""
        return Blocked(f"Blocked by the safety filter: the {what} was judged unsafe{cats}.",
                 hint="Llama Guard 3 judged it against its categories; --guard-categories narrows them, "
                      "--guard off turns the filter off.")


def load_guard(plan: Optional[GuardPlan], *, threads: Optional[int], quiet: bool) -> Optional[GuardRunner]:
    if plan is None:
        return None
    from edgevlm.runtime import loader
    from edgevlm.runtime.generation.guard import Guard
    from edgevlm.runtime.protocol import LoadOptions

    backend = loader.load_backend(plan.resolved.artifact, LoadOptions(n_ctx=plan.n_ctx, n_threads=threads))
    try:
        guard = Guard(backend, plan.policy, name=plan.resolved.alias_ref)
    except BaseException:
        backend.close()
        raise
    runner = GuardRunner(plan=plan, guard=guard, backend=backend, quiet=quiet)
    runner.fresh()
    return runner


def memory_pair(plan: Optional[GuardPlan]):
    """What open_model's memory check adds for the guard: (resolved, n_ctx), or None."""
    return None if plan is None else (plan.resolved, plan.n_ctx)


def _blocked_doc(runner: GuardRunner, base: dict) -> str:
    import json

    doc = {**base, "answer": None, "finish_reason": "content_filter", "guard": runner.public()}
    return json.dumps(doc, ensure_ascii=False) + "\n"


def judge_question(runner: Optional[GuardRunner], messages, *, json_base: Optional[dict] = None) -> None:
    """Check the question when the input guard is on; blocked: with --json, print the blocked record,
    then raise Blocked (exit 13)."""
    if runner is None:
        return
    v = runner.check_input(messages)
    if v is not None and not v.safe:
        if json_base is not None:
            console.write_out(_blocked_doc(runner, json_base))
        raise runner.error(v)


def judge_answer(runner: Optional[GuardRunner], messages, answer: str, *, json_base: Optional[dict] = None) -> None:
    """Check the (held) answer when the output guard is on; blocked: as judge_question."""
    if runner is None:
        return
    v = runner.check_output(messages, answer)
    if v is not None and not v.safe:
        if json_base is not None:
            console.write_out(_blocked_doc(runner, json_base))
        raise runner.error(v)


def holds_answer(runner: Optional[GuardRunner]) -> bool:
    """With the output guard on, answers are generated whole and checked before anything is printed."""
    return runner is not None and runner.plan.checks_output


def chat_turn(session, runner: Optional[GuardRunner], text: str, images, stream_answer) -> None:
    """One chat turn under the guard. A blocked question never reaches the model and a blocked answer is
    not shown; the conversation keeps placeholders instead of the blocked text and goes on.
    ``stream_answer(session, text, images)`` is the unguarded way to answer (streaming)."""
    if runner is None:
        stream_answer(session, text, images)
        return
    asked = session.pending_messages(text, images)
    runner.fresh()
    v = runner.check_input(asked)
    if v is not None and not v.safe:
        session.withhold_question()
        _say_blocked(runner, v)
        return
    if not holds_answer(runner):
        stream_answer(session, text, images)
        return
    try:
        result = session.ask(text, images)
    except KeyboardInterrupt:
        console.write_out("")
        console.err.print("[dim](answer stopped; the conversation continues)[/]")
        session.withhold_answer()          # a partial answer was never checked: it is not kept either
        return
    v = runner.check_output(asked, result.text)
    if v is not None and not v.safe:
        session.withhold_answer()
        _say_blocked(runner, v)
        return
    console.write_out(result.text + "\n")
    if result.final.finish_reason == "length":
        console.info("[dim](stopped at --max-tokens or the context limit)[/]")


def _say_blocked(runner: GuardRunner, verdict) -> None:
    e = runner.error(verdict)
    console.err.print(f"[bold yellow]{e.message}[/] [dim](the conversation keeps a placeholder)[/]")


def caption_verdict(runner: Optional[GuardRunner], question: Optional[dict], asked, answer: str) -> Optional[dict]:
    """The ``guard`` field of one caption record: the prompt's verdict (checked once for the whole run)
    and this answer's, when the output guard is on. None without --guard."""
    if runner is None:
        return None
    runner.fresh()
    if question is not None:
        runner.record.update(input=question["input"], categories=list(question["categories"]),
                             seconds=dict(question["seconds"]))
    runner.check_output(asked, answer)
    return runner.public()
