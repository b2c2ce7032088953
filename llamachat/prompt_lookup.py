"""PromptLookup: drafts the next tokens of a reply from the conversation itself (prompt lookup, an n-gram draft).

A reply to "fix this function" or "rewrite this paragraph" repeats long runs of its prompt. The last few tokens
(NGRAM_MAX down to NGRAM_MIN of them) are looked up earlier in the conversation, prompt, history and reply so far;
what followed their latest occurrence is the draft. llama_chat's _CountingLlama evaluates the draft in one batch
behind the last token and samples each drafted position in turn, as it would have without one, keeping the drafted
tokens while the sampled token equals them: the reply is the one normal decoding gives (docs/speculative.md).

The draft length adapts: it doubles while whole drafts are accepted and drops to one past what was accepted when one
is not. A verification pass costs more than a single-token pass, by a part of it measured as the replies run; while
the recent drafts' acceptance stays below that cost (plus a margin) the drafter pauses for a number of tokens that
doubles each time (open-ended chat), and probes again after it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from llama_cpp.llama_speculative import LlamaDraftModel

NGRAM_MAX = 4  # the longest run of last tokens looked up: a longer match is a more reliable draft
NGRAM_MIN = 2  # single tokens recur everywhere in open-ended text, and their drafts are mostly wrong
FIRST_LENGTH = 4  # draft tokens at the start of a reply
# A pass that verifies d drafted tokens costs about (1 + c·d) one-token passes; it yields a + 1 tokens for a
# accepted, so drafting pays while the part of drafted tokens accepted exceeds c. c is measured as the chats run
# (timed()): about 0.1 to 0.3 for a 7B model on a CPU, whose pass is bound by reading the weights, but ~0.5 for a
# 135M model on one core, whose pass is bound by compute (bench/results/speculative.md). Until measured: FIRST_COST.
FIRST_COST = 0.3
MARGIN = 0.1  # drafting goes on while the average acceptance stays above c + MARGIN
RATE_WEIGHT = 0.3  # how much the latest draft moves the average acceptance
COST_WEIGHT = 0.2  # how much the latest timed pass moves the averages of c and of a one-token pass
MOST_COST = 2.0  # a pass slowed by something else (another process) moves c by at most this much
PAUSE_FIRST, PAUSE_MOST = 16, 256  # tokens generated without drafting once drafting has not paid
_NONE = np.array([], dtype=np.intc)


def find_draft(ids: npt.NDArray[np.intc], length: int) -> npt.NDArray[np.intc]:
    """Up to `length` tokens that followed the latest earlier occurrence of the longest run of ids' last tokens
    (NGRAM_MAX down to NGRAM_MIN); empty when none recurs."""
    n_ids = len(ids)
    for n in range(min(NGRAM_MAX, n_ids - 1), NGRAM_MIN - 1, -1):
        tail = ids[n_ids - n :]
        starts = np.flatnonzero(ids[: n_ids - n] == tail[0])  # every start with at least one token after the run
        for offset in range(1, n):
            starts = starts[ids[starts + offset] == tail[offset]]
        if starts.size:
            begin = int(starts[-1]) + n
            return ids[begin : begin + length]
    return _NONE


class PromptLookup(LlamaDraftModel):
    """llama-cpp-python's draft model interface: generate() calls it with the tokens so far (the last sampled one
    included) after each step and evaluates what it returns behind that token."""

    def __init__(self, max_draft: int) -> None:
        if max_draft < 1:
            raise ValueError(f"max_draft must be at least 1, not {max_draft}")
        self.max_draft = max_draft
        self.pending = 0  # tokens of the latest draft not yet evaluated: _CountingLlama.eval takes them
        # What a pass costs is the model's and the machine's, not a chat's: it carries over from chat to chat.
        self.cost = FIRST_COST  # c: a drafted token's cost in a pass, as a part of a one-token pass
        self._pass_s: float | None = None  # a one-token pass's seconds, averaged
        self.reset()

    def reset(self) -> None:
        """A new reply: nothing learnt from the last one carries over."""
        self.length = min(FIRST_LENGTH, self.max_draft)
        self.pending = 0
        self._drafted = self._accepted = 0  # the latest draft: its size, and how many of it were accepted so far
        self._rate = 1.0
        self._pause, self._next_pause = 0, PAUSE_FIRST

    def checked(self, accepted: bool) -> None:
        """A drafted position was sampled: whether the sampled token was the drafted one."""
        self._accepted += accepted

    def timed(self, drafted: int, seconds: float) -> None:
        """A pass of the reply took this long: one token (drafted 0) or the last token and `drafted` more."""
        if not drafted:
            self._pass_s = seconds if self._pass_s is None else self._pass_s + COST_WEIGHT * (seconds - self._pass_s)
        elif self._pass_s:
            extra = min(max(seconds / self._pass_s - 1, 0.0) / drafted, MOST_COST)
            self.cost += COST_WEIGHT * (extra - self.cost)

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        self._learn()
        if self._pause > 0:
            self._pause -= 1
            return _NONE
        draft = find_draft(input_ids, self.length)
        self.pending = self._drafted = len(draft)
        self._accepted = 0
        return draft

    def _learn(self) -> None:
        """Adapts the length, and pauses drafting, from how the latest draft fared."""
        drafted, accepted = self._drafted, self._accepted
        if not drafted:
            return
        self._drafted = 0
        self.length = min(self.max_draft, self.length * 2) if accepted == drafted else max(1, accepted + 1)
        self._rate += RATE_WEIGHT * (accepted / drafted - self._rate)
        pays = self.cost + MARGIN
        if self._rate < pays:
            # Judged afresh after the pause: the probe's own result decides whether drafting resumes.
            self._pause, self._next_pause = self._next_pause, min(self._next_pause * 2, PAUSE_MOST)
            self._rate, self.length = pays, 1
        elif accepted:
            self._next_pause = PAUSE_FIRST
