"""How many real-world JSON schemas `--schema` takes, per backend, and whether any can crash us.

Fetch-free: point it at a local checkout of JSONSchemaBench (github.com/guidance-ai/jsonschemabench:
``data/<category>/*.json``, each file ``{"json_schema": ..., "tests": ...}`` or a bare schema).

    python benchmarks/schema_coverage.py JSONSCHEMABENCH/data --gguf MODEL.gguf --onnx ONNX_DIR \\
        [--per-category 60] [--all] [--answers 30 --answer-tokens 256]

For every schema it asks what `vlm ask --schema` asks before loading a model and before generating:
``load_schema`` (is it valid JSON Schema?) and the constraint engine's compile for this model's
vocabulary (strict, else lenient), through each backend's own ``constraint_tokenizer()`` (GGUF:
llama.cpp's vocabulary; ONNX: tokenizer.json). It also runs the engine the GGUF backend used before
(llama-cpp-python's ``json_schema_to_gbnf`` + ``llama_sampler_init_grammar``) for comparison, each schema
in a child process, since that path can kill the process. Reported per category: accepted (strict /
lenient), refused (with the first reason), crashed. With ``--answers N``, N schemas per category also
get a real constrained answer from the GGUF model ("Fill it in."), and the share that validates with
``jsonschema`` is reported.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path


def _schemas(data: Path, per_category: int | None, seed: int) -> dict[str, list[Path]]:
    out = {}
    for cat in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(cat.glob("*.json"))
        if per_category:
            random.Random(seed).shuffle(files)
            files = sorted(files[:per_category])
        out[cat.name] = files
    return out


def _load(path: Path):
    doc = json.loads(path.read_text(encoding="utf-8"))
    return doc.get("json_schema", doc) if isinstance(doc, dict) and "json_schema" in doc else doc


_OLD_CHILD = r"""
import json, sys, ctypes
from pathlib import Path
import llama_cpp
from llama_cpp.llama_grammar import json_schema_to_gbnf
from edgevlm.runtime.backends.llamacpp import import_llama
lc, _ = import_llama()
cb = lc.llama_log_callback(lambda l, t, d: None); lc.llama_log_set(cb, ctypes.c_void_p(0))
p = lc.llama_model_default_params(); p.use_extra_bufts = False
m = lc.llama_model_load_from_file(sys.argv[1].encode(), p)
vocab = lc.llama_model_get_vocab(m)
for line in sys.stdin:
    path = line.strip()
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    schema = doc.get("json_schema", doc) if isinstance(doc, dict) and "json_schema" in doc else doc
    try:
        g = json_schema_to_gbnf(json.dumps(schema))
        s = lc.llama_sampler_init_grammar(vocab, g.encode(), b"root")
        ok = bool(s)
        if s:
            lc.llama_sampler_free(s)
        print(json.dumps({"path": path, "ok": ok, "why": "" if ok else "grammar rejected"}), flush=True)
    except Exception as e:
        print(json.dumps({"path": path, "ok": False, "why": type(e).__name__ + ": " + str(e)[:120]}), flush=True)
"""


def old_gguf_engine(model: Path, paths: list[Path]) -> dict[str, dict]:
    """The GGUF backend's previous engine, in children that are restarted after a crash."""
    results: dict[str, dict] = {}
    todo = [str(p) for p in paths]
    while todo:
        proc = subprocess.run([sys.executable, "-c", _OLD_CHILD, str(model)], input="\n".join(todo) + "\n",
                              capture_output=True, text=True, timeout=3600)
        for line in proc.stdout.splitlines():
            r = json.loads(line)
            results[r["path"]] = r
        done = set(results)
        rest = [p for p in todo if p not in done]
        if rest and proc.returncode != 0:            # the first one not answered killed the child
            results[rest[0]] = {"path": rest[0], "ok": False, "crash": proc.returncode,
                                "why": f"process died (exit {proc.returncode})"}
            rest = rest[1:]
        elif rest:
            for p in rest:
                results[p] = {"path": p, "ok": False, "why": "no answer"}
            rest = []
        todo = rest
    return results


def new_engine(backend, paths: list[Path]) -> dict[str, dict]:
    from edgevlm.runtime.errors import EdgeVLMError
    from edgevlm.runtime.generation.constrain import compile_schema
    from edgevlm.runtime.generation.schema import load_schema

    tok = backend.constraint_tokenizer()
    out = {}
    for p in paths:
        try:
            schema = load_schema(json.dumps(_load(p)))
            _, unenforced = compile_schema(schema, tok)
            out[str(p)] = {"ok": True, "lenient": bool(unenforced)}
        except EdgeVLMError as e:
            out[str(p)] = {"ok": False, "why": e.message[:160]}
        except (ValueError, RecursionError) as e:
            out[str(p)] = {"ok": False, "why": f"{type(e).__name__}: {str(e)[:120]}"}
    return out


