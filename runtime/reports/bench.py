"""`vlm bench`: what a device really does with a model -- load, TTFT, prefill, decode, image encode, peak RSS.

Each model is measured in its own child process so that its peak RSS is its own, not the sum of
everything measured before it. The child runs ``python -m edgevlm.runtime.reports.bench`` and prints one
JSON object; the parent collects them into a report (REPORT_SCHEMA).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ..errors import BackendError, EdgeVLMError

_STAT = {"type": "object", "required": ["mean", "stdev", "min", "max"],
         "properties": {k: {"type": ["number", "null"]} for k in ("mean", "stdev", "min", "max")}}
RESULT_SCHEMA = {
    "type": "object",
    "required": ["model", "format", "threads", "n_ctx", "prompt_tokens", "gen_tokens", "repeat", "load_s",
                 "ttft_s", "prefill_tps", "decode_tps", "peak_rss_bytes", "weights_bytes"],
    "properties": {
        "model": {"type": "string"}, "path": {"type": "string"}, "format": {"type": "string"},
        "threads": {"type": "integer"}, "n_ctx": {"type": "integer"},
        "prompt_tokens": {"type": "integer"}, "gen_tokens": {"type": "integer"}, "repeat": {"type": "integer"},
        "load_s": {"type": "number"}, "ttft_s": _STAT, "prefill_tps": _STAT, "decode_tps": _STAT,
        "image": {"type": ["object", "null"]},
        "peak_rss_bytes": {"type": "integer"}, "weights_bytes": {"type": "integer"},
        "kv_cache_bytes": {"type": ["integer", "null"]}, "estimate_bytes": {"type": ["integer", "null"]},
        "gpu_layers": {"type": ["integer", "null"]}, "gpu_offload": {"type": ["string", "null"]},
        "kv_type": {"type": "string"}, "kv_quality": {"type": ["object", "null"]},
    },
}
REPORT_SCHEMA = {
    "type": "object", "required": ["device", "results"],
    "properties": {"device": {"type": "object"}, "results": {"type": "array", "items": RESULT_SCHEMA}},
}


def _stat(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "stdev": None, "min": None, "max": None}
    return {"mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    On Linux this is ``VmHWM`` from /proc: ``ru_maxrss`` survives ``execve`` and so starts at the size of
    whatever process forked us (a test runner with torch loaded made a 170 MB run read 530 MB)."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _prompt_of(backend, n_tokens: int) -> str:
    """A plain-text prompt of exactly n_tokens tokens (BOS included) for this model's tokenizer."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    text = " ".join(words[i % len(words)] for i in range(n_tokens * 2))
    toks = backend.tokenize(text, add_special=False, parse_special=False)[: max(1, n_tokens - 1)]
    return backend.detokenize(toks)


# Scored with a quantized KV cache and with an f16 one (--kv-type): a paragraph written for this purpose,
# not the quantize report's (runtime does not import quantize), of a few hundred tokens.
KV_HELD_OUT_TEXT = (
    "The ferry from the mainland leaves at seven in the morning and again at four in the afternoon, except "
    "on Sundays, when only the afternoon boat runs. The crossing takes fifty minutes in calm weather. Most "
    "passengers are islanders returning with groceries, a few are teachers who work at the small school near "
    "the harbour, and in summer there are hikers with maps folded into plastic sleeves. The island has one "
    "road, eleven kilometres long, which climbs from the harbour past the church and the old mill to the "
    "lighthouse at the western point. A bakery opens at six and usually sells out of rye bread before noon. "
    "The post office shares a room with the library, and both close for an hour at lunch. In 1962 the "
    "islanders voted against building a bridge, arguing that the ferry kept the place quiet and that a "
    "bridge would bring cars they had no room for. The vote was close: two hundred and twelve against, one "
    "hundred and ninety-eight in favour. Every few years the question comes back, usually after a winter in "
    "which storms cancelled the ferry for several days in a row, and every time the answer has been the "
    "same. Visitors who stay the night find two guest houses and a campsite behind the dunes, where the "
    "wind rarely stops and the stars are bright enough to read by when the moon is down."
)


