"""Tool calls on the Berkeley Function Calling Leaderboard's "simple" and "multiple" categories: `vlm serve`
(GGUF, and ONNX when given) side by side with llama.cpp's llama-server `--jinja` on the same GGUF, and the
decode speed of a constrained call against unconstrained decoding on the same model.

Per server and category: the share of emitted calls that parse and validate against their tool's schema
(the guarantee: 100% for ours), the AST accuracy (a subset of BFCL's AST checker, below), and the share of
answers with no call. Both servers get the same OpenAI request (`tools`, `tool_choice`, greedy).

AST checker rules implemented (from BFCL's ast_checker.py, simple_function_checker): exactly one call; the
function's name; every required parameter present; no parameter the function does not declare; each value's
type (an int is accepted for a float; a tuple is a list); each value among the possible answers, strings
compared after BFCL's standardisation (lower case; spaces and , . / - _ * ^ ' " removed), lists element by
element, dicts key by key; an optional parameter left out only where "" is among its possible answers.
Not implemented: the Java/JavaScript type rules and the parallel categories.

The data is not fetched here: --data points at a folder with BFCL_v4_simple_python.json,
BFCL_v4_multiple.json and answer_<same names> (the possible_answer/ files) copied from the public
gorilla repository (berkeley-function-call-leaderboard/bfcl_eval/data, Apache-2.0). BFCL's parameter types
("dict", "float", "tuple", "any") become JSON Schema's and "." in names becomes "_", as BFCL does for
OpenAI-style models.

    python benchmarks/tool_calls.py --data DIR --gguf MODEL.gguf [--onnx ONNX_DIR/model_q4.onnx] \\
        [--llama-server PATH [--llama-template TEMPLATE.jinja]] [--items 30] [--choice required] [--speed-rounds 6]

The speed rows count every token of the answer, including those the grammar forces and the decode loop
evaluates in one batch (core.py): the decode speed a client sees while a call is written.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

CATEGORIES = {"simple": "BFCL_v4_simple_python.json", "multiple": "BFCL_v4_multiple.json"}
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "int": "integer", "bool": "boolean", "list": "array"}


def to_json_schema(p):
    """BFCL's parameter schema -> JSON Schema (its type names, "any" without a type)."""
    if isinstance(p, list):
        return [to_json_schema(x) for x in p]
    if not isinstance(p, dict):
        return p
    out = {}
    for k, v in p.items():
        if k == "type":
            if v == "any":
                continue
            out[k] = _TYPES.get(v, v)
        elif k in ("properties",):
            out[k] = {n: to_json_schema(s) for n, s in v.items()}
        elif k in ("items", "additionalProperties"):
            out[k] = to_json_schema(v)
        elif k in ("optional", "format") and not isinstance(v, dict):
            continue
        else:
            out[k] = v
    return out


def tools_of(item) -> list[dict]:
    return [{"type": "function", "function": {"name": f["name"].replace(".", "_"), "description": f.get("description", ""),
                                             "parameters": to_json_schema(f["parameters"])}} for f in item["function"]]


def load(data: Path, cat: str, n: int) -> list[tuple[dict, dict]]:
    qs = [json.loads(x) for x in (data / CATEGORIES[cat]).read_text().splitlines() if x.strip()]
    ans = {a["id"]: a for a in (json.loads(x) for x in (data / f"answer_{CATEGORIES[cat]}").read_text().splitlines() if x.strip())}
    return [(q, ans[q["id"]]) for q in qs[:n]]


# ------------------------------------------------------------------------------------------ the AST checker

def _std(s: str) -> str:
    return re.sub(r"[ ,./\-_*^'\"]", "", s).lower()


def _value_ok(v, possible) -> bool:
    for p in possible:
        if p == "":
            continue
        if isinstance(p, str) and isinstance(v, str) and _std(p) == _std(v):
            return True
        if isinstance(p, bool) or isinstance(v, bool):
            if v is p:
                return True
            continue
        if isinstance(p, (int, float)) and isinstance(v, (int, float)) and float(p) == float(v):
            return True
        if isinstance(p, list) and isinstance(v, list) and len(p) == len(v) and all(
                _value_ok(a, [b]) for a, b in zip(v, p)):
            return True
        if isinstance(p, dict) and isinstance(v, dict) and set(v) <= set(p) and all(
                _value_ok(v[k], p[k] if isinstance(p[k], list) else [p[k]]) for k in v):
            return True
    return False


