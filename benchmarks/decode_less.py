"""Doing less work per token, side by side in one run: forced-token runs under --schema, the first
constrained answer of a fresh process, and a q8_0 KV cache -- each reported as ratios to its reference.

    python benchmarks/decode_less.py MODEL.gguf [MODEL.gguf ...] [--rounds 5] [--threads 2]

1. Forced runs: caption-style records (6-8 properties: enums, numbers, booleans, one or two strings).
   Per round and question, three answers in rotating order: constrained with forced runs batched,
   constrained token by token (``generate(forced_runs=False)``: the same tokens, checked), and the same
   question without a schema (free text). Reported: decode seconds batched / token by token, and
   constrained decode tok/s / free-text decode tok/s (medians of the paired per-round ratios).
2. First answer in a fresh process: time to the first token of a constrained answer minus that of an
   unconstrained one, each in its own new process, with llguidance's tokenizer cache cold (first run
   on a machine) and warm (every later process).
3. --kv-type q8_0: KV cache bytes against f16, top-1 agreement and mean KL against an f16 KV cache over a
   held-out text (runtime.reports.bench.kv_quality), and decode tok/s in alternating rounds.

The machine these figures come from may be shared: the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDS = [
    ({"type": "object",
      "properties": {"name": {"type": "string"}, "species": {"enum": ["cat", "dog", "bird", "fish"]},
                     "age": {"type": "integer"}, "color": {"enum": ["black", "white", "brown", "grey", "orange"]},
                     "indoor": {"type": "boolean"}, "weight_kg": {"type": "number"}},
      "required": ["name", "species", "age", "color", "indoor", "weight_kg"], "additionalProperties": False},
     "Describe this pet as a JSON record: Rex is a 5 year old brown dog who lives indoors and weighs 12 kg."),
    ({"type": "object",
      "properties": {"scene": {"enum": ["indoor", "outdoor", "underwater", "aerial"]},
                     "time_of_day": {"enum": ["morning", "afternoon", "evening", "night"]},
                     "people": {"type": "integer", "minimum": 0, "maximum": 50},
                     "main_subject": {"type": "string"},
                     "weather": {"enum": ["sunny", "cloudy", "rainy", "snowy", "unknown"]},
                     "dominant_color": {"enum": ["red", "green", "blue", "yellow", "white", "black", "other"]},
                     "has_text": {"type": "boolean"},
                     "quality": {"enum": ["low", "medium", "high"]}},
      "required": ["scene", "time_of_day", "people", "main_subject", "weather", "dominant_color", "has_text",
                   "quality"], "additionalProperties": False},
     "Caption this photo as a JSON record: three fishermen pull a red boat onto a beach at sunset under a "
     "cloudy sky; a sign on the boat reads 'Marta'."),
]


def _load(path: Path, threads: int, kv_type: str = "f16"):
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    return load_backend(artifact_from_path(path, None, False), LoadOptions(n_ctx=1024, n_threads=threads, kv_type=kv_type))


def _request(b, question: str, schema, max_tokens: int):
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    return ChatRequest([Message("user", question)], GenerationOptions(
        temperature=0, max_tokens=max_tokens, json_schema=schema, raw=not b.chat_template,
        draft="off"))                 # forced runs alone: drafting has its own benchmark (drafting.py)


def _answer(b, req, forced_runs: bool = True):
    from edgevlm.runtime.generation.core import generate

    b.reset()
    last = None
    for chunk in generate(b, req, forced_runs=forced_runs):
        last = chunk
    return last


def _median_ratio(a: list[float], b: list[float]) -> str:
    r = sorted(x / y for x, y in zip(a, b))
    q = len(r) // 4
    return f"{statistics.median(r):.3f} (middle half {r[q]:.3f}-{r[-q - 1]:.3f}, n={len(r)})"


def forced_runs(path: Path, rounds: int, threads: int) -> dict:
    b = _load(path, threads)
    try:
        batched, stepwise, cons_tps, free_tps = [], [], [], []
        same, tokens = True, []
        for schema, question in RECORDS:
            _answer(b, _request(b, question, schema, 160))          # warm-up: grammar compiled, pages touched
        for i in range(rounds):
            for schema, question in RECORDS:
                runs = {}
                order = [("batched", schema, True), ("stepwise", schema, False), ("free", None, True)]
                order = order[i % 3:] + order[:i % 3]
                for name, sch, forced in order:
                    runs[name] = _answer(b, _request(b, question, sch, 160), forced)
                if runs["free"].completion_tokens < 8:
                    continue                                   # too short a free answer to time
                same &= runs["batched"].token_ids == runs["stepwise"].token_ids
                tokens.append(runs["batched"].completion_tokens)
                batched.append(runs["batched"].decode_s)
                stepwise.append(runs["stepwise"].decode_s)
                cons_tps.append((runs["batched"].completion_tokens - 1) / runs["batched"].decode_s)
                free_tps.append((runs["free"].completion_tokens - 1) / runs["free"].decode_s)
        return {"same_outputs": same, "record_tokens": statistics.median(tokens),
                "decode_batched_over_stepwise": _median_ratio(batched, stepwise),
                "constrained_over_free_tps": _median_ratio(cons_tps, free_tps),
                "tps": {"constrained": statistics.median(cons_tps), "free": statistics.median(free_tps),
                        "constrained_stepwise": statistics.median(
                            [(n - 1) / s for n, s in zip(tokens, stepwise)])}}
    finally:
        b.close()


_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
sys.path.insert(0, %(bench)r)
from decode_less import RECORDS, _load, _request
from edgevlm.runtime.generation.core import generate
b = _load(Path(%(model)r), %(threads)d)
load_s = time.perf_counter() - t0
schema, question = RECORDS[0]
req = _request(b, question, schema if %(constrained)r else None, 8)
t = time.perf_counter()
first = next(iter(generate(b, req)))
print(json.dumps({"first_token_s": time.perf_counter() - t, "load_s": load_s}))
b.close()
"""


