"""The checkpoint `vlm quantize` reads: a local folder or a Hugging Face repo (through huggingface_hub),
refusing pickle weights and custom code unless allowed, and its content fingerprint."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..runtime.digest import sha256_file
from ..runtime.errors import (
    BadModelFile,
    DownloadError,
    EdgeVLMError,
    ModelNotFound,
    OfflineError,
    UsageError,
    missing_extra,
)
from ..runtime.protocol import ProgressCallback, report
from ..runtime.formats.model_json import read_json_object

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
_SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                 "preprocessor_config.json", "processor_config.json")


@dataclass
class Source:
    ref: str                         # what the user typed
    dir: Path                        # local folder holding config.json and the weights
    config: dict
    repo_id: Optional[str] = None
    revision: Optional[str] = None   # the hub commit, for hub sources
    pickle_weights: bool = False

    @property
    def vision(self) -> bool:
        return isinstance(self.config.get("vision_config"), dict)

    @property
    def text_config(self) -> dict:
        t = self.config.get("text_config")
        return {**self.config, **t} if isinstance(t, dict) else self.config


def _check_trust(d: Path, names: list[str], trust_remote_code: bool, what: str) -> None:
    """Refuse checkpoints that would run their own code (``auto_map``), unless the user trusts them."""
    if trust_remote_code:
        return
    for name in _CONFIG_FILES:
        p = d / name
        if p.is_file() and isinstance(read_json_object(p).get("auto_map"), dict):
            raise UsageError(
                f"{what} ships its own model code ('auto_map' in {name}); edgevlm does not run code from a "
                "checkpoint unless told to.",
                hint="Read the code first; if you trust it, pass --trust-remote-code.")


def _check_weights(names: list[str], allow_pickle: bool, what: str) -> bool:
    """True when the weights are pickles (allowed); UsageError when they are and that is not allowed."""
    import fnmatch

    if any(n.endswith(".safetensors") for n in names):
        return False
    pickles = [n for n in names if any(fnmatch.fnmatch(Path(n).name, p) for p in PICKLE_PATTERNS)
               and Path(n).name != "training_args.bin"]
    if not pickles:
        raise BadModelFile(f"{what} has a config.json but no weights (*.safetensors).",
                           hint="The download may be incomplete: fetch the checkpoint's weight files too.")
    if not allow_pickle:
        raise UsageError(
            f"{what} has only pickle weights ({', '.join(sorted(pickles)[:3])}); loading a pickle can run "
            "arbitrary code.",
            hint="Use a checkpoint with *.safetensors weights, or pass --allow-pickle if you trust this one.")
    return True


def resolve_source(ref: str, *, revision: Optional[str] = None, allow_pickle: bool = False,
                   trust_remote_code: bool = False, on_progress: Optional[ProgressCallback] = None,
                   before_download=None) -> Source:
    """A local checkpoint folder, or a hub repo id downloaded into the huggingface_hub cache.

    ``before_download(config)`` runs on the hub's config.json before any weights are fetched, so an
    unsupported architecture fails before a multi-gigabyte download.
    """
    p = Path(ref).expanduser()
    if p.exists() or not _HUB_ID.match(ref.strip()):
        if not p.exists():
            raise ModelNotFound(f"No such checkpoint folder: {p}",
                                hint="Pass the folder of a Hugging Face checkpoint (config.json + *.safetensors), "
                                     "or a hub repo id like HuggingFaceTB/SmolLM2-135M-Instruct.")
        if not p.is_dir():
            raise UsageError(f"{p} is a file, not a checkpoint folder.",
                             hint="Pass the folder that holds config.json and the *.safetensors weights.")
        if not (p / "config.json").is_file():
            raise BadModelFile(f"{p} has no config.json, so it is not a Hugging Face checkpoint.",
                               hint="Pass the folder that holds config.json and the *.safetensors weights.")
        config = read_json_object(p / "config.json")
        names = [f.name for f in p.iterdir() if f.is_file()]
        _check_trust(p, names, trust_remote_code, p.name)
        pickled = _check_weights(names, allow_pickle, str(p))
        return Source(ref=ref, dir=p.resolve(), config=config, pickle_weights=pickled)
    return _hub_source(ref.strip(), revision, allow_pickle, trust_remote_code, on_progress, before_download)


def _hub_source(repo: str, revision: Optional[str], allow_pickle: bool, trust_remote_code: bool,
                on_progress, before_download) -> Source:
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors as hub_errors
    except ImportError as e:  # pragma: no cover - a core dependency
        raise missing_extra("huggingface_hub", package="huggingface-hub") from e
    from ..runtime.models.download import offline_var

    report(on_progress, f"download {repo}", 0, None)
    offline = offline_var() or (os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
                                and "HF_HUB_OFFLINE")
    try:
        if offline:
            raise ConnectionError(f"offline mode ({offline}=1)")
        try:
            info = hub.HfApi().model_info(repo, revision=revision)
        except hub_errors.RepositoryNotFoundError as e:
            raise ModelNotFound(f"No model {repo!r} on the Hugging Face Hub (or it is private).",
                                hint="Check the repo id; for a private or gated model run `hf auth login`.") from e
        except hub_errors.RevisionNotFoundError as e:
            raise ModelNotFound(f"{repo} has no revision {revision!r}.", hint="Check --revision.") from e
        except hub_errors.GatedRepoError as e:
            raise DownloadError(f"{repo} is gated: accept its license on huggingface.co first.",
                                hint="Then run `hf auth login` and try again.") from e
        names = [s.rfilename for s in info.siblings or []]
        if "config.json" not in names:
            raise BadModelFile(f"{repo} has no config.json, so it is not a Hugging Face checkpoint.",
                               hint="Pass a transformers model repository.")
        commit = info.sha
        cfg_path = Path(hub.hf_hub_download(repo, "config.json", revision=commit))
        config = read_json_object(cfg_path)
        pickled = _check_weights(names, allow_pickle, repo)
        if before_download is not None:
            before_download(config)
        patterns = ["*.json", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]
        patterns += ["*.bin", "*.pt", "*.pth"] if pickled else ["*.safetensors"]
        if trust_remote_code:
            patterns.append("*.py")
        local = Path(hub.snapshot_download(repo, revision=commit, allow_patterns=patterns))
    except EdgeVLMError:
        raise
    except (ConnectionError, OSError, hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError) as e:
        local, commit = _hub_cached(repo, revision)
        if local is None:
            raise OfflineError(
                f"Cannot download {repo}: {_network_reason(e)}.",
                hint="Connect to the network (or unset offline mode), or download the checkpoint elsewhere "
                     "and pass its folder.") from e
        config = read_json_object(local / "config.json")
        pickled = _check_weights([f.name for f in local.iterdir()], allow_pickle, repo)
        if before_download is not None:
            before_download(config)
    _check_trust(local, [f.name for f in local.iterdir()], trust_remote_code, repo)
    report(on_progress, f"download {repo}", 1, 1)
    return Source(ref=repo, dir=local, config=config, repo_id=repo, revision=commit, pickle_weights=pickled)


def _network_reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if text.startswith("offline mode"):
        return text
    if re.search(r"NameResolution|Name or service not known|Temporary failure in name resolution|nodename", text):
        return "huggingface.co cannot be reached (no DNS: is this machine offline?)"
    if re.search(r"Max retries|Connection(Error| refused|Reset)|timed out|Timeout", text):
        return "huggingface.co cannot be reached (no connection)"
    return f"the Hugging Face Hub answered {type(e).__name__}: {text[:160]}"


def _hub_cached(repo: str, revision: Optional[str]) -> tuple[Optional[Path], Optional[str]]:
    """A complete snapshot already in the huggingface_hub cache, for offline use."""
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - anything means "not cached"
        return None, None
    if not (local / "config.json").is_file():
        return None, None
    return local, local.name


def _file_record(path: Path, root: Path) -> dict:
    return {"name": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def source_fingerprint(src: Source, on_progress: Optional[ProgressCallback] = None) -> dict:
    """Where the source came from and what exactly it was: hub repo + commit, or a local folder's
    config / weight / tokenizer files with their sha256 and one content hash over them."""
    files = sorted(p for p in src.dir.iterdir() if p.is_file() and (
        p.name in _SOURCE_FILES or p.suffix == ".safetensors" or (src.pickle_weights and p.suffix in (".bin", ".pt", ".pth"))))
    records = []
    for i, p in enumerate(files):
        report(on_progress, "hash source", i, len(files))
        records.append(_file_record(p, src.dir))
    report(on_progress, "hash source", len(files), len(files))
    content = hashlib.sha256("".join(f"{r['name']}\0{r['sha256']}\n" for r in records).encode()).hexdigest()
    out: dict = {"ref": src.ref, "content_sha256": content, "files": records,
                 "architecture": (src.config.get("architectures") or [None])[0],
                 "model_type": src.config.get("model_type")}
    if src.repo_id:
        out.update(repo=src.repo_id, revision=src.revision)
    else:
        out["path"] = str(src.dir)
        m = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})$", src.dir.as_posix())
        if m:                                              # a folder inside the huggingface_hub cache
            out.update(repo=f"{m.group(1)}/{m.group(2)}", revision=m.group(3))
    return out


def default_name(src_ref: str) -> str:
    base = src_ref.rstrip("/").split("/")[-1] if _HUB_ID.match(src_ref.strip()) else Path(src_ref).expanduser().resolve().name
    name = re.sub(r"[^a-z0-9.-]+", "-", base.lower()).strip("-.")
    return name or "model"
