"""The state of one chat command: the reply as it grows, its live metrics, and how it ended."""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

from llamachat.reply_channel import ReplyChannel


class StopReason(str, Enum):
    """How a chat ended: its result's stop_reason. A str, so it compares with and serialises as its value."""

    COMPLETED = "completed"  # the model ended its reply, or a stop string did
    LENGTH = "length"  # max_tokens, or the context, ran out
    CANCELLED = "cancelled"
    ERROR = "error"

    __str__ = str.__str__  # f"{reason}" is its value, not "StopReason.COMPLETED"


# llama-cpp-python's finish_reason -> our stop_reason
STOP_REASON_OF_FINISH_REASON = {"stop": StopReason.COMPLETED, "length": StopReason.LENGTH}


class ChatJob:
    def __init__(
        self, command_id: str, model: str, model_fallback: bool = False, channel: ReplyChannel | None = None
    ) -> None:
        self.command_id = command_id
        self.channel = channel  # under our standalone server: where each new piece of the reply goes at once
        self.model = model
        self.model_fallback = model_fallback
        self.reply = ""
        self.started = time.perf_counter()
        self.inference_started: float | None = None
        # When the reply's first and latest tokens were seen, and the token counts then (for tokens_per_second).
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._tokens_at_first = 0
        self._tokens_at_last = 0
        self.finished_at: float | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        # Where the cached prompt tokens came from (context, ram, disk, none: conversation_cache.SOURCES) and how long
        # restoring them took (None when nothing was restored).
        self.prefix_source: str | None = None
        self.restore_ms: float | None = None
        self.dropped_turns = 0
        self.completion_tokens = 0
        self.stop_reason: StopReason | None = None
        self.error: str | None = None
        self.error_code: str | None = None  # with an error: what kind, where a client may act on it
        self.error_param: str | None = None  # with an error: the input at fault
        self.logprobs: list[dict[str, Any]] | None = None  # with logprobs asked for: one entry per token
        self.drafted_tokens = 0  # speculative decoding: tokens drafted from the conversation, and kept of them
        self.accepted_tokens = 0
        self.threads: int | None = None  # llama.cpp's CPU threads now (the adaptive mode may change it mid-reply)

    def begin_inference(self, prompt_tokens: int, cached_tokens: int, dropped_turns: int) -> None:
        self.prompt_tokens, self.cached_tokens, self.dropped_turns = prompt_tokens, cached_tokens, dropped_turns
        self.inference_started = time.perf_counter()

    def add_text(self, text: str, completion_tokens: int) -> None:
        """A streamed piece of the reply, and how many tokens the model has generated so far (a piece may hold
        several tokens, or none yet of a character still incomplete)."""
        if completion_tokens > self.completion_tokens:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at, self._tokens_at_first = now, completion_tokens
            self.last_token_at, self._tokens_at_last = now, completion_tokens
        self.count_tokens(completion_tokens)
        self.reply += text
        if text and self.channel is not None:  # after the append: a poll from now on sees the piece too
            # With the metrics, the server can answer a status poll itself (llamachat_server/reply_feed.py); the
            # lines carry no log probabilities, so a chat with them is left to the module's answers.
            metrics = self.metrics() if self.logprobs is None else None
            self.channel.text(self.command_id, len(self.reply) - len(text), text, metrics)

    def count_tokens(self, completion_tokens: int) -> None:
        self.completion_tokens = max(self.completion_tokens, completion_tokens)

    def finish(
        self, stop_reason: StopReason, error: str | None = None, code: str | None = None, param: str | None = None
    ) -> dict[str, Any]:
        self.stop_reason, self.error, self.error_code, self.error_param = stop_reason, error, code, param
        self.finished_at = time.perf_counter()
        return self.result()

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    def metrics(self) -> dict[str, Any]:
        now = self.finished_at or time.perf_counter()
        speed = 0.0
        first, last = self.first_token_at, self.last_token_at
        if first is not None and last is not None and last > first:
            speed = (self._tokens_at_last - self._tokens_at_first) / (last - first)
        return {
            "model": self.model,
            "model_fallback": self.model_fallback,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefix_source": self.prefix_source,
            "restore_ms": self.restore_ms,
            "completion_tokens": self.completion_tokens,
            "tokens_per_second": round(speed, 2),
            "time_to_first_token_ms": None if self.first_token_at is None else _ms(self.first_token_at - self.started),
            "elapsed_ms": _ms(now - self.started),
            "dropped_turns": self.dropped_turns,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "threads": self.threads,
        }

    def status(self) -> dict[str, Any]:
        """What a poll sees while the chat runs."""
        return {"success": True, "reply": self.reply, **self._logprobs(), **self.metrics()}

    def _logprobs(self) -> dict[str, Any]:
        return {} if self.logprobs is None else {"logprobs": list(self.logprobs)}

    def result(self) -> dict[str, Any]:
        """The command's final output; the SDK merges it into every later get_command_status answer."""
        end = self.finished_at or time.perf_counter()
        result = {
            "success": self.error is None,
            "reply": self.reply,
            "stop_reason": self.stop_reason,
            "processMs": _ms(end - self.started),
            "inferenceMs": _ms(end - self.inference_started) if self.inference_started else 0,
            **self._logprobs(),
            **self.metrics(),
        }
        if self.error is not None:
            result.update(error=self.error, error_code=self.error_code, error_param=self.error_param)
        return result


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))
