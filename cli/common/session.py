"""The session setup ask, chat and caption share, from their flag groups (options.py): the schema and the
image detail checked before anything loads, media read, the guard planned, the model and the guard
opened (and closed), the GenerationOptions and the ChatSession."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from . import console
from .options import DEFAULT_CTX, Guarding, Images, Loading, Sampling, Tooling, Video

_UNPLANNED = object()


@dataclass
class Opened:
    """A loaded model and, with --guard, its guard."""

    backend: object            # runtime.protocol.Backend
    resolved: object           # loader.ResolvedModel
    runner: object = None      # common.guard.GuardRunner, or None without --guard

    @property
    def name(self) -> str:
        return self.resolved.alias_ref


class Setup:
    """One command's session. Made from the flags, it checks the schema and the image detail at once, so a
    bad flag fails before anything loads; ``open`` loads the model and the guard; ``session`` makes the
    ChatSession with the sampling flags."""

    def __init__(self, *, sampling: Sampling, loading: Loading, images: Images, guarding: Guarding,
                 schema: Optional[str], quiet: bool, tooling: Optional[Tooling] = None):
        from edgevlm.runtime.generation.schema import load_schema

        from .detail import image_detail

        console.set_quiet(quiet)
        self.sampling, self.loading, self.guarding, self.quiet = sampling, loading, guarding, quiet
        self.json_schema = load_schema(schema) if schema else None       # a bad schema fails before the model loads
        self.tooling, self.tools = tooling, None
        if tooling is not None and tooling.tools:                          # a bad tool list too
            from edgevlm.runtime.errors import UsageError
            from edgevlm.runtime.generation.tools import check_choice, load_tools

            if schema:
                raise UsageError("--tools and --schema cannot be used together.",
                                 hint="A tool's parameters are its schema; drop --schema.")
            self.tools = load_tools(tooling.tools)
            check_choice(tooling.choice(), self.tools, "--tool-choice")
        elif tooling is not None and tooling.tool_choice != "auto":
            from edgevlm.runtime.errors import UsageError

            raise UsageError("--tool-choice needs --tools.", hint="Give the tool list with --tools FILE.")
        from .acquire import resolve_draft

        self.draft = resolve_draft(sampling.draft)                         # so does a bad --draft
        self.detail = image_detail(images.detail, images.image_tokens, images.image_budget, images.no_cache)
        self._guard_plan = _UNPLANNED

    @property
    def n_ctx(self) -> int:
        return self.loading.ctx or DEFAULT_CTX

    def media(self, refs: list[str], video: Video) -> list:
        """The images (and video frames) the command line names, checked and decoded."""
        from edgevlm.runtime.inputs.attachments import load_media

        return load_media(refs, frames=video.frames, fps=video.fps, n_ctx=self.n_ctx)

    def guard_plan(self):
        """--guard resolved (and its model installed) before the main model loads; None when it is off."""
        if self._guard_plan is _UNPLANNED:
            from .guard import plan_guard

            g = self.guarding
            self._guard_plan = plan_guard(g.guard, g.guard_model, g.guard_categories, main_ctx=self.n_ctx,
                                          yes=self.loading.yes)
        return self._guard_plan

    @contextmanager
    def open(self, *, want_vision: bool) -> Iterator[Opened]:
        """The model (and the guard beside it, counted by one memory check), closed on the way out."""
        from .acquire import open_model
        from .guard import load_guard, memory_pair

        plan = self.guard_plan()
        backend, resolved = open_model(self.loading, want_vision=want_vision, with_model=memory_pair(plan))
        runner = None
        try:
            runner = load_guard(plan, threads=self.loading.threads, quiet=self.quiet)
            yield Opened(backend, resolved, runner)
        finally:
            if runner is not None:
                runner.close()
            backend.close()

    def options(self, *, raw: bool = False):
        """The GenerationOptions of every answer: the sampling flags, the schema, the image detail."""
        from edgevlm.runtime.protocol import GenerationOptions

        return GenerationOptions(**{**self.sampling.fields(), "draft": self.draft}, raw=raw,
                                 json_schema=self.json_schema, image_detail=self.detail)

    def session(self, opened: Opened, *, system: Optional[str] = None, raw: bool = False):
        """The ChatSession over the opened model; the schema compiled now, with the one-line note of what it
        cannot enforce while generating."""
        from edgevlm.runtime.generation.session import ChatSession

        from .acquire import warn_unenforced

        session = ChatSession(opened.backend, opened.name, system=system, options=self.options(raw=raw))
        warn_unenforced(opened.backend, self.json_schema)
        if self.tools is not None:
            from edgevlm.runtime.generation.tools import plan_tools

            session.tools = plan_tools(opened.backend, self.tools, self.tooling.choice(), param="--tool-choice",
                                       raw=raw)
            if not self.quiet:
                how = "its chat template" if session.tools.native else "the generic preamble (docs/tools.md)"
                console.info(f"[dim]Tools: {session.tools.fmt.name} calls, offered through {how}.[/]")
        return session
