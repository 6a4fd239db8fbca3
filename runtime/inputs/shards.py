"""One captioning job on many machines: which inputs are this shard's, and the merge of the shards' JSONL.

A shard owns an input by the sha256 of its bytes (docs/fleet.md says why): every machine computes the
same split without talking to the others, a file added later lands in one shard and moves nothing
else, and the hash is the one the caption record carries anyway, so it is read once for both.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from ..errors import UsageError

_SHARD_RE = re.compile(r"^\s*(\d+|auto)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int          # 0 .. count-1
    count: int
    source: str = ""    # where it came from, for the one line the CLI prints ("SLURM_ARRAY_TASK_ID=3")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, sha256: Optional[str], path: str) -> bool:
        return shard_of(sha256, path, self.count) == self.index


def shard_of(sha256: Optional[str], path: str, count: int) -> int:
    """The shard (0 .. count-1) of an input: the first 64 bits of its content's sha256, modulo the count.
    An input that cannot be read (no hash) goes by the sha256 of its path, so exactly one shard writes
    its error record."""
    if count <= 1:
        return 0
    if not sha256:
        import hashlib

        sha256 = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()
    return int(sha256[:16], 16) % count


def parse_shard(text: str, env: Optional[Mapping[str, str]] = None) -> Shard:
    """``K/N`` (K from 0 to N-1), ``auto`` (a Slurm job array: index and count from its variables) or
    ``auto/N`` (a Kubernetes Indexed Job: the index from JOB_COMPLETION_INDEX, N = the Job's completions)."""
    t = text.strip()
    if t == "auto":
        return shard_from_env(env if env is not None else os.environ, None)
    m = _SHARD_RE.match(t)
    if not m:
        raise UsageError(f"--shard {text!r} is not K/N.",
                         hint="Give the shard as K/N with K from 0 to N-1 (e.g. --shard 0/4), or --shard auto "
                              "in a Slurm job array, --shard auto/N in a Kubernetes Indexed Job.")
    count = int(m.group(2))
    if count < 1:
        raise UsageError(f"--shard {text}: the shard count must be 1 or more.", hint="e.g. --shard 0/4")
    if m.group(1) == "auto":
        return shard_from_env(env if env is not None else os.environ, count)
    index = int(m.group(1))
    if index >= count:
        raise UsageError(f"--shard {text}: K must be from 0 to {count - 1}.",
                         hint=f"Shards are numbered from 0: {count} shards are 0/{count} ... {count - 1}/{count}.")
    return Shard(index, count, "--shard")


def _int(env: Mapping[str, str], name: str) -> Optional[int]:
    v = env.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"{name}={v!r} is not a number.", hint="Pass --shard K/N explicitly.") from None


