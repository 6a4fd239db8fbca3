"""The int4 recipes of ``quantize.onnx.quantize_onnx`` (issue 20): which MatMul gets 4 or 8 bits, each
block's scale and zero point (weighted least squares, GPTQ, or a float offset carried by extra input
rows), and the graph surgery that puts MatMulNBits / GatherBlockQuantized in place of MatMul / Gather.

Library code: heavy imports (numpy, onnx) inside the functions that need them.
"""
from __future__ import annotations

import json
from typing import Optional

from ..runtime.errors import UsageError

# metadata_props key: JSON {initializer: initializer} of tensors stored once in the data file and read
# under two names (a tied embedding and the lm_head: see ``_quantize_int4``).
_ALIASES_KEY = "edgevlm.tensor_aliases"


def onnx_float() -> int:
    import onnx

    return onnx.TensorProto.FLOAT


# ------------------------------------------------------------------------------------------ int4 recipe
# What `--to onnx:int4` writes, and why (issue 20; measured on SmolLM2-135M, figures in docs/quantize-output.md):
# * MatMulNBits zero points are whole numbers, so a block whose minimum is not a multiple of its step is
#   shifted as a whole by up to half a step. RTN (min/max) int4 lost 40% top-1 that way; a weighted
#   least-squares search for each block's scale and zero point (llama.cpp's make_qkx idea: try a few
#   scales, refit scale and offset, keep the best) halves the loss. Float zero points would be exact
#   but take onnxruntime's unpacked path: 12x slower decode.
# * Weighted by input-channel importance when the caller has an importance matrix (``--calibration``,
#   the same one GGUF targets use), else by |w| (k-quant's default weighting).
# * recipe "mixed", like Q4_K_M's mix: the most sensitive tensors -- the lm_head (with the tied embedding),
#   the attention q/k/v projections and the MLP down projection of the first and last layers -- as
#   8-bit MatMulNBits, the rest 4-bit.
# * share_tied_embedding: a tied token embedding is not stored twice: GatherBlockQuantized reads the
#   lm_head's own quantized blocks (same bytes, same blocks along the hidden axis) under a second
#   initializer name whose external-data entry points at the same bytes of the data file. (Reading the
#   lm_head's initializer itself cost 0.87x decode: onnxruntime does not prepack a weight two nodes read.)
#   It frees ~1 bit/w on a small model with a big vocabulary, which the 8-bit tensors then spend.
# * recipe "gptq" (issue 20, second round; asked for by name): GPTQ error compensation
#   (``gptq_blocks``) with each layer input's second moments from the calibration text, the attention
#   input projections at 8 bits, the tied embedding shared.
# "int4": 4-bit everywhere, searched (meets the size and speed of the RTN recipe); "mixed" adds the
# 8-bit tensors (better answers, 6.66 bits/w and ~0.9x decode).
# * recipe "offset" (issue 20, third round): each 4-bit block is fitted as ``s * q + m`` with a float
#   minimum m, as Q4_1 / Q4_K store it (``_fit_blocks_offset``). The integer zero point holds
#   ``-round(m / s)``; the rest, ``delta = m + s * z`` (at most half a step), rides in the same MatMulNBits
#   as extra input rows: the input becomes ``Concat(x, x @ S)`` (S: a 0/1 matrix whose column b sums
#   input block b) and the weight gets one row per block holding its delta, 4-bit like the rest
#   (``offset_blocks``). One small MatMul + Concat per distinct input, shared by the MatMuls that read
#   it; the tied embedding reads the lm_head's blocks including those rows (``_embedding_nodes``).
INT4_RECIPES = ("offset", "gptq", "mixed", "int4", "rtn")   # int4: every MatMul 4-bit, searched; rtn: the pre-issue-20 recipe
# The MatMuls (by role, the last part of the node's path) whose input gets the block-sum rows in the
# "offset" recipe; "*": all.
OFFSET_ROLES_ALL = ("*",)
# Tensors the "offset" recipe keeps at 8 bits: the lm_head (and the tied embedding read from its blocks),
# which in GGUFs is usually 6-bit or more (SmolLM2's Q4_1 test source: ~29 distinct values per block).
OFFSET_8BIT_ROLES: tuple = ("lm_head",)
_GPTQ_RECIPES = ("gptq",)
# "gptq": the attention input projections at 8 bits (SmolLM2: KL 0.166 -> 0.090 for +0.43 bits/w), the rest
# 4-bit with GPTQ, the tied embedding stored once with the lm_head's blocks.
_GPTQ_8BIT_ROLES = ("q_proj", "k_proj", "v_proj", "qkv_proj")
_HIGH_PRECISION_ROLES = ("lm_head", "q_proj", "k_proj", "v_proj", "qkv_proj")
_EDGE_LAYER_ROLES = ("down_proj", "fc2")


def _node_path(name: str) -> str:
    """``/model/layers.3/self_attn/q_proj/MatMul`` or ``/model.layers.3.self_attn.qkv_proj/MatMul`` ->
    ``model.layers.3.self_attn.q_proj`` (qkv_proj)."""
    parts = [p for p in name.strip("/").split("/") if p]
    if parts and parts[-1].startswith("MatMul"):
        parts = parts[:-1]
    return ".".join(parts)


def _layer_index(path: str) -> Optional[int]:
    bits = path.split(".")
    for i, b in enumerate(bits[:-1]):
        if b in ("layers", "layer", "h", "blocks") and bits[i + 1].isdigit():
            return int(bits[i + 1])
    return None


