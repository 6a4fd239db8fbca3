"""Check a quantized artifact against the model it came from, before anyone is told it exists.

The source is the Hugging Face checkpoint run by transformers in fp32. Every artifact is loaded with
our own runtime (llama.cpp for GGUF, onnxruntime for ONNX) and compared with it on the same token ids:

* next-token distributions at every position of a fixed held-out paragraph (``HELD_OUT_TEXT``, never
  used for calibration): **top-1 agreement** (how often both rank the same token first), **mean
  KL(source || artifact)** in nats, and the artifact's **perplexity** on the paragraph;
* greedy raw completions of a fixed prompt set (``PROMPTS``) through our backends (``GGUFBackend``,
  ``ONNXBackend``), next to the source's own greedy completions;
* decode speed (tokens/s) from a short generation through the same backend;
* for vision artifacts, one image through the projector (it must encode and answer).

Feeding identical token ids to both sides measures the weights, not the tokenizers; whether the
artifact's tokenizer splits the paragraph like the source's is reported separately (``tokenizer_match``).

Library code: no prints, no exits; heavy imports inside functions; progress through
``on_progress(stage, done, total)``.
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..runtime.errors import BackendError, BadModelFile, first_line, missing_extra
from ..runtime.protocol import DEFAULT_CTX, ProgressCallback

# A paragraph written for this purpose (not from any corpus a model was calibrated on). Long enough
# for a few hundred tokens with any common tokenizer; the first ``n_tokens`` tokens are used.
HELD_OUT_TEXT = (
    "The lighthouse on the northern cape was built in 1871, after a winter storm drove three cargo ships "
    "onto the rocks within a single week. Its first keeper, a retired schoolteacher named Elias Varga, kept "
    "a logbook in which he recorded the weather every four hours, the ships that passed, and the birds that "
    "struck the lantern glass during the autumn migration. For forty years the light burned whale oil, then "
    "kerosene, and finally electricity, when a cable was laid across the bay in 1923. Visitors often ask why "
    "the tower is painted in red and white bands. The answer is practical rather than decorative: sailors "
    "needed to tell one lighthouse from another during the day, so each station along the coast received its "
    "own pattern. At night the lights themselves were distinguished by their rhythm, and this one flashes "
    "twice every ten seconds. Today the station is automated, and the keeper's house has become a small "
    "museum. Its most popular exhibit is not the great glass lens but Varga's logbook, open to a page from "
    "March 1888, where he wrote that the sea was so calm he could hear the church bells from the village "
    "across the water. Researchers have used his careful notes to study how storms along the coast have "
    "changed over the past century, and they found that the number of severe gales in late winter has "
    "nearly doubled. Children who visit the museum are usually more interested in the spiral staircase, "
    "which has one hundred and twelve steps, and in the small window at the top, from which, on a clear "
    "morning, you can see the mountains on the other side of the bay."
)

# Raw completions compared with the source's (greedy, a few tokens each).
PROMPTS = (
    "The capital of France is",
    "Water freezes at a temperature of",
    "The largest planet in our solar system is",
    "def add(a, b):\n    return",
)
SPEED_PROMPT = "Once upon a time, in a small village by the sea,"
COMPLETION_TOKENS = 8
SPEED_TOKENS = 48
DEFAULT_TOKENS = 256


def _progress(cb: Optional[ProgressCallback], stage: str, done: int, total: Optional[int]) -> None:
    if cb is not None:
        cb(stage, done, total)


def first_word(text: str) -> str:
    """The first word of a completion, for comparing answers (' Paris.' and ' Paris,' agree)."""
    m = re.search(r"\w+", text or "")
    return m.group(0) if m else ""


# ---------------------------------------------------------------------------------------- source

@dataclass
class Reference:
    """What the source model says about the held-out paragraph and the prompt set."""

    token_ids: list[int]                  # the paragraph, as the source's tokenizer encodes it
    logprobs: object                      # numpy float32 [n, vocab]: log-softmax at each position
    perplexity: float                     # the source's own perplexity on the paragraph
    completions: dict[str, str]           # prompt -> greedy continuation (text)
    n_params: int                         # parameters of the source model (for bits per weight)
    vocab_size: int
    imatrix: Optional[dict] = None        # tensor name (HF) -> mean squared input activations, if asked


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        v = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v if isinstance(x, int))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_source(src_dir: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) for the checkpoint: its own transformers class, fp32, eval mode, on the CPU."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise missing_extra("transformers", extra="quantize") from e
    cfg = json.loads((Path(src_dir) / "config.json").read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch and not trust_remote_code else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForCausalLM
    has_safetensors = any(Path(src_dir).glob("*.safetensors"))
    kw = dict(dtype=torch.float32, trust_remote_code=trust_remote_code, local_files_only=True,
              use_safetensors=True if has_safetensors or not allow_pickle else None)
    try:
        model = cls.from_pretrained(str(src_dir), **kw).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(src_dir), trust_remote_code=trust_remote_code,
                                                         local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BadModelFile(f"transformers could not load {Path(src_dir).name}: {first_line(e)[:300]}",
                           hint="Check that the checkpoint is complete; VLM_DEBUG=1 shows the traceback.") from e
    return model, tok


def source_reference(src_dir: Path, *, n_tokens: int = DEFAULT_TOKENS, trust_remote_code: bool = False,
                     allow_pickle: bool = False, calibration_text: Optional[str] = None,
                     on_progress: Optional[ProgressCallback] = None, hessians: bool = False) -> Reference:
    """Run the source model once: paragraph log-probs, greedy completions, and (with ``calibration_text``)
    the importance matrix of every linear layer's input (``hessians``: with the second moments ONNX int4's
    "gptq" recipe needs; see ``collect_imatrix``). The model is freed before returning."""
    import numpy as np
    import torch

    from ..runtime.device.hardware import default_threads

    torch.set_num_threads(default_threads())
    _progress(on_progress, "reference", 0, len(PROMPTS) + 2)
    model, tok = load_source(src_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    try:
        _progress(on_progress, "reference", 1, len(PROMPTS) + 2)
        ids = tok(HELD_OUT_TEXT, add_special_tokens=True)["input_ids"][:n_tokens]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1).numpy().astype(np.float32)
        nll = -logprobs[np.arange(len(ids) - 1), ids[1:]]
        ppl = float(np.exp(nll.mean()))
        _progress(on_progress, "reference", 2, len(PROMPTS) + 2)
        eos = _eos_ids(model, tok)
        completions = {}
        for i, prompt in enumerate(PROMPTS):
            completions[prompt] = _greedy(model, tok, prompt, COMPLETION_TOKENS, eos)
            _progress(on_progress, "reference", 3 + i, len(PROMPTS) + 2)
        n_params = sum(p.numel() for p in model.parameters())
        imatrix = collect_imatrix(model, tok, calibration_text, on_progress, hessians=hessians) if calibration_text else None
        return Reference(token_ids=list(ids), logprobs=logprobs, perplexity=ppl, completions=completions,
                         n_params=int(n_params), vocab_size=int(logprobs.shape[-1]), imatrix=imatrix)
    finally:
        del model
        gc.collect()


def _greedy(model, tok, prompt: str, n: int, eos: set[int]) -> str:
    import torch

    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            t = int(torch.argmax(logits))
            if t in eos:
                break
            out.append(t)
    return tok.decode(out, skip_special_tokens=True)


class ImportanceMatrix(dict):
    """An importance matrix (tensor name -> mean squared input activation per input channel, what GGUF
    targets take) that also carries, in ``hessians``, each linear layer's full second moment of its input
    (``mean(x x^T)``, K x K float32; layers fed by the same input share one array): what ONNX int4's
    GPTQ-style error compensation needs. The diagonal of a layer's matrix is its importance vector."""

    def __init__(self, *args, hessians: Optional[dict] = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.hessians = hessians or {}

    def __reduce__(self):                 # pickles with its hessians (benchmarks cache the reference)
        return (_rebuild_importance, (dict(self), self.hessians))


def _rebuild_importance(d: dict, hessians: dict) -> "ImportanceMatrix":
    return ImportanceMatrix(d, hessians=hessians)


# Full second moments are kept for inputs up to this width, and while their sum stays under the budget
# (bytes, float32): a 135M model needs ~400 MB, a 1.7B one would need ~8 GB, so larger models keep the
# diagonal only for their widest inputs (their MLP down projections) and quantize those without GPTQ.
HESSIAN_MAX_K = 8192
HESSIAN_BUDGET = 3 * 1024 ** 3
# GPTQ's second moments settle long before the importance vectors need the whole text: they are summed
# over the first 8192 calibration tokens only (each token costs a K x K product for every layer).
HESSIAN_TOKENS = 8192


def collect_imatrix(model, tok, text: str, on_progress: Optional[ProgressCallback] = None,
                    *, chunk: int = 512, max_tokens: int = 32768, hessians: bool = False) -> dict:
    """Importance matrix, as llama.cpp's ``llama-imatrix`` defines it: for every linear layer, the mean
    over calibration tokens of each input column's squared activation. Keys are the module's weight
    name in the checkpoint (``model.layers.0.self_attn.q_proj.weight``); values float32 arrays.
    Returns an ``ImportanceMatrix``; with ``hessians`` it also holds each layer's ``mean(x x^T)`` (layers
    reading the same input tensor share one), within ``HESSIAN_MAX_K`` / ``HESSIAN_BUDGET``."""
    import numpy as np
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 16:
        from ..runtime.errors import UsageError

        raise UsageError(f"The calibration text has only {len(ids)} tokens.",
                         hint="Give --calibration a text file of at least a few thousand words.")
    sums: dict[str, object] = {}
    counts: dict[str, int] = {}
    full: dict[str, object] = {}          # name -> running sum of x^T x (float64), or an alias's name
    alias: dict[str, str] = {}
    last = {"input": None, "name": None}
    used, seen = [0], [0]
    hcount: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(_mod, inputs, _out):
            x0 = inputs[0]
            x = x0.detach().reshape(-1, x0.shape[-1]).double()
            s = (x * x).sum(0)
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0) + x.shape[0]
            if not hessians or seen[0] >= HESSIAN_TOKENS:
                return
            if last["input"] is x0 and last["name"] is not None:        # q/k/v, gate/up: the same input
                alias[name] = alias.get(last["name"], last["name"])
                return
            k = x.shape[1]
            if name not in full:
                if k > HESSIAN_MAX_K or used[0] + 4 * k * k > HESSIAN_BUDGET:
                    return
                used[0] += 4 * k * k
                full[name] = torch.zeros(k, k, dtype=torch.float64)
            xf = x0.detach().reshape(-1, k).float()
            full[name] += (xf.T @ xf).double()      # float32 products per chunk, float64 sums
            hcount[name] = hcount.get(name, 0) + xf.shape[0]
            last["input"], last["name"] = x0, name
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(hook(name + ".weight")))
    try:
        n_chunks = math.ceil(len(ids) / chunk)
        with torch.inference_mode():
            for i in range(n_chunks):
                _progress(on_progress, "imatrix", i, n_chunks)
                last["input"] = last["name"] = None
                part = ids[i * chunk:(i + 1) * chunk]
                model(input_ids=torch.tensor([part]))
                seen[0] += len(part)
        _progress(on_progress, "imatrix", n_chunks, n_chunks)
    finally:
        for h in hooks:
            h.remove()
    hs = {k: (v / hcount[k]).float().numpy() for k, v in full.items() if hcount.get(k)}
    hs.update({k: hs[a] for k, a in alias.items() if a in hs})
    return ImportanceMatrix({k: (sums[k] / counts[k]).float().numpy().astype(np.float32) for k in sums}, hessians=hs)


