"""ReplyFeed: the server's end of the reply channel (docs/protocol.md §1.10). Each time the server launches the module
it opens a pipe whose write end only that process inherits (its number in LLAMACHAT_REPLY_CHANNEL_FD), reads the
module's lines on the event loop, and hands each chat's to whoever subscribed to its commandId: the OpenAI stream,
which then sends every piece of the reply as it is made. It also keeps each running chat's reply and latest metrics,
so that a client's get_command_status poll of a running chat is answered here (`status`), without the three HTTP
exchanges through the module's process that slow its decoding.

The lines are hints, never the record: a chat's result stays what the module answers. A follower merges pieces by
their offsets and asks get_command_status whenever a piece is missing, the chat has ended, or the channel has gone
quiet or closed; `status` answers only from the module's own latest answer for the chat, updated by the lines that
came after it, and leaves the poll to the module in those cases. On Windows no pipe is passed (the fd cannot be
handed over as simply): followers poll, and so do clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import monotonic

from .routes import STATUS_COMMAND
from .server_log import ServerLog

# A line is at most PIPE_BUF bytes (the module drops longer ones); more than this is not a line of the module's.
LINE_LIMIT = 64 * 1024
READ_BYTES = 64 * 1024  # a pipe's default capacity on Linux: one read empties it
# When the latest line was written longer ago than this, a running chat's status is the module's to answer: a chat
# evaluating its prompt, or one whose end line was dropped while the pipe was full.
LIVE_SILENCE = 1.0
# Running chats whose status the server keeps: far more than the module runs at once. Past it the oldest is dropped
# (a chat whose end line was lost would otherwise stay forever); its polls go to the module.
MAX_LIVE_CHATS = 256


def extend(reply: str, at: int, text: str) -> str | None:
    """The reply with the piece `text` at offset `at` merged in (a part it already has is skipped), or None when the
    piece starts past its end: one before it is missing."""
    if at > len(reply):
        return None
    return reply + text[len(reply) - at :] if at + len(text) > len(reply) else reply


def _well_formed(line: object) -> bool:
    """A piece {"id", "at", "text"} or an end {"id", "end": true}, as llamachat/reply_channel.py writes them."""
    if not isinstance(line, dict) or not isinstance(line.get("id"), str):
        return False
    if line.get("end") is True:
        return True
    at = line.get("at")
    return isinstance(at, int) and not isinstance(at, bool) and at >= 0 and isinstance(line.get("text"), str)


class ReplyPieces:
    """One follower's lines for its chat, in order, since it subscribed; `closed` once the channel has gone. A line
    that `direct` (when set) takes, on the pipe reader's callback, is not queued: the follower has dealt with it."""

    def __init__(self) -> None:
        self._lines: list[dict] = []
        self._arrived = asyncio.Event()
        self._heard = monotonic()  # when the latest line came, taken directly or not
        self.direct: Callable[[dict], bool] | None = None
        self.closed = False

    def put(self, line: dict) -> None:
        self._heard = monotonic()
        if self.direct is not None:
            try:
                if self.direct(line):
                    return
            except Exception:  # on the pipe's reader: the other chats' lines must still be delivered
                self.direct = None  # the follower takes this line and the next ones the ordinary way
        self._lines.append(line)
        self._arrived.set()

    def close(self) -> None:
        self.closed = True
        self._arrived.set()

    async def take(self, timeout: float) -> list[dict]:
        """The lines queued since the last take, waiting for one until no line has come for `timeout` s (lines taken
        directly count); [] on that silence, or on close."""
        quiet_since = monotonic()
        while not self._lines and not self.closed:
            left = max(self._heard, quiet_since) + timeout - monotonic()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):  # no task of its own, unlike wait_for
                    await self._arrived.wait()
            except TimeoutError:
                pass
        lines, self._lines = self._lines, []
        self._arrived.clear()
        return lines


class LiveChat:
    """What the server knows of one running chat: the module's latest get_command_status answer for it (the
    envelope), and the reply and metrics as the lines since have grown them."""

    def __init__(self) -> None:
        self.reply = ""
        self.answer: dict | None = None
        self.metrics: dict | None = None  # from the latest line, when it is newer than the answer
        self.heard = 0.0  # monotonic() when the latest line was written

    def piece(self, at: int, text: str, metrics: object, written: object) -> None:
        grown = extend(self.reply, at, text)
        if grown is None:  # a line was dropped: until the module answers again, it answers
            self.answer = self.metrics = None
        elif len(grown) > len(self.reply):  # a line the latest answer covers has older metrics than that answer
            self.reply, self.metrics = grown, metrics if isinstance(metrics, dict) else None
            # When the module wrote it: a line read late (the pipe is read lazily) is as old as that.
            self.heard = written if isinstance(written, float) else monotonic()

    def answered(self, answer: dict) -> None:
        reply = answer.get("reply") or ""
        if len(reply) >= len(self.reply):  # the answer is the newest word (both are the start of the same reply)
            self.reply, self.metrics = reply, None
        self.answer = dict(answer)

    def status(self) -> dict | None:
        if self.answer is None or self.metrics is None or monotonic() - self.heard > LIVE_SILENCE:
            return None
        return {**self.answer, **self.metrics, "reply": self.reply}


