"""The int4 recipe's pieces (issue 20), checked against onnxruntime's own kernels on tiny graphs:
the packed layout MatMulNBits reads, the searched blocks beating min/max rounding, the bits plan, the
importance-matrix matching, and a tied embedding read by GatherBlockQuantized from the lm_head's weight."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgevlm.quantize.onnx import (_fit_blocks, _quantize_int4, importance_for, int4_bits_plan,  # noqa: E402
                                   quantize_blocks)


def _dequant(packed, scales, z_unpacked, bits, block, K):
    N, kb, _ = packed.shape
    if bits == 4:
        q = np.stack([packed & 15, packed >> 4], -1).reshape(N, kb, block)
    else:
        q = packed
    w = (q.astype(np.float32) - z_unpacked[..., None]) * scales[..., None]
    return w.reshape(N, kb * block)[:, :K].T            # [K, N]


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_blocks_are_what_matmulnbits_computes(bits):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    K, N, block = 96, 40, 32
    wt = rng.standard_normal((K, N)).astype(np.float32)
    packed, scales, zp, z = quantize_blocks(wt, bits, block)
    assert packed.shape == (N, K // block, block * bits // 8) and scales.shape == (N, K // block)
    ref_w = _dequant(packed, scales, z, bits, block, K)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S"), numpy_helper.from_array(zp, "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=0)
    g = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, K)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ ref_w, rtol=1e-4, atol=1e-4)
    err = np.abs(ref_w - wt).max() / np.abs(wt).max()
    assert err < (0.1 if bits == 4 else 0.01)


def test_search_beats_min_max_rounding_on_a_shifted_grid():
    """Weights on a Q4_1-like grid whose minimum is not a multiple of the step: the integer zero point of
    min/max rounding shifts every weight of the block; the weighted search finds a better fit."""
    rng = np.random.default_rng(1)
    d = rng.uniform(0.01, 0.02, (512, 1))
    m = -d * (7.3 + rng.uniform(0, 1, (512, 1)))
    x = (m + d * rng.integers(0, 16, (512, 32))).astype(np.float32)
    x[:, 0], x[:, 1] = m[:, 0], (m + 15 * d)[:, 0]
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    s = (hi - lo) / 15
    z = np.clip(np.rint(-lo / s), 0, 15)
    rtn = np.clip(np.rint(x / s + z), 0, 15)
    err_rtn = (((rtn - z) * s - x) ** 2).sum()
    q, s2, z2 = _fit_blocks(x, np.ones_like(x), 15)
    err_fit = (((q - z2) * s2 - x) ** 2).sum()
    assert err_fit < 0.85 * err_rtn
    assert np.all(z2 == np.rint(z2)) and z2.min() >= 0 and z2.max() <= 15


def test_importance_weights_the_fit_toward_important_channels():
    rng = np.random.default_rng(2)
    K, N = 64, 16
    wt = rng.standard_normal((K, N)).astype(np.float32)
    imp = np.ones(K, np.float32)
    imp[:8] = 1000.0
    p0, s0, _, z0 = quantize_blocks(wt, 4, 32)
    p1, s1, _, z1 = quantize_blocks(wt, 4, 32, importance=imp)
    e0 = np.abs(_dequant(p0, s0, z0, 4, 32, K) - wt)[:8].mean()
    e1 = np.abs(_dequant(p1, s1, z1, 4, 32, K) - wt)[:8].mean()
    assert e1 < e0


def test_bits_plan_roles():
    names = [f"/model.layers.{i}.{r}/MatMul" for i in range(12)
             for r in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    names += ["/lm_head/MatMul", "/model/layers.3/self_attn/v_proj/MatMul"]
    plan = int4_bits_plan(names)
    assert plan["/lm_head/MatMul"] == 8 and plan["/model.layers.5.self_attn.qkv_proj/MatMul"] == 8
    assert plan["/model/layers.3/self_attn/v_proj/MatMul"] == 8
    assert plan["/model.layers.0.mlp.down_proj/MatMul"] == 8 and plan["/model.layers.11.mlp.down_proj/MatMul"] == 8
    assert plan["/model.layers.5.mlp.down_proj/MatMul"] == 4 and plan["/model.layers.0.mlp.gate_up_proj/MatMul"] == 4
    assert set(int4_bits_plan(names, "int4").values()) == {4}


def test_importance_matrix_matches_every_exporters_names():
    imat = {"model.layers.3.self_attn.q_proj.weight": np.ones(8), "model.layers.3.mlp.gate_proj.weight": np.ones(8) * 2,
            "model.layers.3.mlp.down_proj.weight": np.ones(16) * 3, "lm_head.weight": np.ones(8) * 4,
            "model.text_model.layers.1.self_attn.k_proj.weight": np.ones(8) * 5}
    got = importance_for({"/model.layers.3.self_attn.qkv_proj/MatMul": 8, "/model.layers.3.mlp.gate_up_proj/MatMul": 8,
                          "/model/layers.3/mlp/down_proj/MatMul": 16, "/lm_head/MatMul": 8,
                          "/text/layers.1/self_attn/k_proj/MatMul": 8, "/model.layers.3.mlp.down_proj/MatMul": 99},
                         imat)
    assert got["/model.layers.3.self_attn.qkv_proj/MatMul"][0] == 1
    assert got["/model.layers.3.mlp.gate_up_proj/MatMul"][0] == 2
    assert got["/model/layers.3/mlp/down_proj/MatMul"][0] == 3 and got["/lm_head/MatMul"][0] == 4
    assert got["/text/layers.1/self_attn/k_proj/MatMul"][0] == 5
    assert "/model.layers.3.mlp.down_proj/MatMul" not in got          # wrong length: not used


def _tied_model(rng, V: int = 64, H: int = 96, *, hidden_output: bool = False):
    """A tied embedding / lm_head pair as our exporters write it: Gather on ``embed``, MatMul on its
    transpose ``head``. Returns (model, embedding)."""
    from onnx import TensorProto, helper, numpy_helper

    emb = rng.standard_normal((V, H)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"], name="/model/embed_tokens/Gather", axis=0),
             helper.make_node("MatMul", ["h", "head"], ["logits"], name="/lm_head/MatMul")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])]
    if hidden_output:
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", H]))
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])], outputs,
                          [numpy_helper.from_array(emb, "embed"), numpy_helper.from_array(np.ascontiguousarray(emb.T), "head")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m, emb


def test_tied_embedding_is_read_from_the_lm_head_weight(tmp_path):
    from edgevlm.quantize.onnx import _save

    m, emb = _tied_model(np.random.default_rng(3), hidden_output=True)
    V, H = emb.shape
    unshared, pristine = onnx.ModelProto(), onnx.ModelProto()
    unshared.CopyFrom(m)
    pristine.CopyFrom(m)
    u = _quantize_int4(unshared, 32, 0, "mixed", None, True)          # default: a copy of its own, 4-bit
    ug = next(n for n in u.graph.node if n.op_type == "GatherBlockQuantized")
    assert ug.input[0] != next(n for n in u.graph.node if n.op_type == "MatMulNBits").input[1]
    uh = ort.InferenceSession(u.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": np.array([[1, 2]], dtype=np.int64)})[1]
    np.testing.assert_allclose(uh[0], emb[[1, 2]], atol=0.15 * np.abs(emb).max())
    q = _quantize_int4(m, 32, 0, "mixed", None, True, share_tied_embedding=True)
    assert {t.name for t in q.graph.initializer}.isdisjoint({"embed", "head"})
    ops = [n.op_type for n in q.graph.node]
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    mnb = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    assert gbq.input[0] == mnb.input[1] + "/embedding"          # a name of its own (onnxruntime prepacks
    weights = sess_weights(q)                                    # an initializer only one node reads)
    path = tmp_path / "q.onnx"
    _save(q, path)
    saved = onnx.load(str(path), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in saved.graph.initializer}
    assert where[gbq.input[0]] == where[mnb.input[1]] and where[mnb.input[1]]    # the same bytes on disk
    sizes = {}
    for shared in (False, True):
        other = onnx.ModelProto()
        other.CopyFrom(pristine)
        _save(_quantize_int4(other, 32, 0, "mixed", None, True, share_tied_embedding=shared), tmp_path / f"{shared}.onnx")
        sizes[shared] = (tmp_path / f"{shared}.onnx_data").stat().st_size
    assert sizes[True] <= sizes[False] - V * H // 2              # no 4-bit copy of the table beside it
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 63]], dtype=np.int64)
    logits, h = sess.run(None, {"ids": ids})
    assert h.shape == (1, 3, H)
    np.testing.assert_allclose(h[0], emb[ids[0]], atol=0.02 * np.abs(emb).max())   # 8-bit lm_head: close
    np.testing.assert_allclose(logits, h @ weights.T, rtol=1e-3, atol=1e-3)


def sess_weights(q):
    """The lm_head the quantized graph holds, dequantized (its embedding rows are the same numbers)."""
    from onnx import helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    mnb = next(n for n in q.graph.node if n.op_type == "MatMulNBits")
    at = {a.name: helper.get_attribute_value(a) for a in mnb.attribute}
    packed, scales, zp = inits[mnb.input[1]], inits[mnb.input[2]], inits[mnb.input[3]]
    N, kb = scales.shape
    z = zp.reshape(N, kb).astype(np.float32) if at["bits"] == 8 else \
        np.stack([zp & 15, zp >> 4], -1).reshape(N, -1)[:, :kb].astype(np.float32)
    return _dequant(packed, scales, z, at["bits"], at["block_size"], at["K"]).T


@pytest.mark.parametrize("shared", [False, True])
def test_vlm_info_counts_a_quantized_embedding_once_at_its_real_size(tmp_path, shared):
    """`vlm info`'s parameter count: a 4-bit GatherBlockQuantized table holds two values a byte, its
    scales and zero points (read through a Reshape) are not parameters, and a table shared with the
    lm_head is counted once."""
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.quantize.onnx import _save
    from edgevlm.runtime.reports.inspect import _onnx_graph_facts

    V, H = 64, 96
    emb = np.random.default_rng(4).standard_normal((V, H)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h"], name="/model/embed_tokens/Gather", axis=0),
             helper.make_node("MatMul", ["h", "head"], ["logits"], name="/lm_head/MatMul")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])],
                          [numpy_helper.from_array(emb, "embed"), numpy_helper.from_array(np.ascontiguousarray(emb.T), "head")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    fp32 = onnx.ModelProto()
    fp32.CopyFrom(m)                      # saving moves the weights out of the proto
    assert _onnx_graph_facts([_saved(fp32, tmp_path / "fp32.onnx", _save)])["parameters"] == 2 * V * H
    q = _quantize_int4(m, 32, 0, "int4", None, True, share_tied_embedding=shared)
    facts = _onnx_graph_facts([_saved(q, tmp_path / "q4.onnx", _save)])
    assert facts["parameters"] == (1 if shared else 2) * V * H
    assert facts["quantization"] == "int4 (MatMulNBits, block 32)"


def _saved(model, path, save):
    save(model, path)
    return path


def test_gptq_lowers_the_output_error_and_keeps_matmulnbits_layout():
    """GPTQ's compensation against the plain block search on inputs with correlated, uneven channels:
    the layer's output error (what the model sees) drops, and onnxruntime computes what we packed."""
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.quantize.onnx import gptq_blocks

    rng = np.random.default_rng(5)
    K, N, block = 128, 48, 32
    mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)
    x = (rng.standard_normal((2000, K)) @ mix).astype(np.float32)
    x[:, 3] *= 6
    h = x.T @ x / len(x)
    wt = rng.standard_normal((K, N)).astype(np.float32)
    g = gptq_blocks(wt, 4, block, h)
    s = quantize_blocks(wt, 4, block, np.diag(h))
    err = {k: np.mean((x @ (_dequant(r[0], r[1], r[3], 4, block, K) - wt)) ** 2) for k, r in (("gptq", g), ("search", s))}
    assert err["gptq"] < 0.8 * err["search"], err
    inits = [numpy_helper.from_array(g[0], "B"), numpy_helper.from_array(g[1], "S"), numpy_helper.from_array(g[2], "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=block, accuracy_level=0)
    gr = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[:4]})[0]
    np.testing.assert_allclose(y, x[:4] @ _dequant(g[0], g[1], g[3], 4, block, K), rtol=1e-4, atol=1e-3)