# ------------------------------------------------------------------------------------- metrics

def compare(ref: Reference, logits) -> dict:
    """Top-1 agreement, mean KL(source || artifact) and the artifact's perplexity, over ``ref.token_ids``."""
    import numpy as np

    a = np.asarray(logits, dtype=np.float64)
    s = np.asarray(ref.logprobs, dtype=np.float64)
    n = min(len(a), len(s))
    v = min(a.shape[-1], s.shape[-1])          # embeddings padded to a round size on one side
    a, s = a[:n, :v], s[:n, :v]
    if not np.all(np.isfinite(a)):
        raise BackendError("The artifact produced non-finite logits (NaN or infinity).",
                           hint="The quantization is broken for this model: try a wider type (q8_0, int8).")
    la = a - a.max(-1, keepdims=True)
    la = la - np.log(np.exp(la).sum(-1, keepdims=True))
    ls = s - np.log(np.exp(s).sum(-1, keepdims=True))
    ps = np.exp(ls)
    kl = (ps * (ls - la)).sum(-1)
    top1 = float((la.argmax(-1) == ls.argmax(-1)).mean())
    nxt = np.asarray(ref.token_ids[1:n], dtype=np.int64)
    ok = nxt < v
    nll = -la[np.arange(n - 1)[ok], nxt[ok]]
    return {"positions": int(n), "top1_agreement": round(top1, 4), "kl_mean": round(float(kl.mean()), 5),
            "kl_max": round(float(kl.max()), 4), "perplexity": round(float(np.exp(nll.mean())), 3),
            "source_perplexity": round(ref.perplexity, 3)}


