"""What a downloaded model file is checked against, as the install manifest records it (``verified_by``).

The registry's sha256 when it has one; otherwise the checksum the source publishes: the Hugging Face
Hub's ETag (an LFS file's is its sha256, any other file's its git blob sha1), a package index's sha256 of
a wheel. The sha256 of what was installed is recorded at the first download either way.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

from .registry import FileSpec

REGISTRY_SHA256 = "registry sha256"
HUB_LFS_SHA256 = "hub LFS sha256"
HUB_GIT_SHA1 = "hub git blob sha1"
WHEEL_SHA256 = "package index sha256 of the wheel"
SIZE_ONLY = "size only"
VERIFIED_BY = (REGISTRY_SHA256, HUB_LFS_SHA256, HUB_GIT_SHA1, WHEEL_SHA256, SIZE_ONLY, "none")
GIT_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(path: Path) -> str:
    """The id git (and the Hugging Face Hub's ETag of a non-LFS file) gives a file's content."""
    h = hashlib.sha1(f"blob {Path(path).stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verified_without_hub(spec: FileSpec, extra: Optional[str] = None) -> str:
    """For sources with no checksum of their own: the registry's sha256, else ``extra``, else the size."""
    if spec.sha256:
        return REGISTRY_SHA256
    return extra or (SIZE_ONLY if spec.size is not None else "none")