def _type_ok(v, schema: dict) -> bool:
    t = schema.get("type")
    return {"integer": isinstance(v, int) and not isinstance(v, bool),
            "number": isinstance(v, (int, float)) and not isinstance(v, bool),
            "string": isinstance(v, str), "boolean": isinstance(v, bool), "array": isinstance(v, list),
            "object": isinstance(v, dict)}.get(t, True)


def ast_ok(calls: list[tuple[str, dict]], item: dict, answer: dict) -> bool:
    if len(calls) != 1:
        return False
    name, args = calls[0]
    (truth,) = answer["ground_truth"]
    (want, possible), = truth.items()
    if name != want.replace(".", "_"):
        return False
    fn = next(f for f in item["function"] if f["name"] == want)
    params = to_json_schema(fn["parameters"])
    props = params.get("properties", {})
    if any(r not in args for r in params.get("required", [])) or any(k not in props for k in args):
        return False
    for k, poss in possible.items():
        if k not in args:
            if "" not in poss:
                return False
            continue
        if not _type_ok(args[k], props.get(k, {})) or not _value_ok(args[k], poss):
            return False
    return True


# ------------------------------------------------------------------------------------------ the servers

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    p = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if p.poll() is not None:
            sys.exit(f"{cmd[0]} exited {p.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return p
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    p.kill()
    sys.exit(f"{cmd[0]} did not start: {log.read_text()[-2000:]}")


def model_id(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]


def ask(url: str, item: dict, tools: list[dict], choice: str, max_tokens: int) -> dict:
    import httpx

    body = {"model": model_id(url), "messages": item["question"][0], "tools": tools, "tool_choice": choice,
            "temperature": 0, "max_tokens": max_tokens, "parallel_tool_calls": False}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:200]}"}
    return r.json()


def judge(doc: dict, item: dict, answer: dict, tools: list[dict]) -> dict:
    """parsed+valid, AST ok, no call, per answer."""
    import jsonschema

    if "error" in doc:
        return {"calls": 0, "valid": 0, "ast": False, "no_call": True, "error": doc["error"]}
    msg = doc["choices"][0]["message"]
    calls = msg.get("tool_calls") or []
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    parsed, valid = [], 0
    for c in calls:
        try:
            args = json.loads(c["function"]["arguments"])
            jsonschema.validate(args, by_name[c["function"]["name"]])
        except (ValueError, KeyError, TypeError, jsonschema.ValidationError, jsonschema.SchemaError):
            continue
        valid += 1
        parsed.append((c["function"]["name"], args))
    return {"calls": len(calls), "valid": valid, "ast": ast_ok(parsed, item, answer) and valid == len(calls),
            "no_call": not calls}


def run_side(url: str, items, choice: str, max_tokens: int) -> dict:
    res = []
    for q, a in items:
        tools = tools_of(q)
        res.append(judge(ask(url, q, tools, choice, max_tokens), q, a, tools))
    n_calls = sum(r["calls"] for r in res)
    return {"items": len(res), "calls": n_calls,
            "valid_share": round(sum(r["valid"] for r in res) / n_calls, 3) if n_calls else None,
            "invalid_calls": n_calls - sum(r["valid"] for r in res),
            "ast_accuracy": round(sum(r["ast"] for r in res) / len(res), 3),
            "no_call_share": round(sum(r["no_call"] for r in res) / len(res), 3),
            "errors": sum("error" in r for r in res)}


