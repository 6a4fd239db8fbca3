"""llguidance's tokenizer for a GGUF model's vocabulary, built once per vocabulary and kept on disk.

``llguidance.llamacpp.lltokenizer_from_vocab`` asks llama.cpp for every token's piece and attributes
through ctypes, two calls per token: for a 49k-token vocabulary that is the first constrained answer's
second or more of delay, in every new process (each ``vlm caption --schema`` run). The pieces depend on
the vocabulary alone, which the GGUF's ``tokenizer.ggml.*`` metadata defines, so they are stored under
the sha256 of that metadata (and of the llama.cpp build that read it) in
``$VLM_HOME/cache/tokenizers/<digest>.bin``; the next process reads the file and hands the pieces to
``LLTokenizer.from_llamacpp`` with llama.cpp's own tokenize function, as llguidance does itself.
Two quantizations of one model share the entry; a file whose vocabulary differs gets its own.

Entry layout: magic, token count, one little-endian uint32 length per token, then the pieces
concatenated. A short, damaged or mismatched entry is ignored and rewritten.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
from pathlib import Path
from typing import Optional

_MAGIC = b"EVLMTOK1"
_PREFIX = "tokenizer.ggml."        # what defines llama.cpp's vocabulary (tokens, types, merges, ids, flags)


def vocab_digest(path: Path, build: str = "") -> str:
    """sha256 of the raw ``tokenizer.ggml.*`` metadata entries of the GGUF at ``path`` (plus ``build``):
    reads the metadata only, walking its entries without decoding the vocabulary (~10 ms for 49k tokens).
    The file's structure was checked by ``formats.gguf_file.read_gguf`` first."""
    from ..formats.gguf_file import read_gguf

    info = read_gguf(path)
    with open(path, "rb") as f:
        data = f.read(info.data_offset)
    h = hashlib.sha256(build.encode())
    off = 24                                       # magic, version, n_tensors, n_kv
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    unpack = struct.unpack_from

    def skip_string(o: int) -> int:
        return o + 8 + unpack("<Q", data, o)[0]

    for _ in range(n_kv):
        start = off
        key_end = skip_string(off)
        key = data[off + 8: key_end]
        off = key_end
        vtype = unpack("<I", data, off)[0]
        off += 4
        if vtype == 9:                             # array: element type, count, elements
            etype, n = unpack("<IQ", data, off)
            off += 12
            if etype == 8:
                for _ in range(n):
                    off = skip_string(off)
            else:
                off += n * scalar[etype]
        elif vtype == 8:
            off = skip_string(off)
        else:
            off += scalar[vtype]
        if key.startswith(_PREFIX.encode()):
            h.update(data[start:off])
    return h.hexdigest()


def _pieces(llama_cpp, vocab) -> list[bytes]:
    """Every token's bytes as llguidance.llamacpp builds them (control tokens marked with a 0xff byte)."""
    import ctypes

    n_tok = llama_cpp.llama_vocab_n_tokens(vocab)
    size = 16 * 1024
    buf = ctypes.create_string_buffer(size + 1)
    to_piece, get_attr = llama_cpp.llama_token_to_piece, llama_cpp.llama_vocab_get_attr
    control, user = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    out = []
    for t in range(n_tok):
        n = to_piece(vocab, t, buf, size, 0, True)
        if n < 0:
            raise ValueError(f"token {t} does not fit a {size}-byte piece")
        tok = buf.raw[:n]
        attr = get_attr(vocab, t)
        if attr & control or (attr & user and tok.startswith(b"<") and tok.endswith(b">")):
            tok = b"\xff" + tok
        out.append(tok)
    return out


def _read(path: Path, n_tok: int) -> Optional[list[bytes]]:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + 4
    if len(data) < head or data[:len(_MAGIC)] != _MAGIC or struct.unpack_from("<I", data, len(_MAGIC))[0] != n_tok:
        return None
    from array import array

    lengths = array("I")
    end_lengths = head + 4 * n_tok
    if len(data) < end_lengths:
        return None
    lengths.frombytes(data[head:end_lengths])
    if struct.pack("<I", 1) != array("I", [1]).tobytes():
        lengths.byteswap()
    if end_lengths + sum(lengths) != len(data):
        return None
    out, off = [], end_lengths
    for n in lengths:
        out.append(data[off: off + n])
        off += n
    return out


def _write(path: Path, pieces: list[bytes]) -> None:
    """Atomically (temp file + rename): concurrent processes may write the same entry."""
    from array import array

    lengths = array("I", (len(p) for p in pieces))
    if struct.pack("<I", 1) != array("I", [1]).tobytes():
        lengths.byteswap()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<I", len(pieces)) + lengths.tobytes() + b"".join(pieces))
        os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _digest_of(model_path: Path, directory: Path) -> str:
    """``vocab_digest`` of the file, remembered per file (path, size, mtime) in ``directory/files/``: the
    walk over a 49k-token vocabulary costs tens of milliseconds, the look-up one."""
    import sys

    from ..inputs.embed_cache import file_identity

    build = str(getattr(sys.modules.get("llama_cpp"), "__version__", ""))
    memo = directory / "files" / f"{file_identity(model_path)}.{build}"
    try:
        digest = memo.read_text(encoding="ascii").strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = vocab_digest(model_path, build)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(digest, encoding="ascii")
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest


def cache_dir(home: Optional[Path] = None) -> Path:
    from ..inputs.embed_cache import cache_root

    return cache_root(home) / "tokenizers"


def gguf_tokenizer(llama_cpp, vocab, model_path: Path, n_vocab: int, eos_ids: list[int],
                   directory: Optional[Path] = None):
    """An ``llguidance.LLTokenizer`` for llama.cpp's ``vocab`` (of the GGUF at ``model_path``), ``n_vocab``
    wide, from the disk cache when an entry for this vocabulary exists (else built and stored). A cache
    that cannot be read or written only costs the time it would have saved."""
    import ctypes

    from .constrain import import_llguidance

    llg = import_llguidance()
    n_tok = llama_cpp.llama_vocab_n_tokens(vocab)
    entry = None
    try:
        entry = (directory or cache_dir()) / f"{_digest_of(Path(model_path), directory or cache_dir())}.bin"
    except (OSError, ValueError, KeyError, struct.error):
        pass
    pieces = _read(entry, n_tok) if entry is not None else None
    if pieces is None:
        pieces = _pieces(llama_cpp, vocab)
        if entry is not None:
            try:
                _write(entry, pieces)
            except OSError:
                pass
    tokens = list(pieces) + [b""] * max(0, n_vocab - len(pieces))
    lib = getattr(llama_cpp, "_lib", None) or llama_cpp.llama_cpp._lib      # llama_cpp.llama_cpp or llama_cpp
    fptr = ctypes.cast(lib.llama_tokenize, ctypes.c_void_p).value
    return llg.LLTokenizer.from_llamacpp(tokens=tokens, vocab_ptr=vocab, tokenize_fptr=fptr,
                                         eos_token=eos_ids, slices=None)


__all__ = ["gguf_tokenizer", "vocab_digest", "cache_dir"]
