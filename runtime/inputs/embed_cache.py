"""The persistent image-embedding cache: a vision encoder's output, kept under ``$VLM_HOME`` for every later
process (ask, chat, caption) on both backends.

An entry is the encoder output for one image at one detail: a list of float32 arrays (one per chunk the
backend encodes: a tile for libmtmd, the whole image for the ONNX encoder), keyed by
``entry_key(encoder id, pixels id, settings)``:

* encoder id: what produced it -- the backend, the projector / vision-encoder file's identity (sha256 of
  path, size and mtime, see ``file_identity``) and the engine build. A new projector or a rebuilt engine
  never reads old entries.
* pixels id: sha256 of the decoded RGB pixels and their size (``pixels_id``).
* settings: the preprocessing that decides the tiles or tokens (the family's ladder option, see
  ``ladders.py``: a tile cap, a token cap, a resize); the detail level chooses it.

The JSON meta of a llama.cpp entry lists the unit's parts in position order: ``["t", token ids]`` and
``["e", n_tokens]``, or, where the model places image tokens itself (M-RoPE positions for Qwen-VL,
non-causal attention for Gemma), ``["e", n_tokens, n_positions, base64 of libmtmd's
mtmd_input_chunk_save]``: the chunk's token grid, which libmtmd turns back into the decode positions, so
a cached answer is the uncached one.

Layout: ``$VLM_HOME/cache/embeddings/<key[:2]>/<key>.emb``; each file is a magic line, a JSON header
(key, shapes), the raw float32 data and the sha256 of header + data. Reading verifies all of it: a
truncated, corrupt or foreign file is ignored (and replaced by the next write), never fed to a model.

Writes go to a temp file in the same folder and are renamed into place, so readers in other processes see
an old entry, a whole new one, or none. LRU: a hit touches the file's mtime; after each write, when the
folder is over its cap (config ``image_cache_max_bytes``, default ``DEFAULT_MAX_BYTES``), the least
recently used entries are removed, under a ``filelock`` so concurrent processes do not race on it.
A cache that cannot be written (read-only, full disk) never fails an answer: ``put`` returns the reason and
the caller shows one warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

MAGIC = b"EVLM-EMB1\n"
DEFAULT_MAX_BYTES = 1024 ** 3        # 1 GiB: ~500 photos of a SmolVLM model at full detail (1.9 MB each)
_SUFFIX = ".emb"


def entry_key(encoder_id: str, pixels: str, settings: str) -> str:
    return hashlib.sha256(json.dumps([encoder_id, pixels, settings]).encode()).hexdigest()


def pixels_id(rgb: bytes, width: int, height: int) -> str:
    """sha256 of the decoded pixels and their size (the pixels the encoder would see, not the file)."""
    h = hashlib.sha256(f"{width}x{height}:".encode())
    h.update(rgb)
    return h.hexdigest()


def file_identity(path: Path) -> str:
    """What names a weights file cheaply: its resolved path, size and mtime (hashing a 200 MB projector in
    every process would cost more than the cache saves on small images)."""
    p = Path(path).resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]


def cache_root(home: Optional[Path] = None) -> Path:
    from ..config import vlm_home

    return (home if home is not None else vlm_home()) / "cache"


class EmbedCache:
    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.dir = self.root / "embeddings"
        self.max_bytes = max_bytes

    @classmethod
    def default(cls) -> "EmbedCache":
        """The cache of ``$VLM_HOME`` with the configured cap (a broken config falls back to the default)."""
        from ..config import load_config
        from ..errors import EdgeVLMError

        try:
            cap = load_config().image_cache_max_bytes or DEFAULT_MAX_BYTES
        except (EdgeVLMError, AttributeError):
            cap = DEFAULT_MAX_BYTES
        return cls(cache_root(), cap)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}{_SUFFIX}"

    # ------------------------------------------------------------------ read
    def has(self, key: str) -> bool:
        """Whether an entry exists (not verified: ``get`` does that)."""
        return self._path(key).is_file()

    def get(self, key: str) -> Optional[tuple[list, dict]]:
        """(arrays, meta) stored under ``key``, or None (missing, truncated, corrupt or someone else's key)."""
        import numpy as np

        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        got = _decode(data, key, np)
        if got is None:
            try:                      # a damaged entry: remove it so the next write replaces it
                path.unlink()
            except OSError:
                pass
            return None
        try:
            os.utime(path)            # LRU: a hit is a use
        except OSError:
            pass
        return got

    # ------------------------------------------------------------------ write
    def put(self, key: str, arrays: list, meta: Optional[dict] = None) -> Optional[str]:
        """Store ``arrays`` (and a small JSON ``meta``) under ``key``; returns None, or why the cache could
        not be written."""
        import numpy as np

        blob = _encode(key, [np.ascontiguousarray(a, dtype=np.float32) for a in arrays], meta or {})
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            return f"{e.strerror or e} ({path.parent})"
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        try:
            self.evict()
        except OSError:
            pass
        return None

    # ------------------------------------------------------------------ size
    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry, oldest use first."""
        out = []
        if not self.dir.is_dir():
            return out
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for p in sub.iterdir():
                if p.suffix != _SUFFIX:
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        out.sort()
        return out

    def _lock(self):
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "embeddings.lock"), timeout=30)

    def evict(self) -> int:
        """Remove least recently used entries until the cache is under its cap; returns bytes removed."""
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        if total <= self.max_bytes:
            return 0
        removed = 0
        with self._lock():
            for _, size, p in self.entries():
                if total - removed <= self.max_bytes:
                    break
                try:
                    p.unlink()
                    removed += size
                except FileNotFoundError:
                    removed += size       # another process evicted it
                except OSError:
                    pass
        return removed

    def stats(self) -> dict:
        entries = self.entries()
        return {"path": str(self.dir), "entries": len(entries), "bytes": sum(s for _, s, _ in entries),
                "max_bytes": self.max_bytes,
                "oldest_use": entries[0][0] if entries else None, "newest_use": entries[-1][0] if entries else None}

    def clear(self) -> tuple[int, int]:
        """Remove every entry (the measured encode speeds stay); returns (entries, bytes) removed."""
        n = b = 0
        with self._lock():
            for _, size, p in self.entries():
                try:
                    p.unlink()
                    n, b = n + 1, b + size
                except OSError:
                    pass
            for sub in (self.dir.iterdir() if self.dir.is_dir() else []):
                for t in sub.glob(".tmp-*"):
                    if time.time() - t.stat().st_mtime > 3600:   # a writer killed mid-write
                        t.unlink(missing_ok=True)
        return n, b


def _encode(key: str, arrays: list, meta: dict) -> bytes:
    header = json.dumps({"key": key, "shapes": [list(a.shape) for a in arrays], "dtype": "float32",
                         "meta": meta}).encode()
    body = b"".join(a.tobytes() for a in arrays)
    head = MAGIC + len(header).to_bytes(4, "little") + header
    digest = hashlib.sha256(head + body).digest()
    return head + body + digest


def _decode(data: bytes, key: str, np) -> Optional[tuple[list, dict]]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4 + 32:
        return None
    n = int.from_bytes(data[len(MAGIC): len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4 + n
    if start + 32 > len(data):
        return None
    try:
        header = json.loads(data[len(MAGIC) + 4: start])
        shapes = [tuple(int(d) for d in s) for s in header["shapes"]]
        meta = header.get("meta") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if header.get("key") != key or header.get("dtype") != "float32" or not isinstance(meta, dict):
        return None
    sizes = [int(np.prod(s)) * 4 for s in shapes]
    if start + sum(sizes) + 32 != len(data):
        return None
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        return None
    out, off = [], start
    for shape, size in zip(shapes, sizes):
        out.append(np.frombuffer(data, dtype=np.float32, count=size // 4, offset=off).reshape(shape))
        off += size
    return out, meta


_OPENED: dict = {}       # cache folder -> its EmbedCache, opened once per process


def cache_for(detail) -> Optional[EmbedCache]:
    """The embedding cache a request uses, for both backends: None when it asks for none (``--no-cache``:
    ``detail.cache`` is false), else ``$VLM_HOME``'s with the configured cap, opened on first use and kept
    for the process (one object per cache folder, so a later ``$VLM_HOME`` gets its own)."""
    if detail is not None and not detail.cache:
        return None
    root = cache_root()
    cache = _OPENED.get(root)
    if cache is None:
        cache = _OPENED[root] = EmbedCache.default()
    return cache


__all__ = ["EmbedCache", "entry_key", "pixels_id", "file_identity", "cache_root", "cache_for", "DEFAULT_MAX_BYTES"]
