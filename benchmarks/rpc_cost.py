"""What spreading a model over `vlm worker` processes costs: load time, prefill and decode tokens/s, and
bytes sent per token, local vs one and two loopback workers, in one run.

    python benchmarks/rpc_cost.py MODEL.gguf [MODEL2.gguf ...] [--rounds 3] [--prompt 128] [--gen 64]

Workers run on this same machine (loopback), so this measures the RPC path's cost, not a speed-up:
every process shares the same cores. Bytes: what crossed the workers' connections (received + sent, from `ss`'s per-socket
counters) during the load and during the generation, per token evaluated.
Rounds alternate the configurations; medians are reported, and ratios against local in the same run.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

VLM = str(Path(sys.executable).with_name("vlm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen([VLM, "worker", "--port", str(port), "--threads", str(threads)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return p, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise SystemExit("worker did not start")


def socket_bytes(ports: list[int]) -> int:
    """Bytes received by the workers' listening ports' connections so far (ss's per-socket counters):
    what the main host sent them. Connections that closed are not counted, so read it while loaded."""
    import re

    total = 0
    for port in ports:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True).stdout
        total += sum(int(x) for x in re.findall(r"bytes_received:(\d+)", out))
        total += sum(int(x) for x in re.findall(r"bytes_acked:(\d+)", out))
    return total


def run(model: Path, endpoints: list[str], prompt_tokens: int, gen: int, threads: int, moved) -> dict:
    from edgevlm.runtime.generation.core import complete
    from edgevlm.runtime.loader import artifact_from_path, load_backend, plan_cluster, resolve
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, LoadOptions, Message

    opts = LoadOptions(n_ctx=prompt_tokens + gen + 64, n_threads=threads)
    if endpoints:
        plan = plan_cluster(resolve(str(model), want_vision=False), opts.n_ctx, endpoints,
                            [1.0] * (len(endpoints) + 1))
        opts.rpc, opts.host_layers, opts.worker_shares = endpoints, plan.host_layers, plan.worker_shares
    m0 = moved()
    t0 = time.perf_counter()
    b = load_backend(artifact_from_path(model, None, False), opts)
    load_s = time.perf_counter() - t0
    load_bytes = moved() - m0
    try:
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
        toks = b.tokenize(" ".join(words[i % len(words)] for i in range(prompt_tokens * 2)), add_special=False)
        text = b.detokenize(toks[: prompt_tokens - 1])
        req = ChatRequest([Message("user", text)], GenerationOptions(raw=True, temperature=0, max_tokens=gen))
        complete(b, ChatRequest([Message("user", "warm up")], GenerationOptions(raw=True, temperature=0, max_tokens=4)))
        b.reset()
        m1 = moved()
        _, last = complete(b, req)
        gen_bytes = moved() - m1
        return {"load_s": load_s, "load_bytes": load_bytes,

                "prefill_tps": last.prompt_eval_tokens / last.prefill_s if last.prefill_s else None,
                "decode_tps": (last.completion_tokens - 1) / last.decode_s if last.decode_s else None,
                "bytes_per_token": gen_bytes / max(1, last.prompt_eval_tokens + last.completion_tokens)}
    finally:
        b.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads of the main host and of each worker")
    args = ap.parse_args()
    workers = [start_worker(args.threads) for _ in range(2)]
    try:
        for model in args.models:
            configs = {"local": [], "1 worker": [workers[0][1]], "2 workers": [w[1] for w in workers]}
            res: dict[str, list[dict]] = {k: [] for k in configs}
            for _ in range(args.rounds):
                for name, eps in configs.items():
                    ports = [int(ep.rsplit(":", 1)[1]) for ep in eps]
                    r = run(model, eps, args.prompt, args.gen, args.threads, lambda: socket_bytes(ports))
                    res[name].append(r)
            print(f"\n{model.name}: prompt {args.prompt}, {args.gen} generated, {args.threads} thread(s) per "
                  f"process, medians of {args.rounds} alternating rounds (loopback, shared cores)\n")
            print("| config | load s | sent at load | prefill tok/s | decode tok/s | decode vs local | bytes per token |")
            print("|---|---|---|---|---|---|---|")
            base = statistics.median(r["decode_tps"] for r in res["local"])
            for name, rs in res.items():
                med = {k: statistics.median(r[k] for r in rs)
                       for k in ("load_s", "load_bytes", "prefill_tps", "decode_tps", "bytes_per_token")}
                print(f"| {name} | {med['load_s']:.2f} | {med['load_bytes'] / 2**20:.0f} MiB | {med['prefill_tps']:.0f} | "
                      f"{med['decode_tps']:.1f} | {med['decode_tps'] / base:.2f}x | {med['bytes_per_token'] / 1024:.1f} KiB |")
    finally:
        for p, _ in workers:
            p.terminate()
            p.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
