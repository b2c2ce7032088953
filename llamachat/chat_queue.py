"""The chats waiting for the model, first come first served, and the results of finished ones for a while.

The SDK runs one long process per module and refuses the rest (docs/protocol.md §1.7), so LlamaChat keeps its own
queue: every chat is accepted while there is room, waits its turn, and is reachable through its own commandId only.
A worker takes the oldest waiting chat whenever one of the `slots` is free (one slot, or CPAI_MODULE_LLAMA_PARALLEL
of them: one worker each), runs it and hands back its result, which stays readable for `result_ttl` seconds and is
then forgotten, so memory stays bounded. Pure logic, no model and no SDK: tests/test_chat_queue.py drives it with a
fake clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from llamachat.chat_job import ChatJob, StopReason


class ChatState(str, Enum):
    """Where a chat is: its commandStatus in the module's answers. A str, so it serialises as its value."""

    QUEUED = "queued"  # waiting for a slot
    RUNNING = "running"
    COMPLETED = "completed"  # finished, however it ended (its result's stop_reason says how)

    __str__ = str.__str__  # f"{state}" is its value, not "ChatState.QUEUED"


# A bound on the results kept at once, whatever the TTL: cancelling queued chats in a loop finishes them faster than
# any model could, and each would otherwise be kept for the whole TTL.
MAX_KEPT_RESULTS = 1000
# The wait estimate uses the figures of this many recent chats.
RECENT_CHATS = 16
# A reply's length before any chat has ended on its own: a few paragraphs.
DEFAULT_REPLY_TOKENS = 256


class ChatQueueFull(Exception):
    """No room: `capacity` chats already wait."""


class ChatQueueClosed(Exception):
    """The module is shutting down: no chat starts any more."""


@dataclass(eq=False)
class QueuedChat:
    command_id: str
    request: Any  # what the worker needs to run it (the adapter's ChatRequest); dropped once it has finished
    max_tokens: int  # the chat's limit; 0 = none (for the wait estimate)
    state: ChatState = ChatState.QUEUED
    cancel_requested: bool = False  # a running chat stops at its next token
    job: ChatJob | None = None  # the running chat's live state, set by its worker; dropped once it has finished
    result: dict | None = None  # the finished chat's answer
    forget_at: float = math.inf


class WaitEstimate:
    """Seconds until a queued chat starts: the tokens still to come before it, at the speed recent chats were
    generated, plus each chat's time to its first token (prompt evaluation). A chat is expected to produce as many
    tokens as recent chats that ended on their own, or its max_tokens if that is fewer; with several slots the work
    ahead is shared among them. Unknown (None) until a speed has been measured."""

    def __init__(self) -> None:
        self._speeds: deque[float] = deque(maxlen=RECENT_CHATS)  # tokens/s
        self._first_token_s: deque[float] = deque(maxlen=RECENT_CHATS)
        self._reply_tokens: deque[int] = deque(maxlen=RECENT_CHATS)

    def record(self, result: dict) -> None:
        """Learns from a finished chat's result (ChatJob.result())."""
        if result.get("tokens_per_second"):
            self._speeds.append(result["tokens_per_second"])
        if result.get("time_to_first_token_ms") is not None:
            self._first_token_s.append(result["time_to_first_token_ms"] / 1000)
        if result.get("stop_reason") in (StopReason.COMPLETED, StopReason.LENGTH) and result.get("completion_tokens"):
            self._reply_tokens.append(result["completion_tokens"])

    def reply_tokens(self, max_tokens: int) -> float:
        typical = sum(self._reply_tokens) / len(self._reply_tokens) if self._reply_tokens else DEFAULT_REPLY_TOKENS
        return min(max_tokens, typical) if max_tokens > 0 else typical

    def seconds(self, running: list[QueuedChat], ahead: list[QueuedChat], slots: int) -> float | None:
        speeds = list(self._speeds) or [s for c in running if c.job and (s := c.job.metrics()["tokens_per_second"]) > 0]
        if not speeds:
            return None
        speed = sum(speeds) / len(speeds)
        first_token = sum(self._first_token_s) / len(self._first_token_s) if self._first_token_s else 0.0
        work = sum(first_token + self.reply_tokens(c.max_tokens) / speed for c in ahead)
        for chat in running:
            generated = chat.job.completion_tokens if chat.job else 0
            work += max(0.0, self.reply_tokens(chat.max_tokens) - generated) / speed
            if not generated:
                work += first_token
        return work / slots


