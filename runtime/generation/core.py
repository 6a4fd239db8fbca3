"""The one decode loop: every backend's answers are generated here.

A backend evaluates (``prefill`` the prompt, ``eval`` one token) and exposes the logits; this loop
samples, applies the JSON-schema constraint, turns tokens into text, cuts at stop strings, decides the
finish reason and measures the timings -- once, for GGUF and ONNX alike. Layers, as in mlx-lm:
``generate`` yields ``Chunk``s (text, counts, timings, finish reason); ``ChatSession`` keeps history.

Finish reasons: "stop" (end-of-generation token, stop string, or a complete constrained document),
"length" (``max_tokens`` or the context is full), "cancelled" (the consumer closed the generator).
The last token of an answer cut at ``max_tokens`` is not evaluated: nothing would read its logits.

Drafts (``--draft``, generation/draft.py): after a sampled token, tokens that followed the context's last
n-gram before are evaluated with it in one batch (``Backend.eval_rows``: a logits row per position) and
checked one row at a time below, with the same mask, penalty and sampler (``Sampler(logits, draft)``); the
first one the model does not take ends the draft, its positions leave the KV cache (``drop_last``) and the
token chosen in its place goes on as a sampled one. Greedy answers are plain decoding's, token for token.

Forced runs: under a JSON schema most of a record's tokens are fixed by the schema (``{"``, a key,
``":``, the rest of an enum value). After each sampled token the constraint hands back the run of tokens
it forces next (``JSONSchemaConstraint.forced``: each the one token its mask allows, so sampling could
not have picked another and greedy output is unchanged); they are appended without sampling and
evaluated together with the sampled token in one batch (``Backend.eval_tokens``): one llama_decode /
onnxruntime run instead of one per token. llama.cpp gives the very same logits either way; ONNX graphs
that quantize activations per run (int8, int4 exports) give slightly different ones after a run than
after single steps, as their prompt evaluation does, so a greedy answer may part at a near-tie there.
"""
from __future__ import annotations

import time
from typing import Iterator

from ..protocol import Backend, ChatRequest, Chunk
from .draft import Drafting
from .sampling import Sampler
from .text import StopFilter


