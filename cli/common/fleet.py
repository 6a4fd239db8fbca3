"""`vlm caption` beyond one machine: this shard's inputs, captions through `vlm serve` endpoints
(--server), and the merge of the shards' files (--merge) with its report and exit code."""
from __future__ import annotations

import time
from typing import Optional

from edgevlm.runtime.errors import UsageError

from . import console

EXIT_SOME_FAILED = 12          # some inputs became error records (README: Exit codes)
EXIT_SOME_MISSING = 14         # --merge: some inputs have no record in any part (re-run their shards)


def owned(files: list[str], shard) -> list[tuple[str, Optional[str]]]:
    """(path, sha256) of the inputs this process captions. Without a shard nothing is hashed here (the
    caption loop hashes each file just before reading it as an image, while it is in the page cache)."""
    if shard is None:
        return [(p, None) for p in files]
    from edgevlm.runtime.inputs.batch import file_sha256
    from edgevlm.runtime.inputs.shards import select

    work = select(files, shard, file_sha256)
    console.info(f"[dim]Shard {shard} ({shard.source}): {len(work)} of {len(files)} inputs.[/]")
    return work


def refuse_local_options(*groups) -> None:
    """Flags that shape a model loaded here (the Loading, Images and Guarding groups, but --model, which names
    the servers' model, --yes and --detail, which the request carries) mean nothing with --server: say so
    instead of ignoring them."""
    import dataclasses

    keep = {"model", "yes", "detail"}
    bad = [f.name for g in groups for f in dataclasses.fields(g)
           if f.name not in keep and getattr(g, f.name) != f.default]
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise UsageError(f"{flags}: {'it applies' if len(bad) == 1 else 'they apply'} to a model loaded here, "
                         "not to --server.", hint="Set them on the servers (vlm serve ...), or leave them out.")


def caption_remote(server: str, files: list[str], shard, *, out: str, resume: bool, prompt: str,
                   schema: Optional[dict], model: Optional[str], detail: Optional[str], sampling,
                   slots: Optional[int], timeout: float,
                   api_key: Optional[str]) -> int:
    """Caption ``files`` (this shard's) on the servers; the same records as a local run, plus ``server``.
    ``sampling``: the command line's Sampling flags; those left at the engine's defaults beyond temperature,
    max_tokens and seed are not sent (an OpenAI-compatible server need not know top_k, min_p...)."""
    from edgevlm.runtime.errors import EdgeVLMError
    from edgevlm.runtime.generation.schema import parse_and_validate
    from edgevlm.runtime.inputs.batch import JsonlWriter, file_sha256, record_key
    from edgevlm.runtime.inputs.remote import Ask, Dispatcher, Endpoint, parse_servers, probe

    eps = [Endpoint(u, api_key=api_key) for u in parse_servers(server)]
    listed: list[str] = []
    for ep in eps:
        reported, models = probe(ep)
        ep.slots = slots or reported or 1
        listed += [m for m in models if m not in listed]
    name = model or (listed[0] if listed else None)
    if name is None:
        raise UsageError("No server answered with a model to use.",
                         hint="Check that the servers are up (curl URL/v1/models) and --api-key, or name the "
                              "model with -m.")
    console.info("[dim]" + ", ".join(f"{ep.url} ({ep.slots} at once)" for ep in eps) + f" — model {name}[/]")
    work = [(p, s or file_sha256(p)) for p, s in owned(files, shard)]
    writer = JsonlWriter(out, resume)
    ok = failed = skipped = 0
    try:
        todo = []
        for path, sha in work:
            key = record_key(sha, prompt, name, schema)
            if key in writer.done:
                skipped += 1
            else:
                todo.append((path, sha, key))
        from edgevlm.runtime.protocol import GenerationOptions

        given, engine = sampling.fields(), GenerationOptions()
        extra = {k: v for k, v in given.items()
                 if k not in ("max_tokens", "temperature", "seed") and v != getattr(engine, k)}
        ask = Ask(prompt=prompt, model=name, max_tokens=given["max_tokens"], temperature=given["temperature"],
                  seed=given["seed"], extra=extra, detail=detail, json_schema=schema, timeout=timeout)
        disp = Dispatcher(eps, ask, on_event=lambda msg: console.info(f"[dim]{msg}[/]"))
        t_start = time.perf_counter()
        with console.progress("Captioning", unit="items") as cb:
            cb("images", 0, len(todo))
            for n, (idx, res) in enumerate(disp.run([p for p, _, _ in todo]), 1):
                path, sha, key = todo[idx]
                rec: dict = {"path": path, "sha256": sha, "prompt": prompt, "model": name, "key": key}
                if shard is not None:
                    rec["shard"] = str(shard)
                if sha is None and "error" not in res:
                    res = {"error": f"Cannot read {path}."}
                if "error" not in res:
                    try:
                        rec["answer"] = (parse_and_validate(res["text"], schema, res["finish_reason"]) if schema
                                         else res["text"].strip())
                        rec.update(finish_reason=res["finish_reason"], usage=res["usage"], timings=res["timings"],
                                   server=res["server"])
                        ok += 1
                    except EdgeVLMError as e:
                        res = {"error": e.message, "hint": e.hint, "server": res["server"]}
                if "error" in res:
                    rec["error"] = res["error"]
                    if res.get("hint"):
                        rec["hint"] = res["hint"]
                    failed += 1
                writer.write(rec)
                cb("images", n, len(todo))
        elapsed = time.perf_counter() - t_start
    finally:
        writer.close()
    done = ok + failed
    per = ", ".join(f"{ep.url} {ep.answered}" for ep in eps)
    console.info(f"[dim]{ok} captioned, {failed} failed, {skipped} already done"
                 + (f" — {done / elapsed:.2f} images/s" if done and elapsed > 0 else "") + f" ({per})[/]")
    return EXIT_SOME_FAILED if failed else 0


