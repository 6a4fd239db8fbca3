"""`vlm serve` side by side with what it wraps, in one run, interleaved rounds, medians and ratios.

1. ttft: time to the first answer token through HTTP (streaming, the `openai` SDK's wire format, a
   keep-alive connection) vs `generate(backend, request)` called in-process on the very same loaded
   backend. Both start from an empty KV cache each round, with prompts of one length. Also, per HTTP
   request, client-side TTFT minus the server's own generate() TTFT (its `timings.ttft_ms`): the
   HTTP + queue + thread hand-off cost alone, paired within one request (robust on a busy machine).
2. image: a chat about one image (a vision GGUF + mmproj): TTFT of the second turn (the conversation so
   far plus one new question; the image is neither decoded into tiles nor encoded again) vs the first;
   and of a third turn after another conversation took the slot (its KV cache comes back from
   --prompt-cache; `--prompt-cache 0` to see it without).
3. decode: 1 client, tokens/s of a streamed answer as the HTTP client sees it (first to last token)
   vs generate() in-process on the same backend.
4. throughput (only with --llama-server PATH): aggregate decode tok/s of N streaming clients (--requests
   of --gen-tokens, greedy) against `vlm serve --parallel N` and llama.cpp's llama-server `-np N`, both as
   processes of their own, on the same model and threads, rounds interleaved.

    python benchmarks/serve_bench.py MODEL.gguf [--vision VISION.gguf (its mmproj beside it)]
        [--llama-server build/bin/llama-server] [--rounds 9] [--threads 2]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: list[str], threads: int, ctx: int, parallel: int = 1, prompt_cache: Optional[int] = None):
    """Our app in this process (uvicorn on a thread), so the in-process side can use its backend."""
    import uvicorn

    from edgevlm.runtime.serving.app import create_app
    from edgevlm.runtime.serving.pool import ModelPool
    from edgevlm.runtime.serving.settings import ServeSettings

    settings = ServeSettings(models=models, threads=threads, ctx=ctx, port=free_port(), max_tokens=4096, queue_size=64,
                             parallel=parallel)
    if prompt_cache is not None:
        settings.prompt_cache_bytes = prompt_cache
    pool = ModelPool(settings)
    pool.prepare()
    app = create_app(settings, pool)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{settings.port}"
    _wait_health(url)
    return url, pool, server, th


def sse_ttft(client, url: str, body: dict) -> tuple[float, dict]:
    """Seconds from sending the request to the first content delta, and the final chunk's timings."""
    t0 = time.perf_counter()
    first, final = None, {}
    with client.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            ch = doc["choices"][0] if doc.get("choices") else {}
            if first is None and ch.get("delta", {}).get("content"):
                first = time.perf_counter() - t0
            if ch.get("finish_reason"):
                final = doc.get("timings", {})
    return (first if first is not None else time.perf_counter() - t0), final


def inproc_ttft(backend, messages: list[dict], max_tokens: int) -> float:
    from edgevlm.runtime.generation.core import generate
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    req = ChatRequest([Message(m["role"], m["content"]) for m in messages],
                      GenerationOptions(max_tokens=max_tokens, temperature=0))
    t0 = time.perf_counter()
    gen = generate(backend, req)
    try:
        for chunk in gen:
            if chunk.text or chunk.finish_reason:
                return time.perf_counter() - t0
    finally:
        gen.close()
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_ttft(model: str, args) -> dict:
    import httpx

    url, pool, server, th = start_server([model], args.threads, args.ctx)
    entry = pool.loaded()[0]
    backend, mid = entry.backend, entry.id
    topics = ["rivers", "volcanoes", "glaciers", "deserts", "forests", "oceans", "islands", "canyons", "meadows",
              "tundras", "reefs", "marshes"]
    http_s, local_s, engine_s = [], [], []
    with httpx.Client(timeout=120) as client:
        sse_ttft(client, url, {"model": mid, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2})
        for i in range(args.rounds):
            msgs = [{"role": "user", "content": f"Write two sentences about {topics[i % len(topics)]}."}]
            order = ("http", "local") if i % 2 == 0 else ("local", "http")
            for side in order:
                backend.reset()                  # server idle between requests: same empty cache for both
                if side == "http":
                    t, tim = sse_ttft(client, url, {"model": mid, "messages": msgs, "max_tokens": 2, "temperature": 0})
                    http_s.append(t)
                    engine_s.append(t - tim["ttft_ms"] / 1000)   # this request's own generate() TTFT taken out
                else:
                    local_s.append(inproc_ttft(backend, msgs, 2))
    server.should_exit = True
    th.join(30)
    h, loc = med(http_s), med(local_s)
    return {"model": mid, "rounds": args.rounds, "http_ttft_ms": round(h * 1000, 2), "inproc_ttft_ms": round(loc * 1000, 2),
            "overhead_ms": round((h - loc) * 1000, 2), "ratio": round(h / loc, 3),
            "http_minus_engine_ttft_ms": round(med(engine_s) * 1000, 2)}


