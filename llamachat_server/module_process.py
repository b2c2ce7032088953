"""The module's process: started like the real server starts it, its output sent to the server log, its
status tracked (Starting → Started → Crashed → Restarting → Started ... → Stopping → Stopped), restarted
when it dies, and stopped quickly.

Stopping: the SDK never answers `quit` (docs/protocol.md §1.8), so instead of waiting the real server's 30 s
we post quit, give the module a moment to leave on its own, then terminate it, then kill it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable

from .server_log import MAX_ENTRY_CHARS, ServerLog, split_level_prefix
from .settings import REPLY_CHANNEL_VARIABLE

# How much of an output line is buffered; the log keeps less (MAX_ENTRY_CHARS), and the rest of a longer line
# is read and dropped, so no line, however long, ends the supervisor.
OUTPUT_LINE_LIMIT = 64 * 1024


class ModuleStatus(str, Enum):
    """The real server's ProcessStatusType values this server uses."""

    NOT_STARTED = "NotStarted"
    STARTING = "Starting"
    RESTARTING = "Restarting"
    STARTED = "Started"
    FAILED_START = "FailedStart"
    CRASHED = "Crashed"
    STOPPING = "Stopping"
    STOPPED = "Stopped"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _die_with_parent() -> None:
    """Runs in the child before exec (Linux): if the server dies without stopping it, the module is told
    to end too rather than polling a dead port forever."""
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:  # another C library (e.g. musl): the module just outlives a killed server
        pass