def int4_recipe(recipe: str, importance: Optional[dict]) -> str:
    """``"auto"``: "offset", with or without calibration (issue 20): the only recipe whose answers stay
    close to the source (SmolLM2-135M: top-1 95.3% / KL 0.004 at 6.25 bits/w, against 60.9% / 0.40 for
    "rtn" and GGUF Q4_K_M's 87.5% / 0.053), paid for with decode speed: its extra small operators per
    layer decode at ~0.82-0.89x of "rtn" on a 135M model. "rtn" / "int4" stay for those who want that
    speed back; "gptq" (needs --calibration) and "mixed" are asked for by name (docs/quantize-output.md)."""
    if recipe == "auto":
        return "offset"
    if recipe not in INT4_RECIPES:
        raise UsageError(f"Unknown int4 recipe {recipe!r}.", hint=f"Use one of {', '.join(INT4_RECIPES)}, or auto.")
    return recipe


def int4_bits_plan(names: list[str], recipe: str = "mixed", eight_bit_roles=None) -> dict[str, int]:
    """MatMul node name -> bits (4 or 8) for ``recipe``. Roles are read from the names our exporters
    write (fused builder, optimum, the vision parts): lm_head, q/k/v (or packed qkv), down_proj/fc2.
    ``eight_bit_roles`` (roles as ``_offset_role`` reads them) replaces the "offset" recipe's own
    (``OFFSET_8BIT_ROLES``)."""
    if recipe not in INT4_RECIPES:
        raise UsageError(f"Unknown int4 recipe {recipe!r}.", hint=f"Use one of {', '.join(INT4_RECIPES)}.")
    plan = {n: 4 for n in names}
    if recipe == "offset" or eight_bit_roles is not None:
        roles = OFFSET_8BIT_ROLES if eight_bit_roles is None else tuple(eight_bit_roles)
        for n in names:
            if _offset_role(n) in roles:
                plan[n] = 8
        return plan
    if recipe == "gptq":
        for n in names:
            if _node_path(n).rsplit(".", 1)[-1] in _GPTQ_8BIT_ROLES:
                plan[n] = 8
        return plan
    if recipe != "mixed":
        return plan
    layers = [i for i in (_layer_index(_node_path(n)) for n in names) if i is not None]
    n_layers = max(layers) + 1 if layers else 0
    edge = max(1, n_layers // 6)
    for n in names:
        path = _node_path(n)
        role = path.rsplit(".", 1)[-1]
        layer = _layer_index(path)
        if role in _HIGH_PRECISION_ROLES or path.endswith("lm_head"):
            plan[n] = 8
        elif role in _EDGE_LAYER_ROLES and layer is not None and (layer < edge or layer >= n_layers - edge):
            plan[n] = 8
    return plan


def importance_for(names_k: dict[str, int], importance: Optional[dict]) -> dict:
    """Match an importance matrix keyed by Hugging Face tensor names (``model.layers.3.mlp.down_proj.weight``
    -> mean squared input activation per input channel, what ``verify.collect_imatrix`` returns) to MatMul
    nodes by the last four parts of their paths (``layers.3.mlp.down_proj``; ``lm_head``), which the fused
    builder, optimum and the vision exporter all keep. Packed projections (qkv, gate_up) take their first
    member's vector: they share its input. Only vectors of length K are kept."""
    import numpy as np

    if not importance:
        return {}

    def tail(path: str) -> str:
        return "lm_head" if path.endswith("lm_head") else ".".join(path.split(".")[-4:])

    by_tail = {tail(k[:-len(".weight")] if k.endswith(".weight") else k): v for k, v in importance.items()}
    aliases = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}
    out = {}
    for name, k in names_k.items():
        path = _node_path(name)
        head, _, role = path.rpartition(".")
        for cand in (path, f"{head}.{aliases[role]}" if role in aliases else None):
            vec = by_tail.get(tail(cand)) if cand else None
            if vec is not None and np.asarray(vec).size == k:
                out[name] = np.asarray(vec, dtype=np.float32).reshape(-1)
                break
    return out


def _fit_blocks(x, wgt, maxq: int):
    """Weighted least-squares scale and integer zero point for each row of ``x`` [rows, block]: start from
    min/max, try ``maxq + d`` steps over the range (d in -1..1), refit scale and offset by weighted least
    squares, round the zero point, refit the scale, keep the best. Returns q (0..maxq), scale, zero (ints)."""
    import numpy as np

    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    rng = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    sw = wgt.sum(-1, keepdims=True)
    best = None
    for d in np.arange(-1.0, 1.01, 0.1, dtype=np.float32):
        q = np.clip(np.rint((x - lo) * ((maxq + d) / rng)), 0, maxq)
        sq, sqq = (wgt * q).sum(-1, keepdims=True), (wgt * q * q).sum(-1, keepdims=True)
        sx, sqx = (wgt * x).sum(-1, keepdims=True), (wgt * q * x).sum(-1, keepdims=True)
        det = sw * sqq - sq * sq
        ok = det > 1e-30
        s = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), rng / maxq)
        off = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), lo)
        s = np.where(s > 0, s, rng / maxq)
        z = np.clip(np.rint(-off / s), 0, maxq)
        q = np.clip(np.rint(x / s + z), 0, maxq)
        c = q - z
        scc = (wgt * c * c).sum(-1, keepdims=True)
        s = np.where(scc > 0, (wgt * c * x).sum(-1, keepdims=True) / np.where(scc > 0, scc, 1), s)
        s = np.where(s > 0, s, rng / maxq)
        q = np.clip(np.rint(x / s + z), 0, maxq)
        err = (wgt * ((q - z) * s - x) ** 2).sum(-1, keepdims=True)
        if best is None:
            best = [err, q, s, z]
        else:
            better = err < best[0]
            for i, v in enumerate((err, q, s, z)):
                best[i] = np.where(better, v, best[i])
    return best[1], best[2], best[3]