class ChatQueue:
    """FIFO scheduler: `add` queues a chat (at most `capacity` wait), a worker's `take` hands it the oldest one when a
    slot is free, `finish` stores its result. Thread-safe: the SDK's threads add, look up and cancel chats while
    workers run them."""

    def __init__(
        self,
        capacity: int,
        result_ttl: float,
        slots: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_complete: Callable[[str], None] | None = None,
    ) -> None:
        """on_complete(commandId): a chat has its result, however it ended (called holding the lock: it must not
        wait)."""
        self.capacity, self.result_ttl, self.slots = capacity, result_ttl, slots
        self._clock = clock
        self._on_complete = on_complete
        self._lock = threading.Condition()
        self._waiting: deque[QueuedChat] = deque()
        self._running: list[QueuedChat] = []
        self._finished: deque[QueuedChat] = deque()  # in the order they finished, so also of forget_at
        self._chats: dict[str, QueuedChat] = {}  # every chat not yet forgotten, by commandId
        self._closed = False
        self.estimate = WaitEstimate()

    # --- for the SDK's threads ---------------------------------------------------------------------------------

    def add(self, command_id: str, request: Any, max_tokens: int) -> QueuedChat:
        """Queues a chat; ChatQueueFull when `capacity` chats wait already, ChatQueueClosed when shutting down."""
        with self._lock:
            self._forget_expired()
            if self._closed:
                raise ChatQueueClosed()
            if command_id in self._chats:
                raise ValueError(f"commandId {command_id} is already in use")
            if len(self._waiting) + 1 - self._free_slots() > self.capacity:  # it would wait, and there is no room
                raise ChatQueueFull()
            chat = QueuedChat(command_id, request, max_tokens)
            self._waiting.append(chat)
            self._chats[command_id] = chat
            self._lock.notify_all()
            return chat

    def get(self, command_id: str) -> QueuedChat | None:
        """The chat with this commandId, unless it never existed or has been forgotten."""
        with self._lock:
            self._forget_expired()
            return self._chats.get(command_id)

    def place(self, chat: QueuedChat) -> tuple[int, float | None]:
        """(queue_position, estimated wait in seconds) of a waiting chat: 1 starts next. Position 0 for a chat that
        runs, or starts as soon as its worker wakes (a slot is free for it), or has finished."""
        with self._lock:
            if chat.state != ChatState.QUEUED:
                return 0, None
            index = self._waiting.index(chat)
            position = index + 1 - self._free_slots()
            if position <= 0:
                return 0, None
            return position, self.estimate.seconds(self._running, list(self._waiting)[:index], self.slots)

    def cancel(self, command_id: str, cancelled_result: Callable[[QueuedChat], dict]) -> QueuedChat | None:
        """Stops a chat: a waiting one leaves the queue at once and finishes with cancelled_result(chat); a running
        one is asked to stop (its worker ends it); a finished one is left as it is. None for an unknown id."""
        with self._lock:
            chat = self._chats.get(command_id)
            if chat is None:
                return None
            if chat.state == ChatState.QUEUED:
                self._waiting.remove(chat)
                self._complete(chat, cancelled_result(chat))
            elif chat.state == ChatState.RUNNING:
                chat.cancel_requested = True
            return chat

    def counts(self) -> tuple[int, int]:
        """(chats waiting, chats running)."""
        with self._lock:
            return self._waiting_count(), len(self._running)

    # --- for the workers ---------------------------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> QueuedChat | None:
        """The oldest waiting chat, now running, once one waits and a slot is free; None after `timeout` seconds or
        once the queue is closed."""
        with self._lock:
            ready = self._lock.wait_for(lambda: self._closed or (self._waiting and self._free_slots()), timeout)
            if not ready or self._closed:
                return None
            chat = self._waiting.popleft()
            chat.state = ChatState.RUNNING
            self._running.append(chat)
            return chat

    def finish(self, chat: QueuedChat, result: dict) -> None:
        """A worker has ended `chat` with `result`; its slot is free again."""
        with self._lock:
            self._running.remove(chat)
            self.estimate.record(result)
            self._complete(chat, result)
            self._lock.notify_all()

    def close(self, closed_result: Callable[[QueuedChat], dict]) -> None:
        """Shutting down: every waiting chat finishes with closed_result(chat), running ones are asked to stop, and
        `take` returns None from now on."""
        with self._lock:
            self._closed = True
            while self._waiting:
                chat = self._waiting.popleft()
                self._complete(chat, closed_result(chat))
            for chat in self._running:
                chat.cancel_requested = True
            self._lock.notify_all()

    # --- inside the lock ---------------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.slots - len(self._running)

    def _waiting_count(self) -> int:
        """Chats waiting for a slot; those a free slot is about to take do not wait."""
        return max(0, len(self._waiting) - self._free_slots())

    def _complete(self, chat: QueuedChat, result: dict) -> None:
        # Only the result is kept: a request may hold megabytes of history, and the job's reply is in the result.
        chat.state, chat.result, chat.request, chat.job = ChatState.COMPLETED, result, None, None
        chat.forget_at = self._clock() + self.result_ttl
        if self._on_complete is not None:
            self._on_complete(chat.command_id)
        self._finished.append(chat)
        while len(self._finished) > MAX_KEPT_RESULTS:
            self._forget(self._finished.popleft())

    def _forget_expired(self) -> None:
        now = self._clock()
        while self._finished and self._finished[0].forget_at <= now:
            self._forget(self._finished.popleft())

    def _forget(self, chat: QueuedChat) -> None:
        del self._chats[chat.command_id]