def kv_agreement(ref, other) -> dict:
    """Top-1 agreement and mean / max KL(ref || other) in nats between two logits arrays [n, n_vocab], as the
    quantize report compares an artifact with its source."""
    import numpy as np

    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return {"positions": int(len(a)), "top1_agreement": round(float((la.argmax(-1) == lb.argmax(-1)).mean()), 4),
            "kl_mean": round(float(kl.mean()), 6), "kl_max": round(float(kl.max()), 5)}


def kv_quality(b, artifact, opts, n_tokens: int = 256) -> dict:
    """What ``b``'s KV cache type changes in the next-token distributions over ``KV_HELD_OUT_TEXT``: scored
    token by token as an answer is generated (every step reads the cache), against the same model loaded
    with an f16 KV cache."""
    from dataclasses import replace

    from ..loader import load_backend

    ids = b.tokenize(KV_HELD_OUT_TEXT, add_special=True)[:min(n_tokens, b.n_ctx - 1)]
    got = b.score(ids, batched=False)
    ref_backend = load_backend(artifact, replace(opts, kv_type="f16"))
    try:
        ref = ref_backend.score(ids, batched=False)
    finally:
        ref_backend.close()
    return kv_agreement(ref, got)


def guard_latency(ref: str, answer: str, *, repeat: int, threads: Optional[int], question_tokens: int = 50) -> dict:
    """``--guard``: what Llama Guard adds to an answer, loaded beside the model being measured: an input check
    of a ``question_tokens`` question with the whole prompt evaluated (a process's first check), one with
    the preamble kept from the previous check (chat, caption, a server), and the output check of ``answer``."""
    from ..generation.guard import Guard
    from ..loader import load_backend, resolve
    from ..protocol import LoadOptions, Message

    res = resolve(ref, want_vision=False)
    if res.artifact is None:
        raise EdgeVLMError(f"{res.alias_ref} is not installed.", hint=f"Run `vlm pull {res.alias_ref}` first.")
    gb = load_backend(res.artifact, LoadOptions(n_ctx=2048, n_threads=threads))
    try:
        g = Guard(gb, name=res.alias_ref)
        q = _prompt_of(gb, question_tokens + 1)
        g.check_input([Message("user", q)])              # warm-up
        full, reused, out = [], [], []
        for i in range(repeat):
            gb.reset()
            # questions that differ from their first token: a check shares only the preamble with the last
            full.append(g.check_input([Message("user", f"{2 * i}. {q}")]).seconds)
            reused.append(g.check_input([Message("user", f"{2 * i + 1}. {q}")]).seconds)
            out.append(g.check_output([Message("user", f"{2 * i + 1}. {q}")], answer).seconds)
        return {"model": res.alias_ref, "question_tokens": question_tokens, "input_full_s": _stat(full),
                "input_s": _stat(reused), "output_s": _stat(out),
                "added_s": _stat([a + b for a, b in zip(reused, out)])}
    finally:
        gb.close()