def _block_weights(x, imp, n: int, kb: int, block: int):
    """How much each weight of ``x`` [n*kb, block] (n columns of kb blocks) counts in its block's fit: its
    input channel's importance ``imp`` [kb*block] (the imatrix: the error a weight causes ~ its input's mean
    square), else llama.cpp's weighting without an imatrix, which favours the large weights."""
    import numpy as np

    if imp is not None:
        return np.array(np.broadcast_to(imp.reshape(1, kb, block), (n, kb, block)).reshape(n * kb, block))
    return np.sqrt((x * x).mean(-1, keepdims=True) + x * x)


def quantize_blocks(wt, bits: int, block: int, importance=None, chunk: int = 4096):
    """A MatMul weight [K, N] -> MatMulNBits inputs: B uint8 [N, K/block, block*bits/8] (two 4-bit values a
    byte, low nibble first), scales float32 [N, K/block], packed zero points uint8 [N * ceil(K/block * bits/8)].
    Blocks run along K (one column's consecutive input channels), as the kernel reads them."""
    import numpy as np

    K, N = wt.shape
    kb = -(-K // block)
    maxq = (1 << bits) - 1
    imp = None
    if importance is not None:
        imp = np.zeros(kb * block, np.float32)
        imp[:K] = np.maximum(np.asarray(importance, np.float32), 0)
        if not np.any(imp > 0):
            imp = None
    q_all = np.empty((N, kb, block), np.uint8)
    s_all = np.empty((N, kb), np.float32)
    z_all = np.empty((N, kb), np.uint8)
    for c0 in range(0, N, chunk):
        cols = np.asarray(wt[:, c0:c0 + chunk], dtype=np.float32).T          # [n, K]
        n = cols.shape[0]
        if kb * block != K:
            cols = np.pad(cols, ((0, 0), (0, kb * block - K)))
        x = cols.reshape(n * kb, block)
        w = _block_weights(x, imp, n, kb, block)
        if kb * block != K:                                          # padding must not pull the fit
            pad = np.zeros((kb * block,), np.float32)
            pad[:K] = 1
            w = w * np.broadcast_to(pad.reshape(1, kb, block), (n, kb, block)).reshape(n * kb, block)
        q, s, z = _fit_blocks(x, w, maxq)
        q_all[c0:c0 + n] = q.reshape(n, kb, block)
        s_all[c0:c0 + n] = s.reshape(n, kb)
        z_all[c0:c0 + n] = z.reshape(n, kb)
    return _pack(q_all, s_all, z_all, bits)


def hessians_for(names_k: dict[str, int], importance: Optional[dict]) -> dict:
    """MatMul node name -> its input's second moment ``mean(x x^T)`` [K, K], matched like ``importance_for``
    from the ``hessians`` an ``ImportanceMatrix`` (``verify.collect_imatrix``) carries; {} without them."""
    hs = getattr(importance, "hessians", None) if importance else None
    if not hs:
        return {}
    flat = {k: v.reshape(-1) for k, v in hs.items()}      # views: matched on size K*K like the vectors
    got = importance_for({n: k * k for n, k in names_k.items()}, flat)
    return {n: v.reshape(names_k[n], names_k[n]) for n, v in got.items()}


def _gptq_setup(wt, hessian, damp: float):
    """GPTQ's starting point for a weight [K, N] and its input's second moment [K, K]: the weights as a
    float32 copy (inputs that never fire zeroed), the upper Cholesky factor of the damped inverse
    Hessian, and the Hessian's diagonal (each input's importance for the block fits)."""
    import numpy as np

    K = wt.shape[0]
    W = np.array(wt, dtype=np.float32)                         # [K, N]: GPTQ's columns are our rows
    H = np.array(hessian, dtype=np.float64)
    diag = np.diag(H).copy()
    dead = diag <= 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H[np.diag_indices(K)] += damp * float(np.mean(diag[~dead])) if np.any(~dead) else damp
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T             # upper factor of H^-1
    except np.linalg.LinAlgError:
        H[np.diag_indices(K)] += 0.1 * float(np.mean(np.diag(H)))
        U = np.linalg.cholesky(np.linalg.inv(H)).T
    return W, U.astype(np.float32), np.maximum(diag, 0).astype(np.float32)


def _gptq_sweep(W, U, block: int, step: int, fit, quantize) -> None:
    """GPTQ's pass over the input channels (the rows of ``W`` [K, N], updated in place): at each block's
    first row ``fit(b, rows)`` fits block b's grid on its rows as updated so far ([N, block]); each row is
    then ``quantize(row, w)``-d (the value it will hold), and its error, divided by its diagonal of ``U``
    (``_gptq_setup``), is spread over the rows not yet quantized: within ``step`` rows at once, beyond
    them once per step (the lazy batch update)."""
    import numpy as np

    K, N = W.shape
    step = max(block, step - step % block)
    for i1 in range(0, K, step):
        i2 = min(i1 + step, K)
        W1 = W[i1:i2]                                          # a view: updated in place
        E1 = np.empty((i2 - i1, N), np.float32)
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                fit(col // block, np.ascontiguousarray(W1[i:i + block].T))
            w = W1[i]
            err = (w - quantize(col, w)) / U[col, col]
            E1[i] = err
            if i + 1 < i2 - i1:
                W1[i + 1:] -= np.outer(U[col, col + 1:i2], err)
        if i2 < K:
            W[i2:] -= U[i1:i2, i2:].T @ E1


def gptq_blocks(wt, bits: int, block: int, hessian, *, damp: float = 0.01, step: int = 128):
    """``quantize_blocks`` with GPTQ's error compensation (Frantar et al. 2022): input channels are
    quantized one at a time in order, and each one's rounding error, divided by its diagonal of the
    inverse Hessian's Cholesky factor, is spread over the channels not yet quantized in proportion to
    how their inputs correlate (``hessian`` = the input's ``mean(x x^T)`` from calibration text), so the
    layer's output error rather than its weight error is what the rounding minimises. Each block's scale and
    integer zero point are fitted (``_fit_blocks``, weighted by the Hessian's diagonal) on the weights
    as updated when the block is reached. Same outputs as ``quantize_blocks``."""
    import numpy as np

    K, N = wt.shape
    if K % block:
        return quantize_blocks(wt, bits, block, np.diag(hessian))
    maxq = (1 << bits) - 1
    W, U, imp = _gptq_setup(wt, hessian, damp)
    Q = np.empty((K, N), np.uint8)
    kb = K // block
    S = np.empty((kb, N), np.float32)
    Z = np.empty((kb, N), np.float32)
    grid: list = []

    def fit(b: int, x):                                        # x: block b's rows as updated so far [N, block]
        _, s, z = _fit_blocks(x, np.broadcast_to(imp[b * block:(b + 1) * block] + 1e-12, x.shape), maxq)
        grid[:] = s[:, 0], z[:, 0]
        S[b], Z[b] = grid

    def quantize(col: int, w):
        s, z = grid
        q = np.clip(np.rint(w / s + z), 0, maxq)
        Q[col] = q
        return (q - z) * s

    _gptq_sweep(W, U, block, step, fit, quantize)
    q_all = np.ascontiguousarray(Q.T).reshape(N, kb, block)
    s_all, z_all = np.ascontiguousarray(S.T), np.ascontiguousarray(Z.T).astype(np.uint8)
    return _pack(q_all, s_all, z_all, bits)


def _fit_blocks_offset(x, wgt, maxq: int):
    """Weighted least squares of ``x`` [rows, block] ~ ``s * q + m`` with q in 0..maxq and a float minimum m
    (llama.cpp's make_qkx): try ``maxq + d`` steps over the range (d in -1..1, and -2..-4), refit scale and minimum for
    those levels, keep the best, then re-round against the best fit and refit twice. Returns q (float
    levels), s and m ([rows, 1])."""
    import numpy as np

    lo = x.min(-1, keepdims=True)
    hi = x.max(-1, keepdims=True)
    rng = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    sw = wgt.sum(-1, keepdims=True)

    def refit(q):
        sq, sqq = (wgt * q).sum(-1, keepdims=True), (wgt * q * q).sum(-1, keepdims=True)
        sx, sqx = (wgt * x).sum(-1, keepdims=True), (wgt * q * x).sum(-1, keepdims=True)
        det = sw * sqq - sq * sq
        ok = det > 1e-30 * np.maximum(sw * sqq, 1e-30)
        safe = np.where(ok, det, 1)
        s = np.where(ok, (sw * sqx - sq * sx) / safe, rng / maxq)
        m = np.where(ok, (sqq * sx - sq * sqx) / safe, lo)
        bad = ~(s > 0)
        s = np.where(bad, rng / maxq, s)
        m = np.where(bad, lo, m)
        q = np.where(bad, np.clip(np.rint((x - lo) / s), 0, maxq), q)
        err = (wgt * (s * q + m - x) ** 2).sum(-1, keepdims=True)
        return err, q, s, m

    best = None
    # -2..-4: blocks that miss the top and bottom levels of a grid they lie on exactly (a Q4_1 source)
    steps = np.concatenate([np.arange(-1.0, 1.01, 0.1), [-2.0, -3.0, -4.0]]).astype(np.float32)
    for d in steps:
        got = refit(np.clip(np.rint((x - lo) * ((maxq + d) / rng)), 0, maxq))
        if best is None:
            best = list(got)
        else:
            better = got[0] < best[0]
            for i, v in enumerate(got):
                best[i] = np.where(better, v, best[i])
    for _ in range(2):
        got = refit(np.clip(np.rint((x - best[3]) / best[2]), 0, maxq))
        better = got[0] < best[0]
        for i, v in enumerate(got):
            best[i] = np.where(better, v, best[i])
    return best[1], best[2], best[3]


def offset_rows(k: int, block: int) -> int:
    """The extra inputs of an "offset" MatMul with K inputs: one per block (K' = K + K/block)."""
    return -(-k // block)


def block_sum_matrix(k: int, block: int):
    """S [K, K/block] float32: column b is input block b's mean (``x @ S``; 1/block is exact in fp32)."""
    import numpy as np

    S = np.zeros((k, offset_rows(k, block)), np.float32)
    S[np.arange(k), np.arange(k) // block] = 1.0 / block
    return S


def _unpack(packed, bits: int):
    import numpy as np

    if bits == 8:
        return packed.astype(np.float32)
    N, kb, half = packed.shape
    return np.stack([packed & 15, packed >> 4], -1).reshape(N, kb, 2 * half).astype(np.float32)


def offset_blocks(wt, bits: int, block: int, importance=None, hessian=None, chunk: int = 4096):
    """A MatMul weight [K, N] (K a multiple of ``block``) -> MatMulNBits inputs for ``K + offset_rows(K)``
    inputs, the rows after K holding each block's offset (see the "offset" recipe above): B uint8
    [N, K'/block, block*bits/8], scales [N, K'/block], packed and unpacked integer zero points, as
    ``quantize_blocks`` returns them. Each block is fitted as ``s * q + m`` (``_fit_blocks_offset``, weighted
    like ``quantize_blocks``); z = round(-m / s) and delta = m + s * z go to the extra rows, which are
    quantized themselves (weighted by the expected square of their block sums: from ``hessian`` when
    given, else the sum of the block's importances), and the block's levels and scale are refitted against
    the quantized delta. The layer computes ``x @ W ~= Concat(x, x @ S) @ W'``."""
    import numpy as np

    K, N = wt.shape
    if K % block:
        raise ValueError(f"K={K} is not a multiple of block {block}")
    kb = K // block
    P = -(-kb // block) * block              # the offset rows, padded to whole blocks of their own
    maxq = (1 << bits) - 1
    imp = None
    if importance is not None:
        imp = np.maximum(np.asarray(importance, np.float32).reshape(-1), 0)
        if not np.any(imp > 0):
            imp = None

    q_all = np.empty((N, kb, block), np.uint8)
    s_all = np.empty((N, kb), np.float32)
    z_all = np.empty((N, kb), np.float32)
    delta = np.empty((N, kb), np.float32)
    for c0 in range(0, N, chunk):
        x = np.asarray(wt[:, c0:c0 + chunk], dtype=np.float32).T.reshape(-1, block)     # [n*kb, block]
        n = x.shape[0] // kb
        q, s, m = _fit_blocks_offset(x, _block_weights(x, imp, n, kb, block), maxq)
        z = np.clip(np.rint(-m / s), 0, maxq)
        q_all[c0:c0 + n] = q.reshape(n, kb, block)
        s_all[c0:c0 + n] = s.reshape(n, kb)
        z_all[c0:c0 + n] = z.reshape(n, kb)
        delta[c0:c0 + n] = (m + s * z).reshape(n, kb)

    if hessian is not None:
        H = np.asarray(hessian, np.float64)
        dimp = H.reshape(kb, block, kb, block).sum((1, 3))[np.arange(kb), np.arange(kb)]
    elif imp is not None:
        dimp = imp.reshape(kb, block).sum(1)
    else:
        dimp = np.ones(kb)
    dimp_full = np.zeros(P, np.float32)
    dimp_full[:kb] = np.maximum(dimp, 0)
    rows = np.zeros((P, N), np.float32)
    rows[:kb] = delta.T * block               # the extra inputs are block means, not sums
    dp, ds, _, dz = quantize_blocks(rows, bits, block, dimp_full if np.any(dimp_full > 0) else None)
    lv = _unpack(dp, bits)
    delta_q = ((lv - dz[..., None].astype(np.float32)) * ds[..., None]).reshape(N, P)[:, :kb] / block

    for c0 in range(0, N, chunk):            # the levels and scale again, against the delta as stored
        x = np.asarray(wt[:, c0:c0 + chunk], dtype=np.float32).T.reshape(-1, block)
        n = x.shape[0] // kb
        w = _block_weights(x, imp, n, kb, block)
        s = s_all[c0:c0 + n].reshape(-1, 1)
        z = z_all[c0:c0 + n].reshape(-1, 1)
        dl = delta_q[c0:c0 + n].reshape(-1, 1)
        y = x - dl
        q0 = np.clip(np.rint(y / s + z), 0, maxq)
        e0 = (w * ((q0 - z) * s - y) ** 2).sum(-1, keepdims=True)
        c = q0 - z
        scc = (w * c * c).sum(-1, keepdims=True)
        s1 = np.where(scc > 0, (w * c * y).sum(-1, keepdims=True) / np.where(scc > 0, scc, 1), s)
        s1 = np.where(s1 > 0, s1, s)
        q1 = np.clip(np.rint(y / s1 + z), 0, maxq)
        e1 = (w * ((q1 - z) * s1 - y) ** 2).sum(-1, keepdims=True)
        better = e1 < e0
        q_all[c0:c0 + n] = np.where(better, q1, q0).reshape(n, kb, block)
        s_all[c0:c0 + n] = np.where(better, s1, s).reshape(n, kb)

    q_full = np.concatenate([q_all, lv.astype(np.uint8)], 1)
    s_full = np.concatenate([s_all, ds], 1)
    z_full = np.concatenate([z_all.astype(np.uint8), dz.astype(np.uint8)], 1)
    return _pack(q_full, s_full, z_full, bits)


def gptq_offset_blocks(wt, bits: int, block: int, hessian, *, damp: float = 0.01, step: int = 128):
    """``offset_blocks`` with GPTQ's error compensation (``gptq_blocks``): each block's scale, integer zero
    point and float offset are fitted (``_fit_blocks_offset``) on the weights as updated when the block is
    reached, its offset is rounded at once on the offset rows' grid (taken from a plain ``offset_blocks``
    pass), and every weight's error -- level and offset rounding together -- is spread over the input
    channels not yet quantized. Same outputs as ``offset_blocks``."""
    import numpy as np

    K, N = wt.shape
    kb = K // block
    maxq = (1 << bits) - 1
    _, s0, _, z0 = offset_blocks(wt, bits, block, np.diag(hessian))
    ds, dz = s0[:, kb:], z0[:, kb:].astype(np.float32)           # the offset rows' grid [N, P/block]
    P = ds.shape[1] * block
    W, U, imp = _gptq_setup(wt, hessian, damp)
    Q = np.empty((K, N), np.uint8)
    S = np.empty((kb, N), np.float32)
    Z = np.empty((kb, N), np.float32)
    D = dz.astype(np.uint8).repeat(block, 1)               # offset-row levels [N, P]; padding rows: zero
    grid: list = []

    def fit(b: int, x):
        _, s, m = _fit_blocks_offset(x, np.broadcast_to(imp[b * block:(b + 1) * block] + 1e-12, x.shape), maxq)
        s, m = s[:, 0], m[:, 0]
        z = np.clip(np.rint(-m / s), 0, maxq)
        g, gz = ds[:, b // block], dz[:, b // block]
        lv = np.clip(np.rint((m + s * z) * block / g + gz), 0, maxq)
        D[:, b] = lv
        grid[:] = s, z, (lv - gz) * g / block
        S[b], Z[b] = s, z

    def quantize(col: int, w):
        s, z, dq = grid
        q = np.clip(np.rint((w - dq) / s + z), 0, maxq)
        Q[col] = q
        return (q - z) * s + dq

    _gptq_sweep(W, U, block, step, fit, quantize)
    q_full = np.concatenate([np.ascontiguousarray(Q.T).reshape(N, kb, block), D.reshape(N, P // block, block)], 1)
    s_full = np.concatenate([np.ascontiguousarray(S.T), ds], 1)
    z_full = np.concatenate([np.ascontiguousarray(Z.T).astype(np.uint8), dz.astype(np.uint8)], 1)
    return _pack(q_full, s_full, z_full, bits)


def _pack(q_all, s_all, z_all, bits: int):
    """[N, K/block, block] levels, [N, K/block] scales and integer zero points -> MatMulNBits' inputs."""
    import numpy as np

    N, kb = s_all.shape
    if bits == 4:
        packed = q_all[..., 0::2] | (q_all[..., 1::2] << 4)
        zz = z_all if kb % 2 == 0 else np.concatenate([z_all, np.full((N, 1), 8, np.uint8)], 1)
        zp = (zz[:, 0::2] | (zz[:, 1::2] << 4)).reshape(-1)
    else:
        packed, zp = q_all, z_all.reshape(-1)
    return packed.astype(np.uint8), s_all.astype(np.float32), zp.astype(np.uint8), z_all


def _wide_block(k: int, block_size: int) -> int:
    """8-bit tensors take the widest block (up to 256) that divides K: the scale costs 32/block bits a weight,
    and 8-bit steps are fine enough that wider blocks cost next to nothing in accuracy."""
    for b in (256, 128, 64, 32, 16):
        if b >= block_size and k % b == 0:
            return b
    return block_size


def _offset_role(name: str) -> str:
    path = _node_path(name)
    return "lm_head" if path.endswith("lm_head") else path.rsplit(".", 1)[-1]


def offset_roles_for(recipe: str, offset_roles=None) -> tuple:
    """The roles whose MatMuls get block-offset rows: ``offset_roles`` when given, else all of them for
    the "offset" recipe and none for the others."""
    if offset_roles is not None:
        return tuple(offset_roles)
    return OFFSET_ROLES_ALL if recipe == "offset" else ()


def _block_sum_nodes(x: str, k: int, block: int, have: set, rank: Optional[int]):
    """``Concat(x, block means of x)`` for the "offset" MatMuls reading ``x``: (nodes, new initializers,
    output name). The means: one ``AveragePool`` over the last axis (kernel = stride = block) when x has a
    known rank >= 3 (decode: two small ops per input; a fp32 MatMul against a 0/1 matrix cost ~3x more
    here), else ``x @ S`` (``block_sum_matrix``, one per K)."""
    from onnx import helper, numpy_helper

    p = f"/edgevlm/block_sums{x if x.startswith('/') else '/' + x}"
    kb = offset_rows(k, block)
    extra = []
    if rank and rank >= 3:
        nodes = [helper.make_node("AveragePool", [x], [f"{p}/means"], name=f"{p}/AveragePool",
                                  kernel_shape=[1] * (rank - 3) + [block], strides=[1] * (rank - 3) + [block])]
    else:
        s_name = f"/edgevlm/block_sums/S_{k}x{kb}"
        if s_name not in have:
            extra.append(numpy_helper.from_array(block_sum_matrix(k, block), s_name))
            have.add(s_name)
        nodes = [helper.make_node("MatMul", [x, s_name], [f"{p}/means"], name=f"{p}/MatMul")]
    out = f"{p}/output_0"
    nodes.append(helper.make_node("Concat", [x, f"{p}/means"], [out], name=f"{p}/Concat", axis=-1))
    return nodes, extra, out


def _input_ranks(model) -> dict:
    """Tensor name -> rank where known: from the graph's inputs and value_info, onnx's shape inference
    (standard operators only), and our fused builder's graphs, whose linear layers all read [batch, seq,
    hidden]."""
    import onnx

    def ranks(g):
        out = {}
        for v in [*g.input, *g.value_info, *g.output]:
            t = v.type.tensor_type
            if t.HasField("shape"):
                out[v.name] = len(t.shape.dim)
        return out

    got = ranks(model.graph)
    try:
        got.update(ranks(onnx.shape_inference.infer_shapes(model, strict_mode=False).graph))
    except Exception:  # noqa: BLE001 - inference is a hint only
        pass
    if any(p.key == "edgevlm.builder" and p.value.startswith("fused") for p in model.metadata_props):
        return {"*": 3, **got}
    return got


def _embedding_nodes(p: str, b_name: str, s_name: str, z, ids: str, out: str, K: int, block: int, bits: int):
    """A token embedding read by GatherBlockQuantized from blocks in MatMulNBits' layout ([V, K'/block,
    block*bits/8] data, [V, K'/block] scales, ``z`` the unpacked zero points): (nodes, initializers).
    With block-offset rows (K' > K) each block's offset is read from them and added back."""
    import numpy as np
    from onnx import helper, numpy_helper

    N, kbt = z.shape
    kb = K // block
    inits = [numpy_helper.from_array(z.reshape(N, kbt, 1).astype(np.uint8), f"{p}/zero_points3"),
             numpy_helper.from_array(np.array([N, kbt, 1], np.int64), f"{p}/scales_shape"),
             numpy_helper.from_array(np.array([K], np.int64), f"{p}/width")]
    # data [V, K'/block, block*bits/8] -> [..., K'/block, block] -> [..., K]
    nodes = [helper.make_node("Reshape", [s_name, f"{p}/scales_shape"], [f"{p}/scales"], name=f"{p}/Reshape_scales"),
             helper.make_node("GatherBlockQuantized", [b_name, ids, f"{p}/scales", f"{p}/zero_points3"],
                              [f"{p}/blocks"], name=f"{p}/GatherBlockQuantized", domain="com.microsoft",
                              gather_axis=0, quantize_axis=2, block_size=block, bits=bits)]
    blocks = f"{p}/blocks"
    if kbt > kb:            # [T, kb', block]: the first kb blocks + each block's offset from the rows after them
        for name, arr in (("flat_shape", [-1, kbt, block]), ("rows_shape", [-1, (kbt - kb) * block]), ("zero", [0]),
                          ("kb", [kb]), ("kbt", [kbt]), ("axis1", [1]), ("offs_shape", [-1, kb, 1])):
            inits.append(numpy_helper.from_array(np.array(arr, np.int64), f"{p}/{name}"))
        inits.append(numpy_helper.from_array(np.array(1.0 / block, np.float32), f"{p}/per_block"))  # rows: block * offset
        nodes += [
            helper.make_node("Reshape", [blocks, f"{p}/flat_shape"], [f"{p}/flat"], name=f"{p}/Reshape_flat"),
            helper.make_node("Slice", [f"{p}/flat", f"{p}/zero", f"{p}/kb", f"{p}/axis1"], [f"{p}/main"],
                             name=f"{p}/Slice_main"),
            helper.make_node("Slice", [f"{p}/flat", f"{p}/kb", f"{p}/kbt", f"{p}/axis1"], [f"{p}/rows"],
                             name=f"{p}/Slice_rows"),
            helper.make_node("Reshape", [f"{p}/rows", f"{p}/rows_shape"], [f"{p}/rows_flat"], name=f"{p}/Reshape_rows"),
            helper.make_node("Slice", [f"{p}/rows_flat", f"{p}/zero", f"{p}/kb", f"{p}/axis1"], [f"{p}/offsets"],
                             name=f"{p}/Slice_offsets"),
            helper.make_node("Reshape", [f"{p}/offsets", f"{p}/offs_shape"], [f"{p}/offsets3"],
                             name=f"{p}/Reshape_offsets"),
            helper.make_node("Mul", [f"{p}/offsets3", f"{p}/per_block"], [f"{p}/offsets_each"], name=f"{p}/Mul"),
            helper.make_node("Add", [f"{p}/main", f"{p}/offsets_each"], [f"{p}/with_offsets"], name=f"{p}/Add"),
        ]
        blocks = f"{p}/with_offsets"
    nodes += [helper.make_node("Shape", [ids], [f"{p}/ids_shape"], name=f"{p}/Shape"),
              helper.make_node("Concat", [f"{p}/ids_shape", f"{p}/width"], [f"{p}/out_shape"], name=f"{p}/Concat",
                               axis=0),
              helper.make_node("Reshape", [blocks, f"{p}/out_shape"], [out], name=f"{p}/Reshape")]
    return nodes, inits


def _quantize_int4(model, block_size: int, accuracy_level: int, recipe: str, importance: Optional[dict],
                   quantize_embeddings: bool, share_tied_embedding: bool = False,
                   bits_plan: Optional[dict] = None, offset_roles=None, eight_bit_roles=None):
    """The int4 recipe (see the comment above ``INT4_RECIPES``) applied to ``model`` in place.
    ``offset_roles``: which MatMuls (by role: qkv_proj, o_proj, gate_up_proj, down_proj, lm_head, ...; "*"
    for all) get block-offset rows (``offset_roles_for``)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    targets = []
    for n in g.node:
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits:
            t = inits[n.input[1]]
            if len(t.dims) == 2 and t.data_type == onnx_float():
                targets.append(n)
    ks = {n.name: int(inits[n.input[1]].dims[0]) for n in targets}
    plan = int4_bits_plan(list(ks), recipe, eight_bit_roles)
    if bits_plan:
        plan.update({n: b for n, b in bits_plan.items() if n in plan})
    roles = offset_roles_for(recipe, offset_roles)
    offset = {n.name for n in targets if plan[n.name] == 4 and ks[n.name] % block_size == 0
              and ("*" in roles or _offset_role(n.name) in roles)}
    imps = importance_for(ks, importance)
    hs = hessians_for(ks, importance) if recipe in _GPTQ_RECIPES or offset else {}
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
               and inits[n.input[0]].data_type == onnx_float()]
    tables = {n.input[0]: numpy_helper.to_array(inits[n.input[0]]) for n in gathers}

    replaced: dict[str, list] = {}
    drop: set[str] = set()
    tied: dict[str, tuple] = {}          # embedding table name -> (B, scales, unpacked zero points, bits, block, K)
    aliases: dict[str, str] = {}        # initializer -> the one whose bytes it shares on disk
    summed: dict[str, str] = {}         # an input -> Concat(input, its block sums), for the "offset" MatMuls
    sums_made: set[str] = set()
    ranks = _input_ranks(model) if offset else {}
    for n in targets:
        wt = numpy_helper.to_array(inits[n.input[1]])
        K, N = wt.shape
        bits = plan[n.name]
        block = block_size if bits == 4 else _wide_block(K, block_size)
        before, x, k_in = [], n.input[0], K
        if n.name in offset:
            if n.name in hs:         # second moments given (an ImportanceMatrix with hessians): GPTQ on top
                packed, scales, zp, z = gptq_offset_blocks(wt, bits, block, hs[n.name])
            else:
                packed, scales, zp, z = offset_blocks(wt, bits, block, imps.get(n.name))
            if x not in summed:
                before, extra, summed[x] = _block_sum_nodes(x, K, block, sums_made, ranks.get(x, ranks.get("*")))
                g.initializer.extend(extra)
            x, k_in = summed[x], K + offset_rows(K, block)
        elif n.name in hs:
            packed, scales, zp, z = gptq_blocks(wt, bits, block, hs[n.name])
        else:
            packed, scales, zp, z = quantize_blocks(wt, bits, block, imps.get(n.name))
        base = n.input[1]
        names = (f"{base}_Q{bits}", f"{base}_scales", f"{base}_zero_points")
        g.initializer.extend([numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scales, names[1]),
                              numpy_helper.from_array(zp, names[2])])
        replaced[n.name] = before + [onnx.helper.make_node(
            "MatMulNBits", [x, *names], list(n.output), name=n.name + f"_Q{bits}", domain="com.microsoft", K=k_in,
            N=N, bits=bits, block_size=block, accuracy_level=accuracy_level)]
        drop.add(base)
        if share_tied_embedding and K % block == 0:
            for tname, table in tables.items():
                if tname not in tied and table.shape == (N, K) and np.array_equal(table, wt.T):
                    tied[tname] = (names[0], names[1], z, bits, block, K, N)
        del wt
    for n in gathers:
        tname = n.input[0]
        if tname in tied:
            # The lm_head's own blocks, under names of their own that point at the same bytes of the data
            # file (``_save_external``): one copy on disk, while onnxruntime still prepacks the lm_head's
            # weight (it does not prepack an initializer that two nodes read: 0.87x decode).
            b_name, s_name, z, bits, block, K, N = tied[tname]
            inits_now = {t.name: t for t in g.initializer}
            for name in (b_name, s_name):
                alias = onnx.TensorProto()
                alias.CopyFrom(inits_now[name])
                alias.name = f"{name}/embedding"
                g.initializer.append(alias)
                aliases[alias.name] = name
            b_name, s_name = f"{b_name}/embedding", f"{s_name}/embedding"
        elif quantize_embeddings:
            table = tables[tname]
            bits, block = 4, block_size
            if table.shape[1] % block:
                continue
            N, K = table.shape
            fit = offset_blocks if "*" in roles or "embed_tokens" in roles else quantize_blocks
            packed, scales, _, z = fit(np.ascontiguousarray(table.T), bits, block)
            b_name, s_name = f"{tname}_Q{bits}", f"{tname}_scales"
            g.initializer.extend([numpy_helper.from_array(packed, b_name), numpy_helper.from_array(scales, s_name)])
        else:
            continue
        p = f"/edgevlm/embed/{tname}"
        replaced[n.name or p], extra = _embedding_nodes(p, b_name, s_name, z, n.input[1], n.output[0], K, block, bits)
        g.initializer.extend(extra)
        if not n.name:
            n.name = p
        drop.add(tname)
    if aliases:
        meta = {p.key: p for p in model.metadata_props}
        entry = meta.get(_ALIASES_KEY) or model.metadata_props.add(key=_ALIASES_KEY)
        entry.value = json.dumps({**json.loads(entry.value or "{}"), **aliases})
    new_nodes = []
    for n in g.node:
        new_nodes.extend(replaced.get(n.name, [n]) if n.name else [n])
    g.ClearField("node")
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name not in drop or t.name in used]
    g.ClearField("initializer")
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model
