"""Read and check a GGUF file's header, metadata and tensor table before llama.cpp sees it.

llama.cpp can crash (not raise) on malformed files, so every GGUF we load is first checked here:
magic, version, metadata, tensor table, and that the file is long enough to hold every tensor.
Large arrays (the tokenizer's vocabulary) are skipped, not decoded, so this stays fast.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import BadModelFile

GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml type id -> (block size in elements, bytes per block); from ggml.h / gguf-py constants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# llama.cpp general.file_type -> name (LLAMA_FTYPE_*)
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_STRING = 1 << 26          # 64 MiB: chat templates and merges are long, but not that long
MAX_DIMS = 4
_KEEP_ARRAY_MAX = 64          # decode arrays up to this length; longer ones are skipped (counted)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int | None:
        t = GGML_TYPES.get(self.type_id)
        if t is None:
            return None
        _, block, size = t
        return self.n_elements // block * size


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]          # skipped arrays: key -> length
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "unknown"))

    @property
    def is_mmproj(self) -> bool:
        return self.architecture == "clip"

    @property
    def context_length(self) -> int | None:
        v = self.get(f"{self.architecture}.context_length")
        return int(v) if v is not None else None

    @property
    def chat_template(self) -> str | None:
        v = self.get("tokenizer.chat_template")
        return v if isinstance(v, str) and v.strip() else None

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str:
        ft = self.get("general.file_type")
        if isinstance(ft, int) and ft in FILE_TYPES:
            return FILE_TYPES[ft]
        counts: dict[str, int] = {}
        for t in self.tensors:
            name = GGML_TYPES.get(t.type_id, (f"type{t.type_id}",))[0]
            counts[name] = counts.get(name, 0) + t.n_elements
        return max(counts, key=counts.get) if counts else "unknown"

    @property
    def kv_shape(self) -> tuple[int, int, int] | None:
        """(layers, kv_heads, head_dim) for the KV-cache estimate, when the metadata says."""
        a = self.architecture
        layers = self.get(f"{a}.block_count")
        heads = self.get(f"{a}.attention.head_count")
        kv = self.get(f"{a}.attention.head_count_kv", heads)
        emb = self.get(f"{a}.embedding_length")
        kdim = self.get(f"{a}.attention.key_length")
        if isinstance(kv, list):            # per-layer head counts (some hybrids)
            kv = max(kv) if kv else None
        if not (layers and kv and (kdim or (emb and heads))):
            return None
        head_dim = int(kdim) if kdim else int(emb) // int(heads if not isinstance(heads, list) else max(heads))
        return int(layers), int(kv), head_dim

    @property
    def vocab_size(self) -> int | None:
        return self.array_lengths.get("tokenizer.ggml.tokens")

    @property
    def projector_dim(self) -> int | None:
        """mmproj: the text embedding size its projector outputs (clip.*.projection_dim)."""
        for k in ("clip.vision.projection_dim", "clip.projection_dim"):
            v = self.get(k)
            if v:
                return int(v)
        return None


class _Reader:
    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def _bad(self, what: str) -> BadModelFile:
        return BadModelFile(
            f"{self.path.name} is not a valid GGUF file: {what}.",
            hint="The file is truncated or corrupt: delete it and download it again (`vlm pull` verifies checksums).",
        )

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise self._bad("it ends in the middle of its header (truncated)")
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > MAX_STRING or self.f.tell() + n > self.size:
            raise self._bad("a string length points past the end of the file")
        return self.read(n).decode("utf-8", "replace")

    def skip_strings(self, n: int) -> None:
        """Skip n length-prefixed strings (a vocabulary: 50k-260k of them) walking 1 MiB chunks in
        memory rather than two file calls per string."""
        f, pos = self.f, self.f.tell()
        buf, off = b"", 0
        for _ in range(n):
            if len(buf) - off < 8:
                f.seek(pos)
                buf, off = f.read(1 << 20), 0
                if len(buf) < 8:
                    raise self._bad("it ends in the middle of its vocabulary (truncated)")
            ln = struct.unpack_from("<Q", buf, off)[0]
            if ln > MAX_STRING:
                raise self._bad("a string length points past the end of the file")
            pos += 8 + ln
            off += 8 + ln
            if off > len(buf):                    # the string runs past this chunk: refill at pos
                buf, off = b"", 0
        if pos > self.size:
            raise self._bad("a string length points past the end of the file")
        f.seek(pos)

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        raise self._bad(f"unknown metadata type {vtype}")


_CHECKED: dict[tuple, GGUFInfo] = {}


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse and sanity-check a GGUF file. Raises BadModelFile with a one-line reason.

    A file that passed is remembered for this process by (path, size, mtime), since one `vlm ask`
    looks at its model up to three times (memory check before and after pull, load)."""
    try:
        st = Path(path).stat()
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key in _CHECKED:
        return _CHECKED[key]
    info = _read_gguf(Path(path))
    if key is not None:
        _CHECKED[key] = info
    return info