def _isolation_options() -> dict:
    """Ctrl+C in the server's terminal must reach only the server, which then stops the module in order."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        options["preexec_fn"] = _die_with_parent
    return options


class ModuleProcess:
    """`on_exit(reason)` is called each time the module ends on its own, reason "module <name> stopped (exit
    code <n>)". `open_reply_channel()`, when given, opens a pipe for each launch and returns its write end's fd, which
    the module inherits (and this process closes), or None for none (reply_feed.ReplyFeed.open)."""

    def __init__(
        self,
        name: str,
        command: list[str],
        cwd: str,
        log: ServerLog,
        on_exit: Callable[[str], None],
        first_restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
        quit_grace: float = 2.0,
        terminate_grace: float = 2.0,
        open_reply_channel: Callable[[], int | None] | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.cwd = cwd
        self.env: dict[str, str] = {}
        self._log = log
        self._on_exit = on_exit
        self._first_restart_delay = first_restart_delay
        self._max_restart_delay = max_restart_delay
        self._quit_grace = quit_grace
        self._terminate_grace = terminate_grace
        self._open_reply_channel = open_reply_channel

        self.status = ModuleStatus.NOT_STARTED
        self.started: datetime | None = None
        self.last_seen: datetime | None = None
        self.status_data: dict | None = None
        self.request_count = 0
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task | None = None
        self._stop_requested = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    def start(self, env: dict[str, str]) -> None:
        """Launches the module with `env` as its whole environment, and keeps it running until stop()."""
        self.env = env
        self.status = ModuleStatus.STARTING
        self._supervisor = asyncio.create_task(self._supervise())

    def seen(self) -> None:
        """The module polled or answered: it is alive, and once it polls it has finished initialising."""
        self.last_seen = _utc_now()
        # NotStarted too: a module launched by hand (--no-module) is Started once it polls.
        if self.status in (ModuleStatus.NOT_STARTED, ModuleStatus.STARTING, ModuleStatus.RESTARTING):
            self.status = ModuleStatus.STARTED
            self._log.add(f"Module {self.name} started", category=self.name)

    def _set_status(self, status: ModuleStatus, message: str, level: str = "information") -> None:
        self.status = status
        self._log.add(message, level, category=self.name)

    async def _spawn(self) -> asyncio.subprocess.Process | None:
        channel_fd = self._open_reply_channel() if self._open_reply_channel else None
        # The variable names this launch's pipe or nothing: one inherited from the server's own environment would name
        # some other file.
        env = {name: value for name, value in self.env.items() if name != REPLY_CHANNEL_VARIABLE}
        if channel_fd is not None:
            env[REPLY_CHANNEL_VARIABLE] = str(channel_fd)
        try:
            return await asyncio.create_subprocess_exec(
                *self.command,
                cwd=self.cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=OUTPUT_LINE_LIMIT,
                pass_fds=() if channel_fd is None else (channel_fd,),
                **_isolation_options(),
            )
        except OSError as ex:
            self._set_status(
                ModuleStatus.FAILED_START, f"Cannot start module {self.name} ({' '.join(self.command)}): {ex}", "error"
            )
            return None
        finally:
            if channel_fd is not None:  # the module holds it now: the pipe ends when the module does
                os.close(channel_fd)

    async def _pipe_to_log(self, stream: asyncio.StreamReader, default_level: str) -> None:
        async for raw in output_lines(stream):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                level, text = split_level_prefix(line, default_level)
                self._log.add(text, level, category=self.name)

    async def _supervise(self) -> None:
        failures_in_a_row = 0
        while not self._stop_requested.is_set():
            self.started = _utc_now()
            process = await self._spawn()
            if process is not None:
                self._process = process
                self._log.add(
                    f"Module {self.name} launched (pid {process.pid}): {' '.join(self.command)}", category=self.name
                )
                assert process.stdout is not None and process.stderr is not None  # _spawn pipes both
                await asyncio.gather(
                    self._pipe_to_log(process.stdout, "information"), self._pipe_to_log(process.stderr, "error")
                )
                exit_code = await process.wait()
                if self._stop_requested.is_set():
                    break
                failures_in_a_row = 0 if self.status == ModuleStatus.STARTED else failures_in_a_row + 1
                self._on_exit(f"module {self.name} stopped (exit code {exit_code})")
            else:
                failures_in_a_row += 1
            delay = min(self._first_restart_delay * 2 ** max(failures_in_a_row - 1, 0), self._max_restart_delay)
            if process is not None:
                self._set_status(
                    ModuleStatus.CRASHED,
                    f"Module {self.name} crashed (exit code {process.returncode}); restarting in {delay:g} s",
                    "error",
                )
            try:
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            except asyncio.TimeoutError:
                self.restarts += 1
                self.status = ModuleStatus.RESTARTING

    @staticmethod
    async def _exited_within(process: asyncio.subprocess.Process, seconds: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, ask_to_quit: Callable[[], object]) -> None:
        """Stops the module: `ask_to_quit` posts the quit command, then terminate, then kill."""
        if self._supervisor is None:
            return
        self._stop_requested.set()
        self._set_status(ModuleStatus.STOPPING, f"Stopping module {self.name}")
        process = self._process
        if process is not None and process.returncode is None:
            ask_to_quit()
            if not await self._exited_within(process, self._quit_grace):
                process.terminate()
                if not await self._exited_within(process, self._terminate_grace):
                    process.kill()
                    await process.wait()
        # The supervisor ends once the module's last output is logged; a grandchild holding the pipes
        # open must not hold up the stop.
        done, _ = await asyncio.wait({self._supervisor}, timeout=self._terminate_grace)
        if not done:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._process is not None and self._process.returncode is None:  # launched as the stop began
            self._process.kill()
            await self._process.wait()
        self._set_status(ModuleStatus.STOPPED, f"Module {self.name} stopped")


async def output_lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines; a line longer than the stream's buffer limit comes as its first part plus a marker
    (StreamReader's own line iterator raises instead, which would end the reader)."""
    while True:
        try:
            yield await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as ex:  # end of stream
            if ex.partial:
                yield ex.partial
            return
        except asyncio.LimitOverrunError as ex:
            head = await stream.readexactly(ex.consumed)
            cut = await _skip_line(stream)
            kept = MAX_ENTRY_CHARS - 100  # room for the marker, so the log does not cut the line again
            yield head[:kept] + f" [... {len(head) - kept + cut} more bytes cut]".encode()


async def _skip_line(stream: asyncio.StreamReader) -> int:
    """Reads and drops the rest of the current line; returns how many bytes that was."""
    skipped = 0
    while True:
        try:
            return skipped + len(await stream.readuntil(b"\n"))
        except asyncio.IncompleteReadError as ex:
            return skipped + len(ex.partial)
        except asyncio.LimitOverrunError as ex:
            skipped += len(await stream.readexactly(ex.consumed))


def interpreter_command(python: str, start_file: os.PathLike) -> list[str]:
    """How the real server runs a Python module: `<python> <module dir>/<FilePath>`."""
    return [python, os.fspath(start_file)]
