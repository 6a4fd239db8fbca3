"""Typed errors. Each carries a ``hint`` (the user's next step) and an exit code.

Subclasses also inherit the matching builtin, so library callers can catch ``FileNotFoundError``
or ``ValueError`` as usual, while the CLI catches ``EdgeVLMError`` in one place.
"""
from __future__ import annotations


class EdgeVLMError(Exception):
    exit_code: int = 1
    default_hint: str = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(EdgeVLMError, ValueError):
    """Bad flags or arguments."""
    exit_code = 2


class ModelNotFound(EdgeVLMError, LookupError):
    exit_code = 3
    default_hint = "Run `vlm list --available` to see the registry, or pass a path to a .gguf file."


class ModelNotInstalled(EdgeVLMError, LookupError):
    exit_code = 3


class BadModelFile(EdgeVLMError, ValueError):
    """Missing, truncated or corrupt model file; an mmproj that does not belong to the model."""
    exit_code = 4


class BadMedia(EdgeVLMError, ValueError):
    """A file that is not a readable image/video, or one we refuse (decompression bomb)."""
    exit_code = 5


class ContextOverflow(EdgeVLMError, ValueError):
    exit_code = 6


class InsufficientMemory(EdgeVLMError, MemoryError):
    exit_code = 7


class DownloadError(EdgeVLMError, OSError):
    exit_code = 8


class OfflineError(DownloadError):
    default_hint = "Connect to the network, or copy the model files in and use `-m PATH`."


class ChecksumMismatch(DownloadError):
    pass


class MissingExtra(EdgeVLMError, ImportError):
    exit_code = 9


class BackendError(EdgeVLMError, RuntimeError):
    exit_code = 10


class TemplateRefused(BackendError):
    """The model's chat template refused the conversation's shape (roles that must alternate, a role it
    does not know): the request's doing, so a 400 from the server; exit 10 as before on the command line."""


class Blocked(EdgeVLMError):
    """--guard: the safety filter (Llama Guard 3) judged the question or the answer unsafe."""
    exit_code = 13


class Cancelled(EdgeVLMError):
    """Raised to stop long work cleanly: Ctrl-C (exit 130), or SIGTERM with ``terminated`` (exit 143)."""
    exit_code = 130

    def __init__(self, message: str, hint: str | None = None, *, terminated: bool = False):
        super().__init__(message, hint)
        self.terminated = terminated
        if terminated:
            self.exit_code = 143


def missing_extra(module: str, extra: str | None = None, package: str | None = None) -> MissingExtra:
    # edgevlm is installed from its source folder (README: Install), not from PyPI: name that line.
    if extra:
        brings = f" (it brings {package})" if package and package != module else ""
        hint = f"In the edgevlm source folder: pip install '.[{extra}]'{brings}"
    else:
        hint = f"pip install {package or module}"
    return MissingExtra(f"{module} is not installed.", hint=hint)


def first_line(e: BaseException | str) -> str:
    """The first non-empty line of an exception's message (or of a text), or the exception's type name: what
    goes after "...:" in a one-line error. ``str(e).splitlines()[0]`` raises IndexError on an empty message."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0].strip()
    return type(e).__name__ if isinstance(e, BaseException) else "unknown error"
