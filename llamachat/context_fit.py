"""Fitting a conversation into the model's context: the oldest whole turns go first, never the system prompt or
the new prompt, and room is kept for the reply.

The work is linear in the history, not quadratic: each message's text is tokenized once (and remembered, because
clients send the whole conversation again with every prompt), the cut is chosen from the newest turn backwards with
running sums of those counts plus the template's per-message overhead, and only then is the kept conversation
rendered and tokenized, to check it. The check corrects the estimate when it was off (a token merged across a turn
boundary, a template that trims).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from llamachat.chat_request import CONTEXT_LENGTH_EXCEEDED, ChatError, ChatRequest
from llamachat.chat_types import Message, never

# With max_tokens 0 ("until the model stops") the reply still needs room: this much, or a quarter of the context.
MIN_REPLY_ROOM = 512
# Token counts remembered, by a digest of the text: a long conversation resent turn after turn is counted once.
COUNT_CACHE_SIZE = 4096
# Renders guided by the estimate before halving the range instead (only a template far from the estimate needs it).
GUIDED_RENDERS = 3
_PROBE = "x"


class FitCancelled(Exception):
    """The chat was cancelled while its conversation was being fitted."""


@dataclass
class FittedChat:
    history: list[Message]
    prompt_tokens: list[int]
    dropped_turns: int


def reply_room(request: ChatRequest, n_ctx: int) -> int:
    return request.max_tokens if request.max_tokens > 0 else min(MIN_REPLY_ROOM, n_ctx // 4)


def split_turns(history: list[Message]) -> list[list[Message]]:
    """A turn is a user message and the assistant replies that follow it."""
    turns: list[list[Message]] = []
    for message in history:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


class ContextFitter:
    """Fits requests to one model. `chat` is a LlamaChat, or anything with its n_ctx, messages(),
    tokenize_messages() and count_tokens()."""

    def __init__(self, chat) -> None:
        self.chat = chat
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._overhead: dict[str, int] | None = None

    def count(self, text: str) -> int:
        """The tokens of a message's text on its own, remembered."""
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        n = self._counts.get(key)
        if n is None:
            n = self._counts[key] = self.chat.count_tokens(text)
            if len(self._counts) > COUNT_CACHE_SIZE:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(key)
        return n

    def overhead(self) -> dict[str, int]:
        """Tokens the template adds around one message's text, by role: measured once on a probe conversation."""
        if self._overhead is None:
            alone = len(self._tokens(_PROBE, None, []))
            pair = len(
                self._tokens(
                    _PROBE, None, [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}]
                )
            )
            extra = pair - alone - 2 * self.count(_PROBE)
            self._overhead = {"user": (extra + 1) // 2, "assistant": extra // 2}
        return self._overhead

    def _tokens(
        self, prompt: str, system_prompt: str | None, history: list[Message], request: ChatRequest | None = None
    ) -> list[int]:
        shape = {"as_sent": request.as_sent, "prefill": request.prefill} if request else {}
        tools = {"tools": request.tools} if request and request.tools else {}
        try:
            return self.chat.tokenize_messages(self.chat.messages(prompt, system_prompt, history, **shape), **tools)
        except Exception as ex:  # the template's own checks, e.g. roles that must alternate
            raise ChatError(f"The model's chat template rejected the conversation: {ex}") from None

    def fit(self, request: ChatRequest, cancelled: Callable[[], bool] = never) -> FittedChat:
        """The newest turns that fit with the prompt and room for the reply; raises FitCancelled as soon as
        cancelled() says so, and ChatError when even the prompt alone does not fit (or, with trim_history off,
        the whole conversation). System messages before the first turn are kept, as the system prompt is."""
        room = reply_room(request, self.chat.n_ctx)
        limit = self.chat.n_ctx - room
        pinned = 0
        while pinned < len(request.history) and request.history[pinned]["role"] == "system":
            pinned += 1
        head, turns = request.history[:pinned], split_turns(request.history[pinned:])
        why = "max_tokens" if request.max_tokens else "the minimum kept for a reply"
        lower = " or lower max_tokens." if request.max_tokens else "."

        def render(keep_from: int) -> list[int]:
            if cancelled():
                raise FitCancelled()
            kept = head + [message for turn in turns[keep_from:] for message in turn]
            return self._tokens(request.prompt, request.system_prompt, kept, request)

        if not request.trim_history:
            whole = render(0)
            if len(whole) > limit:
                raise ChatError(
                    f"The conversation does not fit the model's context: it takes {len(whole)} tokens and the reply "
                    f"needs {room} more ({why}), but the context holds {self.chat.n_ctx}. Leave out earlier messages"
                    f"{lower} (or allow trim_history, which leaves out the oldest turns)",
                    "messages",
                    CONTEXT_LENGTH_EXCEEDED,
                )
            return FittedChat(list(request.history), whole, 0)
        alone = render(len(turns))
        if len(alone) > limit:
            raise ChatError(
                f"The prompt does not fit the model's context: it takes {len(alone)} tokens (system prompt included) "
                f"and the reply needs {room} more ({why}), "
                f"but the context holds {self.chat.n_ctx}. Shorten the prompt{lower}",
                "messages",
                CONTEXT_LENGTH_EXCEEDED,
            )
        if not turns:
            return FittedChat(head, alone, 0)

        overhead = self.overhead()
        # estimate[k]: the prompt's tokens with turns[k:] kept, known from the newest turn back to the oldest counted.
        estimate = {len(turns): len(alone)}

        def estimated(k: int) -> int:
            for i in range(min(estimate) - 1, k - 1, -1):
                if cancelled():
                    raise FitCancelled()
                estimate[i] = estimate[i + 1] + sum(
                    overhead.get(m["role"], 0) + self.count(m["content"]) for m in turns[i]
                )
            return estimate[k]

        # Bracket the answer: turns[fits:] is known to fit, turns[too_long:] known not to (-1: the whole history).
        # It ends closed, so no turn is dropped that would have fitted.
        fits, fitting_tokens, too_long, error, attempt = len(turns), alone, -1, 0, 0
        while fits - too_long > 1:
            if attempt < GUIDED_RENDERS:
                k = fits
                while k - 1 > too_long and estimated(k - 1) + error <= limit:
                    k -= 1
                k = min(k, fits - 1)  # the estimate says nothing more fits: check the next older turn
            else:
                k = (too_long + fits + 1) // 2
            attempt += 1
            tokens = render(k)
            error = len(tokens) - estimated(k)
            if len(tokens) <= limit:
                fits, fitting_tokens = k, tokens
            else:
                too_long = k
        kept = head + [message for turn in turns[fits:] for message in turn]
        return FittedChat(kept, fitting_tokens, fits)
