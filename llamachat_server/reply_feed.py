"""ReplyFeed: the server's end of the reply channel (docs/protocol.md §1.10). Each time the server launches the module
it opens a pipe whose write end only that process inherits (its number in LLAMACHAT_REPLY_CHANNEL_FD), reads the
module's lines on the event loop, and hands each chat's to whoever subscribed to its commandId: the OpenAI stream,
which then sends every piece of the reply as it is made. Nobody subscribed: the line is dropped.

The lines are hints, never the record: a chat's reply and result stay what get_command_status answers. A follower
merges pieces by their offsets and asks get_command_status whenever a piece is missing, the chat has ended, or the
channel has gone quiet or closed. On Windows no pipe is passed (the fd cannot be handed over as simply): followers poll.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .module_process import output_lines
from .server_log import ServerLog

# A line is at most PIPE_BUF bytes (the module drops longer ones); more than this is not a line of the module's.
LINE_LIMIT = 64 * 1024


def _well_formed(line: object) -> bool:
    """A piece {"id", "at", "text"} or an end {"id", "end": true}, as llamachat/reply_channel.py writes them."""
    if not isinstance(line, dict) or not isinstance(line.get("id"), str):
        return False
    if line.get("end") is True:
        return True
    at = line.get("at")
    return isinstance(at, int) and not isinstance(at, bool) and at >= 0 and isinstance(line.get("text"), str)


class ReplyPieces:
    """One follower's lines for its chat, in order, since it subscribed; `closed` once the channel has gone."""

    def __init__(self) -> None:
        self._lines: list[dict] = []
        self._arrived = asyncio.Event()
        self.closed = False

    def put(self, line: dict) -> None:
        self._lines.append(line)
        self._arrived.set()

    def close(self) -> None:
        self.closed = True
        self._arrived.set()

    async def take(self, timeout: float) -> list[dict]:
        """The lines that have come since the last take, waiting up to `timeout` s for one; [] on silence or close."""
        if not self._lines and not self.closed:
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        lines, self._lines = self._lines, []
        self._arrived.clear()
        return lines


class ReplyFeed:
    def __init__(self, log: ServerLog) -> None:
        self._log = log
        self._followers: dict[str, set[ReplyPieces]] = {}
        self._reader: asyncio.Task | None = None
        self.live = False  # a module process holds the write end of a pipe being read now

    def open(self) -> int | None:
        """A new pipe for the module about to be launched: the write end's fd, to pass to it and close here once it
        is launched; None on Windows."""
        if sys.platform == "win32":
            return None
        read_fd, write_fd = os.pipe()
        self._reader = asyncio.create_task(self._read(read_fd))
        self.live = True
        return write_fd

    async def _read(self, read_fd: int) -> None:
        """Reads the module's lines until it ends (its write end closes with it), then wakes every follower."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        try:
            async for raw in output_lines(reader):
                self._deliver(raw)
        finally:
            transport.close()
            if self._reader is asyncio.current_task():  # not when a newer module's pipe is read already
                self.live = False
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
        for pieces in self._followers.get(line["id"], ()):
            pieces.put(line)

    @contextmanager
    def follow(self, command_id: str) -> Iterator[ReplyPieces]:
        """The lines of the chat `command_id` from now on, while the block runs."""
        pieces = ReplyPieces()
        if not self.live:
            pieces.close()
        self._followers.setdefault(command_id, set()).add(pieces)
        try:
            yield pieces
        finally:
            followers = self._followers[command_id]
            followers.discard(pieces)
            if not followers:
                del self._followers[command_id]

    async def close(self) -> None:
        """After the module has stopped: ends the last reader, if its pipe is still open."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
