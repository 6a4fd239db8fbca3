"""vlm caption: many images -> one JSON line each; resumable; bad files become error records."""
from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from edgevlm.runtime.errors import EdgeVLMError, UsageError

from .common import console
from .common.console import boundary
from .common.options import Guarding, Images, Loading, Quiet, Sampling, flag_groups

from .common.fleet import EXIT_SOME_FAILED  # noqa: E402  (12; --merge also exits 14: some inputs have no record)


@boundary
@flag_groups(temperature=0.0, max_tokens=128)
def caption(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs.", show_default=False)],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="JSONL file to write (- for stdout).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question asked of every image.")] = "Describe this image in one sentence.",
    resume: Annotated[bool, typer.Option("--resume", help="Skip images already in --out (same file bytes, prompt, model).")] = False,
    schema: Annotated[Optional[str], typer.Option("--schema", help="JSON schema (file or JSON text): answers are constrained to it and parsed.")] = None,
    sampling: Sampling = None,
    loading: Loading = None,
    image_flags: Images = None,
    guarding: Guarding = None,
    quiet: Quiet = False,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", metavar="K/N|auto|auto/N",
        help="Caption only shard K of N (0..N-1), split by file content so every machine agrees; auto: from a "
             "Slurm job array, auto/N: from a Kubernetes Indexed Job of N completions.")] = None,
    merge: Annotated[Optional[str], typer.Option(
        "--merge", metavar="OUT.jsonl",
        help="Merge the part files given as PATHS into OUT.jsonl, each input once; with --inputs, report the "
             "missing ones. Exit 14: some missing, 12: some failed.")] = None,
    inputs: Annotated[Optional[list[str]], typer.Option(
        "--inputs", help="--merge: the job's inputs (files, folders, globs; repeatable), to find the missing ones.")] = None,
    server: Annotated[Optional[str], typer.Option(
        "--server", metavar="URL[,URL...]",
        help="Send the images to these `vlm serve` (or OpenAI-compatible) servers instead of loading a model here.")] = None,
    server_slots: Annotated[Optional[int], typer.Option(
        "--server-slots", min=1,
        help="--server: requests at once per server (default: what the server reports, else 1; "
             "a `vlm serve --parallel N` takes N).")] = None,
    server_timeout: Annotated[float, typer.Option(
        "--server-timeout", min=1.0, help="--server: seconds to wait for one answer before trying another server; when every "
                                        "server has failed for this long the job stops (exit 10; --resume continues).")] = 600.0,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="VLM_API_KEY", show_envvar=False, help="--server: the servers' API key.")] = None,
) -> None:
    """Caption many images with one model load, one JSON line per image.

    Exit code 0 when every image succeeded, 12 when some became error records, 13 (--guard) when the
    prompt or some answers were blocked by the safety filter (their lines carry "answer": null).
    --merge: 14 when some inputs have no record, else 12 when some only have error records.
    """
    if merge is not None:
        from .common.fleet import merge_parts

        if out is not None or shard or server:
            raise UsageError("--merge takes the output file itself and the parts as arguments.",
                             hint="vlm caption --merge all.jsonl part-*.jsonl [--inputs photos/]")
        console.set_quiet(quiet)
        code = merge_parts(merge, paths, inputs)
        if code:
            raise typer.Exit(code)
        return
    if out is None:
        raise UsageError("--out is required.", hint="e.g. vlm caption photos/ --out captions.jsonl")
    if inputs:
        raise UsageError("--inputs goes with --merge.", hint="Give the images as arguments.")
    from edgevlm.runtime.inputs.batch import JsonlWriter, expand_inputs

    from .common.session import Setup

    setup = Setup(sampling=sampling, loading=loading, images=image_flags, guarding=guarding, schema=schema, quiet=quiet)
    json_schema, idetail = setup.json_schema, setup.detail
    files = expand_inputs(paths)
    if not files:
        raise EdgeVLMError("No inputs.", hint="Pass image files, folders or globs.")
    the_shard = None
    if shard is not None:
        from edgevlm.runtime.inputs.shards import parse_shard

        the_shard = parse_shard(shard)
        if the_shard.count == 1:
            the_shard = None
    if server is not None:
        from .common.fleet import caption_remote, refuse_local_options

        refuse_local_options(loading, image_flags, guarding)
        code = caption_remote(server, files, the_shard, out=out, resume=resume, prompt=prompt, schema=json_schema,
                              model=loading.model, detail=idetail.level, sampling=sampling, slots=server_slots,
                              timeout=server_timeout, api_key=api_key)
        if code:
            raise typer.Exit(code)
        return
    if server_slots is not None:
        raise UsageError("--server-slots goes with --server.", hint="Add --server URL, or leave --server-slots out.")
    gplan = setup.guard_plan()                      # bad guard flags fail before the output file is opened
    writer = JsonlWriter(out, resume)
    try:
        with setup.open(want_vision=True) as opened:
            failed, blocked = _caption_here(setup, opened, gplan, writer, prompt, files, the_shard)
    finally:
        writer.close()
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)
    if blocked:
        from edgevlm.runtime.errors import Blocked

        raise typer.Exit(Blocked.exit_code)