def shard_from_env(env: Mapping[str, str], count: Optional[int]) -> Shard:
    """This task's shard from a Slurm job array (SLURM_ARRAY_TASK_ID, _MIN, _STEP, _COUNT: ``--array=1-8``
    and ``--array=0-14:2`` both give shards 0..N-1) or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX;
    the count is the Job's ``completions``, which no variable carries: ``--shard auto/N``)."""
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        n = _int(env, "SLURM_ARRAY_TASK_COUNT")
        lo = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
        if n is None:
            raise UsageError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not.",
                             hint="Pass --shard K/N explicitly.")
        off = task - lo
        if off < 0 or off % step or off // step >= n:
            raise UsageError(f"Slurm array task {task} is not one of {n} tasks from {lo} in steps of {step} "
                             "(an --array list with gaps has no shard numbering).",
                             hint="Use --array=0-N-1 (or 1-N, or a range with a step), or pass --shard K/N.")
        if count is not None and count != n:
            raise UsageError(f"--shard auto/{count}, but this Slurm array has {n} tasks.",
                             hint="Use --shard auto, which takes the count from the array.")
        return Shard(off // step, n, f"SLURM_ARRAY_TASK_ID={task}")
    index = _int(env, "JOB_COMPLETION_INDEX")
    if index is not None:
        if count is None:
            raise UsageError("In a Kubernetes Indexed Job the shard count is the Job's completions, which no "
                             "environment variable carries.", hint="Pass --shard auto/N with N = completions.")
        if not 0 <= index < count:
            raise UsageError(f"JOB_COMPLETION_INDEX={index} is not below the shard count {count}.",
                             hint="N in --shard auto/N must equal the Job's completions.")
        return Shard(index, count, f"JOB_COMPLETION_INDEX={index}")
    raise UsageError("--shard auto: neither a Slurm job array (SLURM_ARRAY_TASK_ID) nor a Kubernetes Indexed Job "
                     "(JOB_COMPLETION_INDEX) is in the environment.",
                     hint="Pass --shard K/N (with GNU parallel: --shard {}/N ::: 0 1 ... N-1).")


def select(inputs: Iterable[str], shard: Optional[Shard],
           hash_of: Callable[[str], Optional[str]]) -> list[tuple[str, Optional[str]]]:
    """(path, sha256) of the inputs this shard owns, in input order; every input is hashed once here and
    the hash travels with it to the record."""
    out = []
    for p in inputs:
        sha = hash_of(p)
        if shard is None or shard.owns(sha, p):
            out.append((p, sha))
    return out


# -- merge -----------------------------------------------------------------------------------------

@dataclass
class MergeReport:
    records: int = 0                    # lines written to the merged file
    parts: int = 0
    lines_read: int = 0
    bad_lines: int = 0                  # did not parse (a torn last line of a part still being written)
    duplicates: int = 0                 # further good records of an input already merged (dropped)
    failed: list[str] = field(default_factory=list)      # inputs whose every record carries "error"
    missing: list[str] = field(default_factory=list)     # expected inputs with no record at all
    rerun_shards: list[int] = field(default_factory=list)     # the shards of the missing and failed inputs
    empty_shards: list[int] = field(default_factory=list)     # shards no record came from (lost, or owning nothing)
    extra: int = 0                      # records of inputs not in the expected list (dropped: stale or foreign)
    shard_count: Optional[int] = None
    settings: int = 0                   # distinct (prompt, model) pairs among the records (1 is normal)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _read_part(path: str, rep: MergeReport) -> Iterable[dict]:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise UsageError(f"Cannot read {path}: {e.strerror or e}", hint="Check the part files' paths.") from e
    for line in data.splitlines():
        if not line.strip():
            continue
        rep.lines_read += 1
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rep.bad_lines += 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not _well_formed(rec):
            rep.bad_lines += 1
            continue
        yield rec


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _well_formed(rec: dict) -> bool:
    """The fields merge keys and counts by have the types `vlm caption` writes (a foreign or damaged line
    is counted as bad, never a crash)."""
    sha = rec.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        return False
    return all(rec.get(k) is None or isinstance(rec.get(k), str) for k in ("prompt", "model", "shard"))


def _shard_count(records: Iterable[dict]) -> Optional[int]:
    counts: dict[int, int] = {}
    for r in records:
        s = r.get("shard")
        if isinstance(s, str) and "/" in s:
            try:
                n = int(s.split("/")[1])
            except ValueError:
                continue
            counts[n] = counts.get(n, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None


def merge(parts: list[str], out: str, expected: Optional[list[tuple[str, Optional[str]]]] = None) -> MergeReport:
    """Merge caption parts into ``out``: one record per input, keyed by (path, sha256). A good record wins
    over error records of the same input (a retry that succeeded), the first good one over later ones
    (duplicates from re-runs are counted and dropped). With ``expected`` (the job's inputs, hashed), the
    inputs no part has are reported, and the shards they belong to when the parts say how many there were.
    ``out`` is written whole to a temporary file and renamed into place."""
    rep = MergeReport(parts=len(parts))
    best: dict[tuple[str, Optional[str]], dict] = {}
    settings: set[tuple] = set()
    outp = Path(out).expanduser()
    for part in parts:
        if Path(part).expanduser().resolve() == outp.resolve():
            raise UsageError(f"{part} is both a part and the merged output.", hint="Write the merge to a new file.")
        for rec in _read_part(part, rep):
            k = (rec["path"], rec.get("sha256"))
            settings.add((rec.get("prompt"), rec.get("model")))
            have = best.get(k)
            if have is None:
                best[k] = rec
            elif "error" in have and "error" not in rec:
                best[k] = rec                          # a later retry succeeded
            elif "error" not in rec:
                rep.duplicates += 1
    rep.settings = len(settings)
    rep.shard_count = _shard_count(best.values())
    if expected is not None:
        wanted = set(expected)
        missing = [k for k in expected if k not in best]
        rep.missing = [p for p, _ in missing]
        rep.extra = sum(1 for k in best if k not in wanted)
        keys = [k for k in dict.fromkeys(expected) if k in best]
    else:
        keys = sorted(best, key=lambda k: (k[0], k[1] or ""))
    failed = [k for k in keys if "error" in best[k]]
    rep.failed = [p for p, _ in failed]
    if rep.shard_count:
        rep.rerun_shards = sorted({shard_of(sha, p, rep.shard_count)
                                   for p, sha in failed + (missing if expected is not None else [])})
    if rep.shard_count:
        seen = {r.get("shard") for r in best.values()}
        rep.empty_shards = [i for i in range(rep.shard_count) if f"{i}/{rep.shard_count}" not in seen]
    _write_atomic(outp, (best[k] for k in keys))
    rep.records = len(keys)
    return rep


def _write_atomic(path: Path, records: Iterable[dict]) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a directory.", hint="Give the merged file a name, e.g. captions.jsonl")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"Cannot write {path}: {e.strerror or e}", hint="Choose a writable output file.") from e


__all__ = ["Shard", "shard_of", "parse_shard", "shard_from_env", "select", "merge", "MergeReport"]
