"""The request queues between clients and modules (as in the real server, docs/protocol.md §1.2, §2.2).

A client's request waits here, keyed by a new reqid, until a module takes it with a long poll and posts
the answer back, or until the response timeout. Requests whose client has given up are dropped rather
than handed to a module; requests a module took but never answered fail at once if that module dies.
"""
from __future__ import annotations

import asyncio
import json
import uuid

DEFAULT_MAX_QUEUE_LENGTH = 1024


class QueueError(Exception):
    """A request that got no answer from its module; the message is what the client is told."""


class RequestTimedOut(QueueError):
    pass


class RequestQueues:
    def __init__(self, response_timeout: float, max_queue_length: int = DEFAULT_MAX_QUEUE_LENGTH) -> None:
        self.response_timeout = response_timeout
        self._max_queue_length = max_queue_length
        self._queues: dict[str, asyncio.Queue] = {}
        self._waiting: dict[str, asyncio.Future] = {}  # reqid → the client's pending answer
        self._unawaited: set[str] = set()  # reqids sent with no client waiting (quit)
        self._taken: dict[str, str] = {}  # reqid → queue, taken by a module and not yet answered

    def ensure_queue(self, name: str) -> None:
        self._queues.setdefault(name.lower(), asyncio.Queue(self._max_queue_length))

    def has_queue(self, name: str) -> bool:
        return name.lower() in self._queues

    def _enqueue(self, queue: str, payload: dict) -> str:
        reqid = str(uuid.uuid4())
        request = {"reqid": reqid, "reqtype": payload["command"], "payload": payload}
        try:
            self._queues[queue.lower()].put_nowait(request)
        except asyncio.QueueFull:
            raise QueueError(f"Request queue '{queue}' is full (#reqid {reqid})") from None
        return reqid

    async def send_request(self, queue: str, payload: dict) -> dict:
        """Queues `payload` and returns the module's answer (a JSON object) or raises QueueError."""
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
        try:
            answer = json.loads(response)
        except json.JSONDecodeError:
            raise QueueError(f"Invalid JSON response from backend (#reqid {reqid})") from None
        if answer is None:
            raise QueueError(f"null json returned from backend (#reqid {reqid})")
        if not isinstance(answer, dict):
            raise QueueError(f"Invalid JSON response from backend (#reqid {reqid})")
        return answer

    def post(self, queue: str, payload: dict) -> str:
        """Queues `payload` for a module with nobody waiting for an answer (e.g. quit); returns its reqid."""
        reqid = self._enqueue(queue, payload)
        self._unawaited.add(reqid)
        return reqid

    async def take(self, queue: str, wait: float) -> dict | None:
        """The next live request on `queue`, or None when none came within `wait` seconds."""
        pending = self._queues[queue.lower()]
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            try:
                request = await asyncio.wait_for(pending.get(), remaining)
            except asyncio.TimeoutError:
                return None
            reqid = request["reqid"]
            if reqid in self._unawaited:
                self._unawaited.discard(reqid)
                return request
            future = self._waiting.get(reqid)
            if future is not None and not future.done():
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
