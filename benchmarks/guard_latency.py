"""What `--guard` costs: an input check of a 50-token question on a model of Llama Guard 3 1B's shapes.

Llama Guard 3 1B cannot be downloaded here, so this builds a random-weight model of its shapes (Llama
3.2 1B architecture: 16 layers, hidden 2048, 32 heads / 8 KV heads, MLP 8192, vocab 128256, untied output
layer; Llama 3's real tokenizer) with our own quantize pipeline at Q4_K_M, once, cached under
~/.cache/edgevlm-tests/bench (the build takes minutes and ~6 GB of RAM). Its verdicts are noise; its
speed is the real architecture's.

Measured side by side in one run, interleaved round by round:
  * full     -- the whole prompt evaluated (empty KV cache): what every check would cost without reuse,
                and what the first check of a process costs;
  * reused   -- the fixed preamble (task line + categories) kept in the KV cache from the previous check
                of the same role: only the conversation and the instruction are evaluated;
  * output   -- an answer check right after an input check (the role in the task line changes, so the
                categories are evaluated again).

    python benchmarks/guard_latency.py [--rounds 10] [--threads 2] [--model PATH.gguf]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CACHE = Path.home() / ".cache" / "edgevlm-tests"
QUESTION_TOKENS = 50


def build_model() -> Path:
    """The random LG3-1B-shaped Q4_K_M GGUF, built once with `vlm quantize`."""
    import shutil

    from fixtures.guard_models import LG3_1B, build_checkpoint, quantize_checkpoint, tokenizer_dir

    root = CACHE / "bench" / "guard-lg3-1b-random"
    gguf = root / "out" / "lg3-1b-random-Q4_K_M.gguf"
    if gguf.is_file():
        return gguf
    tok = tokenizer_dir(CACHE / "fixtures")
    staging = root.with_name(root.name + ".partial")
    t0 = time.perf_counter()
    print(f"building {gguf.name} (random weights, once) ...", file=sys.stderr, flush=True)
    if not (staging / "hf" / "done").is_file():           # a checkpoint left by an interrupted build is reused
        shutil.rmtree(staging, ignore_errors=True)
        build_checkpoint(staging / "hf", tok, shapes=LG3_1B, construct=False, dtype="bfloat16")
        (staging / "hf" / "done").write_text("")
    print(f"  checkpoint {time.perf_counter() - t0:.0f} s; quantizing ...", file=sys.stderr, flush=True)
    shutil.rmtree(staging / "out", ignore_errors=True)
    quantize_checkpoint(staging / "hf", staging / "out", "lg3-1b-random", ["gguf:q4_k_m"], verify_tokens=16)
    shutil.rmtree(staging / "hf", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return gguf


WORDS = ("how do I keep my sourdough starter alive while I travel for two weeks and what should I feed it "
         "before I leave so that it is still active when I come back home from the mountains next month").split()


def question_of(backend, n: int, seed: int = 0) -> str:
    """An n-token question; each seed gives different words from the first token on, so a check never
    shares more than the preamble with the one before it."""
    import random

    words = WORDS[:]
    random.Random(seed).shuffle(words)
    text = " ".join(words[i % len(words)] for i in range(n * 2)).capitalize()
    return backend.detokenize(backend.tokenize(text, add_special=False, parse_special=False)[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", type=Path, default=None, help="a Llama Guard 3 GGUF instead of the random one")
    a = ap.parse_args()

    from edgevlm.runtime.device.hardware import cpu_info
    from edgevlm.runtime.generation.guard import Guard
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions, Message

    path = a.model or build_model()
    b = load_backend(artifact_from_path(path, None, False), LoadOptions(n_ctx=2048, n_threads=a.threads))
    try:
        guard = Guard(b, name=path.name)
        answer = question_of(b, 40, seed=-1)
        guard.check_input([Message("user", question_of(b, QUESTION_TOKENS, seed=-2))])   # warm-up: first touch
        full, reused, output, ev = [], [], [], {}
        for i in range(a.rounds):
            # two different questions per round: a check shares nothing but the preamble with the one before
            qa, qb = question_of(b, QUESTION_TOKENS, 2 * i), question_of(b, QUESTION_TOKENS, 2 * i + 1)
            b.reset()
            v = guard.check_input([Message("user", qa)])
            full.append(v.seconds)
            ev["full"] = (v.prompt_tokens, v.eval_tokens)
            v = guard.check_input([Message("user", qb)])
            reused.append(v.seconds)
            ev["reused"] = (v.prompt_tokens, v.eval_tokens)
            v = guard.check_output([Message("user", qb)], answer)
            output.append(v.seconds)
            ev["output"] = (v.prompt_tokens, v.eval_tokens)
        n_q = len(b.tokenize(qa, add_special=False, parse_special=False))
    finally:
        b.close()

    def row(name, xs):
        p, e = ev[name]
        return (f"| {name:<7} | {p:>6} | {e:>9} | {statistics.median(xs):>8.3f} | {statistics.fmean(xs):>8.3f} "
                f"| {min(xs):>7.3f} | {max(xs):>7.3f} |")

    cpu = cpu_info()
    print(f"{path.name}, {cpu.model}, {b.n_threads} threads, question {n_q} tokens, {a.rounds} rounds interleaved")
    print("| check   | prompt | evaluated | median s |   mean s |   min s |   max s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(row("full", full))
    print(row("reused", reused))
    print(row("output", output))
    ratios = [f / r for f, r in zip(full, reused)]
    print(f"\npreamble reuse: {statistics.median(ratios):.2f}x faster (median of per-round ratios; "
          f"range {min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
