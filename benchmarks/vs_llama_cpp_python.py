"""Decode and prefill tokens/s of edgevlm's GGUF backend next to llama-cpp-python's own high-level API.

Same file, same threads, same context, greedy, one process, alternating runs; reported as ratios.
    python benchmarks/vs_llama_cpp_python.py MODEL.gguf [--threads 2] [--gen 128] [--prompt-tokens 256] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from edgevlm.runtime.loader import artifact_from_path, load_backend
from edgevlm.runtime.generation.core import generate
from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, LoadOptions, Message


def prompt_of(n_words: int) -> str:
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches").split()
    return " ".join(words[i % len(words)] for i in range(n_words))


def run_ours(b, prompt: str, gen: int) -> tuple[float, float, int, int]:
    b.reset()
    req = ChatRequest([Message("user", prompt)], GenerationOptions(raw=True, temperature=0, max_tokens=gen,
                                                                   draft="off"))   # the engine's step, as llama-cpp-python's
    last = None
    for last in generate(b, req):
        pass
    return (last.prompt_eval_tokens / last.prefill_s, (last.completion_tokens - 1) / last.decode_s,
            last.prompt_eval_tokens, last.completion_tokens)


def run_theirs(llm, prompt: str, gen: int) -> tuple[float, float, int, int]:
    llm.reset()
    toks = llm.tokenize(prompt.encode(), add_bos=True)
    t0 = time.perf_counter()
    n, t_first = 0, None
    for tok in llm.generate(toks, temp=0.0, top_k=1, reset=True):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        if n >= gen or llm.token_eos() == tok:
            break
    t_end = time.perf_counter()
    return len(toks) / (t_first - t0), (n - 1) / (t_end - t_first), len(toks), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    import llama_cpp

    ours = load_backend(artifact_from_path(a.model, None, False), LoadOptions(n_ctx=2048, n_threads=a.threads))
    theirs = llama_cpp.Llama(str(a.model), n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads,
                             n_batch=512, verbose=False)
    prompt = prompt_of(int(a.prompt_tokens * 0.8))
    res = {"edgevlm": [], "llama-cpp-python": []}
    run_ours(ours, prompt, 8), run_theirs(theirs, prompt, 8)      # warm-up
    for _ in range(a.repeat):
        res["edgevlm"].append(run_ours(ours, prompt, a.gen))
        res["llama-cpp-python"].append(run_theirs(theirs, prompt, a.gen))
    print(f"model {a.model.name}, threads {a.threads}, prompt {res['edgevlm'][0][2]} tokens, gen {a.gen}, repeat {a.repeat}")
    print(f"{'engine':<18}{'prefill tok/s':>16}{'decode tok/s':>16}")
    med = {}
    for k, rows in res.items():
        pp = statistics.median(r[0] for r in rows)
        tg = statistics.median(r[1] for r in rows)
        med[k] = (pp, tg)
        print(f"{k:<18}{pp:>16.1f}{tg:>16.1f}")
    o, t = med["edgevlm"], med["llama-cpp-python"]
    print(f"{'ratio':<18}{o[0] / t[0]:>15.2f}x{o[1] / t[1]:>15.2f}x")
    ours.close()
    theirs.close()


if __name__ == "__main__":
    main()
