"""Which model a request names: the command-line models (by the name each was given, its alias or its
file name), the guard model, or any installed registry model; resolved once and remembered.
Paths from clients are refused: a request must not make the server open arbitrary files.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..errors import ModelNotFound
from .apierror import APIError
from .settings import ServeSettings

if TYPE_CHECKING:
    from ..loader import ResolvedModel


class ModelNames:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._named: dict[str, str] = {}        # names a command-line model answers to -> the ref given
        self._resolved: dict[str, "ResolvedModel"] = {}

    def resolve(self, model_id: Optional[str]) -> "ResolvedModel":
        """The model a request names (none: the one command-line model), or a 400/404 APIError."""
        from ..loader import _looks_like_path, resolve

        if not model_id:
            if len(self.settings.models) == 1:
                model_id = self.settings.models[0]
            else:
                raise APIError(400, "`model` is required.", param="model", code="missing_model")
        ref = self._named.get(model_id, model_id)
        hit = self._resolved.get(ref)
        if hit is not None:
            return hit
        if _looks_like_path(ref) and ref not in self.settings.models:
            raise APIError(404, f"The model `{model_id}` does not exist.", code="model_not_found", param="model")
        try:
            resolved = resolve(ref, want_vision=True, home=self.settings.home)
        except ModelNotFound as e:
            raise APIError(404, f"The model `{model_id}` does not exist ({e.message}).", code="model_not_found",
                           param="model") from None
        if not resolved.installed:
            raise APIError(404, f"The model `{model_id}` is not installed on this server (run `vlm pull "
                                f"{resolved.alias_ref}` on it).", code="model_not_found", param="model")
        self._resolved[ref] = resolved
        return resolved

    def resolve_pinned(self) -> list["ResolvedModel"]:
        """The command-line models (and the guard's), resolved before the server starts: a typo fails the
        command, not the first request; each answers to its id, its name and its file name."""
        from ..errors import ModelNotInstalled
        from ..loader import resolve

        out = []
        for ref in self.pinned_refs():
            resolved = resolve(ref, want_vision=ref != self.settings.guard_model, home=self.settings.home)
            if not resolved.installed:
                raise ModelNotInstalled(f"{resolved.alias_ref} is not installed.",
                                        hint=f"Run `vlm pull {resolved.alias_ref}` first.")
            self._resolved[ref] = resolved
            for name in {self.model_id(resolved), resolved.name, resolved.artifact.path.name}:
                self._named.setdefault(name, ref)
            out.append(resolved)
        return out

    def pinned_refs(self) -> list[str]:
        """The command-line models, and the guard model when --guard is on: loaded at start, kept loaded."""
        guard = [self.settings.guard_model] if self.settings.guard_mode and self.settings.guard_model else []
        return list(self.settings.models) + [g for g in guard if g not in self.settings.models]

    def is_pinned(self, resolved: "ResolvedModel") -> bool:
        return any(self._resolved.get(r) is resolved for r in self.pinned_refs())

    def is_guard(self, resolved: "ResolvedModel") -> bool:
        return bool(self.settings.guard_model) and self._resolved.get(self.settings.guard_model) is resolved

    @staticmethod
    def model_id(resolved: "ResolvedModel") -> str:
        return resolved.alias_ref if resolved.model is not None else resolved.name
