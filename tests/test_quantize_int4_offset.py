"""The "offset" int4 recipe (issue 20): each 4-bit block fitted as ``s * q + m`` with a float minimum m, the
part of m an integer zero point cannot hold carried by extra input rows of the same MatMulNBits (the
input's block sums). Checked with onnxruntime's own kernels: on a tiny graph, and on a real fused decoder
built from a checkpoint, against the float graph."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgevlm.quantize.onnx_int4 import (_unpack, block_sum_matrix, offset_blocks, offset_rows,  # noqa: E402
                                        quantize_blocks)


def _q41(rng, K, N, block=32):
    """[K, N] weights on a Q4_1 grid along K (per block of 32: a float minimum + 0..15 steps), as a
    checkpoint dequantized from a Q4_1 GGUF holds them."""
    d = rng.uniform(0.01, 0.02, (N, K // block, 1))
    m = -d * (7 + rng.uniform(0, 1.5, d.shape))
    return (m + d * rng.integers(0, 16, (N, K // block, block))).reshape(N, K).T.astype(np.float32)


def _dequant(packed, scales, z):
    N = scales.shape[0]
    return ((_unpack(packed, 4) - z[..., None]) * scales[..., None]).reshape(N, -1).T     # [K', N]


def _run_offset_matmul(packed, scales, zp, x, K, N, accuracy_level):
    from onnx import TensorProto, helper, numpy_helper

    Kp = K + offset_rows(K, 32)             # K + K/32: MatMulNBits pads the last block itself
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "Sc"), numpy_helper.from_array(zp, "Z"),
             numpy_helper.from_array(block_sum_matrix(K, 32), "S")]
    nodes = [helper.make_node("MatMul", ["x", "S"], ["xs"]), helper.make_node("Concat", ["x", "xs"], ["xa"], axis=-1),
             helper.make_node("MatMulNBits", ["xa", "B", "Sc", "Z"], ["y"], domain="com.microsoft", K=Kp, N=N, bits=4,
                              block_size=32, accuracy_level=accuracy_level)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_offset_rows_reproduce_a_q41_grid_that_integer_zero_points_cannot():
    rng = np.random.default_rng(0)
    K, N = 192, 80
    w = _q41(rng, K, N)
    packed, scales, zp, z = offset_blocks(w, 4, 32)
    P = offset_rows(K, 32)
    assert P == K // 32 and packed.shape == (N, K // 32 + 1, 16) and scales.shape == (N, K // 32 + 1)
    x = rng.standard_normal((6, K)).astype(np.float32)
    ref = x @ w
    wq = _dequant(packed, scales, z)
    effective = wq[:K] + block_sum_matrix(K, 32) @ wq[K:K + P]      # what the Concat(x, block means) input sees
    for level in (0, 4):
        y = _run_offset_matmul(packed, scales, zp, x, K, N, level)
        np.testing.assert_allclose(y, x @ effective, rtol=2e-2 if level else 1e-4, atol=2e-2 if level else 1e-3)
    rel = np.linalg.norm(effective - w) / np.linalg.norm(w)
    p2, s2, _, z2 = quantize_blocks(w, 4, 32)                      # integer zero points only
    rel_int = np.linalg.norm(_dequant(p2, s2, z2) - w) / np.linalg.norm(w)
    assert rel < 0.01 and rel < rel_int / 5, (rel, rel_int)
    y0 = _run_offset_matmul(packed, scales, zp, x, K, N, 0)
    assert np.linalg.norm(y0 - ref) / np.linalg.norm(ref) < 0.01


def test_offset_rows_do_not_hurt_weights_that_never_saw_a_grid():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    packed, scales, _, z = offset_blocks(w, 4, 32)
    wq = _dequant(packed, scales, z)
    effective = wq[:128] + block_sum_matrix(128, 32) @ wq[128:132]
    p2, s2, _, z2 = quantize_blocks(w, 4, 32)
    assert np.linalg.norm(effective - w) <= np.linalg.norm(_dequant(p2, s2, z2) - w)


def _tiny_checkpoint(tmp_path, tied: bool):
    """A tiny random Llama (tied) / Qwen2 (untied) checkpoint with its weights on a Q4_1 grid, exported to
    the fused fp32 graph. Returns (fp32 graph path, layers, kv heads, head dim)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgevlm.quantize.onnx import export_decoder

    torch.manual_seed(0)
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5)
    if tied:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False,
                                                                        use_sliding_window=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                o, i = p.shape
                b = p.numpy().reshape(o, i // 32, 32)
                lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
                d = (hi - lo) / 15
                p.copy_(torch.from_numpy((lo + d * np.rint((b - lo) / d)).reshape(o, i).astype(np.float32)))
    model.save_pretrained(tmp_path / "hf")
    return export_decoder(tmp_path / "hf", tmp_path / "onnx")


def _logits(path, ids):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = []
    for t in range(1, len(ids) + 1):
        feed = {"input_ids": np.array([ids[:t]]), "attention_mask": np.ones((1, t), np.int64)}
        feed.update({f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 32), np.float32) for i in range(2)
                     for kv in ("key", "value")})
        outs.append(sess.run(None, feed)[0][0, -1])
    return np.stack(outs)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_offset_recipe_on_a_fused_decoder_matches_the_float_graph(tmp_path, tied):
    from edgevlm.quantize.onnx import quantize_onnx

    fp32 = _tiny_checkpoint(tmp_path, tied)
    ids = [5, 17, 200, 3, 99, 42, 7, 11]
    ref = _logits(fp32, ids)
    err = {}
    for recipe in ("int4", "offset"):
        out = quantize_onnx(fp32, tmp_path / recipe / "model_q4.onnx", "int4", recipe=recipe)
        err[recipe] = np.linalg.norm(_logits(out, ids) - ref) / np.linalg.norm(ref)
    assert err["offset"] < 0.03 and err["offset"] < err["int4"] / 4, err
    # `vlm info` counts the model's weights, not the offset rows (K' = K + K/block inputs)
    from edgevlm.runtime.reports.inspect import _onnx_graph_facts

    table = next(t for t in onnx.load(str(fp32), load_external_data=False).graph.initializer
                 if t.name.endswith("embed_tokens.weight"))
    tied_copy = int(table.dims[0]) * int(table.dims[1]) if tied else 0     # stored once, with the lm_head's blocks
    assert _onnx_graph_facts([tmp_path / "offset" / "model_q4.onnx"])["parameters"] == (
        _onnx_graph_facts([fp32])["parameters"] - tied_copy)
    g = onnx.load(str(tmp_path / "offset" / "model_q4.onnx"), load_external_data=False).graph
    # one block sum per distinct input (per layer: the attention input, o_proj's, the MLP input,
    # down_proj's), by AveragePool over [batch, seq, K]; the lm_head at 8 bits without them
    assert sum(n.op_type == "AveragePool" and n.name.startswith("/edgevlm/block_sums") for n in g.node) == 4 * 2
    nbits = {n.name: n for n in g.node if n.op_type == "MatMulNBits"}
    bits = {name: next(a.i for a in n.attribute if a.name == "bits") for name, n in nbits.items()}
    head = next(n for n in nbits.values() if n.name.startswith("/lm_head"))
    assert bits[head.name] == 8 and not head.input[0].startswith("/edgevlm/block_sums")
    assert sum(n.input[0].startswith("/edgevlm/block_sums") for n in nbits.values()) == 4 * 2
    gbq = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1
    assert (gbq[0].input[0] == head.input[1] + "/embedding") == tied


