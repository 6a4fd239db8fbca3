"""Shared option types, so every command spells its flags the same way."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from edgevlm.runtime.protocol import DEFAULT_CTX, GenerationOptions  # noqa: F401  (DEFAULT_CTX: for the commands)

Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name (alias or alias:quant) or a path to a .gguf file.")]
MMProj = Annotated[Optional[Path], typer.Option("--mmproj", help="Vision projector (mmproj .gguf) for a model given by path.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Top-k sampling; 0 = off.")]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens under this share of the likeliest one's probability; 0 = off.")]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", min=0.0, max=10.0, help="Penalty for tokens already in the text (llama.cpp's); 1 = off.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed, for repeatable sampling.")]
Ctx = Annotated[Optional[int], typer.Option("--ctx", "-c", min=128, help="Context length in tokens (default 4096, capped at the model's).")]
OneShotCtx = Annotated[Optional[int], typer.Option(
    "--ctx", "-c", min=128, help="Context length in tokens (default: enough for this question and --max-tokens, "
                                 "at most 4096; with images 4096), capped at the model's.")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: physical cores).")]
System = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Download a missing model without asking.")]
IgnoreMemory = Annotated[bool, typer.Option("--ignore-memory", help="Load even if the memory estimate says it will not fit.")]
Raw = Annotated[bool, typer.Option("--raw", help="Plain completion: send the prompt as-is, without the chat template.")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop generating at this string (repeatable).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notices on stderr; errors only.")]

GpuLayers = Annotated[Optional[str], typer.Option(
    "--gpu-layers", metavar="N|auto", help="GGUF on a CUDA or Metal build of llama.cpp: layers to put on the GPU "
                                            "(0 = CPU only; default auto: all that fit in the GPU's free memory).")]

Rpc = Annotated[Optional[str], typer.Option(
    "--rpc", help="Spread the model's layers over these workers too (HOST:PORT,HOST:PORT; each runs `vlm worker`).")]
TensorSplit = Annotated[Optional[str], typer.Option(
    "--tensor-split", help="With --rpc: relative share of layers for this host and each worker, in order "
                           "(e.g. 1,2,2; default: by free memory).")]

Guard = Annotated[Optional[str], typer.Option(
    "--guard", metavar="input|output|both|off",
    help="Safety filter (Llama Guard 3, on this device): check the question, the answer, or both; a blocked one "
         "exits 13. With the answer checked, it is held until the check passes instead of streamed. Images "
         "are not judged (text only). Default: the config's `guard`, else off.")]
GuardModel = Annotated[Optional[str], typer.Option(
    "--guard-model", help="The guard model: registry name or a Llama Guard 3 .gguf (default llama-guard3-1b).")]
GuardCategories = Annotated[Optional[str], typer.Option(
    "--guard-categories", metavar="S1,S10|-S6|FILE",
    help="Categories to check (S1..S13 by default), those to leave out (-S6,-S12), or a file of custom "
         "categories ('S1: text' lines).")]

Detail = Annotated[str, typer.Option("--detail", help="Image detail: low (one tile), auto (the most that encodes "
                                     "and prefills within --image-budget here) or high (the model's full tiling).")]
ImageTokens = Annotated[Optional[int], typer.Option("--image-tokens", min=1, help="At most this many tokens per image.")]
ImageBudget = Annotated[Optional[float], typer.Option("--image-budget", min=0.0, help="--detail auto: seconds the images "
                                                      "may add before the first token here, encode and prefill (default 1).")]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the image-embedding cache.")]

KvType = Annotated[Optional[str], typer.Option(
    "--kv-type", metavar="f16|q8_0|q4_0", help="What the KV cache stores (GGUF models): q8_0 halves it at almost no "
                                              "quality cost, q4_0 quarters it (default: the config's `kv_type`, else f16).")]

Draft = Annotated[Optional[str], typer.Option(
    "--draft", metavar="auto|off|ngram", help="Draft tokens from the prompt and verify them in one batch (same "
                                               "answers, faster when the answer copies its input): auto while it "
                                               "pays, ngram always, off never (default: the config's `draft`, else auto).")]

Frames = Annotated[Optional[int], typer.Option("--frames", min=1, help="Video: number of frames to sample (default: chosen for the context).")]
Fps = Annotated[Optional[float], typer.Option("--fps", min=0.01, help="Video: sample this many frames per second instead.")]



# ------------------------------------------------------------------------------------------ flag groups
# The flags ask, chat and caption share, declared once. A command names a group as one parameter
# (``sampling: Sampling``) and ``@flag_groups`` puts the group's flags on its command line; the command
# receives them as one object and hands it to the session setup (common/session.py). A new sampling
# flag is one field of ``Sampling`` (named as in GenerationOptions and the HTTP APIs' bodies).

_GEN = GenerationOptions()        # the defaults, declared once (runtime/protocol.py)


@dataclasses.dataclass
class Sampling:
    """How to generate: the GenerationOptions fields a person sets on the command line, with its defaults."""
    temperature: Temperature = _GEN.temperature
    top_p: TopP = _GEN.top_p
    top_k: TopK = _GEN.top_k
    min_p: MinP = _GEN.min_p
    repeat_penalty: RepeatPenalty = _GEN.repeat_penalty
    max_tokens: MaxTokens = _GEN.max_tokens
    seed: Seed = None
    stop: Stop = None
    draft: Draft = None

    def fields(self) -> dict:
        """As GenerationOptions' keyword arguments (and an HTTP body's keys); ``draft`` only when given (the
        session setup fills in the config's)."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop or [])
        if d["draft"] is None:
            del d["draft"]
        return d


@dataclasses.dataclass
class Loading:
    """Which model, and how to load it here."""
    model: Model = None
    mmproj: MMProj = None
    ctx: Ctx = None
    threads: Threads = None
    yes: Yes = False
    ignore_memory: IgnoreMemory = False
    rpc: Rpc = None
    tensor_split: TensorSplit = None
    gpu_layers: GpuLayers = None
    kv_type: KvType = None


@dataclasses.dataclass
class Images:
    """Image detail and the embedding cache."""
    detail: Detail = "auto"
    image_tokens: ImageTokens = None
    image_budget: ImageBudget = None
    no_cache: NoCache = False


@dataclasses.dataclass
class Guarding:
    """--guard and its model and categories."""
    guard: Guard = None
    guard_model: GuardModel = None
    guard_categories: GuardCategories = None


@dataclasses.dataclass
class Video:
    """How to sample a video's frames."""
    frames: Frames = None
    fps: Fps = None


Tools = Annotated[Optional[str], typer.Option(
    "--tools", help="Functions the model may call: OpenAI's tool list (a .json file or the JSON text). A call is "
                    "printed as JSON and exits 15; see docs/tools.md.")]
ToolChoice = Annotated[str, typer.Option(
    "--tool-choice", help="With --tools: auto (text or calls), required (a call), none (text), or a function's name.")]


@dataclasses.dataclass
class Tooling:
    """--tools and --tool-choice (ask, chat)."""
    tools: Tools = None
    tool_choice: ToolChoice = "auto"

    def choice(self):
        """--tool-choice as OpenAI's tool_choice: a mode, or a named function."""
        c = self.tool_choice
        return c if c in ("auto", "none", "required") else {"type": "function", "function": {"name": c}}


GROUPS = (Sampling, Loading, Images, Guarding, Video, Tooling)


def flag_groups(**overrides) -> Callable:
    """Expand the command's parameters typed with a flag group into the group's flags (Typer reads the
    signature), and pack them back into the group when the command runs. ``overrides``: per flag, this
    command's default value, or an ``Annotated`` type (other help text), e.g. ``max_tokens=128``."""

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)
        sig = inspect.signature(fn)
        params: list[inspect.Parameter] = []
        groups: dict[str, tuple[type, list[str]]] = {}
        for p in sig.parameters.values():
            cls = hints.get(p.name)
            if cls not in GROUPS:
                params.append(p.replace(annotation=hints.get(p.name, p.annotation)))
                continue
            types = typing.get_type_hints(cls, include_extras=True)
            names = []
            for f in dataclasses.fields(cls):
                ann, default = types[f.name], f.default
                o = overrides.get(f.name, dataclasses.MISSING)
                if typing.get_origin(o) is Annotated:
                    ann = o
                elif o is not dataclasses.MISSING:
                    default = o
                params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
                names.append(f.name)
            groups[p.name] = (cls, names)
        unknown = set(overrides) - {n for _, names in groups.values() for n in names}
        assert not unknown, f"{fn.__name__}: no flag {sorted(unknown)} in its groups"
        # keyword-only throughout: Typer calls with keywords, and a default before a required one is fine
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            for pname, (cls, names) in groups.items():
                kwargs[pname] = cls(**{n: kwargs.pop(n) for n in names})
            return fn(**kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper
    return decorate