def answers(backend, paths: list[Path], max_tokens: int) -> Counter:
    from edgevlm.runtime.errors import EdgeVLMError
    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.generation.schema import load_schema, parse_and_validate
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    c = Counter()
    for p in paths:
        try:
            schema = load_schema(json.dumps(_load(p)))
            backend.reset()
            text, last = complete(backend, ChatRequest([Message("user", "Fill it in.")], GenerationOptions(
                temperature=0, max_tokens=max_tokens, json_schema=schema)))
            parse_and_validate(text, schema, last.finish_reason)
            c["valid"] += 1
        except EdgeVLMError as e:
            c["cut off" if "cut off" in e.message else ("refused" if e.exit_code == 2 else "invalid")] += 1
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="JSONSchemaBench's data/ folder")
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--per-category", type=int, default=60)
    ap.add_argument("--all", action="store_true", help="every schema (overrides --per-category)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-old", action="store_true", help="skip the previous GGUF engine")
    ap.add_argument("--answers", type=int, default=0, help="schemas per category answered by the GGUF model")
    ap.add_argument("--answer-tokens", type=int, default=256)
    ap.add_argument("--answers-model", type=Path, help="GGUF model that answers (default: --gguf)")
    ap.add_argument("--json", type=Path, help="write the per-schema results here")
    args = ap.parse_args()

    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    cats = _schemas(args.data, None if args.all else args.per_category, args.seed)
    every = [p for ps in cats.values() for p in ps]
    t0 = time.perf_counter()
    gguf = load_backend(artifact_from_path(args.gguf, None, False), LoadOptions(n_ctx=2048, n_threads=2))
    onnx = load_backend(artifact_from_path(args.onnx, None, False), LoadOptions(n_ctx=2048, n_threads=2))
    res = {"gguf": new_engine(gguf, every), "onnx": new_engine(onnx, every)}
    if not args.no_old:
        res["old_gguf"] = old_gguf_engine(args.gguf, every)
    cols = list(res)
    print(f"{len(every)} schemas in {len(cats)} categories ({time.perf_counter() - t0:.0f} s)\n")
    print(f"| category | n | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    totals = defaultdict(int)
    for cat, ps in cats.items():
        row = []
        for col in cols:
            k = sum(1 for p in ps if res[col][str(p)]["ok"])
            totals[col] += k
            row.append(f"{k / len(ps):.0%}" if ps else "-")
        print(f"| {cat} | {len(ps)} | " + " | ".join(row) + " |")
    print(f"| **all** | {len(every)} | " + " | ".join(f"**{totals[c] / len(every):.1%}**" for c in cols) + " |")
    lenient = sum(1 for p in every if res["gguf"][str(p)].get("lenient"))
    print(f"\nlenient (some keywords not enforced, answer validated afterwards): {lenient}")
    same = sum(1 for p in every if res["gguf"][str(p)]["ok"] == res["onnx"][str(p)]["ok"])
    print(f"identical acceptance on both backends: {same}/{len(every)}")
    if "old_gguf" in res:
        crashes = [p for p, r in res["old_gguf"].items() if r.get("crash")]
        print(f"previous GGUF engine: {len(crashes)} crash(es)" + (f": {crashes[:5]}" if crashes else ""))
    print("new engines: 0 crashes (in process: a crash would have ended this run)")
    reasons = Counter(r["why"].split(":")[0][:70] for c in ("gguf",) for r in res[c].values() if not r["ok"])
    if reasons:
        print("\nrefusals (gguf), by first words of the reason:")
        for why, n in reasons.most_common(8):
            print(f"  {n:4d}  {why}")
    if args.answers:
        print(f"\nconstrained answers from {(args.answers_model or args.gguf).name}, {args.answers} schema(s) per category, "
              f"<= {args.answer_tokens} tokens, greedy:")
        tot = Counter()
        answerer = gguf if args.answers_model is None else load_backend(
            artifact_from_path(args.answers_model, None, False), LoadOptions(n_ctx=2048, n_threads=2))
        for cat, ps in cats.items():
            ok = [p for p in ps if res["gguf"][str(p)]["ok"]][: args.answers]
            c = answers(answerer, ok, args.answer_tokens)
            tot += c
            print(f"  {cat}: {dict(c)}")
        n = sum(tot.values())
        print(f"  all: {dict(tot)} -> {tot['valid'] / n:.0%} valid" if n else "  none")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    gguf.close()
    onnx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
