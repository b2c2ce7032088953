"""ReplyChannel: the module's end of the reply channel, a pipe our standalone server opens when it launches the module
(docs/protocol.md §1.10). The module writes a line for each piece of a reply as it is appended, with the chat's
metrics then, and one as a chat ends, so that the server's OpenAI stream sends every token as it comes instead of
asking for the status five times a second, and the server answers a client's status polls of a running chat without
a round trip through this process. Under the real CodeProject.AI Server the variable is not set: there is no
channel, and the module is polled.

A write never waits: a line that does not fit in the pipe now (the server is behind) is dropped, and the server,
finding a gap in the reply's offsets, or silence, asks get_command_status once to catch up. Lines are at most
PIPE_BUF bytes, so each is written whole or not at all, whichever thread writes it.
"""

from __future__ import annotations

import json
import os
import select
import stat
import time
from collections.abc import Mapping

from llamachat_server.settings import REPLY_CHANNEL_VARIABLE

# A write to a pipe of at most this many bytes is atomic: lines of concurrent writers never interleave.
ATOMIC_BYTES = getattr(select, "PIPE_BUF", 512)


class ReplyChannelError(ValueError):
    """The variable names no pipe this process can write to."""


class ReplyChannel:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._broken = False  # the server has closed its end: nothing more is written
        self.dropped = 0  # lines not written because the pipe was full (or a line too long)

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> ReplyChannel | None:
        """The channel the server passed, or None where it passed none (the real server, Windows); ReplyChannelError
        for a variable that names no pipe."""
        value = env.get(REPLY_CHANNEL_VARIABLE)
        if not value or not hasattr(select, "PIPE_BUF"):  # Windows: the server passes none there
            return None
        try:
            fd = int(value)
            is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        except (ValueError, OSError) as ex:
            raise ReplyChannelError(f"{REPLY_CHANNEL_VARIABLE}={value}: {ex}") from None
        if not is_pipe:
            raise ReplyChannelError(f"{REPLY_CHANNEL_VARIABLE}={value} is not a pipe")
        os.set_blocking(fd, False)  # decoding never waits for the server
        os.set_inheritable(fd, False)  # only this process writes to the server's channel
        return cls(fd)

    def text(self, command_id: str, offset: int, text: str, metrics: dict[str, object] | None = None) -> None:
        """`text` has just been appended to the chat's reply at character `offset`; `metrics`, the chat's live
        metrics now (ChatJob.metrics), when a status poll's answer holds nothing else that changes."""
        # "t": when, on the machine's monotonic clock (the server's too), so the server can tell stale lines it reads
        # late from fresh ones.
        record: dict[str, object] = {"id": command_id, "at": offset, "text": text, "t": time.monotonic()}
        if metrics is not None:
            record["metrics"] = metrics
        self._write(record)

    def ended(self, command_id: str) -> None:
        """The chat is over: its result is what get_command_status answers from now on."""
        self._write({"id": command_id, "end": True})

    def _write(self, record: dict) -> None:
        if self._broken:
            return
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if len(line) > ATOMIC_BYTES:  # a long piece could be written in part: the server fills the gap by a poll
            self.dropped += 1
            return
        try:
            os.write(self._fd, line)
        except BlockingIOError:  # the pipe is full: the server is behind, and catches up by a poll
            self.dropped += 1
        except OSError:  # BrokenPipeError: the server has gone; the fd stays open, so its number is never reused
            self._broken = True
