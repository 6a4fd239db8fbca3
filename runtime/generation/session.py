"""Chat sessions: history, system prompt, images, saving; one backend whose KV cache follows the talk."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UsageError
from ..protocol import Backend, ChatRequest, Chunk, GenerationOptions, ImageInput, Message
from .core import generate


# What a conversation keeps in place of text the safety filter (--guard) blocked: the main model never
# sees the blocked question again, nor its own blocked answer.
BLOCKED_QUESTION = "[message withheld: blocked by the safety filter]"
BLOCKED_ANSWER = "[answer withheld: blocked by the safety filter]"


@dataclass
class TurnResult:
    text: str
    final: Chunk
    wall_s: float

    @property
    def usage(self) -> dict:
        f = self.final
        return {"prompt_tokens": f.prompt_tokens, "prompt_eval_tokens": f.prompt_eval_tokens,
                "image_tokens": f.image_tokens, "completion_tokens": f.completion_tokens,
                "total_tokens": f.prompt_tokens + f.completion_tokens}

    @property
    def timings(self) -> dict:
        f = self.final
        decode_tps = (f.completion_tokens - 1) / f.decode_s if f.decode_s > 0 and f.completion_tokens > 1 else None
        prefill_tps = f.prompt_eval_tokens / f.prefill_s if f.prefill_s > 0 else None
        return {"ttft_s": round(f.ttft_s, 4), "prefill_s": round(f.prefill_s, 4),
                "image_encode_s": round(f.image_encode_s, 4), "decode_s": round(f.decode_s, 4),
                "prefill_tokens_per_s": round(prefill_tps, 2) if prefill_tps else None,
                "decode_tokens_per_s": round(decode_tps, 2) if decode_tps else None,
                "total_s": round(self.wall_s, 4)}


class ChatSession:
    """A conversation with one loaded backend.

    The backend keeps its KV cache between turns, so each turn evaluates only what is new. When a
    turn is interrupted (Ctrl-C) the partial answer stays in the history, so the conversation and
    the cache stay consistent.
    """

    def __init__(self, backend: Backend, model_name: str, system: Optional[str] = None,
                 options: Optional[GenerationOptions] = None):
        self.backend = backend
        self.model_name = model_name
        self.system = system
        self.options = options or GenerationOptions()
        self.history: list[Message] = []
        self.pending_images: list[ImageInput] = []
        self.tools = None              # a tools.ToolPlan: every answer may call these (see tool_answer)

    # --- conversation state
    def messages_for(self, user_text: Optional[str], images: list[ImageInput]) -> list[Message]:
        """``user_text`` None: no new user turn (the answer that follows tool results)."""
        msgs = [Message("system", self.system)] if self.system else []
        return msgs + self.history + ([Message("user", user_text, list(images))] if user_text is not None else [])

    def add_image(self, image: ImageInput) -> None:
        self.pending_images.append(image)

    def clear(self, reset_cache: bool = True) -> None:
        """Forget the conversation. ``reset_cache=False`` keeps the KV cache: the next prompt evaluates
        only what differs from it (a batch asking one question of many images keeps the template's
        prefix); it is never needed for correctness."""
        self.history.clear()
        self.pending_images.clear()
        if reset_cache:
            self.backend.reset()

    def set_system(self, text: Optional[str]) -> None:
        self.system = text or None

    # --- the safety filter's verdicts
    def pending_messages(self, user_text: str, images: Optional[list[ImageInput]] = None) -> list[Message]:
        """The conversation ``send(user_text, images)`` would send (what an input check judges)."""
        return self.messages_for(user_text, self.pending_images + list(images or []))

    def withhold_question(self) -> None:
        """A question was blocked before it reached the model: the history keeps placeholders (a turn that
        was never answered), and the images that were to go with it are dropped."""
        self.pending_images = []
        self.history.append(Message("user", BLOCKED_QUESTION))
        self.history.append(Message("assistant", BLOCKED_ANSWER))

    def withhold_answer(self) -> None:
        """The last answer was blocked after it was generated: a placeholder takes its place (the KV cache
        holds the answer's tokens; the next turn re-evaluates from where they differ)."""
        if self.history and self.history[-1].role == "assistant":
            self.history[-1] = Message("assistant", BLOCKED_ANSWER)

    # --- one turn
    def send(self, user_text: Optional[str], images: Optional[list[ImageInput]] = None) -> Iterator[Chunk]:
        """Stream the answer to ``user_text``; images given here plus any added with add_image()."""
        imgs = self.pending_images + list(images or [])
        self.pending_images = []
        msgs = self.messages_for(user_text, imgs)
        req = self.tools.request(msgs, self.options) if self.tools is not None else ChatRequest(msgs, self.options)
        answer: list[str] = []
        completed = False
        try:
            for chunk in generate(self.backend, req):
                answer.append(chunk.text)
                yield chunk
            completed = True
        finally:
            # record the turn even if interrupted, so history matches what the model saw
            text = "".join(answer)
            if completed or text:
                if user_text is not None:
                    self.history.append(Message("user", user_text, imgs))
                self.history.append(Message("assistant", text))

    # --- tool calling (generation/tools.py)
    def tool_answer(self, result: "TurnResult"):
        """The last answer read as text and calls (``ToolCallViolation`` when a call does not validate); the
        history keeps the calls in OpenAI's shape, so the next prompt renders them in the family's syntax."""
        answer = self.tools.parse(result.text, result.final.finish_reason)
        if answer.calls and self.history and self.history[-1].role == "assistant":
            self.history[-1] = Message("assistant", answer.content, tool_calls=[c.openai() for c in answer.calls])
        return answer

    def drop_answer(self, with_question: bool = False) -> None:
        """Forget the last answer (a tool call that could not be used), and the question before it when
        ``with_question``, so the history holds no broken call."""
        if self.history and self.history[-1].role == "assistant":
            self.history.pop()
            if with_question and self.history and self.history[-1].role == "user":
                self.history.pop()

    def add_tool_call(self, call: dict) -> None:
        """A call made earlier (OpenAI's shape), as an assistant turn of the history (``vlm ask --tool-calls``)."""
        if self.history and self.history[-1].role == "assistant" and self.history[-1].tool_calls:
            self.history[-1].tool_calls.append(call)
        else:
            self.history.append(Message("assistant", "", tool_calls=[call]))

    def add_tool_result(self, call_id: str, name: str, content: str) -> None:
        self.history.append(Message("tool", content, tool_call_id=call_id, name=name))

    def ask(self, user_text: Optional[str], images: Optional[list[ImageInput]] = None) -> TurnResult:
        t0 = time.perf_counter()
        parts, final = [], None
        for chunk in self.send(user_text, images):
            parts.append(chunk.text)
            final = chunk
        assert final is not None
        return TurnResult(text="".join(parts), final=final, wall_s=time.perf_counter() - t0)

    # --- persistence
    def to_dict(self) -> dict:
        def msg(m: Message) -> dict:
            d: dict = {"role": m.role, "content": m.content}
            if m.tool_calls:
                d["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                d.update(tool_call_id=m.tool_call_id, name=m.name)
            if m.images:
                d["images"] = [{"path": _abs(i.source), "sha256": i.sha256, "width": i.width, "height": i.height,
                                **({"label": i.label} if i.label else {})} for i in m.images]
            return d

        return {"format": "edgevlm-chat/1", "model": self.model_name, "system": self.system,
                "messages": [msg(m) for m in self.history]}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path).expanduser()
        if path.is_dir():
            raise UsageError(f"{path} is a directory.", hint="Give a file name, e.g. /save chat.json")
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UsageError(f"Cannot write {path}: {e.strerror or e}", hint="Choose a writable location.") from e
        return path


def _abs(source: str) -> str:
    if source in ("-",) or "://" in source:
        return source
    return str(Path(source).expanduser().resolve())