@dataclass
class Verification:
    metrics: dict
    completions: list[dict] = field(default_factory=list)    # prompt, source, artifact, match
    decode_tps: Optional[float] = None
    tokenizer_match: Optional[bool] = None
    vision: Optional[dict] = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    metrics_stepwise: Optional[dict] = None   # ONNX: scored token by token through the KV cache

    def to_dict(self) -> dict:
        extra = {"metrics_stepwise": self.metrics_stepwise} if self.metrics_stepwise is not None else {}
        return {"metrics": self.metrics, **extra, "decode_tps": self.decode_tps, "tokenizer_match": self.tokenizer_match,
                "completions": self.completions, "vision": self.vision, "warnings": self.warnings,
                "seconds": round(self.seconds, 2)}


def _judge(v: Verification, ref: Reference, min_top1: float) -> None:
    if v.metrics["top1_agreement"] < min_top1:
        v.warnings.append(f"top-1 agreement {v.metrics['top1_agreement']:.0%} is below {min_top1:.0%}: "
                          "this quantization changes the model's predictions noticeably")
    lost = [c["prompt"] for c in v.completions if c["source_word"] and not c["match"]]
    if lost:
        v.warnings.append(f"{len(lost)} of {len(v.completions)} prompt(s) complete differently from the source")
    if v.tokenizer_match is False:
        v.warnings.append("the artifact's tokenizer splits the held-out text differently from the source's")


