"""Decode and prefill speed of this checkout against another one (e.g. before a refactor), in one run.

    git worktree add /tmp/prev 9952b28
    python benchmarks/ab_checkouts.py /tmp/prev MODEL.gguf [MODEL.onnx ...] [--rounds 7] [--gen 128]

Each round runs both checkouts in fresh child processes, alternating which goes first; each child loads
the model through that checkout's own runtime (`edgevlm` imported from that folder), generates greedily
from a fixed prompt, and reports prefill and decode tokens/s. Medians and paired per-round ratios
(this / previous) are printed: above 1.0 means this checkout is faster.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
from pathlib import Path
model, gen, prompt_tokens = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
from edgevlm.runtime.loader import artifact_from_path, load_backend
from edgevlm.runtime import protocol as P
b = load_backend(artifact_from_path(model, None, False), P.LoadOptions(n_ctx=prompt_tokens + gen + 64, n_threads=2))
words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
text = " ".join(words[i % len(words)] for i in range(prompt_tokens))
msgs = [P.Message("user", text)]
if hasattr(P, "GenerationOptions") and "options" in P.ChatRequest.__dataclass_fields__:
    from edgevlm.runtime.generation.core import generate
    # drafting (where the checkout has it) off: this compares the engine's work, and a repeated prompt
    # like this one is what drafting speeds up most
    off = {"draft": "off"} if "draft" in P.GenerationOptions.__dataclass_fields__ else {}
    req = P.ChatRequest(msgs, P.GenerationOptions(raw=True, temperature=0, max_tokens=gen, **off))
    run = lambda: list(generate(b, req))
else:                                     # before the generation core: backend.stream
    req = P.ChatRequest(messages=msgs, raw=True, temperature=0, max_tokens=gen)
    run = lambda: list(b.stream(req))
run()
b.reset()
last = run()[-1]
print(json.dumps({"prefill": last.prompt_eval_tokens / last.prefill_s,
                  "decode": (last.completion_tokens - 1) / last.decode_s, "n": last.completion_tokens}))
b.close()
"""


def _pkg_root(checkout: Path) -> Path:
    """A folder where `import edgevlm` finds ``checkout``'s cli/runtime/quantize (its setuptools layout)."""
    root = Path(tempfile.mkdtemp(prefix="ab-"))
    pkg = root / "edgevlm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for sub in ("cli", "runtime", "quantize"):
        (pkg / sub).symlink_to(checkout / sub)
    return root


def run(checkout_root: Path, model: Path, gen: int, prompt: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout_root)}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(gen), str(prompt)], env=env,
                         capture_output=True, text=True, timeout=600, cwd="/")
    if out.returncode != 0:
        raise SystemExit(f"child failed ({checkout_root}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("previous", type=Path, help="a checkout of the commit to compare with")
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    args = ap.parse_args()
    roots = {"this": _pkg_root(HERE), "previous": _pkg_root(args.previous.resolve())}
    for model in args.models:
        res = {"this": [], "previous": []}
        for i in range(args.rounds):
            order = ["this", "previous"] if i % 2 == 0 else ["previous", "this"]
            for name in order:
                res[name].append(run(roots[name], model, args.gen, args.prompt))
        print(f"\n{model.name}: {args.rounds} alternating rounds, prompt ~{args.prompt} words, {args.gen} generated, 2 threads")
        print("| checkout | prefill tok/s | decode tok/s |\n|---|---|---|")
        for name, rs in res.items():
            print(f"| {name} | {statistics.median(r['prefill'] for r in rs):.0f} | "
                  f"{statistics.median(r['decode'] for r in rs):.1f} |")
        for k in ("prefill", "decode"):
            ratios = sorted(a[k] / b[k] for a, b in zip(res["this"], res["previous"]))
            q = len(ratios) // 4
            print(f"{k}: this / previous, paired per round: median {statistics.median(ratios):.3f} "
                  f"(middle half {ratios[q]:.3f}-{ratios[-q - 1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