@pytest.mark.slow
def test_offset_roles_pick_the_inputs_that_get_block_sums(tmp_path):
    """Only the roles asked for read the block sums; a 4-bit lm_head with offset rows, and the tied
    embedding reading its blocks, offsets included."""
    from edgevlm.quantize.onnx import quantize_onnx

    fp32 = _tiny_checkpoint(tmp_path, True)
    out = quantize_onnx(fp32, tmp_path / "q" / "model_q4.onnx", "int4", recipe="offset",
                        offset_roles=("qkv_proj", "lm_head"), eight_bit_roles=())
    g = onnx.load(str(out), load_external_data=False).graph
    with_sums = sorted(n.name for n in g.node if n.op_type == "MatMulNBits" and n.input[0].startswith("/edgevlm/block_sums"))
    assert len(with_sums) == 3 and all("qkv_proj" in n or n.startswith("/lm_head") for n in with_sums)
    ids = [5, 17, 200, 3]
    ref = _logits(fp32, ids)
    assert np.linalg.norm(_logits(out, ids) - ref) / np.linalg.norm(ref) < 0.2
    # the embedding the quantized graph computes: the lm_head's blocks plus their offsets, close to the table
    table = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(fp32)).graph.initializer
                                            if t.name.endswith("embed_tokens.weight")))
    emb_out = next(n.output[0] for n in g.node if n.name.endswith("/Reshape") and "/edgevlm/embed/" in n.name)
    m = onnx.load(str(out))
    m.graph.output.append(onnx.helper.make_tensor_value_info(emb_out, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, 4), np.int64)}
    feed.update({f"past_key_values.{i}.{kv}": np.zeros((1, 2, 0, 32), np.float32) for i in range(2) for kv in ("key", "value")})
    emb = sess.run([emb_out], feed)[0][0]
    np.testing.assert_allclose(emb, table[ids], atol=0.01 * np.abs(table).max())


def test_offset_plan_keeps_the_lm_head_at_8_bits_unless_told():
    from edgevlm.quantize.onnx import int4_bits_plan, int4_recipe

    names = ["/model.layers.0.self_attn.qkv_proj/MatMul", "/model.layers.0.mlp.down_proj/MatMul", "/lm_head/MatMul"]
    assert int4_bits_plan(names, "offset") == {names[0]: 4, names[1]: 4, names[2]: 8}
    assert set(int4_bits_plan(names, "offset", eight_bit_roles=()).values()) == {4}
    assert int4_recipe("offset", None) == "offset"           # no calibration needed


def test_gptq_on_top_of_the_offsets_lowers_the_output_error():
    """With the calibration's second moments, GPTQ's compensation also covers the offset rounding: the
    layer's output error on correlated, uneven inputs drops, and onnxruntime computes what was packed."""
    from edgevlm.quantize.onnx_int4 import gptq_offset_blocks

    rng = np.random.default_rng(5)
    K, N = 128, 48
    mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)
    x = (rng.standard_normal((2000, K)) @ mix).astype(np.float32)
    x[:, 3] *= 6
    h = x.T @ x / len(x)
    wt = rng.standard_normal((K, N)).astype(np.float32)
    S = block_sum_matrix(K, 32)

    def effective(r):
        wq = _dequant(r[0], r[1], r[3])
        return wq[:K] + S @ wq[K:K + K // 32]

    g, plain = gptq_offset_blocks(wt, 4, 32, h), offset_blocks(wt, 4, 32, np.diag(h))
    err = {k: np.mean((x @ (effective(r) - wt)) ** 2) for k, r in (("gptq", g), ("plain", plain))}
    assert err["gptq"] < 0.8 * err["plain"], err
    y = _run_offset_matmul(g[0], g[1], g[2], x[:4], K, N, 0)
    np.testing.assert_allclose(y, x[:4] @ effective(g), rtol=1e-4, atol=1e-3)