def measure(model: str, *, image: Optional[str] = None, prompt_tokens: int = 256, gen_tokens: int = 128,
            repeat: int = 3, threads: Optional[int] = None, n_ctx: Optional[int] = None,
            rpc: Optional[list[str]] = None, tensor_split: Optional[list[float]] = None,
            guard: Optional[str] = None, detail: Optional[list[str]] = None,
            gpu_layers: Optional[int] = None, kv_type: str = "f16", draft: str = "off") -> dict:
    """Measure one model in this process (called in the child). With an image, ``detail`` lists the image
    detail levels to measure (default: auto); the first one is also the image of the TTFT rows. The
    embedding cache is off: every repeat encodes. A ``kv_type`` other than f16 also measures its quality
    against an f16 KV cache (``kv_quality``). ``draft``: --draft for the timed answers (off by default: the
    decode figure is the engine's own step; with drafting the drafted tokens checked and accepted are
    counted)."""
    from ..loader import estimate_memory, load_backend, resolve
    from ..inputs.media import load_image
    from ..generation.core import complete
    from ..protocol import ChatRequest, GenerationOptions, ImageDetail, LoadOptions, Message

    img = load_image(image) if image else None
    resolved = resolve(model, want_vision=img is not None)
    if resolved.artifact is None:
        raise EdgeVLMError(f"{resolved.alias_ref} is not installed.", hint=f"Run `vlm pull {resolved.alias_ref}` first.")
    ctx = n_ctx or max(512, prompt_tokens + gen_tokens + 2048 * (img is not None) + 64)
    t0 = time.perf_counter()
    opts = LoadOptions(n_ctx=ctx, n_threads=threads, kv_type=kv_type)
    gpu = None
    if rpc:                                  # spread over `vlm worker`s: what that costs per token
        from ..loader import plan_cluster

        plan = plan_cluster(resolved, ctx, rpc, tensor_split)
        opts.rpc, opts.host_layers, opts.worker_shares = rpc, plan.host_layers, plan.worker_shares
    else:                                    # --gpu-layers N|auto (None): 0 on a CPU-only llama.cpp build
        from .gpu import plan as gpu_plan

        gpu = gpu_plan(resolved, ctx, gpu_layers)
        opts.n_gpu_layers = gpu.layers if gpu is not None else 0
    b = load_backend(resolved.artifact, opts)
    load_s = time.perf_counter() - t0
    try:
        prompt = _prompt_of(b, prompt_tokens)
        if img is not None and not b.has_vision:
            raise BackendError(f"{resolved.alias_ref} has no vision projector.", hint="Benchmark images with a vision model.")

        levels = list(detail or ["auto"])
        drafted = [0, 0]                                # drafted tokens checked, accepted

        def run(text: str, images: list, reset: bool = True, level: Optional[str] = None):
            if reset:
                b.reset()
            req = ChatRequest([Message("user", text, images)], GenerationOptions(
                raw=True, temperature=0, max_tokens=gen_tokens, draft=draft,
                image_detail=ImageDetail(level=level or levels[0], cache=False)))
            last = complete(b, req)[1]
            drafted[0] += last.draft_tokens
            drafted[1] += last.draft_accepted
            return last

        run(prompt[:200], [], True)                     # warm-up: first-touch of weights, thread pools
        ttft, pp, tg, enc, follow = [], [], [], [], []
        n_img_tokens = None
        for _ in range(repeat):
            f = run(prompt, [img] if img else [])
            ttft.append(f.ttft_s)
            text_tokens = f.prompt_eval_tokens - f.image_tokens
            text_s = f.prefill_s - f.image_encode_s
            pp.append(text_tokens / text_s if text_s > 0 else None)
            tg.append((f.completion_tokens - 1) / f.decode_s if f.decode_s > 0 and f.completion_tokens > 1 else None)
            if img is not None:
                enc.append(f.image_encode_s)
                n_img_tokens = f.image_tokens
                # a second question about the same image, same session: KV prefix reused, image not re-encoded
                f2 = run(prompt + " And what else?", [img], reset=False)
                follow.append(f2.ttft_s)
        per_level = {}
        if img is not None:
            for level in levels:
                rows = [run(prompt, [img], level=level) for _ in range(repeat)] if level != levels[0] else None
                if rows is None:
                    rows_ttft, rows_enc = ttft, enc
                else:
                    rows_ttft, rows_enc = [f.ttft_s for f in rows], [f.image_encode_s for f in rows]
                rep = (b.image_report or {}).get("images") or [{}]
                if rows is None:
                    b.reset()
                    run(prompt, [img], level=level)
                    rep = (b.image_report or {}).get("images") or [{}]
                per_level[level] = {"tiles": rep[0].get("tiles"), "tokens": rep[0].get("tokens"),
                                    "choice": rep[0].get("reason"), "encode_ms": _stat([e * 1000 for e in rows_enc]),
                                    "ttft_s": _stat(rows_ttft)}
        guard_doc = None
        if guard:
            answer = complete(b, ChatRequest([Message("user", prompt)], GenerationOptions(
                raw=True, temperature=0, max_tokens=min(gen_tokens, 64))))[0]
            guard_doc = guard_latency(guard, answer, repeat=repeat, threads=threads)
        rss = peak_rss()               # before kv_quality loads an f16 copy beside it
        quality = kv_quality(b, resolved.artifact, opts) if kv_type != "f16" else None
        kv = b.kv_cache_bytes()        # in each backend's own KV dtype: --kv-type in llama.cpp, the past's in ONNX
        from ..backends import capabilities

        try:                           # the weights as the memory check counts them (the files that load)
            mem = estimate_memory(resolved, b.n_ctx, kv_type)
            weights, est = mem.weights, mem.total
        except EdgeVLMError:
            path = Path(resolved.artifact.path)
            weights, est = (path.stat().st_size if path.is_file() else
                            sum(p.stat().st_size for p in path.rglob("*") if p.is_file())), None
        mmproj = resolved.artifact.mmproj
        if mmproj is not None and b.has_vision and Path(mmproj).is_file():
            weights += Path(mmproj).stat().st_size       # the projector is weights in memory too
        return {
            "model": resolved.alias_ref, "path": str(resolved.artifact.path), "format": resolved.artifact.format,
            "threads": b.n_threads, "n_ctx": b.n_ctx,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeat": repeat, "load_s": load_s,
            "ttft_s": _stat(ttft), "prefill_tps": _stat(pp), "decode_tps": _stat(tg),
            "image": None if img is None else {
                "source": image, "width": img.width, "height": img.height, "tokens": n_img_tokens,
                "encode_ms": _stat([e * 1000 for e in enc]), "followup_ttft_s": _stat(follow),
                "detail": levels[0], "levels": per_level,
            },
            "draft": {"mode": draft, "checked": drafted[0], "accepted": drafted[1]},
            "peak_rss_bytes": rss, "weights_bytes": weights, "kv_type": kv_type, "kv_quality": quality, "kv_cache_bytes": kv, "estimate_bytes": est,
            "gpu_layers": opts.n_gpu_layers if capabilities(resolved.artifact.format).gpu_offload else None,
            "gpu_offload": gpu.device if gpu is not None else None,
            **({"guard": guard_doc} if guard_doc is not None else {}),
        }
    finally:
        b.close()