class ReplyFeed:
    """Reads the pipe while a stream follows a chat (a wake-up per token is then the point); otherwise only when a
    status poll needs what it holds, so that a chat nobody streams costs the server nothing per token. A pipe left
    unread fills, and the module then drops its lines: a gap that sends the next poll to the module."""

    def __init__(self, log: ServerLog) -> None:
        self._log = log
        self._followers: dict[str, set[ReplyPieces]] = {}
        self._live: dict[str, LiveChat] = {}
        self._fd: int | None = None  # the read end of the launched module's pipe
        self._partial = b""  # the start of a line whose end is still in the pipe
        self._watched = False  # the event loop reads the pipe as lines come
        self.live = False  # a module process may hold the write end of the pipe read here

    def open(self) -> int | None:
        """A new pipe for the module about to be launched: the write end's fd, to pass to it and close here once it
        is launched; None on Windows."""
        if sys.platform == "win32":
            return None
        self._ended()  # a module launched before has gone: its pipe is done with
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._fd, self._partial, self.live = read_fd, b"", True
        self._watch(bool(self._followers))
        return write_fd

    def _watch(self, on: bool) -> None:
        if self._fd is None or on == self._watched:
            return
        loop = asyncio.get_running_loop()
        if on:
            loop.add_reader(self._fd, self._drain)
        else:
            loop.remove_reader(self._fd)
        self._watched = on

    def _drain(self) -> None:
        """Delivers every whole line the pipe holds now; at its end (the module has gone), ends the channel."""
        while self._fd is not None:
            try:
                data = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._ended()
                return
            *lines, self._partial = (self._partial + data).split(b"\n")
            if len(self._partial) > LINE_LIMIT:  # no line of the module's: its end is skipped as a line of its own
                lines.append(self._partial[:LINE_LIMIT])
                self._partial = b""
            for raw in lines:
                self._deliver(raw)

    def _ended(self) -> None:
        """The module's pipe is closed (it has ended, or a new one replaces it): followers poll from now on."""
        if self._fd is not None:
            self._watch(False)
            os.close(self._fd)
            self._fd = None
        self.live = False
        self._live.clear()
        for followers in self._followers.values():
            for pieces in followers:
                pieces.close()

    def _deliver(self, raw: bytes) -> None:
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not _well_formed(line):
            self._log.add(f"The module wrote a line the reply channel does not know: {raw[:100]!r}", "warning")
            return
        command_id = line["id"]
        if line.get("end"):
            self._live.pop(command_id, None)
        else:
            self._live_chat(command_id).piece(line["at"], line["text"], line.get("metrics"), line.get("t"))
        for pieces in self._followers.get(command_id, ()):
            pieces.put(line)

    def _live_chat(self, command_id: str) -> LiveChat:
        chat = self._live.get(command_id)
        if chat is None:
            if len(self._live) >= MAX_LIVE_CHATS:
                del self._live[next(iter(self._live))]
            chat = self._live[command_id] = LiveChat()
        return chat

    def status(self, command_id: str | None) -> dict | None:
        """get_command_status's answer for a running chat, from the module's latest answer and the lines since; None
        when only the module can answer (no answer of its yet, a line missing, silence, a chat with log
        probabilities, or one that is not running)."""
        self._drain()
        chat = self._live.get(command_id or "") if self.live else None
        return chat.status() if chat is not None else None

    def answered(self, command_id: str | None, command: str, answer: dict) -> None:
        """The module's answer to `command` for the chat `command_id`, as relayed to a client."""
        if not command_id:
            return
        if command == STATUS_COMMAND and answer.get("success") and answer.get("commandStatus") == "running":
            chat = self._live.get(command_id)  # made by its lines only: an answer that comes late makes none
            if chat is not None:
                chat.answered(answer)
        else:  # over, queued, unknown, or being cancelled: polls go to the module until its answer says running
            self._live.pop(command_id, None)

    @contextmanager
    def follow(self, command_id: str) -> Iterator[ReplyPieces]:
        """The lines of the chat `command_id` from now on, while the block runs."""
        self._drain()  # what the pipe holds already is from before: it goes to the running chats' status only
        pieces = ReplyPieces()
        if not self.live:
            pieces.close()
        self._followers.setdefault(command_id, set()).add(pieces)
        self._watch(True)
        try:
            yield pieces
        finally:
            followers = self._followers[command_id]
            followers.discard(pieces)
            if not followers:
                del self._followers[command_id]
            self._watch(bool(self._followers))

    def close(self) -> None:
        """After the module has stopped: closes the last pipe, if it is still open."""
        self._ended()
