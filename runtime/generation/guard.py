"""Llama Guard 3 as a safety filter: the prompt format, the policy (categories), and the verdict.

A verdict costs one prefill, not a generation. The prompt is Meta's Llama Guard 3 format (the model
card's and the model's own chat template, byte for byte): a user turn holding the task line (which
role is judged: 'User' for a question, 'Agent' for an answer -- the last message's), the categories
between ``<BEGIN UNSAFE CONTENT CATEGORIES>`` markers, the conversation between ``<BEGIN
CONVERSATION>`` markers as ``User:`` / ``Agent:`` turns, the two-line output instruction, and the
assistant header. Llama Guard 3 always opens its answer with "\\n\\n" (its template appends "\\n\\n" and
the assessment), so that token is fed as part of the prompt, and the logits after it hold the verdict:
"safe" against "unsafe" (Meta's on-device recipe reads the verdict from the first answer token's
logits the same way). Only when unsafe are the categories decoded, constrained token by token to
``S<n>(,S<n>)*`` over the policy's codes, each at most once, so the list always parses.

Everything that varies comes after the fixed preamble (task line + categories), and the backend keeps
the longest KV prefix a prompt shares with the previous one: consecutive checks of the same role
evaluate only the conversation's tokens (and a follow-up in a chat only the new turns). The role is
part of the task line, so an input check right after an output check re-evaluates the preamble.

Llama Guard 3 1B is text-only: images in a conversation are not judged (``Verdict.ignored_images``
counts them, so the caller can say so); Llama Guard 3 11B Vision is an mllama model that llama.cpp
cannot run.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import BadModelFile, ContextOverflow, UsageError
from ..protocol import Backend, ChatRequest, GenerationOptions, Message

# Llama Guard 3's hazard categories as its prompt names them (MLCommons taxonomy). The 1B model was
# trained on S1-S13 (its model card); S14 exists for the 8B (tool calls) and is only used when asked.
CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}
DEFAULT_CODES = tuple(f"S{i}" for i in range(1, 14))
MODES = ("input", "output", "both")


def checks_input(mode: Optional[str]) -> bool:
    return mode in ("input", "both")


def checks_output(mode: Optional[str]) -> bool:
    return mode in ("output", "both")

BOS = "<|begin_of_text|>"
_TASK = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
         "Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
         "policy with the below categories.\n\n")
_INSTRUCTION = ("<END CONVERSATION>\n\n"
                "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
                " - First line must read 'safe' or 'unsafe'.\n"
                " - If unsafe, a second line must include a comma-separated list of violated categories. "
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
ANSWER_PREFIX = "\n\n"            # what Llama Guard 3 writes before its verdict; fed, not generated

_CODE = re.compile(r"^S([1-9][0-9]{0,2})$")
_FILE_ENTRY = re.compile(r"^(S[1-9][0-9]{0,2})\s*:\s*(.*)$")


# ----------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class Policy:
    """The categories a check lists, in order: (code, text). The codes keep their numbers when some are
    left out, as the model card's ``excluded_category_keys`` does."""

    categories: tuple[tuple[str, str], ...]

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.categories)

    @classmethod
    def default(cls) -> "Policy":
        return cls(tuple((c, CATEGORIES[c]) for c in DEFAULT_CODES))

    @classmethod
    def parse(cls, spec: Optional[str]) -> "Policy":
        """``None``: S1-S13. ``S1,S10``: only those. ``-S6,-S12`` (or ``!S6``): all but those. ``all``: S1-S14.
        A path to a file: custom categories (see ``from_file``)."""
        if spec is None or not spec.strip():
            return cls.default()
        spec = spec.strip()
        if spec.lower() == "all":
            return cls(tuple(CATEGORIES.items()))
        if "/" in spec or spec.endswith((".txt", ".md")) or Path(spec).expanduser().is_file():
            return cls.from_file(Path(spec))
        items = [s.strip() for s in spec.split(",") if s.strip()]
        excluded = [s[1:].strip().upper() for s in items if s[:1] in "-!"]
        chosen = [s.upper() for s in items if s[:1] not in "-!"]
        if excluded and chosen:
            raise UsageError(f"--guard-categories {spec!r} mixes chosen and excluded categories.",
                             hint="Either list the categories to check (S1,S10) or the ones to leave out (-S6,-S12).")
        for code in excluded + chosen:
            if code not in CATEGORIES:
                raise UsageError(f"--guard-categories: unknown category {code!r}.",
                                 hint="Llama Guard 3's categories are S1..S14 (S14 is for the 8B model); "
                                      "custom ones come from a file.")
        if chosen:
            keep = [c for c in CATEGORIES if c in set(chosen)]
        else:
            keep = [c for c in DEFAULT_CODES if c not in set(excluded)]
        if not keep:
            raise UsageError("--guard-categories leaves no category to check.", hint="Keep at least one.")
        return cls(tuple((c, CATEGORIES[c]) for c in keep))

    @classmethod
    def from_file(cls, path: Path) -> "Policy":
        """Custom categories, as the model card allows: each starts with a line ``S<n>: <name>`` and may go on
        over the following lines (a description, as in Llama Guard's longer policy text); the text is used as
        written. Lines before the first category and ``#`` comment lines are ignored."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"Cannot read the guard categories file {path}: {e.strerror or e}",
                             hint="Pass a readable text file with lines like 'S1: Violent Crimes.'") from e
        cats: list[list[str]] = []
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            m = _FILE_ENTRY.match(line.strip())
            if m:
                cats.append([m.group(1), m.group(2).strip()])
            elif cats and line.strip():
                cats[-1][1] += "\n" + line.rstrip()
        if not cats:
            raise UsageError(f"{path} holds no categories.", hint="Write one per line: 'S1: Violent Crimes.'")
        codes = [c for c, _ in cats]
        dup = sorted({c for c in codes if codes.count(c) > 1})
        if dup:
            raise UsageError(f"{path}: category {dup[0]} appears twice.", hint="Give each category its own code.")
        if any(not t for _, t in cats):
            raise UsageError(f"{path}: a category has no text.", hint="Write 'S<n>: <what it covers>'.")
        return cls(tuple((c, t) for c, t in cats))

    def block(self) -> str:
        lines = "".join(f"{c}: {t}\n" for c, t in self.categories)
        return f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{lines}<END UNSAFE CONTENT CATEGORIES>\n\n"


# ----------------------------------------------------------------------------- the prompt
def _clean(text: str) -> str:
    """The template's ``| trim``; and special-token text in a message is defused, so a message cannot
    close the conversation block or the turn (the backend parses special tokens in the prompt)."""
    return text.strip().replace("<|", "<\u200b|")


def conversation_turns(messages: Sequence[Message]) -> tuple[list[tuple[str, str]], int]:
    """(role, text) turns as Llama Guard sees them -- 'User' / 'Agent', system prompts left out,
    consecutive messages of one role joined -- and the number of images left unjudged."""
    turns: list[tuple[str, str]] = []
    images = 0
    for m in messages:
        images += len(m.images)
        if m.role == "system":
            continue
        role = "Agent" if m.role == "assistant" else "User"
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + m.content)
        else:
            turns.append((role, m.content))
    return turns, images


def preamble(policy: Policy, role: str) -> str:
    """Everything before the conversation: the same for every check of ``role`` under ``policy``."""
    return _TASK.format(role=role) + policy.block() + "<BEGIN CONVERSATION>\n\n"


def render(turns: Sequence[tuple[str, str]], policy: Optional[Policy] = None) -> str:
    """Llama Guard 3's prompt for ``turns`` ((role, text), role 'User' or 'Agent'); the role judged is the
    last turn's. Ends with the assistant header, exactly as the model's template does."""
    if not turns:
        raise UsageError("Nothing to check.", hint="Give the guard a question or an answer.")
    policy = policy or Policy.default()
    role = turns[-1][0]
    conv = "".join(f"{r}: {_clean(t)}\n\n" for r, t in turns)
    return preamble(policy, role) + conv + _INSTRUCTION.format(role=role)


# ----------------------------------------------------------------------------- the verdict
@dataclass
class Verdict:
    safe: bool
    categories: list[str] = field(default_factory=list)
    seconds: float = 0.0
    role: str = "User"                 # what was judged: 'User' (input) or 'Agent' (output)
    unsafe_probability: float = 0.0    # P(unsafe) from the "safe"/"unsafe" logits alone
    prompt_tokens: int = 0
    eval_tokens: int = 0               # evaluated now: the prompt minus the KV prefix kept from the last check
    ignored_images: int = 0            # images in the conversation that were not judged (text-only model)

    @property
    def label(self) -> str:
        return "safe" if self.safe else "unsafe"

    def describe(self) -> str:
        what = "question" if self.role == "User" else "answer"
        cats = f" ({', '.join(self.categories)})" if self.categories else ""
        return f"the {what} was judged {self.label}{cats}"


class Guard:
    """Llama Guard 3 over a loaded backend: ``check_input(messages)`` judges the last user message,
    ``check_output(messages, answer)`` the answer to it."""

    def __init__(self, backend: Backend, policy: Optional[Policy] = None, name: str = "llama-guard3-1b"):
        self.backend = backend
        self.policy = policy or Policy.default()
        self.name = name
        self._ids = self._token_ids()

    def _single(self, text: str) -> int:
        ids = self.backend.tokenize(text, add_special=False, parse_special=False)
        if len(ids) != 1:
            raise BadModelFile(f"{self.name} does not tokenize {text!r} as one token, as Llama Guard 3 does.",
                               hint="Use a Llama Guard 3 GGUF (e.g. `--guard-model llama-guard3-1b`).")
        return ids[0]

    def _token_ids(self) -> dict:
        ids = {"safe": self._single("safe"), "unsafe": self._single("unsafe"), "nl": self._single("\n"),
               "S": self._single("S"), ",": self._single(",")}
        nums = {}
        for code in self.policy.codes:
            n = _CODE.match(code)
            if n is None:
                raise UsageError(f"Guard category code {code!r} is not of the form S<n>.", hint="Use S1, S2, ...")
            nums[self._single(n.group(1))] = code
        ids["numbers"] = nums
        eot = self.backend.tokenize("<|eot_id|>", add_special=False, parse_special=True)
        ids["end"] = set(self.backend.eog_ids()) | ({eot[0]} if len(eot) == 1 else set())
        return ids

    def prompt(self, turns: Sequence[tuple[str, str]]) -> str:
        return render(turns, self.policy) + ANSWER_PREFIX

    def check_input(self, messages: Sequence[Message]) -> Verdict:
        """Judge the last user message (the question), with the conversation before it as context."""
        msgs = list(messages)
        while msgs and msgs[-1].role == "assistant":
            msgs.pop()
        return self.check(msgs)

    def check_output(self, messages: Sequence[Message], answer: str) -> Verdict:
        """Judge ``answer`` to the conversation ``messages`` (which ends with the question)."""
        return self.check(list(messages) + [Message("assistant", answer)])

    def check(self, messages: Sequence[Message]) -> Verdict:
        t0 = time.perf_counter()
        turns, images = conversation_turns(messages)
        text = self._fit(turns)
        pre = self.backend.prefill(ChatRequest([Message("user", text)], GenerationOptions(raw=True, max_tokens=1)))
        logits = self.backend.logits()
        ls, lu = float(logits[self._ids["safe"]]), float(logits[self._ids["unsafe"]])
        import math

        p_unsafe = 1.0 / (1.0 + math.exp(max(-60.0, min(60.0, ls - lu))))
        verdict = Verdict(safe=ls >= lu, role=turns[-1][0], unsafe_probability=round(p_unsafe, 6),
                          prompt_tokens=pre.prompt_tokens, eval_tokens=pre.eval_tokens, ignored_images=images)
        if not verdict.safe:
            verdict.categories = self._categories()
        verdict.seconds = time.perf_counter() - t0
        return verdict

    def _fit(self, turns: list[tuple[str, str]]) -> str:
        """The prompt, dropping the oldest turns while it does not fit the guard's context (the judged
        turn always stays; if it alone does not fit, that is an error)."""
        room = self.backend.n_ctx - 8 - 2 * len(self.policy.codes)      # the categories' tokens, decoded
        while True:
            text = self.prompt(turns)
            if len(text.encode("utf-8")) <= room:        # a token holds at least one byte: it fits
                return text
            n = self.backend.count_tokens(text)
            if n <= room:
                return text
            if len(turns) == 1:
                raise ContextOverflow(
                    f"The text to check is {n:,} tokens with the guard's prompt, but the guard's context holds "
                    f"{self.backend.n_ctx:,}.", hint="Shorten the input, or raise --ctx.")
            turns = turns[1:]

    def _categories(self) -> list[str]:
        """Decode ``unsafe\\nS<n>(,S<n>)*`` with the structure forced and each number chosen by the model
        among the policy's codes not yet named."""
        b, ids = self.backend, self._ids
        b.eval(ids["unsafe"])
        b.eval(ids["nl"])
        left = dict(ids["numbers"])
        out: list[str] = []
        while left and b.kv_used() + 3 < b.n_ctx:
            b.eval(ids["S"])
            row = b.logits()
            tok = max(left, key=lambda t: float(row[t]))
            out.append(left.pop(tok))
            if not left:
                break
            b.eval(tok)
            row = b.logits()
            more = float(row[ids[","]])
            end = max(float(row[t]) for t in ids["end"]) if ids["end"] else float("-inf")
            if end >= more:
                break
            b.eval(ids[","])
        return out


def parse_mode(value: Optional[str]) -> Optional[str]:
    """``input`` | ``output`` | ``both`` -> itself; ``off`` / ``none`` / empty -> None."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("", "off", "none", "no", "false"):
        return None
    if v in ("on", "yes", "true"):
        return "both"
    if v not in MODES:
        raise UsageError(f"--guard {value!r}: expected input, output, both or off.",
                         hint="For example: --guard both (the question and the answer are checked).")
    return v


__all__ = ["CATEGORIES", "DEFAULT_CODES", "MODES", "Policy", "Verdict", "Guard", "render", "preamble",
           "conversation_turns", "parse_mode", "ANSWER_PREFIX"]