def first_answer(path: Path, rounds: int, threads: int) -> dict:
    """Time to the first token of the first answer in a new process, constrained minus unconstrained."""
    bench_dir = str(Path(__file__).resolve().parent)

    def child(constrained: bool, home: str) -> float:
        code = _CHILD % {"bench": bench_dir, "model": str(path), "threads": threads, "constrained": constrained}
        env = dict(os.environ, VLM_HOME=home)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["first_token_s"]

    cold, warm = [], []
    for i in range(rounds):
        with tempfile.TemporaryDirectory() as home:
            plain = child(False, home)
            cold.append(child(True, home) - plain)           # empty cache: this process builds the tokenizer
            warm.append(child(True, home) - child(False, home))   # the cache written by the one before
    return {"cold_cache_extra_s": statistics.median(cold), "warm_cache_extra_s": statistics.median(warm),
            "rounds": rounds}


def kv_q8(path: Path, rounds: int, threads: int) -> dict:
    from dataclasses import replace

    from edgevlm.runtime.reports.bench import kv_quality
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    q8 = _load(path, threads, "q8_0")
    f16 = _load(path, threads)
    try:
        quality = kv_quality(q8, q8.artifact, replace(_opts(threads), kv_type="q8_0"))
        req = ChatRequest([Message("user", "Write a long story about a lighthouse keeper and the sea.")],
                          GenerationOptions(temperature=0, max_tokens=128, raw=not f16.chat_template, draft="off"))
        tps: dict[str, list[float]] = {"q8_0": [], "f16": []}
        for i in range(rounds):
            for name, b in ((("q8_0", q8), ("f16", f16)) if i % 2 == 0 else (("f16", f16), ("q8_0", q8))):
                last = _answer(b, req)
                tps[name].append((last.completion_tokens - 1) / last.decode_s)
        return {"kv_bytes_ratio": q8.kv_cache_bytes() / f16.kv_cache_bytes(), **quality,
                "decode_ratio": _median_ratio(tps["q8_0"], tps["f16"]),
                "tps": {k: statistics.median(v) for k, v in tps.items()}}
    finally:
        q8.close()
        f16.close()


def _opts(threads: int):
    from edgevlm.runtime.protocol import LoadOptions

    return LoadOptions(n_ctx=1024, n_threads=threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["forced", "first", "kv"], action="append")
    args = ap.parse_args()
    parts = args.only or ["forced", "first", "kv"]
    for model in args.models:
        doc = {"model": model.name, "threads": args.threads, "load_average_before": os.getloadavg()}
        t0 = time.perf_counter()
        if "forced" in parts:
            doc["forced_runs"] = forced_runs(model, args.rounds, args.threads)
        if "first" in parts:
            doc["first_answer"] = first_answer(model, max(1, args.rounds // 2 + 1), args.threads)
        if "kv" in parts:
            doc["kv_q8_0"] = kv_q8(model, args.rounds, args.threads)
        doc["load_average_after"] = os.getloadavg()
        doc["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(doc, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