def generate(backend: Backend, request: ChatRequest, *, forced_runs: bool = True) -> Iterator[Chunk]:
    """Stream the answer to ``request`` from ``backend``; the last chunk has ``finish_reason`` set.
    ``forced_runs=False`` samples every token of a constrained answer one step at a time, even those the
    schema forces (the reference the batched runs are compared with: same tokens, more steps)."""
    opts = request.options
    t_start = time.perf_counter()
    constraint = building = None
    if opts.json_schema is not None or opts.tools is not None:
        # Built beside the prefill: the first constrained answer of a process builds llguidance's view of
        # the vocabulary (pieces from the disk cache for GGUF, then ~0.1-0.4 s of llguidance's own work,
        # without the GIL) and imports the schema checker while the prompt is evaluated; later answers find
        # the tokenizer built and the grammar compiled. (The CLI and the server reject invalid schemas
        # before anything loads; here one surfaces after the prefill.)
        from concurrent.futures import ThreadPoolExecutor

        from .constrain import JSONSchemaConstraint

        pool = ThreadPoolExecutor(1, thread_name_prefix="vlm-constraint")
        building = (pool.submit(opts.tools.constraint, backend) if opts.tools is not None     # tools.ToolPlan
                    else pool.submit(JSONSchemaConstraint.for_backend, backend, opts.json_schema))
        pool.shutdown(wait=False)
    drafting = Drafting.start(backend, opts.draft)   # --draft: a bad mode or a refusal before the prefill
    pre = backend.prefill(request)                # (a failed prefill leaves the build to finish on its own)
    if building is not None:
        constraint = building.result()            # its errors (a schema the engine refuses) surface here
    t_prefill = time.perf_counter()
    base = dict(prompt_tokens=pre.prompt_tokens, prompt_eval_tokens=pre.eval_tokens, image_tokens=pre.image_tokens,
                prefill_s=t_prefill - t_start, image_encode_s=pre.image_encode_s)

    sampler = Sampler(opts)
    text = backend.text_stream()
    stops = StopFilter(opts.stop)
    generated: list[int] = []
    if drafting is not None:
        drafting.begin(backend.kv_keys(), generated)
    in_kv = False
    rows: list = []                               # logits rows evaluated ahead (a draft's verification) ...
    drafts: list[int] = []                        # ... and the drafted token each checks (the last row: none)
    finish = "length"
    hit_stop_string = False
    t_first = None
    is_eog, n_ctx = backend.is_eog, backend.n_ctx
    try:
        while len(generated) < opts.max_tokens:
            if rows:
                logits, draft = rows.pop(0), (drafts.pop(0) if drafts else None)
            else:
                logits, draft = backend.logits(), None
            if constraint is not None:
                constraint.mask(logits)           # in place: forbidden tokens -> -inf (EOS only once complete)
            tok = sampler(logits, draft)
            if t_first is None:
                t_first = time.perf_counter()
            if constraint is not None:
                constraint.advance(tok)           # BackendError if the sampler ignored the mask
            in_kv = False                         # ``tok`` is a drafted token already evaluated
            if draft is not None:
                drafting.record(tok == draft)
                if tok == draft:
                    in_kv = bool(rows)
                else:                             # the rest of the draft goes: its positions leave the KV cache
                    backend.drop_last(len(rows))
                    rows, drafts = [], []
            if is_eog(tok):
                finish = "stop"
                break
            run = [tok]
            kv_now = backend.kv_used() - len(rows)        # positions before ``tok``
            if constraint is not None and forced_runs and not in_kv:
                # what the schema forces next (keys, quotes, braces): taken without sampling, since the mask
                # would allow nothing else, and evaluated with ``tok`` in one batch
                room = min(opts.max_tokens - len(generated), n_ctx - 1 - kv_now) - 1
                run += constraint.forced(room)
                for t in run[1:]:
                    sampler.note(t)
            end = None
            for t in run:
                generated.append(t)
                piece, stopped = stops.feed(text.feed(t))
                if piece:
                    yield Chunk(text=piece, completion_tokens=len(generated), **base)
                if stopped:
                    end, hit_stop_string = "stop", True
                    break
            if end is None and constraint is not None and constraint.is_done():
                end = "stop"                      # the document is complete: only EOS could follow
            elif end is None and (len(generated) >= opts.max_tokens or kv_now + len(run) >= n_ctx):
                end = "length"
            if end is not None:
                finish = end
                break
            if in_kv:
                continue
            if len(run) == 1 and drafting is not None:
                # tokens that followed the context's last n-gram before: evaluated with ``tok`` in one batch,
                # a logits row each, checked one by one above
                room = min(opts.max_tokens - len(generated), n_ctx - 1 - kv_now) - 1
                drafts = drafting.propose(room, constraint)
                if drafts:
                    rows = list(backend.eval_rows([tok] + drafts))
                    continue
            if len(run) == 1:
                backend.eval(tok)
            else:
                backend.eval_tokens(run)
    except GeneratorExit:
        finish = "cancelled"
        _drop_drafted(backend, rows)
        raise
    _drop_drafted(backend, rows)
    tail = "" if hit_stop_string else stops.feed(text.flush())[0] + stops.flush()
    t_end = time.perf_counter()
    yield Chunk(text=tail, completion_tokens=len(generated), finish_reason=finish, token_ids=generated,
                ttft_s=(t_first or t_end) - t_start, decode_s=t_end - (t_first or t_end),
                draft_tokens=drafting.checked if drafting else 0, draft_accepted=drafting.accepted if drafting else 0,
                **base)


def _drop_drafted(backend: Backend, rows: list) -> None:
    """An answer that ends inside a verified draft leaves the KV cache as plain decoding would: without the
    drafted positions from its last token on (the last token is never evaluated). ``rows`` left unread
    are exactly those positions: the last token's own and the drafts after it."""
    if rows:
        backend.drop_last(len(rows))


def complete(backend: Backend, request: ChatRequest) -> tuple[str, Chunk]:
    """The whole answer as one string, and the last chunk (counts, timings, finish reason)."""
    parts, last = [], None
    for chunk in generate(backend, request):
        parts.append(chunk.text)
        last = chunk
    assert last is not None
    return "".join(parts), last


__all__ = ["generate", "complete"]