def _caption_here(setup, opened, gplan, writer, prompt: str, files: list[str], the_shard) -> tuple[int, int]:
    """The caption loop over a model loaded here; returns how many images failed and how many were blocked."""
    from edgevlm.runtime.generation.schema import parse_and_validate
    from edgevlm.runtime.inputs.batch import file_sha256, record_key
    from edgevlm.runtime.inputs.media import load_image
    from edgevlm.runtime.protocol import Message

    from .common.detail import notice_images
    from .common.fleet import owned
    from .common.guard import caption_verdict, judge_question

    backend, runner, json_schema = opened.backend, opened.runner, setup.json_schema
    failed = ok = skipped = blocked = 0
    judge_question(runner, [Message("user", prompt)])     # one prompt for every image: checked once
    question = runner.public() if runner is not None else None
    name = opened.name
    guard_key = None if gplan is None else \
        f"{gplan.mode}|{gplan.resolved.alias_ref}|{gplan.policy.block()}"
    session = setup.session(opened)
    t_start = time.perf_counter()
    work = owned(files, the_shard)
    with console.progress("Captioning", unit="items") as cb:
        for i, (path, sha) in enumerate(work):
            cb("images", i, len(work))
            sha = sha or file_sha256(path)          # hashed already when sharding picked it
            key = record_key(sha, prompt, name, json_schema, guard=guard_key)
            if key in writer.done:
                skipped += 1
                continue
            rec: dict = {"path": path, "sha256": sha, "prompt": prompt, "model": name, "key": key}
            if the_shard is not None:
                rec["shard"] = str(the_shard)
            try:
                img = load_image(path)
                session.clear(reset_cache=False)   # each image on its own; the prompt's KV prefix stays
                asked = session.pending_messages(prompt, [img])
                result = session.ask(prompt, [img])
                verdict = caption_verdict(runner, question, asked, result.text)
                if verdict is not None and verdict["output"] == "unsafe":
                    rec.update(answer=None, finish_reason="content_filter", usage=result.usage,
                               timings=result.timings, guard=verdict)
                    blocked += 1
                    writer.write(rec)
                    continue
                rec["answer"] = parse_and_validate(result.text, json_schema, result.final.finish_reason) if json_schema else result.text.strip()
                rec["finish_reason"] = result.final.finish_reason
                rec["usage"] = result.usage          # the same shapes as `vlm ask --json`
                rec["timings"] = result.timings
                rep = notice_images(backend, quiet=True)   # no line per image in a batch; the warning once
                if rep:
                    rec["timings"]["images"] = rep["images"]
                if verdict is not None:
                    rec["guard"] = verdict
                ok += 1
            except EdgeVLMError as e:
                rec["error"] = e.message
                if e.hint:
                    rec["hint"] = e.hint
                failed += 1
            writer.write(rec)
        cb("images", len(work), len(work))
    elapsed = time.perf_counter() - t_start
    done = ok + failed
    console.info(f"[dim]{ok} captioned, {failed} failed, {skipped} already done"
                 + (f", {blocked} blocked by the safety filter" if blocked else "")
                 + (f" — {done / elapsed:.2f} images/s" if done and elapsed > 0 else "") + "[/]")
    return failed, blocked