def _read_gguf(path: Path) -> GGUFInfo:
    path = Path(path)
    if not path.exists():
        raise BadModelFile(f"Model file not found: {path}", hint="Check the path, or run `vlm list` to see installed models.")
    if path.is_dir():
        raise BadModelFile(f"{path} is a directory, not a GGUF file.", hint="Pass the .gguf file inside it.")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            r = _Reader(f, size, path)
            if size < 24:
                raise r._bad(f"it is only {size} bytes long")
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                what = "it looks like a pickle/PyTorch file" if magic[:2] == b"PK" or magic[:1] == b"\x80" else "wrong magic bytes"
                raise r._bad(what)
            version = r.unpack("<I")
            if version not in (2, 3):
                raise r._bad(f"unsupported GGUF version {version}")
            n_tensors = r.unpack("<Q")
            n_kv = r.unpack("<Q")
            if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
                raise r._bad("its header counts are implausible")
            meta: dict[str, Any] = {}
            arrays: dict[str, int] = {}
            for _ in range(n_kv):
                key = r.string()
                vtype = r.unpack("<I")
                if vtype == _ARRAY:
                    etype = r.unpack("<I")
                    n = r.unpack("<Q")
                    if etype in _SCALAR:
                        width = struct.calcsize(_SCALAR[etype])
                        if f.tell() + n * width > size:
                            raise r._bad(f"metadata array {key} runs past the end of the file")
                        if n <= _KEEP_ARRAY_MAX:
                            meta[key] = list(struct.unpack(f"<{n}{_SCALAR[etype][1]}", r.read(n * width)))
                        else:
                            f.seek(n * width, os.SEEK_CUR)
                            arrays[key] = n
                    elif etype == _STRING:
                        if n > size:
                            raise r._bad(f"metadata array {key} is implausibly long")
                        if n <= _KEEP_ARRAY_MAX:
                            meta[key] = [r.string() for _ in range(n)]
                        else:
                            r.skip_strings(n)
                            arrays[key] = n
                    else:
                        raise r._bad(f"metadata array {key} has unsupported element type {etype}")
                else:
                    meta[key] = r.value(vtype)
            tensors: list[TensorInfo] = []
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("<I")
                if n_dims > MAX_DIMS:
                    raise r._bad(f"tensor {name} has {n_dims} dimensions")
                shape = tuple(r.unpack("<Q") for _ in range(n_dims))
                type_id = r.unpack("<I")
                offset = r.unpack("<Q")
                tensors.append(TensorInfo(name, shape, type_id, offset))
            alignment = int(meta.get("general.alignment", 32) or 32)
            pos = f.tell()
            data_offset = pos + (alignment - pos % alignment) % alignment
    except OSError as e:
        raise BadModelFile(f"Cannot read {path}: {e.strerror or e}", hint="Check the file's permissions.") from e
    info = GGUFInfo(path=path, version=version, metadata=meta, array_lengths=arrays, tensors=tensors,
                    data_offset=data_offset, file_size=size)
    end = data_offset
    for t in tensors:
        nb = t.n_bytes
        if nb is None:
            continue                 # a type newer than this table: llama.cpp will judge it
        if t.offset % alignment:
            raise r._bad(f"tensor {t.name} is misaligned")
        end = max(end, data_offset + t.offset + nb)
    if end > size:
        missing = end - size
        raise BadModelFile(
            f"{path.name} is truncated: its tensors need {end:,} bytes but the file has {size:,} ({missing:,} missing).",
            hint="The download was interrupted or the file was cut: delete it and download it again.",
        )
    if not tensors:
        raise r._bad("it contains no tensors")
    return info


def check_mmproj(model: GGUFInfo, mmproj: GGUFInfo) -> None:
    """Refuse a vision projector that does not belong to the text model, before llama.cpp sees it."""
    if not mmproj.is_mmproj:
        raise BadModelFile(
            f"{mmproj.path.name} is not a vision projector (its architecture is {mmproj.architecture!r}).",
            hint="Pass the model's mmproj-*.gguf file with --mmproj.",
        )
    if model.is_mmproj:
        raise BadModelFile(
            f"{model.path.name} is a vision projector (mmproj), not a language model.",
            hint="Pass the language model with -m and the projector with --mmproj.",
        )
    if not mmproj.get("clip.has_vision_encoder", True) and not mmproj.get("clip.has_audio_encoder", False):
        raise BadModelFile(f"{mmproj.path.name} has no vision encoder.", hint="Use the model's image projector.")
    n_embd = model.get(f"{model.architecture}.embedding_length")
    proj = mmproj.projector_dim
    if n_embd and proj and int(n_embd) != int(proj):
        raise BadModelFile(
            f"{mmproj.path.name} does not belong to {model.path.name}: the projector outputs {proj}-wide "
            f"embeddings but the model expects {n_embd}.",
            hint="Use the mmproj file published with this model (`vlm info MODEL` shows it).",
        )
