"""What `--schema` costs per token: constrained vs unconstrained decode tokens/s, same model, one run.

    python benchmarks/schema_overhead.py MODEL [MODEL ...] [--rounds 7] [--gen 128]

MODEL: a .gguf file or an ONNX model (file or folder). The constrained run asks for a JSON object with
one long string, so both runs decode about the same number of tokens; rounds alternate which goes
first, and the paired per-round ratio (constrained / unconstrained decode tok/s) is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"], "additionalProperties": False}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, LoadOptions, Message

    for model in args.models:
        b = load_backend(artifact_from_path(model, None, False), LoadOptions(n_ctx=1024, n_threads=args.threads))
        msgs = [Message("user", "Tell me a long story about a lighthouse keeper.")]
        reqs = {"plain": ChatRequest(msgs, GenerationOptions(temperature=0, max_tokens=args.gen)),
                "schema": ChatRequest(msgs, GenerationOptions(temperature=0, max_tokens=args.gen, json_schema=SCHEMA))}
        t0 = time.perf_counter()
        complete(b, reqs["schema"])                     # compiles the grammar and the tokenizer once
        compile_s = time.perf_counter() - t0
        res: dict[str, list[float]] = {"plain": [], "schema": []}
        for i in range(args.rounds):
            for name in (("plain", "schema") if i % 2 == 0 else ("schema", "plain")):
                b.reset()
                _, last = complete(b, reqs[name])
                res[name].append((last.completion_tokens - 1) / last.decode_s)
        b.close()
        ratios = sorted(s / p for s, p in zip(res["schema"], res["plain"]))
        q = len(ratios) // 4
        print(f"{model.name}: decode tok/s unconstrained {statistics.median(res['plain']):.1f}, "
              f"constrained {statistics.median(res['schema']):.1f}; paired ratio median "
              f"{statistics.median(ratios):.3f} (middle half {ratios[q]:.3f}-{ratios[-q - 1]:.3f}); "
              f"first constrained answer incl. compile {compile_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