def _completion_rows(ref: Reference, outs: dict[str, str]) -> list[dict]:
    rows = []
    for prompt in PROMPTS:
        src, art = ref.completions.get(prompt, ""), outs.get(prompt, "")
        rows.append({"prompt": prompt, "source": src, "artifact": art, "source_word": first_word(src),
                     "match": first_word(src) == first_word(art)})
    return rows


def _generate(backend, prompt: str, n: int):
    from ..runtime.generation.core import complete
    from ..runtime.protocol import ChatRequest, GenerationOptions, Message

    return complete(backend, ChatRequest([Message(role="user", content=prompt)],
                                         GenerationOptions(max_tokens=n, temperature=0.0, raw=True)))


def _decode_tps(backend, runs: int = 2) -> Optional[float]:
    """Decode tokens/s of a short raw generation: the best of ``runs`` (other processes only slow it down)."""
    best = None
    for _ in range(runs):
        backend.reset()
        _, last = _generate(backend, SPEED_PROMPT, SPEED_TOKENS)
        if last is None or last.completion_tokens < 2 or last.decode_s <= 0:
            continue
        tps = (last.completion_tokens - 1) / last.decode_s
        best = tps if best is None else max(best, tps)
    return None if best is None else round(best, 1)


# ---------------------------------------------------------------------------------------- GGUF

# Context for the image check: SmolVLM's processor scales every image to a 2048-px edge and cuts it into
# up to 16 tiles plus a global one, 64 tokens each (~1100 tokens); LLaVA 1.5 takes 576. The backends cap
# it at the model's trained context.
VISION_CTX = DEFAULT_CTX


