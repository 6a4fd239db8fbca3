"""Decode and prefill tokens/s of edgevlm's ONNX backend next to the references that matter.

* ``naive``: the obvious loop over the same .onnx file -- ``session.run`` with a feed dict of numpy
  arrays, the presents copied back into numpy as the next past, ``argmax`` over every logits row. This
  is the baseline the ONNX backend must beat.
* ``gguf`` (``--gguf FILE``): edgevlm's GGUF backend (llama.cpp) on the same weights, run in the same
  process, so a shared, noisy machine affects both alike.
* ``genai`` (``--genai-python PY --genai-model DIR``): onnxruntime-genai's own loop, run by another
  interpreter (it needs a transformers version that conflicts with optimum); ``DIR`` is a model
  made by its model builder.

The genai side, in its own environment (it pins its own transformers), from the same HF checkpoint
our int4 artifact came from (asymmetric int4 like ours; its symmetric default loses " Paris" on SmolLM2):
    python -m venv genai && genai/bin/pip install torch==2.13.0 onnxruntime-genai transformers
    genai/bin/python -m onnxruntime_genai.models.builder -i HF_DIR -o GENAI_DIR -p int4 -e cpu
        --extra_options is_symmetric=false accuracy_level=4 block_size=32

genai runs twice per round: "+ text" turns each token into text through its TokenizerStream, as its
own examples do and as our backends always do (every chunk carries text); "tokens only" skips that.

Greedy, same prompt and lengths, same threads, alternating runs, best of ``--repeat``
(``VLM_ORT_SPIN=0|1`` fixes onnxruntime's thread spinning for every ONNX runner):
    python benchmarks/onnx_vs_genai.py DIR_OR_FILE.onnx [--gguf X.gguf] [--threads 2] [--gen 64] [--prompt-tokens 128]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgevlm.runtime.generation.core import generate
from edgevlm.runtime.protocol import Artifact, ChatRequest, GenerationOptions, LoadOptions, Message


def prompt_of(n_words: int) -> str:
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches").split()
    return " ".join(words[i % len(words)] for i in range(n_words))


def run_backend(b, prompt: str, gen: int) -> tuple[float, float, int]:
    b.reset()
    req = ChatRequest([Message("user", prompt)], GenerationOptions(raw=True, temperature=0, max_tokens=gen))
    last = None
    for last in generate(b, req):
        pass
    return last.prompt_eval_tokens / last.prefill_s, (last.completion_tokens - 1) / last.decode_s, last.prompt_eval_tokens


class Naive:
    """The loop a first ONNX integration writes (what the ONNX backend is measured against)."""

    def __init__(self, model_file: Path, backend, threads: int) -> None:
        import numpy as np
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.np = np
        self.sess = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        self.b = backend    # for the tokenizer, eos ids and KV shapes
        self.inputs = {i.name for i in self.sess.get_inputs()}

    def run(self, prompt: str, gen: int) -> tuple[float, float, int]:
        np, b = self.np, self.b
        ids = b.tokenize(prompt, add_special=True)
        past = {n: np.zeros((1, b.kv_heads, 0, b.head_dim), dtype=np.float32) for n in b._past_names}
        cur, pos, n_out = ids, 0, 0
        t0 = time.perf_counter()
        t_first = None
        while True:
            feed = {"input_ids": np.array([cur], dtype=np.int64),
                    "attention_mask": np.ones((1, pos + len(cur)), dtype=np.int64), **past}
            if "position_ids" in self.inputs:
                feed["position_ids"] = np.arange(pos, pos + len(cur), dtype=np.int64)[None]
            outs = self.sess.run(None, feed)
            tok = int(outs[0][0, -1].argmax())
            if t_first is None:
                t_first = time.perf_counter()
            past = dict(zip(b._past_names, outs[1:]))
            pos += len(cur)
            n_out += 1
            if n_out >= gen or tok in b.eos_ids:
                break
            cur = [tok]
        t_end = time.perf_counter()
        return len(ids) / (t_first - t0), (n_out - 1) / (t_end - t_first), len(ids)


GENAI_SCRIPT = r"""
import json, sys, time
import onnxruntime_genai as og
model_dir, prompt, gen, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = og.Config(model_dir)
cfg.clear_providers()
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
model = og.Model(cfg)
tok = og.Tokenizer(model)
ids = tok.encode(prompt)

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:            # one run per line ("tokens" or "text"): the parent interleaves them
    text = line.strip() == "text"     # stream text as genai's own examples do (and as vlm does)
    stream = tok.create_stream() if text else None
    out = []
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=len(ids) + gen, do_sample=False)
    g = og.Generator(model, p)
    t0 = time.perf_counter()
    g.append_tokens(ids)      # the prefill forward
    g.generate_next_token()   # only picks the first token from the prefill logits (no forward)
    if text:
        out.append(stream.decode(g.get_next_tokens()[0]))
    t1 = time.perf_counter()
    n = 0
    while not g.is_done() and n < gen - 1:
        g.generate_next_token()   # one forward on the previous token, then the pick
        if text:
            out.append(stream.decode(g.get_next_tokens()[0]))
        n += 1
    t2 = time.perf_counter()
    print(json.dumps([len(ids) / (t1 - t0), n / (t2 - t1), peak_rss()]), flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path, nargs="+", help="ONNX model directories or .onnx files (each one is run)")
    ap.add_argument("--gguf", type=Path, help="the same model as GGUF, for edgevlm's GGUF backend")
    ap.add_argument("--genai-python", help="a python with onnxruntime-genai installed")
    ap.add_argument("--genai-model", type=Path, help="a model directory made by onnxruntime-genai's builder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true")
    args = ap.parse_args()

    from edgevlm.runtime.backends.onnx import ONNXBackend

    prompt = prompt_of(args.prompt_tokens * 3 // 4)
    runners = {}
    first = None
    for path in args.models:
        b = ONNXBackend()
        b.load(Artifact(format="onnx", path=path, name=path.name), LoadOptions(n_threads=args.threads))
        first = first or b
        kv = "shared" if "shared" in b.describe()["kv"] else "concat"
        label = f"onnx {path.parent.name}/{b.model_file.name} ({kv} kv, spin {int(b.spin)})"
        runners[label] = (lambda b=b: run_backend(b, prompt, args.gen))
    if not args.no_naive:
        naive = Naive(first.model_file, first, args.threads)
        runners["naive-numpy"] = lambda: naive.run(prompt, args.gen)
    if args.gguf:
        from edgevlm.runtime.loader import artifact_from_path, load_backend

        gg = load_backend(artifact_from_path(args.gguf, None, False), LoadOptions(n_threads=args.threads, n_ctx=2048))
        runners["edgevlm-gguf"] = lambda: run_backend(gg, prompt, args.gen)
    genai = None
    if args.genai_python and args.genai_model:
        genai = subprocess.Popen([args.genai_python, "-c", GENAI_SCRIPT, str(args.genai_model), prompt, str(args.gen),
                                  str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(genai.stdout.readline())          # loaded

        def genai_run(mode: str):
            genai.stdin.write(mode + "\n")
            genai.stdin.flush()
            return tuple(json.loads(genai.stdout.readline()))

        # "+ text": detokenized token by token through its TokenizerStream, as genai's examples do and as
        # our backends always do (a chunk of text per token); "tokens only": ids, no text at all
        runners["onnxruntime-genai + text"] = lambda: genai_run("text")
        runners["onnxruntime-genai tokens only"] = lambda: genai_run("tokens")
    results: dict[str, list] = {k: [] for k in runners}
    for f in runners.values():   # warm-up
        f()
    order = list(runners)
    for r in range(args.repeat):  # alternating, the order reversed every other round: a noisy neighbour
        for k in (order if r % 2 == 0 else order[::-1]):   # slows every runner alike
            results[k].append(runners[k]())
    if genai is not None:
        genai.stdin.close()
        genai.wait()

    print(f"naive runs {first.model_file}  threads {args.threads}  prompt ~{args.prompt_tokens} tokens  gen {args.gen}  "
          f"best of {args.repeat}", file=sys.stderr)
    w = max(len(k) for k in results)
    print(f"{'runner':{w}s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'decode median':>14s}   decode runs")
    for k, rs in results.items():
        print(f"{k:{w}s} {max(r[0] for r in rs):14.0f} {max(r[1] for r in rs):13.1f} "
              f"{statistics.median(r[1] for r in rs):14.1f}   " + " ".join(f"{r[1]:.1f}" for r in rs))
    ref = "onnxruntime-genai + text" if genai is not None else None
    if ref is not None:   # paired per round: the two runs of a round saw the same neighbours
        for k, rs in results.items():
            if k.startswith("onnxruntime-genai"):
                continue
            ratios = sorted(a[1] / b[1] for a, b in zip(rs, results[ref]))
            print(f"{k:{w}s} decode / genai + text, per round: median {statistics.median(ratios):.3f} "
                  f"(middle half {ratios[len(ratios) // 4]:.3f}-{ratios[(3 * len(ratios)) // 4]:.3f}); "
                  f"prefill {statistics.median(a[0] / b[0] for a, b in zip(rs, results[ref])):.2f}")
    if genai is not None:
        print(f"onnxruntime-genai peak RSS {results['onnxruntime-genai + text'][-1][2] / 2**20:.0f} MiB "
              f"(edgevlm's: `vlm bench MODEL`, one model per process)")


if __name__ == "__main__":
    main()