def run_isolated(model: str, **kw) -> dict:
    """Measure one model in a child process; its errors come back as EdgeVLMError."""
    args = [sys.executable, "-m", "edgevlm.runtime.reports.bench", model, json.dumps(kw)]
    r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BackendError(f"Benchmark of {model} failed (exit {r.returncode}): {tail}",
                           hint="Run it again with VLM_DEBUG=1 to see the child's traceback.")
    doc = json.loads(lines[-1])
    if "error" in doc:
        err = EdgeVLMError(doc["error"], hint=doc.get("hint", ""))
        err.exit_code = int(doc.get("exit_code", 1))
        raise err
    return doc


def device_summary() -> dict:
    import platform

    from ..device.hardware import cpu_info, gpu_backend, llama_system_info, memory_info

    c = cpu_info()
    return {"cpu": c.model, "arch": c.arch, "physical_cores": c.physical_cores, "logical_cores": c.logical_cores,
            "memory_total": memory_info().total, "os": f"{platform.system()} {platform.release()}",
            "board": c.board, "gpu_offload": gpu_backend(llama_system_info())}


def plot(report: dict, path: Path) -> Path:
    """A PNG with prefill and decode tok/s per model side by side (people compare quants by looking)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        from ..errors import missing_extra

        raise missing_extra("matplotlib", extra="plot") from e
    res = report["results"]
    names = [r["model"] for r in res]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(res), 4))
    for ax, key, title in ((axes[0], "prefill_tps", "prefill tok/s"), (axes[1], "decode_tps", "decode tok/s")):
        vals = [r[key]["mean"] or 0 for r in res]
        errs = [r[key]["stdev"] or 0 for r in res]
        ax.bar(names, vals, yerr=errs, color="#4C72B0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    axes[2].bar(names, [r["peak_rss_bytes"] / 2**20 for r in res], color="#DD8452")
    axes[2].set_title("peak RSS (MiB)")
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(f"{report['device']['cpu']} - {res[0]['threads']} threads")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _child(argv: list[str]) -> int:
    from ..env import debug

    model, kw = argv[0], json.loads(argv[1])
    try:
        doc = measure(model, **kw)
    except EdgeVLMError as e:
        if debug():
            import traceback

            traceback.print_exc()
        doc = {"error": e.message, "hint": e.hint, "exit_code": e.exit_code}
    print(json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
