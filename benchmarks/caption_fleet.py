"""One captioning job spread over processes and servers, against one `vlm caption` process, same cores.

Per round (rounds interleaved, so load on a shared machine hits every setup alike):
  one     `vlm caption DIR` with --threads CORES
  one1    `vlm caption DIR` with --threads CORES/2 (on busy cores llama.cpp's threads wait on each other:
          fewer threads can be the faster single process; the best of one, one1 is "best local")
  shards  two `vlm caption --shard K/2` side by side (--threads CORES/2 each), then `--merge`: wall time of
          both plus the merge; the merged records must equal one's (greedy: answers, keys, token counts)
  server  `vlm caption --server A,B --server-slots P` against two `vlm serve --parallel P` (--threads
          CORES/2 each), started before the round (servers are long-running); images/min
  ray     (--ray) Ray Data on a local cluster: Captioner in 2 actors (threads CORES/2), map_batches;
          wall without the cluster's start, and the overhead per image beyond the actors' caption time
Then, once: the server setup with one server killed (SIGKILL) mid-job, checking that nothing was lost.

    python benchmarks/caption_fleet.py MODEL.gguf [--mmproj MMPROJ] [--images 48] [--rounds 3]
        [--detail low] [--max-tokens 16] [--cores 2] [--parallel 2] [--ray]

A model with real sizes that needs no download: benchmarks/random_smolvlm.py (SmolVLM-256M's shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def vlm_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("vlm")
    return [str(exe)] if exe.exists() else (shutil.which("vlm") and [shutil.which("vlm")]) or \
        sys.exit("vlm is not installed in this Python")


def make_images(d: Path, n: int) -> None:
    """``n`` distinct 640x480 pictures (shapes on gradients), the same on every run."""
    import random

    from PIL import Image, ImageDraw

    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    for i in range(n):
        img = Image.new("RGB", (640, 480))
        px = img.load()
        a, b = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        for y in range(0, 480, 4):
            c = tuple(int(a[k] + (b[k] - a[k]) * y / 480) for k in range(3))
            for x in range(0, 640, 4):
                for dy in range(4):
                    for dx in range(4):
                        px[x + dx, y + dy] = c
        dr = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.randrange(600), rng.randrange(440)
            box = (x0, y0, x0 + rng.randrange(20, 200), y0 + rng.randrange(20, 200))
            fill = tuple(rng.randrange(256) for _ in range(3))
            (dr.ellipse if rng.random() < 0.5 else dr.rectangle)(box, fill=fill)
        img.save(d / f"{i:03d}.jpg", quality=90)


_HOME: list[Path] = []


def fresh_home(path: Path) -> Path:
    """Each setup of each round gets an empty VLM_HOME: the image-embedding cache (keyed by pixels) would
    otherwise let every setup after the first skip the image encodes."""
    path.mkdir(parents=True, exist_ok=True)
    _HOME[:] = [path]
    return path


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("VLM_DEBUG", "VLM_API_KEY")}
    e["NO_COLOR"] = "1"
    if _HOME:
        e["VLM_HOME"] = str(_HOME[0])
    return e


def run(cmd: list[str], ok=(0,)) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode not in ok:
        sys.exit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def side_by_side(cmds: list[list[str]]) -> float:
    t = time.perf_counter()
    ps = [subprocess.Popen(c, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True) for c in cmds]
    errs = [p.communicate()[1] for p in ps]
    for p, c, e in zip(ps, cmds, errs):
        if p.returncode != 0:
            sys.exit(f"{' '.join(c)} exited {p.returncode}:\n{e[-2000:]}")
    return time.perf_counter() - t


def lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def comparable(recs: list[dict]) -> list[dict]:
    out = []
    for r in recs:
        c = {k: r.get(k) for k in ("path", "sha256", "key", "answer", "error")}
        c["tokens"] = (r.get("usage") or {}).get("completion_tokens")
        out.append(c)
    return sorted(out, key=lambda c: c["path"])


class Server:
    def __init__(self, model: str, mmproj: str | None, threads: int, parallel: int, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb")
        args = [model]               # vlm serve finds the projector beside the model (mmproj-<model file>)
        self.proc = subprocess.Popen(vlm_cmd() + ["serve", *args, "--port", str(self.port), "--threads", str(threads),
                                                  "--parallel", str(parallel)], env=env(), stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"vlm serve exited {self.proc.returncode}: see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"vlm serve did not come up: see {log}")
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def ray_round(paths: list[str], model: str, mmproj: str | None, a, threads: int) -> tuple[float, float, list[dict]]:
    """(wall of the dataset run, overhead per image, records) with a fresh local cluster of ``a.cores`` CPUs."""
    import ray

    from edgevlm.runtime.captioner import Captioner

    import logging

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.init(logging_level=logging.WARNING, num_cpus=a.cores, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
             runtime_env={"env_vars": {"VLM_HOME": env()["VLM_HOME"], "NO_COLOR": "1"}})
    try:
        ds = ray.data.from_items([{"path": p} for p in paths])
        kw = {"model": model, "mmproj": mmproj, "max_tokens": a.max_tokens, "threads": threads, "detail": a.detail}
        out = ds.map_batches(Captioner, batch_size=4, compute=ray.data.ActorPoolStrategy(size=2),
                             num_cpus=max(1, a.cores // 2), fn_constructor_kwargs=kw)
        t = time.perf_counter()
        recs = [json.loads(r["record"]) for r in out.iter_rows()]
        wall = time.perf_counter() - t
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    busy = sum((r.get("timings") or {}).get("total_s") or 0 for r in recs) / 2      # two actors' caption time
    return wall, (wall - busy) / max(1, len(recs)), recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--mmproj")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--detail", default="low")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=2, help="--parallel of each vlm serve")
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--work", type=Path, help="keep the images and outputs here (default: a temp folder)")
    a = ap.parse_args()

    work = a.work or Path(tempfile.mkdtemp(prefix="caption-fleet-"))
    pics = work / "pics"
    if not pics.exists():
        make_images(pics, a.images)
    half = max(1, a.cores // 2)
    model = ["-m", a.model] + (["--mmproj", a.mmproj] if a.mmproj else [])
    common = ["-t", "0", "-n", str(a.max_tokens), "--detail", a.detail, "--quiet"]
    vlm = vlm_cmd()
    name = Path(a.model).name
    print(f"{a.images} images, model {name}, --detail {a.detail}, -n {a.max_tokens}, {a.cores} cores "
          f"(machine: {os.cpu_count()}), GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}; "
          f"load {os.getloadavg()[0]:.2f} at start", flush=True)
    fresh_home(work / "home-warm")
    first = str(sorted(pics.iterdir())[0])
    run(vlm + ["caption", first, "--out", str(work / "warm.jsonl"), *model, *common])    # model file in the page cache

    def start_servers(tag: str) -> list[Server]:
        fresh_home(work / f"home-{tag}-server")
        return [Server(a.model, a.mmproj, half, a.parallel, work / f"serve-{tag}-{k}.log") for k in range(2)]

    servers: list[Server] = []
    res: dict[str, list[float]] = {"one": [], "one1": [], "shards": [], "server": [], "ray": [], "ray_overhead": []}
    reference = None
    try:
        for rnd in range(a.rounds):
            out = work / f"r{rnd}"
            out.mkdir(exist_ok=True)
            order = ["one", "one1", "shards", "server"] + (["ray"] if a.ray else [])
            order = order[rnd % len(order):] + order[:rnd % len(order)]      # interleaved, rotated
            servers = start_servers(f"r{rnd}")      # before the round, untimed: servers are long-running
            urls = ",".join(s.url for s in servers)
            for what in order:
                if what != "server":
                    fresh_home(work / f"home-r{rnd}-{what}")
                if what == "one":
                    res["one"].append(run(vlm + ["caption", str(pics), "--out", str(out / "one.jsonl"), *model,
                                                 "--threads", str(a.cores), *common]))
                    recs = comparable(lines(out / "one.jsonl"))
                    reference = reference or recs
                elif what == "one1":
                    res["one1"].append(run(vlm + ["caption", str(pics), "--out", str(out / "one1.jsonl"), *model,
                                                  "--threads", str(half), *common]))
                    recs = comparable(lines(out / "one1.jsonl"))
                elif what == "shards":
                    parts = [out / f"part{k}.jsonl" for k in range(2)]
                    t = side_by_side([vlm + ["caption", str(pics), "--out", str(parts[k]), "--shard", f"{k}/2",
                                             *model, "--threads", str(half), *common] for k in range(2)])
                    t += run(vlm + ["caption", "--merge", str(out / "merged.jsonl"), *map(str, parts),
                                    "--inputs", str(pics), "--quiet"])
                    res["shards"].append(t)
                    recs = comparable(lines(out / "merged.jsonl"))
                    print(f"        shards split {'/'.join(str(len(lines(p))) for p in parts)} by content hash",
                          flush=True)
                elif what == "server":
                    res["server"].append(run(vlm + ["caption", str(pics), "--out", str(out / "server.jsonl"),
                                                    "--server", urls, "--server-slots", str(a.parallel), "-m", name,
                                                    *common]))
                    recs = comparable(lines(out / "server.jsonl"))
                else:
                    wall, over, raw = ray_round(sorted(str(p) for p in pics.iterdir()), a.model, a.mmproj, a, half)
                    res["ray"].append(wall)
                    res["ray_overhead"].append(over)
                    recs = comparable(raw)
                n_ok = sum(1 for r in recs if not r["error"])
                same = reference is None or [r["path"] for r in recs] == [r["path"] for r in reference]
                ans = "" if reference is None else \
                    f", answers equal to one's: {sum(x['answer'] == y['answer'] for x, y in zip(recs, reference))}/{len(recs)}"
                print(f"round {rnd + 1} {what:<7} {res[what][-1]:7.2f} s  {n_ok} records, each input once: {same}{ans}"
                      f"  (load {os.getloadavg()[0]:.2f})", flush=True)
            for srv in servers:
                srv.stop()

        # one server killed mid-job: nothing lost
        servers = start_servers("kill")
        urls = ",".join(s.url for s in servers)
        kill_out = work / "killed.jsonl"
        p = subprocess.Popen(vlm + ["caption", str(pics), "--out", str(kill_out), "--server", urls, "--server-slots",
                                    str(a.parallel), "-m", name, *common], env=env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not kill_out.exists() or kill_out.read_text().count("\n") < a.images // 4:
            if p.poll() is not None:
                break
            time.sleep(0.05)
        servers[0].stop(signal.SIGKILL)
        err = p.communicate()[1]
        recs = lines(kill_out)
        lost = len({str(x) for x in pics.iterdir()} - {r["path"] for r in recs if "error" not in r})
        print(f"server killed mid-job: exit {p.returncode}, {len(recs)} records, {lost} images lost, "
              f"{len(recs) - len({r['path'] for r in recs})} duplicates" + ("" if p.returncode == 0 else f"\n{err[-500:]}"))
    finally:
        for s in servers:
            s.stop()

    med = {k: statistics.median(v) for k, v in res.items() if v}
    print(f"\nmedians of {a.rounds} interleaved rounds ({a.images} images; load {os.getloadavg()[0]:.2f} at the end):")
    best_local = min(med["one"], med["one1"], med["shards"])
    best_one = min(med["one"], med["one1"])
    for k in ("one", "one1", "shards", "server", "ray"):
        if k in med:
            per_min = a.images / med[k] * 60
            print(f"  {k:<7} {med[k]:7.2f} s  {per_min:7.1f} images/min  wall vs best one process "
                  f"{med[k] / best_one:.2f}x  "
                  f"images/min vs best local {best_local / med[k]:.2f}x")
    if "ray_overhead" in med:
        print(f"  ray overhead beyond the actors' caption time: {med['ray_overhead'] * 1000:.0f} ms per image")
    paired = [s / min(o, o1) for s, o, o1 in zip(res["shards"], res["one"], res["one1"])]
    print(f"  shards / best one process, per round: {', '.join(f'{x:.2f}' for x in paired)}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