def vision_smoke(backend) -> dict:
    """One synthetic image through the projector: it must encode and the model must answer."""
    import hashlib

    from PIL import Image

    from ..runtime.protocol import ChatRequest, GenerationOptions, ImageDetail, ImageInput, Message

    img = Image.new("RGB", (96, 64))
    img.putdata([(x * 255 // 96, y * 255 // 64, (x * y) % 256) for y in range(64) for x in range(96)])
    rgb = img.tobytes()
    image = ImageInput(rgb=rgb, width=96, height=64, source="verify.png", sha256=hashlib.sha256(rgb).hexdigest())
    req = ChatRequest([Message(role="user", content="Describe this image.", images=[image])], GenerationOptions(
        max_tokens=4, temperature=0.0,
        # the model's own full tiling, never the embedding cache: the check is that the projector encodes
        # and that the context holds the most image tokens the model makes
        image_detail=ImageDetail(level="high", cache=False)))
    from ..runtime.generation.core import complete

    _, last = complete(backend, req)
    if last.image_tokens <= 0:
        raise BackendError("The vision projector did not turn the test image into tokens.",
                           hint="The mmproj file may not belong to the text model.")
    return {"image_tokens": last.image_tokens, "image_encode_ms": round(last.image_encode_s * 1000, 1),
            "finish_reason": last.finish_reason}


def _prompts_and_speed(backend, on_progress, stage: str, total: int) -> tuple[dict, Optional[float]]:
    """The fixed prompts (greedy, each from an empty cache), then a timed generation: what every
    artifact's verification runs through our own backend. Progress steps 2.. len(PROMPTS) + 1."""
    outs = {}
    for i, prompt in enumerate(PROMPTS):
        backend.reset()
        outs[prompt] = _generate(backend, prompt, COMPLETION_TOKENS)[0]
        _progress(on_progress, stage, 2 + i, total)
    backend.reset()
    return outs, _decode_tps(backend)


def _verdict(ref: Reference, metrics: dict, outs: dict, tps: Optional[float], own_ids: list[int],
             min_top1: float, **extra) -> Verification:
    """The verification of one artifact from what was measured, judged against ``min_top1``."""
    v = Verification(metrics=metrics, completions=_completion_rows(ref, outs), decode_tps=tps,
                     tokenizer_match=own_ids[:len(ref.token_ids)] == ref.token_ids, **extra)
    _judge(v, ref, min_top1)
    return v


def verify_gguf(model_path: Path, ref: Reference, *, mmproj: Optional[Path] = None, threads: Optional[int] = None,
                min_top1: float = 0.8, on_progress: Optional[ProgressCallback] = None) -> Verification:
    """Load the GGUF with our runtime, compare it with the source, time a generation."""
    from ..runtime.loader import load_backend
    from ..runtime.protocol import Artifact, LoadOptions

    t0 = time.perf_counter()
    stage = f"verify {Path(model_path).name}"
    total = len(PROMPTS) + 3 + (1 if mmproj else 0)
    _progress(on_progress, stage, 0, total)
    backend = load_backend(Artifact(format="gguf", path=Path(model_path), name=Path(model_path).name, mmproj=mmproj),
                           LoadOptions(n_ctx=VISION_CTX if mmproj is not None else 512, n_threads=threads))
    try:
        metrics = compare(ref, backend.score(ref.token_ids))      # every position's logits, one batch
        own_ids = backend.tokenize(HELD_OUT_TEXT, add_special=True, parse_special=False)
        _progress(on_progress, stage, 1, total)
        outs, tps = _prompts_and_speed(backend, on_progress, stage, total)
        _progress(on_progress, stage, total - (1 if mmproj else 0), total)
        vision = None
        if mmproj is not None:
            backend.reset()
            vision = vision_smoke(backend)
            _progress(on_progress, stage, total, total)
    finally:
        backend.close()
    v = _verdict(ref, metrics, outs, tps, own_ids, min_top1, vision=vision)
    v.seconds = time.perf_counter() - t0
    return v


# ---------------------------------------------------------------------------------------- ONNX

_LAST_POSITION_SLICE = "/edgevlm/last_position/Slice"     # quantize.onnx.keep_last_logits names it so


def _all_positions(model) -> bool:
    """Undo ``keep_last_logits`` in memory so the graph scores every position. True if it changed."""
    g = model.graph
    idx = next((i for i, n in enumerate(g.node) if n.name == _LAST_POSITION_SLICE and n.op_type == "Slice"), None)
    if idx is None:
        return False
    node = g.node[idx]
    hidden, sliced = node.input[0], node.output[0]
    for n in g.node:
        for j, name in enumerate(n.input):
            if name == sliced:
                n.input[j] = hidden
    del g.node[idx]
    for o in g.output:
        if o.name == "logits":
            dims = o.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].Clear()
                dims[1].dim_param = "sequence_length"
    return True


def onnx_logits(model_file: Path, token_ids: list[int], *, threads: Optional[int] = None, stepwise: bool = False):
    """Logits at every position of ``token_ids`` through our ONNX backend: in one run with an empty KV cache
    (as a prompt is evaluated; the graph's last-position slice is undone in a temporary copy), or with
    ``stepwise`` one token at a time through the KV cache (as tokens are generated). They differ when
    activations are quantized per tensor (dynamic int8): one outlier position then sets the scale for the
    whole batch."""
    try:
        import onnx
    except ImportError as e:
        raise missing_extra("onnx", extra="quantize") from e
    from ..runtime.loader import load_backend
    from ..runtime.protocol import Artifact, LoadOptions

    model_file = Path(model_file)
    path, tmp = model_file, None
    if not stepwise:
        proto = onnx.load(str(model_file), load_external_data=False)      # weights stay where they are
        if _all_positions(proto):
            tmp = model_file.with_name(f".verify-{os.getpid()}-{model_file.name}")   # beside its data file
            onnx.save_model(proto, str(tmp))
            path = tmp
        del proto
    try:
        backend = load_backend(Artifact(format="onnx", path=path, name=model_file.name),
                               LoadOptions(n_ctx=max(512, len(token_ids) + 8), n_threads=threads))
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    try:
        return backend.score(list(token_ids), batched=not stepwise)
    finally:
        backend.close()


def verify_onnx(model_file: Path, ref: Reference, *, threads: Optional[int] = None, min_top1: float = 0.8,
                on_progress: Optional[ProgressCallback] = None) -> Verification:
    """Load the ONNX decoder with onnxruntime and our ONNX backend, compare it with the source."""
    t0 = time.perf_counter()
    model_file = Path(model_file)
    stage = f"verify {model_file.parent.name}/{model_file.name}"
    total = len(PROMPTS) + 3
    _progress(on_progress, stage, 0, total)
    logits = onnx_logits(model_file, ref.token_ids, threads=threads)
    metrics = compare(ref, logits)
    del logits
    stepwise = compare(ref, onnx_logits(model_file, ref.token_ids, threads=threads, stepwise=True))
    _progress(on_progress, stage, 1, total)
    from ..runtime.loader import load_backend
    from ..runtime.protocol import Artifact, LoadOptions

    backend = load_backend(Artifact(format="onnx", path=model_file, name=model_file.name),
                           LoadOptions(n_ctx=512, n_threads=threads))
    try:
        own_ids = backend.tokenize(HELD_OUT_TEXT, add_special=True)
        outs, tps = _prompts_and_speed(backend, on_progress, stage, total)
        _progress(on_progress, stage, total, total)
    finally:
        backend.close()
    v = _verdict(ref, metrics, outs, tps, own_ids, min_top1, metrics_stepwise=stepwise)
    if stepwise["top1_agreement"] - metrics["top1_agreement"] > 0.05:
        v.warnings.append(
            f"scored token by token it agrees on {stepwise['top1_agreement']:.0%}, but only on "
            f"{metrics['top1_agreement']:.0%} when the text is evaluated at once: activations are quantized per "
            "tensor, so long prompts lose precision")
    v.seconds = time.perf_counter() - t0
    return v


def verify_onnx_vision(decoder_file: Path, ref: Reference, *, threads: Optional[int] = None, min_top1: float = 0.8,
                       on_progress: Optional[ProgressCallback] = None) -> Verification:
    """A three-part vision model through our ONNX backend: the held-out text scored token by token
    (token embeddings -> decoder, through the KV cache, as generation runs), the fixed prompts, and one
    image through the vision encoder."""
    from ..runtime.loader import load_backend
    from ..runtime.protocol import Artifact, LoadOptions

    t0 = time.perf_counter()
    decoder_file = Path(decoder_file)
    stage = f"verify {decoder_file.parent.name}/{decoder_file.name}"
    total = len(PROMPTS) + 3
    _progress(on_progress, stage, 0, total)
    backend = load_backend(Artifact(format="onnx", path=decoder_file, name=decoder_file.name),
                           LoadOptions(n_ctx=max(VISION_CTX, len(ref.token_ids) + 8), n_threads=threads))
    try:
        own_ids = backend.tokenize(HELD_OUT_TEXT, add_special=True)
        rows = backend.score(ref.token_ids, batched=False)    # logits after each token, as generation runs
        metrics = compare(ref, rows)
        del rows
        _progress(on_progress, stage, 1, total)
        outs, tps = _prompts_and_speed(backend, on_progress, stage, total)
        backend.reset()
        vision = vision_smoke(backend)
        _progress(on_progress, stage, total, total)
    finally:
        backend.close()
    v = _verdict(ref, metrics, outs, tps, own_ids, min_top1, vision=vision)
    v.seconds = time.perf_counter() - t0
    return v


__all__ = ["HELD_OUT_TEXT", "PROMPTS", "Reference", "Verification", "collect_imatrix", "compare", "first_word",
           "load_source", "onnx_logits", "source_reference", "verify_gguf", "verify_onnx",
           "verify_onnx_vision"]