def test_calibration_collects_second_moments_shared_by_layers_reading_one_input():
    """collect_imatrix's hessians: mean(x x^T) per linear layer (its diagonal is the importance vector),
    one array for the layers that read the same tensor (q/k/v, gate/up), matched to MatMul nodes by name."""
    torch = pytest.importorskip("torch")
    from edgevlm.quantize.onnx import hessians_for
    from edgevlm.quantize.verify import collect_imatrix

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.o_proj = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))

        def forward(self, h):
            return self.o_proj(self.q_proj(h) * self.k_proj(h))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8)
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"self_attn": Attn()})])

        def forward(self, input_ids):
            return self.layers[0]["self_attn"](self.embed(input_ids))

    torch.manual_seed(0)
    model = Tiny()
    imat = collect_imatrix(model, lambda text, **_: {"input_ids": [ord(c) % 50 for c in text]}, "calibration " * 40,
                           chunk=64, hessians=True)
    hs = imat.hessians
    q, k, o = (f"layers.0.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "o_proj"))
    assert hs[q] is hs[k] and hs[o] is not hs[q]
    np.testing.assert_allclose(np.diag(hs[q]), imat[q], rtol=1e-4)
    np.testing.assert_allclose(np.diag(hs[o]), imat[o], rtol=1e-4)
    got = hessians_for({"/model/layers.0/self_attn/k_proj/MatMul": 8, "/model/layers.0/self_attn/o_proj/MatMul": 8}, imat)
    assert got["/model/layers.0/self_attn/k_proj/MatMul"].shape == (8, 8)


def test_auto_recipe_and_the_gptq_plan():
    from edgevlm.quantize.onnx import int4_bits_plan, int4_recipe
    from edgevlm.quantize.verify import ImportanceMatrix

    vec = {"lm_head.weight": np.ones(4, np.float32)}
    assert int4_recipe("auto", None) == "offset"           # with or without calibration (issue 20)
    assert int4_recipe("auto", vec) == "offset"
    assert int4_recipe("auto", ImportanceMatrix(vec, hessians={"lm_head.weight": np.eye(4, dtype=np.float32)})) == "offset"
    assert int4_recipe("gptq", None) == "gptq"
    names = ["/model.layers.0.self_attn.qkv_proj/MatMul", "/model.layers.0.mlp.down_proj/MatMul", "/lm_head/MatMul",
             "/model/layers.0/self_attn/k_proj/MatMul"]
    plan = int4_bits_plan(names, "gptq")
    assert plan == {names[0]: 8, names[1]: 4, names[2]: 4, names[3]: 8}


def test_quantize_onnx_gptq_writes_a_runnable_file_with_the_embedding_stored_once(tmp_path):
    from edgevlm.quantize.onnx import _save, quantize_onnx
    from edgevlm.quantize.verify import ImportanceMatrix

    rng = np.random.default_rng(6)
    m, emb = _tied_model(rng)
    V, H = emb.shape
    _save(m, tmp_path / "model.onnx")
    x = rng.standard_normal((500, H)).astype(np.float32)
    imat = ImportanceMatrix({"lm_head.weight": (x * x).mean(0)}, hessians={"lm_head.weight": x.T @ x / len(x)})
    out = quantize_onnx(tmp_path / "model.onnx", tmp_path / "q" / "model_q4.onnx", "int4", recipe="gptq", importance=imat)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 7, 42]], dtype=np.int64)
    logits = sess.run(None, {"ids": ids})[0]
    ref = emb[ids[0]] @ emb.T
    assert np.corrcoef(logits[0].ravel(), ref.ravel())[0, 1] > 0.98
    saved = onnx.load(str(out), load_external_data=False)
    regions = [tuple((e.key, e.value) for e in t.external_data) for t in saved.graph.initializer if t.external_data]
    assert len(regions) > len(set(regions))                     # two names, one set of bytes


def test_cli_recipe_flag_is_checked_before_any_work(tmp_path):
    from conftest import assert_clean_error, vlm

    src = tmp_path / "ckpt"          # never read: the flags fail first
    assert_clean_error(vlm("quantize", str(src), "--to", "onnx:int4", "--onnx-int4-recipe", "nope"), 2, "recipe")
    assert_clean_error(vlm("quantize", str(src), "--to", "onnx:int4", "--onnx-int4-recipe", "gptq"), 2, "--calibration")
