"""The GGUF check that runs before llama.cpp sees a file: real models pass, damaged copies fail cleanly."""
from __future__ import annotations

import shutil
import struct

import pytest

from edgevlm.runtime.errors import BadModelFile
from edgevlm.runtime.formats.gguf_file import read_gguf

pytestmark = pytest.mark.model


def test_real_models_parse(smollm2_gguf, gemma_gguf):
    s = read_gguf(smollm2_gguf)
    assert s.architecture == "llama"
    assert s.quantization == "Q4_1"
    assert s.chat_template and "im_start" in s.chat_template
    assert s.kv_shape == (30, 3, 64)
    assert 130e6 < s.n_params < 140e6
    g = read_gguf(gemma_gguf)
    assert g.architecture == "gemma3"
    assert g.chat_template is None
    assert g.context_length == 32768


def _copy_prefix(src, dst, n):
    with open(src, "rb") as f, open(dst, "wb") as o:
        o.write(f.read(n))


@pytest.mark.parametrize("keep", [0, 3, 23, 200, 5_000_000, "minus1"])
def test_truncated_files_are_refused(smollm2_gguf, tmp_path, keep):
    size = smollm2_gguf.stat().st_size
    n = size - 1 if keep == "minus1" else keep
    bad = tmp_path / "cut.gguf"
    _copy_prefix(smollm2_gguf, bad, n)
    with pytest.raises(BadModelFile) as e:
        read_gguf(bad)
    assert "truncated" in str(e.value) or "not a valid GGUF" in str(e.value)
    assert e.value.hint


def test_corrupt_header_counts_are_refused(smollm2_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    shutil.copy(smollm2_gguf, bad)
    with open(bad, "r+b") as f:           # tensor count -> absurd
        f.seek(8)
        f.write(struct.pack("<Q", 1 << 40))
    with pytest.raises(BadModelFile, match="implausible"):
        read_gguf(bad)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"\x80\x02PYTORCH pickle" + b"\0" * 64)
    with pytest.raises(BadModelFile, match="pickle"):
        read_gguf(p)
    with pytest.raises(BadModelFile, match="not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_type_tables_agree_with_the_gguf_package():
    """Our copies of ggml's tables (we read headers without importing gguf: it is an optional extra and
    slow to import) must say what gguf-py says: type ids, names, block sizes, bytes per block, value
    types and file types."""
    gguf = pytest.importorskip("gguf")
    from edgevlm.runtime.formats import gguf_file as G

    for tid, (name, block, size) in G.GGML_TYPES.items():
        t = gguf.GGMLQuantizationType(tid)
        assert t.name == name, tid
        if name == "Q8_1":
            # ggml.h's block_q8_1 holds two fp16 scales (36 bytes); gguf-py still lists the old f32 pair
            # (40). Q8_1 is ggml's activation format and never stored in a file, so neither matters.
            assert gguf.GGML_QUANT_SIZES[t] == (32, 40)
            continue
        assert gguf.GGML_QUANT_SIZES[t] == (block, size), name
    for vid, fmt in G._SCALAR.items():
        assert gguf.GGUFValueType(vid).name.lower() in {
            "<B": "uint8", "<b": "int8", "<H": "uint16", "<h": "int16", "<I": "uint32", "<i": "int32",
            "<f": "float32", "<?": "bool", "<Q": "uint64", "<q": "int64", "<d": "float64"}[fmt], vid
    assert gguf.GGUFValueType(G._STRING).name == "STRING" and gguf.GGUFValueType(G._ARRAY).name == "ARRAY"
    for fid, name in G.FILE_TYPES.items():
        assert gguf.LlamaFileType(fid).name == f"MOSTLY_{name}" or gguf.LlamaFileType(fid).name == f"ALL_{name}", fid
    assert G.GGUF_MAGIC == struct.pack("<I", gguf.GGUF_MAGIC)