def _some(paths: list[str], n: int = 5) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def merge_parts(out: str, parts: list[str], inputs: Optional[list[str]]) -> int:
    """--merge: write ``out`` from ``parts`` and report; the exit code says what the job still lacks."""
    from edgevlm.runtime.inputs.batch import expand_inputs, file_sha256
    from edgevlm.runtime.inputs.shards import merge

    if out == "-":
        raise UsageError("--merge writes a file, not stdout.", hint="Give the merged file a name, e.g. all.jsonl")
    if not parts:
        raise UsageError("--merge needs the part files.", hint="vlm caption --merge all.jsonl part-*.jsonl")
    expected = None
    if inputs:
        files = expand_inputs(inputs)
        expected = [(p, file_sha256(p)) for p in files]
    rep = merge(parts, out, expected)
    console.info(f"Merged {rep.parts} part{'s' if rep.parts != 1 else ''} into {out}: {rep.records} records"
                 + (f", {rep.duplicates} duplicate{'s' if rep.duplicates != 1 else ''} dropped" if rep.duplicates else "")
                 + (f", {rep.extra} of inputs not in --inputs dropped" if rep.extra else "") + ".")
    if rep.bad_lines:
        console.warn(f"{rep.bad_lines} line{'s' if rep.bad_lines != 1 else ''} did not parse (a part still being "
                     "written, or cut off); their inputs count as missing.")
    if rep.settings > 1:
        console.warn(f"The parts mix {rep.settings} different prompts or models.")
    if rep.failed:
        console.info(f"Failed ({len(rep.failed)}, only error records): {_some(rep.failed)}")
    if rep.missing:
        console.info(f"Missing ({len(rep.missing)}, no record in any part): {_some(rep.missing)}")
    n = rep.shard_count
    again = sorted(set(rep.rerun_shards) | (set(rep.empty_shards) if expected is None else set()))
    if n and again and (rep.missing or rep.failed):
        console.info(f"Run shard{'s' if len(again) > 1 else ''} {','.join(map(str, again))} of {n} again with "
                     f"--resume (numbered from 0: in a Slurm array from 1, add 1).")
    elif n and rep.empty_shards:
        console.info(f"[dim]No record came from shard{'s' if len(rep.empty_shards) > 1 else ''} "
                     f"{','.join(map(str, rep.empty_shards))} of {n} (lost, or owning no input: --inputs tells).[/]")
    if rep.missing:
        return EXIT_SOME_MISSING
    if rep.failed:
        return EXIT_SOME_FAILED
    return 0
