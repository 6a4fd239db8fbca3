"""sha256 of a file: the one way edgevlm names and checks file content (downloads, installed
artifacts, caption records, video ids, `vlm info`, quantize manifests)."""
from __future__ import annotations

import hashlib
import os

CHUNK = 4 * 1024 * 1024


def sha256_file(path: str | os.PathLike, hasher=None) -> str:
    """Hex sha256 of the file's bytes; ``hasher`` continues a running hash (a resumed download)."""
    h = hasher if hasher is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["sha256_file"]
