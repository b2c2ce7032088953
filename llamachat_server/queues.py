"""The request queues between clients and modules (as in the real server, docs/protocol.md §1.2, §2.2).

A client's request waits here, keyed by a new reqid, until a module takes it with a long poll and posts
the answer back, or until the response timeout. A request whose client has gone (timed out, disconnected)
leaves its queue at once, so its memory is freed and no module ever sees it; requests a module took but
never answered fail at once if that module dies. Each queue is bounded in requests and in bytes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import OrderedDict

DEFAULT_MAX_QUEUE_LENGTH = 1024
# Room for two of the largest requests the server accepts (50 MB each) or thousands of ordinary chats.
DEFAULT_MAX_QUEUE_BYTES = 128 * 1024 * 1024


class QueueError(Exception):
    """A request that got no answer from its module; the message is what the client is told."""


class RequestTimedOut(QueueError):
    pass


class RequestQueueFull(QueueError):
    """The server's request queue for a module is full (not the module's own chat queue)."""


# What Python holds for each value, key and file beyond its characters (a str, a list slot, a dict): a request of
# many tiny values is as big as its objects, not its few characters.
ITEM_OVERHEAD_BYTES = 100


def payload_size(payload: dict) -> int:
    """About how many bytes a payload holds in memory: its texts and files, and ITEM_OVERHEAD_BYTES per item."""
    values = payload.get("values", [])
    files = payload.get("files", [])
    segments = payload.get("urlSegments", [])
    items = len(values) + sum(len(key_values["value"]) for key_values in values) + len(files) + len(segments)
    chars = (
        sum(len(key_values["key"]) + sum(len(value) for value in key_values["value"]) for key_values in values)
        + sum(len(file.get("data", "")) for file in files)
        + sum(len(segment) for segment in segments)
    )
    return chars + items * ITEM_OVERHEAD_BYTES


class _Queue:
    """The requests waiting for a module, oldest first; pollers wait on `arrived`."""

    def __init__(self) -> None:
        self.requests: OrderedDict[str, tuple[dict, int]] = OrderedDict()  # reqid → (request, its size)
        self.bytes = 0
        self.arrived = asyncio.Event()

    def remove(self, reqid: str) -> dict | None:
        entry = self.requests.pop(reqid, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]


class RequestQueues:
    def __init__(
        self,
        response_timeout: float,
        max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
    ) -> None:
        self.response_timeout = response_timeout
        self._max_queue_length = max_queue_length
        self._max_queue_bytes = max_queue_bytes
        self._queues: dict[str, _Queue] = {}
        self._waiting: dict[str, asyncio.Future] = {}  # reqid → the client's pending answer
        self._taken: dict[str, str] = {}  # reqid → queue, taken by a module and not yet answered

    def ensure_queue(self, name: str) -> None:
        self._queues.setdefault(name.lower(), _Queue())

    def has_queue(self, name: str) -> bool:
        return name.lower() in self._queues

    def pending(self, queue: str) -> tuple[int, int]:
        """(requests, bytes) waiting on `queue` for a module."""
        waiting = self._queues[queue.lower()]
        return len(waiting.requests), waiting.bytes

    def _check_room(self, queue: str, waiting: _Queue, size: int, reqid: str) -> None:
        if len(waiting.requests) >= self._max_queue_length:
            raise RequestQueueFull(
                f"Request queue '{queue}' is full: {len(waiting.requests)} requests wait for the "
                f"module (at most {self._max_queue_length}); try again later (#reqid {reqid})"
            )
        if waiting.bytes + size > self._max_queue_bytes:
            raise RequestQueueFull(
                f"Request queue '{queue}' is full: {waiting.bytes / 1e6:.1f} MB of requests wait for the "
                f"module and this one adds {size / 1e6:.1f} MB (at most "
                f"{self._max_queue_bytes / 1e6:.0f} MB in all); try again later (#reqid {reqid})"
            )

    def _enqueue(self, queue: str, payload: dict, bounded: bool = True) -> str:
        waiting = self._queues[queue.lower()]
        reqid = str(uuid.uuid4())
        size = payload_size(payload)
        if bounded:
            self._check_room(queue, waiting, size, reqid)
        waiting.requests[reqid] = ({"reqid": reqid, "reqtype": payload["command"], "payload": payload}, size)
        waiting.bytes += size
        waiting.arrived.set()
        return reqid

    async def send_request(self, queue: str, payload: dict) -> dict:
        """Queues `payload` and returns the module's answer (a JSON object) or raises QueueError. If the caller
        goes away (this coroutine is cancelled), the request leaves the queue with it."""
        future = asyncio.get_running_loop().create_future()
        reqid = self._enqueue(queue, payload)
        self._waiting[reqid] = future
        try:
            response = await asyncio.wait_for(future, self.response_timeout)
        except asyncio.TimeoutError:
            raise RequestTimedOut(f"The request timed out (#reqid {reqid})") from None
        finally:
            self._waiting.pop(reqid, None)
            self._taken.pop(reqid, None)
            self._queues[queue.lower()].remove(reqid)
        try:
            answer = json.loads(response)
        except (ValueError, RecursionError):  # not JSON, or a number too long to read
            raise QueueError(f"Invalid JSON response from backend (#reqid {reqid})") from None
        if answer is None:
            raise QueueError(f"null json returned from backend (#reqid {reqid})")
        if not isinstance(answer, dict):
            raise QueueError(f"Invalid JSON response from backend (#reqid {reqid})")
        return answer

    def post(self, queue: str, payload: dict) -> str:
        """Queues `payload` for a module with nobody waiting for an answer (quit, which must get through even to a
        full queue); returns its reqid."""
        return self._enqueue(queue, payload, bounded=False)

    async def take(self, queue: str, wait: float) -> dict | None:
        """The next request on `queue`, or None when none came within `wait` seconds."""
        waiting = self._queues[queue.lower()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not waiting.requests:
            waiting.arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(waiting.arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        reqid = next(iter(waiting.requests))
        request = waiting.remove(reqid)
        if reqid in self._waiting:
            self._taken[reqid] = queue.lower()
        return request

    def answer(self, reqid: str, response: str) -> bool:
        """Hands a module's answer to the waiting client; False when nobody waits for `reqid`."""
        future = self._waiting.get(reqid)
        if future is None or future.done():
            return False
        future.set_result(response)
        return True

    def fail_taken(self, queue: str, reason: str) -> int:
        """Fails the requests a module took from `queue` but will never answer; returns how many."""
        failed = 0
        for reqid, taken_from in list(self._taken.items()):
            future = self._waiting.get(reqid)
            if taken_from == queue.lower() and future is not None and not future.done():
                future.set_exception(QueueError(f"{reason} (#reqid {reqid})"))
                failed += 1
        return failed

    def fail_all(self, reason: str) -> int:
        """Fails every request still waiting for an answer (the server is stopping); returns how many."""
        failed = 0
        for reqid, future in list(self._waiting.items()):
            if not future.done():
                future.set_exception(QueueError(f"{reason} (#reqid {reqid})"))
                failed += 1
        return failed
