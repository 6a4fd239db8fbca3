"""Draftless drafting (--draft) against plain decoding, side by side in one run, on real GGUF weights.

    python benchmarks/drafting.py MODEL.gguf [MODEL.gguf ...] [--rounds 5] [--threads 1] [--json]

Tasks (greedy, the same prompt for every mode):
- ``quote``: a ~500-token text about a harbour town, then "copy its first paragraph exactly" (chat
  models), or the text followed by the opening of a quotation (base models): an answer that copies its
  input.
- ``record``: the same text and a JSON schema of facts to fill from it (names, years, counts, a quoted
  sentence), answered under the schema (forced-token runs on in every mode).
- ``story``: free creative text with no text to copy ("write a story about a lighthouse keeper").

Per round, the three modes (off, auto, ngram) answer each task in a rotating order; reported per task:
decode tok/s of auto and ngram over off (median of the per-round ratios, middle half in brackets), the
drafted tokens checked and accepted, and whether every answer was the same text as off's (required).
The machine may be shared: the load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

TEXT = """The town of Marrowby sits at the mouth of the river Esk, where the valley opens onto a wide grey bay. \
For three hundred years its people lived from fishing, and the old stone cottages still crowd the slope above \
the water, their red roofs stacked one above the other. In 1842 the council built a new harbour wall of granite \
blocks brought by ship from Cornwall, and the fleet grew to more than ninety boats. The herring came every \
autumn in such numbers that the women on the quay worked through the night to gut and salt them.

The railway arrived in 1871 and changed the town again. Visitors from the industrial cities came for the sea \
air, and the grand hotel on the west cliff opened its doors in 1874 with one hundred and twenty rooms. A \
funicular lift carried guests from the promenade to the sands, and a bandstand was built on the pier. By the \
end of the century the summer population was four times the winter one.

The fishing declined after the First World War. The herring shoals moved north, the steam drifters were sold, \
and by 1950 only a dozen boats worked from the harbour. The fish market closed in 1963 and its hall became a \
museum of local history, which holds the logbooks of the old fleet and a collection of more than four thousand \
photographs.

Today Marrowby has about eleven thousand residents. Tourism is the largest employer, followed by the hospital \
and the university's marine research station, which opened in 1998 on the site of the old gasworks. The \
station studies the seals that breed on the rocks below the headland and the kelp forests of the bay. Every \
September the town holds a festival of folk music that fills every bed for thirty miles around, and on the last \
night a procession of lanterns walks from the church to the end of the harbour wall."""

RECORD = {"type": "object",
          "properties": {"town": {"type": "string"}, "river": {"type": "string"},
                         "harbour_wall_year": {"type": "integer"}, "harbour_wall_stone": {"type": "string"},
                         "railway_year": {"type": "integer"}, "hotel_rooms": {"type": "integer"},
                         "museum_opened_in": {"type": "string"}, "residents": {"type": "string"},
                         "largest_employer": {"type": "string"}, "festival": {"type": "string"},
                         "first_sentence": {"type": "string"}},
          "required": ["town", "river", "harbour_wall_year", "harbour_wall_stone", "railway_year", "hotel_rooms",
                       "museum_opened_in", "residents", "largest_employer", "festival", "first_sentence"],
          "additionalProperties": False}

MODES = ("off", "auto", "ngram")


def _tasks(chat: bool) -> dict:
    """task -> (prompt, schema, max_tokens)"""
    if chat:
        quote = TEXT + "\n\nCopy the first paragraph of the text above exactly."
        record = TEXT + "\n\nFill in this record from the text above, copying its words."
        story = "Write a long story about a lighthouse keeper who finds a message in a bottle."
    else:       # a base model continues a document
        quote = TEXT + "\n\nThe first two paragraphs of the text above, quoted word for word:\n\n\""
        record = TEXT + "\n\nThe facts of the text above as a JSON record, in its own words:\n"
        story = "Once upon a time, a lighthouse keeper found a message in a bottle. It said"
    return {"quote": (quote, None, 160), "record": (record, RECORD, 160), "story": (story, None, 160)}


def _load(path: Path, threads: int):
    from edgevlm.runtime.loader import artifact_from_path, load_backend
    from edgevlm.runtime.protocol import LoadOptions

    return load_backend(artifact_from_path(path, None, False), LoadOptions(n_ctx=2048, n_threads=threads))


def _answer(b, prompt: str, schema, max_tokens: int, draft: str):
    from edgevlm.runtime.generation.core import generate
    from edgevlm.runtime.protocol import ChatRequest, GenerationOptions, Message

    b.reset()     # every answer evaluates its prompt afresh: the modes differ only in decoding
    req = ChatRequest([Message("user", prompt)],
                      GenerationOptions(temperature=0.0, max_tokens=max_tokens, json_schema=schema, draft=draft,
                                        raw=not b.chat_template))
    parts, last = [], None
    for chunk in generate(b, req):
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


def _ratio(a: list[float], b: list[float]) -> str:
    r = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(r, n=4) if len(r) >= 2 else [r[0], r[0], r[0]]
    return f"{statistics.median(r):.2f} ({q[0]:.2f}-{q[2]:.2f})"


def bench(path: Path, rounds: int, threads: int) -> dict:
    b = _load(path, threads)
    try:
        out = {"draft_rows": b.draft_rows()}
        for task, (prompt, schema, max_tokens) in _tasks(bool(b.chat_template)).items():
            tps = {m: [] for m in MODES}
            checked = {m: 0 for m in MODES}
            accepted = {m: 0 for m in MODES}
            texts = {m: set() for m in MODES}
            tokens = 0
            _answer(b, prompt, schema, 8, "off")        # warm-up (llguidance's tokenizer, the schema)
            for i in range(rounds):
                order = MODES[i % 3:] + MODES[: i % 3]
                for m in order:
                    text, last = _answer(b, prompt, schema, max_tokens, m)
                    tps[m].append(last.completion_tokens / max(last.decode_s, 1e-9))
                    checked[m] += last.draft_tokens
                    accepted[m] += last.draft_accepted
                    texts[m].add(text)
                    tokens = last.completion_tokens
            same = all(texts[m] == texts["off"] for m in MODES) and len(texts["off"]) == 1
            out[task] = {"tokens": tokens, "same_text": same,
                         "off_tok_s": round(statistics.median(tps["off"]), 1),
                         **{f"{m}/off": _ratio(tps[m], tps["off"]) for m in ("auto", "ngram")},
                         **{f"{m}_accepted": f"{accepted[m]}/{checked[m]}" for m in ("auto", "ngram")},
                         "answer": next(iter(texts["off"]))[:120]}
        return out
    finally:
        b.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    doc = {"load_average": os.getloadavg(), "threads": args.threads, "rounds": args.rounds, "models": {}}
    for model in args.models:
        print(f"{model.name} ...", file=sys.stderr, flush=True)
        doc["models"][model.name] = bench(model, args.rounds, args.threads)
    doc["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"load average {doc['load_average']} -> {doc['load_average_after']}, {args.threads} thread(s), "
          f"{args.rounds} rounds")
    for name, res in doc["models"].items():
        print(f"\n{name} (verifies {res['draft_rows'] - 1} drafted tokens per step)")
        for task in ("quote", "record", "story"):
            r = res[task]
            print(f"  {task:7s} off {r['off_tok_s']:6.1f} tok/s  auto/off {r['auto/off']}  ngram/off {r['ngram/off']}"
                  f"  accepted auto {r['auto_accepted']} ngram {r['ngram_accepted']}  same text: {r['same_text']}"
                  f"  ({r['tokens']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
