"""A captioner for Python programs and batch engines: load a vision model once, caption paths into the
records `vlm caption` writes (one JSON object per image, the same keys and values).

Made for Ray Data, whose ``map_batches`` constructs a callable class once per actor and calls it with
batches of rows::

    import ray
    from edgevlm.runtime.captioner import Captioner

    ds = ray.data.from_items([{"path": p} for p in paths])
    out = ds.map_batches(Captioner, fn_constructor_kwargs={"model": "smolvlm-256m", "threads": 2},
                         batch_size=16, compute=ray.data.ActorPoolStrategy(size=4), num_cpus=2)
    with open("captions.jsonl", "w") as f:
        for row in out.iter_rows():
            f.write(row["record"] + "\\n")

It works without Ray as well: ``Captioner(...).caption(paths)`` returns the records as dicts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .errors import EdgeVLMError, ModelNotInstalled


class Captioner:
    """Loads ``model`` (registry name or .gguf/.onnx path, ``mmproj`` for a path) when constructed and
    captions batches. ``__call__`` takes a batch in any of Ray's formats that maps column names to
    sequences (``{"path": [...]}``, numpy or lists) and returns ``path``, ``sha256``, ``error`` (None when
    it worked) and ``record``: the JSON line `vlm caption` would write for the image."""

    def __init__(self, model: Optional[str] = None, *, mmproj: Optional[str] = None,
                 prompt: str = "Describe this image in one sentence.", max_tokens: int = 128,
                 temperature: float = 0.0, seed: Optional[int] = None, schema: Optional[dict] = None,
                 detail: str = "auto", ctx: Optional[int] = None, threads: Optional[int] = None,
                 column: str = "path"):
        from .generation.schema import load_schema
        from .generation.session import ChatSession
        from .loader import load_backend, resolve
        from .protocol import DEFAULT_CTX, GenerationOptions, ImageDetail, LoadOptions

        if detail not in ("low", "auto", "high"):
            raise EdgeVLMError(f"Unknown detail {detail!r}.", hint="Use low, auto or high.")
        self.prompt, self.column = prompt, column
        self.schema = load_schema(json.dumps(schema)) if schema is not None else None
        resolved = resolve(model, want_vision=True, mmproj=Path(mmproj) if mmproj else None)
        if not resolved.installed:
            raise ModelNotInstalled(f"{resolved.alias_ref} is not installed on this machine.",
                                    hint=f"Run `vlm pull {resolved.alias_ref}` on every node first.")
        self.model_name = resolved.alias_ref
        self.backend = load_backend(resolved.artifact, LoadOptions(n_ctx=ctx or DEFAULT_CTX, n_threads=threads,
                                                                   mmproj=Path(mmproj) if mmproj else None))
        self.session = ChatSession(self.backend, self.model_name, options=GenerationOptions(
            max_tokens=max_tokens, temperature=temperature, seed=seed, json_schema=self.schema,
            image_detail=ImageDetail(level=detail)))

    def caption_one(self, path: str, sha256: Optional[str] = None) -> dict:
        """The record of one image, as `vlm caption` writes it (an unreadable file: a record with "error")."""
        from .generation.schema import parse_and_validate
        from .inputs.batch import file_sha256, record_key
        from .inputs.media import load_image

        sha = sha256 or file_sha256(path)
        rec: dict[str, Any] = {"path": path, "sha256": sha, "prompt": self.prompt, "model": self.model_name,
                               "key": record_key(sha, self.prompt, self.model_name, self.schema)}
        try:
            img = load_image(path)
            self.session.clear(reset_cache=False)     # each image on its own; the prompt's KV prefix stays
            result = self.session.ask(self.prompt, [img])
            rec["answer"] = (parse_and_validate(result.text, self.schema, result.final.finish_reason) if self.schema
                             else result.text.strip())
            rec["finish_reason"] = result.final.finish_reason
            rec["usage"] = result.usage
            rec["timings"] = result.timings
            rep = getattr(self.backend, "image_report", None)
            if rep:
                rec["timings"]["images"] = rep["images"]
        except EdgeVLMError as e:
            rec["error"] = e.message
            if e.hint:
                rec["hint"] = e.hint
        return rec

    def caption(self, paths) -> list[dict]:
        return [self.caption_one(str(p)) for p in paths]

    def __call__(self, batch: dict) -> dict:
        recs = self.caption([str(p) for p in batch[self.column]])
        return {"path": [r["path"] for r in recs], "sha256": [r["sha256"] or "" for r in recs],
                "error": [r.get("error") for r in recs],
                "record": [json.dumps(r, ensure_ascii=False) for r in recs]}

    def close(self) -> None:
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self.backend = None

    def __del__(self):       # an actor ends without a call to close(): free llama.cpp before the interpreter goes
        try:
            self.close()
        except Exception:    # noqa: BLE001 - nothing to report to at interpreter exit
            pass


__all__ = ["Captioner"]