def image_uri(seed: int, size=(640, 480)) -> str:
    from PIL import Image

    # random bytes: a new image for every turn 1 (no KV cache or image-embedding cache has seen it)
    img = Image.frombytes("RGB", (size[0] // 8, size[1] // 8), os.urandom(size[0] * size[1] * 3 // 64)).resize(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def bench_image(vision: str, args) -> dict:
    import httpx

    url, pool, server, th = start_server([vision], args.threads, args.ctx, prompt_cache=args.prompt_cache)
    mid = pool.loaded()[0].id
    first, second, enc1, enc2, third = [], [], [], [], []
    with httpx.Client(timeout=300) as client:
        for i in range(args.rounds + 1):
            img = image_uri(i)                     # a new image every round: the first turn encodes it
            turn1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                  {"type": "text", "text": "What is in this picture?"}]}]
            t1, tim1 = sse_ttft(client, url, {"model": mid, "messages": turn1, "max_tokens": 8, "temperature": 0})
            turn2 = turn1 + [{"role": "assistant", "content": "A picture."},
                             {"role": "user", "content": "What colour is it mostly?"}]
            t2, tim2 = sse_ttft(client, url, {"model": mid, "messages": turn2, "max_tokens": 8, "temperature": 0})
            # another conversation takes the slot; then the photo conversation goes on (--prompt-cache)
            sse_ttft(client, url, {"model": mid, "max_tokens": 8, "temperature": 0,
                                   "messages": [{"role": "user", "content": f"Name {i + 2} colours."}]})
            turn3 = turn2 + [{"role": "assistant", "content": "Grey."}, {"role": "user", "content": "Anything else?"}]
            t3, _ = sse_ttft(client, url, {"model": mid, "messages": turn3, "max_tokens": 8, "temperature": 0})
            if i == 0:
                continue                           # warm-up
            first.append(t1)
            second.append(t2)
            third.append(t3)
            enc1.append(tim1.get("image_encode_ms", 0))
            enc2.append(tim2.get("image_encode_ms", 0))
    server.should_exit = True
    th.join(30)
    return {"model": mid, "rounds": args.rounds, "turn1_ttft_ms": round(med(first) * 1000, 2),
            "turn2_ttft_ms": round(med(second) * 1000, 2), "ratio": round(med(second) / med(first), 3),
            "turn3_after_other_conversation_ttft_ms": round(med(third) * 1000, 2),
            "turn3_ratio": round(med(third) / med(first), 3), "prompt_cache_bytes": pool.settings.prompt_cache_bytes,
            "turn1_image_encode_ms": round(med(enc1), 2), "turn2_image_encode_ms": round(med(enc2), 2)}


def _stream_tokens(url: str, model: str, n: int, key: int) -> int:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    toks = 0
    for c in client.chat.completions.create(model=model, stream=True, max_tokens=n, temperature=0, seed=key,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": f"Story {key}: write a long tale "
                                                       "about a lighthouse keeper and the sea."}]):
        if c.usage is not None:
            toks = c.usage.completion_tokens
    return toks


