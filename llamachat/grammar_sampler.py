"""Sampling under a grammar at the speed of sampling without one.

llama-cpp-python puts the grammar in the sampler chain, so every token runs the grammar over the whole vocabulary
(49,152 token strings for SmolLM2): structured output ran at half the speed of llama-server, which checks only the
token the chain picked and runs the grammar over the vocabulary when that token breaks it. This sampler does the
same. Greedy decoding picks the same tokens either way (the most likely token overall is the most likely allowed
one whenever the grammar allows it); with temperature > 0 the token comes from the unconstrained distribution while
it fits, as in llama-server.
"""

from __future__ import annotations

import ctypes
import math

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp.llama_grammar import LlamaGrammar

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data's layout


class GrammarCheckedSampler:
    """A sampler chain without the grammar, and the grammar, used as llama-cpp-python uses its LlamaSampler
    (sample() also accepts the token; accept() for a token chosen elsewhere)."""

    def __init__(self, chain: internals.LlamaSampler, model: internals.LlamaModel, grammar: LlamaGrammar) -> None:
        self.chain = chain
        self._grammar = llama_cpp.llama_sampler_init_grammar(
            model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not self._grammar:
            raise ValueError("llama.cpp could not parse the grammar")
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)
        self._data = (llama_cpp.llama_token_data * self._n_vocab)()
        self._view = np.frombuffer(self._data, dtype=_TOKEN_DATA)
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._candidates = llama_cpp.llama_token_data_array(data=self._data, size=self._n_vocab)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_candidate = llama_cpp.llama_token_data_array(data=self._one, size=1)

    def sample(self, ctx: internals.LlamaContext, idx: int = -1) -> int:
        token = self._pick(ctx, idx, with_grammar=False)
        if not self._allows(token):
            token = self._pick(ctx, idx, with_grammar=True)
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._grammar, token)
        self.chain.accept(token)

    def reset(self) -> None:
        llama_cpp.llama_sampler_reset(self._grammar)
        self.chain.reset()

    def close(self) -> None:
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        self.chain.close()

    def __del__(self) -> None:
        self.close()

    def _pick(self, ctx: internals.LlamaContext, idx: int, with_grammar: bool) -> int:
        logits = llama_cpp.llama_get_logits_ith(ctx.ctx, idx)
        self._view["id"] = self._ids  # the samplers sort and cut the array in place: every pick starts afresh
        self._view["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        self._view["p"] = 0.0
        candidates = self._candidates
        candidates.size, candidates.selected, candidates.sorted = self._n_vocab, -1, False
        if with_grammar:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        llama_cpp.llama_sampler_apply(self.chain.sampler, ctypes.byref(candidates))
        return int(self._data[candidates.selected].id)

    def _allows(self, token: int) -> bool:
        self._one[0] = llama_cpp.llama_token_data(token, 1.0, 0.0)
        self._one_candidate.size, self._one_candidate.selected, self._one_candidate.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_candidate))
        return self._one[0].logit != -math.inf
