"""The backends' detokenizers (``Backend.text_stream``): generated token ids -> text, correct across
multi-byte characters split between tokens."""
from __future__ import annotations

from ..generation.text import Utf8Stream


class PieceStream:
    """Generated token ids -> text through llama.cpp's pieces (special tokens render as nothing)."""

    def __init__(self, llama_cpp, vocab, buf) -> None:
        self._lc, self._vocab, self._buf = llama_cpp, vocab, buf
        self._utf8 = Utf8Stream()

    def feed(self, token: int) -> str:
        n = self._lc.llama_token_to_piece(self._vocab, token, self._buf, 256, 0, False)
        return self._utf8.feed(self._buf.raw[: max(n, 0)])

    def flush(self) -> str:
        return self._utf8.flush()


class TextStream:
    """Token ids -> text pieces, correct across multi-byte characters and byte-fallback tokens."""

    def __init__(self, tokenizer, context: list[int]) -> None:
        self._tok = tokenizer
        self._ds = None
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:  # tokenizers < 0.21
            DecodeStream = None
        if DecodeStream is not None:
            try:   # context ids let sentencepiece-style decoders keep a leading space (tokenizers >= 0.22)
                self._ds = DecodeStream(ids=list(context[-4:]), skip_special_tokens=True)
            except TypeError:
                self._ds = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._sent = ""

    def feed(self, tok: int) -> str:
        if self._ds is not None:
            return self._ds.step(self._tok, tok) or ""
        self._ids.append(tok)   # fallback: decode everything, send what is new and complete
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self._sent):
            return ""
        out, self._sent = text[len(self._sent):], text
        return out

    def flush(self) -> str:
        if self._ds is not None:
            return ""
        text = self._tok.decode(self._ids, skip_special_tokens=True)
        out = text[len(self._sent):] if text.startswith(self._sent) else ""
        self._sent = text
        return out


__all__ = ["PieceStream", "TextStream"]
