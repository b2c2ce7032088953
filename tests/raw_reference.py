"""Raw llama-cpp-python on the test model, beside the code under test in the same run on the same machine: what a
reply's text is checked against, since no test may expect particular words. The conftest fixture raw_smollm2 holds
one for the whole run.

llama.cpp's logits differ in their low bits with the CPU's SIMD path (AVX-512, AVX2, NEON, a GPU), the build, the
thread count and the make-up of the batch a token is computed in; where a tiny model's top two tokens are nearly tied
its greedy reply then takes the other branch. So a greedy reply is checked token by token (greedy_departure): every
token must be one raw llama-cpp-python ranks first, or within TOLERANCE of the first, given the reply so far. A reply
decoded on another path passes wherever the paths agree and wherever they part at a near-tie; a token from another
chat, a skipped or repeated token, or text that is not the model's fails.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llama_chat import plain_llama

# How far (in logits) below raw llama-cpp-python's top token a greedy reply's token may be. Measured on SmolLM2 Q4_1
# (AVX2, llama-cpp-python 0.3.36, flash attention as llama_chat.ENGINE_OPTIONS): a token's logits are bit-identical with
# 1 or 2 threads, alone or beside three other sequences in a batch, and with its prompt evaluated whole, in chunks or
# one token at a time, as long as no batch holds 64 or more tokens of one sequence; from 64 on llama.cpp computes
# differently, and the same tokens' logits move by up to 1.34 (0.69 at the last prompt token). The module meets both: a
# chat's prompt whole (up to 512 tokens a batch), or after a cached prefix computed in another batch. The top two of a
# greedy reply were as close as 0.004 apart, while a token of another chat's reply lies some 10 logits below the top.
# 1.5 covers the first and still fails the second (test_batch_decoder.py and test_server_parallel.py check that a reply
# to another prompt fails).
TOLERANCE = 1.5


def full_piece(llm: Llama, token: int, special: bool = False) -> bytes:
    """The token's whole text as llama.cpp gives it: llama-cpp-python 0.3.36's detokenize gives a piece longer than its
    32-byte buffer as b"" (SmolLM2: a newline and 32 spaces or more), which the module's gives whole."""
    buffer = ctypes.create_string_buffer(1024)
    size = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buffer, len(buffer), 0, special)
    return buffer.raw[:size]


class RawModel:
    """One llama_cpp.Llama on a GGUF with a chat template, used only through llama-cpp-python's own API."""

    def __init__(self, model_path: Path, n_ctx: int = 2048, n_threads: int = 1) -> None:
        self.llm = plain_llama(model_path, n_ctx, n_threads)
        model = self.llm._model
        self._template = Jinja2ChatFormatter(
            template=self.llm.metadata["tokenizer.chat_template"],
            eos_token=model.token_get_text(self.llm.token_eos()),
            bos_token=model.token_get_text(self.llm.token_bos()),
        )
        self._eog = {t for t in range(self.llm.n_vocab()) if self._is_eog(t)}
        self._pieces: dict[int, bytes] = {}

    def _is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def close(self) -> None:
        self.llm.close()

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt llama-cpp-python's chat completion evaluates for these messages (the GGUF's own template)."""
        prompt = self._template(messages=messages).prompt
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def reply(self, messages: list[dict[str, str]], **options) -> str:
        """create_chat_completion's reply from an empty cache (the whole prompt evaluated in one batch)."""
        self.llm.reset()
        return self.llm.create_chat_completion(messages=messages, **options)["choices"][0]["message"]["content"]

    def _logits_after(self, tokens: list[int]) -> np.ndarray:
        llm = self.llm
        cached = Llama.longest_token_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens)
        llm.n_tokens = min(cached, len(tokens) - 1)  # at least one token evaluated: its logits are the ones read
        llm.eval(tokens[llm.n_tokens :])
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()

    def greedy_tokens(self, prompt_tokens: list[int], n: int) -> list[int]:
        """Raw llama-cpp-python's greedy reply to prompt_tokens: up to n tokens, without the end-of-generation one."""
        self.llm.reset()
        tokens: list[int] = []
        while len(tokens) < n:
            token = int(np.argmax(self._logits_after(prompt_tokens + tokens)))
            if token in self._eog:
                break
            tokens.append(token)
        return tokens

    def _piece(self, token: int) -> bytes:
        if token not in self._pieces:
            self._pieces[token] = full_piece(self.llm, token)
        return self._pieces[token]

    def greedy_departure(
        self, prompt_tokens: list[int], reply: str, *, ended: bool = False, cut: bool = False, tolerance=TOLERANCE
    ) -> str | None:
        """None when reply is what greedy decoding of prompt_tokens gives, up to near-ties: each of its tokens is
        raw llama-cpp-python's first choice given the reply so far, or within tolerance of it. Otherwise where and
        how it departs. ended: the model ended the reply (an end-of-generation token must then rank so too). cut:
        a stop string cut the reply, so its last token may go on past it."""
        target = reply.encode("utf-8")
        self.llm.reset()  # the prompt evaluated whole from an empty cache, not after whatever another check left there
        worst: list[tuple[int, str]] = []  # (bytes matched, what went wrong there), the furthest first

        def search(tokens: list[int], at: int) -> bool:
            logits = self._logits_after(prompt_tokens + tokens)
            top = float(logits.max())
            near = [int(t) for t in np.argsort(-logits)[: int((logits >= top - tolerance).sum())]]
            rest = target[at:]
            if not rest:
                if not ended or any(t in self._eog for t in near):
                    return True
                worst.append((at, "the reply ended where raw llama-cpp-python does not end it"))
                return False
            for token in near:
                piece = self._piece(token)
                if token in self._eog or not piece:
                    continue
                if rest.startswith(piece) and search(tokens + [token], at + len(piece)):
                    return True
                if cut and piece.startswith(rest):
                    return True
            worst.append((at, self._departure(logits, rest, near)))
            return False

        if search([], 0):
            return None
        at, why = max(worst, key=lambda w: w[0])
        return f"after {target[:at].decode('utf-8', 'replace')!r}: {why}"

    def stop_departure(self, prompt_tokens: list[int], reply: str, stop_reason: str, stop: str, unstopped: str):
        """None when a greedy reply asked to stop at `stop` did: it ends where the model wrote the stop string, or,
        having left raw's greedy reply `unstopped` (which holds stop) at a near-tie before that point, never wrote it.
        Otherwise what went wrong."""
        if stop in reply:
            return f"the stop string {stop!r} is in the reply {reply!r}"
        if stop_reason == "completed":
            return self.greedy_departure(prompt_tokens, reply + stop, cut=True)
        if reply.startswith(unstopped[: unstopped.index(stop)]):
            return f"the reply {reply!r} went on past where the model writes {stop!r} ({stop_reason})"
        return self.greedy_departure(prompt_tokens, reply)

    def _departure(self, logits: np.ndarray, rest: bytes, near: list[int]) -> str:
        top = float(logits.max())
        taken = [t for t in range(len(logits)) if (p := self._piece(t)) and rest.startswith(p)]
        best = max(taken, key=lambda t: logits[t], default=None)
        choices = ", ".join(f"{self._piece(t).decode('utf-8', 'replace')!r} {logits[t]:.3f}" for t in near[:3])
        if best is None:
            return f"the reply goes on with {rest[:20]!r}, which no token begins; raw's choice: {choices}"
        gap = top - float(logits[best])
        return (
            f"the reply goes on with {self._piece(best).decode('utf-8', 'replace')!r}, {gap:.3f} below raw "
            f"llama-cpp-python's top token ({choices})"
        )
