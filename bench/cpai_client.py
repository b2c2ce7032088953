"""A client of the CodeProject.AI API, timed as the client sees it: it starts a chat, then polls for the growing
reply the way the Explorer chat page does (a poll, then a pause of one poll interval after each answer)."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

CHAT_PATH = "/v1/text/chat"


class ChatFailed(RuntimeError):
    """The server or the module refused or failed a chat the benchmark needs."""


@dataclass
class Poll:
    at: float  # perf_counter() when the answer arrived
    reply_chars: int
    completion_tokens: int
    prompt_tokens: int
    running: bool  # not finished yet: waiting in the module's queue or running
    threads: int | None = None  # llama.cpp's thread count the module reported (the adaptive mode may change it)


@dataclass
class ChatTrace:
    sent_at: float  # perf_counter() just before the chat was posted
    command_id: str
    polls: list[Poll] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def client_ttft_ms(self) -> float | None:
        """When the client first saw text, counted from posting the chat."""
        seen = next((p for p in self.polls if p.reply_chars), None)
        return None if seen is None else (seen.at - self.sent_at) * 1000

    def client_tokens_per_second(self) -> float | None:
        """How fast the reply grew between the first and the last poll that saw it growing (the final poll,
        which comes some time after the end, is left out)."""
        growing = [p for p in self.polls if p.running and p.reply_chars]
        if len(growing) < 2 or growing[-1].completion_tokens <= growing[0].completion_tokens:
            return None
        return (growing[-1].completion_tokens - growing[0].completion_tokens) / (growing[-1].at - growing[0].at)


class CpaiClient:
    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        self._address = (parts.hostname, parts.port)
        self._timeout = timeout
        self._connection: http.client.HTTPConnection | None = None
        self.module_id = "LlamaChat"

    def post(self, path: str, fields: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """POSTs a form on a kept-alive connection, as a browser does; returns the JSON answer and when it came."""
        body = urlencode({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(*self._address, timeout=self._timeout)
            try:
                self._connection.request("POST", path, body, headers)
                response = self._connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # the server closed the idle connection: one retry on a new one
                if attempt == 2:
                    raise
        answered = time.perf_counter()
        try:
            return json.loads(data), answered
        except json.JSONDecodeError:
            raise ChatFailed(f"POST {path} answered HTTP {response.status} with no JSON: {data[:200]!r}") from None

    def start_chat(self, fields: dict[str, Any]) -> ChatTrace:
        sent = time.perf_counter()
        ack, _ = self.post(CHAT_PATH, fields)
        if not ack.get("success") or not ack.get("commandId"):
            raise ChatFailed(f"the chat was refused: {ack.get('error') or ack}")
        self.module_id = ack.get("moduleId") or self.module_id
        return ChatTrace(sent_at=sent, command_id=ack["commandId"])

    def poll(self, trace: ChatTrace) -> Poll:
        status, at = self.post(f"/v1/{self.module_id}/get_command_status", {"commandId": trace.command_id})
        running = status.get("commandStatus") in ("queued", "running")  # not finished: waiting in the queue or running
        if not running and status.get("commandStatus") != "completed":
            raise ChatFailed(f"get_command_status failed: {status.get('error') or status}")
        poll = Poll(
            at=at,
            reply_chars=len(status.get("reply") or ""),
            running=running,
            completion_tokens=status.get("completion_tokens") or 0,
            prompt_tokens=status.get("prompt_tokens") or 0,
            threads=status.get("threads"),
        )
        trace.polls.append(poll)
        if not running:
            trace.final = status
        return poll

    def follow(self, trace: ChatTrace, interval_s: float) -> ChatTrace:
        """Polls until the chat has completed, pausing interval_s after each answer."""
        while self.poll(trace).running:
            time.sleep(interval_s)
        return trace

    def chat(self, fields: dict[str, Any], interval_s: float) -> ChatTrace:
        return self.follow(self.start_chat(fields), interval_s)

    def cancel(self, trace: ChatTrace) -> dict[str, Any]:
        answer, _ = self.post(f"/v1/{self.module_id}/cancel_command", {"commandId": trace.command_id})
        return answer

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
