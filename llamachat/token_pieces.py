"""TokenPieces: each token's text, asked of llama.cpp once and kept, so that detokenizing a reply costs a lookup per
token. llama-cpp-python's streaming loop detokenizes the whole reply so far after every token (to find stop strings
and incomplete characters), a foreign call per token of it, so its cost per token grows with the reply: with SmolLM2,
3.8 % of a 256-token reply's time and 9.1 % of a 1024-token one's, where this takes 0.4 % and 0.7 %
(bench/results/detokenize.md).

It also gives pieces longer than 32 bytes whole, where llama-cpp-python 0.3.36 gives them as nothing: SmolLM2 has 47
such tokens (a newline and 32 spaces or more: indented code), Gemma 3 379.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp

_BUFFER_BYTES = 32  # longer pieces (rare) are asked again with the size llama.cpp says they need


class TokenPieces:
    def __init__(self, vocab: llama_cpp.llama_vocab_p) -> None:
        self._vocab = vocab
        self._bos = llama_cpp.llama_vocab_bos(vocab)
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})  # special: no, yes

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """What llama-cpp-python's LlamaModel.detokenize gives (long pieces whole): the pieces joined, without the
        leading space a beginning-of-sentence token's text starts with."""
        pieces = self._pieces[bool(special)]
        text = b"".join([pieces[token] if token in pieces else self._piece(token, special) for token in tokens])
        if len(tokens) > 0 and tokens[0] == self._bos and text[:1] == b" ":
            return text[1:]
        return text

    def _piece(self, token: int, special: bool) -> bytes:
        # A buffer of its own: the foreign call lets other threads run, and they may be asking for pieces too.
        buffer = ctypes.create_string_buffer(_BUFFER_BYTES)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if size < 0:  # the buffer is too small: -size bytes are needed
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        piece = buffer.raw[:size]
        self._pieces[bool(special)][token] = piece
        return piece