def speed(url: str, items, rounds: int, max_tokens: int) -> dict:
    """Decode tokens/s of a constrained call (tool_choice required) vs the same prompt unconstrained (no
    tools, the tool list pasted into the system turn so the prompt is as long), paired, interleaved."""
    import httpx

    ratios, con, unc = [], [], []
    mid = model_id(url)
    for i in range(rounds):
        q, _ = items[i % len(items)]
        tools = tools_of(q)
        bodies = {
            "constrained": {"model": mid, "messages": q["question"][0], "tools": tools, "tool_choice": "required",
                            "temperature": 0, "max_tokens": max_tokens, "parallel_tool_calls": False},
            "free": {"model": mid, "messages": [{"role": "system", "content": "Tools: " + json.dumps(tools)}] + q["question"][0],
                     "temperature": 0, "max_tokens": max_tokens}}
        tps = {}
        for side in (("constrained", "free") if i % 2 == 0 else ("free", "constrained")):
            t = httpx.post(url + "/v1/chat/completions", json=bodies[side], timeout=600).json()["timings"]
            tps[side] = t["predicted_per_second"]
        if tps["constrained"] and tps["free"]:
            con.append(tps["constrained"])
            unc.append(tps["free"])
            ratios.append(tps["constrained"] / tps["free"])
    return {"rounds": len(ratios), "constrained_tok_s": round(statistics.median(con), 1) if con else None,
            "free_tok_s": round(statistics.median(unc), 1) if unc else None,
            "ratio_median": round(statistics.median(ratios), 3) if ratios else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--gguf", action="append", default=[], help="a GGUF model (repeatable)")
    ap.add_argument("--onnx", action="append", default=[], help="an ONNX model folder (repeatable; ours only)")
    ap.add_argument("--llama-server")
    ap.add_argument("--llama-template", help="also run llama-server with this chat template file (e.g. Qwen 2.5's "
                                             "ChatML + tools template for a ChatML model): its own tool-call path")
    ap.add_argument("--only-template", action="store_true", help="with --llama-template: run only that side")
    ap.add_argument("--items", type=int, default=30, help="items per category (the first N)")
    ap.add_argument("--choice", default="required", help="tool_choice sent to both servers")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("/tmp/tool_calls_bench.json"))
    args = ap.parse_args()
    items = {c: load(args.data, c, args.items) for c in CATEGORIES}
    exe = str(Path(sys.executable).with_name("vlm"))
    results = []
    logs = Path("/tmp/tool_calls_bench_logs")
    logs.mkdir(exist_ok=True)
    for model in args.gguf + args.onnx:
        port = free_port()
        sides = {"ours": (f"http://127.0.0.1:{port}",
                          [exe, "serve", model, "--port", str(port), "--threads", str(args.threads), "--ctx", "4096",
                           "--max-tokens", "4096"])}
        if args.llama_server and model in args.gguf:
            lport = free_port()
            sides["llama-server"] = (f"http://127.0.0.1:{lport}",
                                     [args.llama_server, "-m", model, "--jinja", "-t", str(args.threads), "-c", "4096",
                                      "--port", str(lport), "--host", "127.0.0.1", "--no-webui", "-np", "1"])
        if args.llama_server and args.llama_template and model in args.gguf:
            tport = free_port()     # llama-server with a tool-capable template of the model's chat format
            sides["llama-server+template"] = (f"http://127.0.0.1:{tport}",
                                              [args.llama_server, "-m", model, "--jinja", "--chat-template-file",
                                               args.llama_template, "-t", str(args.threads), "-c", "4096",
                                               "--port", str(tport), "--host", "127.0.0.1", "--no-webui", "-np", "1"])
            if args.only_template:
                sides = {"llama-server+template": sides["llama-server+template"]}
        procs = {}
        try:
            for side, (url, cmd) in sides.items():
                procs[side] = start(cmd, int(url.rsplit(":", 1)[1]), logs / f"{side}-{Path(model).name}.log")
            for cat, its in items.items():
                row = {"model": Path(model).name, "backend": "onnx" if model in args.onnx else "gguf", "category": cat}
                for side, (url, _) in sides.items():
                    row[side] = run_side(url, its, args.choice, args.max_tokens)
                    print(json.dumps({**row, side: row[side]}), file=sys.stderr)
                results.append(row)
            if args.speed_rounds and model in args.gguf and "ours" in sides:
                sp = speed(sides["ours"][0], items["simple"], args.speed_rounds, args.max_tokens)
                results.append({"model": Path(model).name, "speed": sp})
                print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(60)
    doc = {"items_per_category": args.items, "tool_choice": args.choice, "threads": args.threads, "results": results}
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