def load_run(url: str, model: str, clients: int, n: int, requests: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        toks = sum(ex.map(lambda k: _stream_tokens(url, model, n, k), range(requests)))
    return toks / (time.perf_counter() - t0)


def bench_decode(model: str, args) -> dict:
    """1 client: tokens per second of a streamed answer seen by the HTTP client (first to last token) vs
    generate() in-process on the same backend, greedy, same prompt, rounds interleaved."""
    import httpx

    from edgevlm.runtime.generation.core import generate
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    url, pool, server, th = start_server([model], args.threads, args.ctx)
    entry = pool.loaded()[0]
    backend, mid = entry.backend, entry.id
    prompt = "Write a long tale about a lighthouse keeper and the sea."
    http_tps, local_tps = [], []
    with httpx.Client(timeout=600) as client:
        for i in range(args.tp_rounds):
            for side in (("http", "local") if i % 2 == 0 else ("local", "http")):
                backend.reset()
                if side == "http":
                    t_first = t_last = None
                    n = 0
                    body = {"model": mid, "messages": [{"role": "user", "content": prompt}], "stream": True,
                            "max_tokens": args.gen_tokens, "temperature": 0}
                    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: {") and '"content":"' in line and '"role"' not in line:
                                t_last = time.perf_counter()
                                t_first = t_first or t_last
                            if '"finish_reason":"' in line:
                                n = json.loads(line[6:])["timings"]["predicted_n"]
                    http_tps.append((n - 1) / (t_last - t_first))
                else:
                    req = ChatRequest([Message("user", prompt)], GenerationOptions(max_tokens=args.gen_tokens, temperature=0))
                    last = None
                    for last in generate(backend, req):
                        pass
                    local_tps.append((last.completion_tokens - 1) / last.decode_s)
    server.should_exit = True
    th.join(30)
    return {"model": mid, "rounds": args.tp_rounds, "gen_tokens": args.gen_tokens,
            "http_client_tok_s": round(med(http_tps), 1), "inproc_tok_s": round(med(local_tps), 1),
            "ratio": round(med(http_tps) / med(local_tps), 3)}


def _wait_health(url: str, proc=None) -> None:
    import httpx

    while True:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"{proc.args[0]} exited {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def bench_throughput(model: str, args) -> dict:
    """Both servers as processes of their own (the load generator runs here: in one process with our
    server its SDK parsing would hold the GIL our decode loop needs), N slots for N clients: ours
    `vlm serve --parallel N`, llama-server `-np N -c ctx*N` (so each slot has the same context)."""
    out = {"model": Path(model).name, "threads": args.threads, "gen_tokens": args.gen_tokens,
           "requests": args.requests, "clients": {}}
    exe = str(Path(sys.executable).with_name("vlm"))
    for clients in (1, 4):
        port, lport = free_port(), free_port()
        ours_p = subprocess.Popen([exe, "serve", model, "--port", str(port), "--threads", str(args.threads),
                                   "--ctx", str(args.ctx), "--parallel", str(clients), "--queue", "64",
                                   "--max-tokens", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs_p = subprocess.Popen([args.llama_server, "-m", model, "-t", str(args.threads), "-c", str(args.ctx * clients),
                                     "-np", str(clients), "--port", str(lport), "--host", "127.0.0.1", "--no-webui"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url, lurl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{lport}"
        try:
            _wait_health(url, ours_p)
            _wait_health(lurl, theirs_p)
            ours, theirs = [], []
            for i in range(args.tp_rounds):
                for side in (("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")):
                    if side == "ours":
                        ours.append(load_run(url, Path(model).name, clients, args.gen_tokens, args.requests))
                    else:
                        theirs.append(load_run(lurl, "x", clients, args.gen_tokens, args.requests))
                    print(json.dumps({"clients": clients, "round": i,
                                      side: round((ours if side == "ours" else theirs)[-1], 2)}), file=sys.stderr)
        finally:
            for p in (ours_p, theirs_p):
                p.terminate()
                p.wait(60)
        out["clients"][clients] = {"ours_tok_s": round(med(ours), 1), "llama_server_tok_s": round(med(theirs), 1),
                                   "ratio": round(med(ours) / med(theirs), 3)}
        print(json.dumps({clients: out["clients"][clients]}), file=sys.stderr)
    for side in ("ours_tok_s", "llama_server_tok_s"):
        one, four = out["clients"][1][side], out["clients"][4][side]
        out[f"scaling_{side[:-6]}"] = round(four / one, 3) if one else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a text GGUF (e.g. SmolLM2-135M Q4_1); with --only image, the vision GGUF")
    ap.add_argument("--vision", help="a vision GGUF with its mmproj beside it")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server, built from the same sources")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tp-rounds", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8, help="throughput: requests per load run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--only", choices=["ttft", "decode", "image", "throughput"], help="run one part")
    ap.add_argument("--prompt-cache", help="image part: vlm serve's --prompt-cache (e.g. 0 to compare without it)")
    args = ap.parse_args()
    if args.prompt_cache is not None:
        from edgevlm.runtime.device.hardware import parse_size

        args.prompt_cache = parse_size(args.prompt_cache)
    report: dict = {}
    for part, fn in (("ttft", bench_ttft), ("decode", bench_decode)):
        if args.only in (None, part):
            report[part] = fn(str(Path(args.model).resolve()), args)
            print(json.dumps(report[part]), file=sys.stderr)
    if args.only == "image" and not args.vision:
        args.vision = args.model
    if args.vision and args.only in (None, "image"):
        report["image"] = bench_image(str(Path(args.vision).resolve()), args)
        print(json.dumps(report["image"]), file=sys.stderr)
    if args.llama_server and args.only in (None, "throughput"):
        report["throughput"] = bench_throughput(str(Path(args.model).resolve()), args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
