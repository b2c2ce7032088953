"""The log probabilities of generated tokens, in OpenAI's shape, from the logits llama.cpp computed for a position.

They are the model's own distribution (before temperature, penalties or a grammar), worked out as llama-cpp-python
works them out for its logprobs, without its logits_all mode: that keeps every position's logits, n_ctx × n_vocab
floats (~800 MB for SmolLM2's 49k-token vocabulary at 4096 tokens), where only the sampled position's are needed.
"""

from __future__ import annotations

from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama


def logprobs_entry(llm: Llama, ctx: llama_cpp.llama_context_p, index: int, token: int, top: int) -> dict[str, Any]:
    """{token, logprob, bytes, top_logprobs} for `token`, sampled from the logits of output `index` of ctx's last
    decode (-1: the last), with the `top` most likely tokens there."""
    n_vocab = llm.n_vocab()
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
    logprobs = Llama.logits_to_logprobs(logits)
    entry = _piece(llm, token, logprobs)
    best = sorted(np.argpartition(-logprobs, top)[:top], key=lambda t: -logprobs[t]) if top else []
    entry["top_logprobs"] = [_piece(llm, int(t), logprobs) for t in best]
    return entry


def _piece(llm: Llama, token: int, logprobs: np.ndarray) -> dict[str, Any]:
    raw = llm.detokenize([token])
    # A token may hold part of a character: its text drops what cannot be decoded (as llama-cpp-python's), its
    # bytes keep everything.
    return {"token": raw.decode("utf-8", errors="ignore"), "logprob": float(logprobs[token]), "bytes": list(raw)}
