"""How many connections the server holds, and for how long, so that no client can use up its file descriptors (each
connection holds one; at the process's limit the server could accept nothing, not even the module's polls).

- Time: a connection must send a whole request's headers within KEEPALIVE_SECONDS of opening or of its last answer,
  and is closed when idle that long; aiohttp's keep-alive timer does both, as it closes a connection that holds no
  whole request when it fires (its default is an hour). A body must then arrive within request_body.BODY_SECONDS.
- Number: at most a cap in all, derived from the descriptor limit, and half of that from any one address; a
  connection over a cap is answered 503 and closed before the next one is accepted, before any of its bytes are
  handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
from typing import Callable

from aiohttp import web

try:
    import resource
except ImportError:  # Windows: no descriptor limit to read
    resource = None  # type: ignore[assignment]

KEEPALIVE_SECONDS = 20.0  # over aiohttp's and httpx's client-side 15 s and 5 s, so a client never reuses a closing one
MAX_CONNECTIONS = 1000
RESERVED_DESCRIPTORS = 64  # listening sockets, the module's pipes, the event loop, log and spooled upload files
ACCEPT_RETRY_SECONDS = 0.1
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def connection_caps(descriptor_limit: int | None) -> tuple[int, int]:
    """(total, per address) for a process allowed `descriptor_limit` open files (None: no limit): half the
    descriptors left after the reserve, so that requests still have room for the files they open."""
    total = MAX_CONNECTIONS
    if descriptor_limit is not None:
        total = max(8, min(total, (descriptor_limit - RESERVED_DESCRIPTORS) // 2))
    return total, max(4, total // 2)


def descriptor_limit() -> int | None:
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


class ConnectionGate:
    """Counts the open connections, by peer address, and turns away those over a cap. It counts sockets until they
    are closed (a closed socket's fileno() is -1), so it counts exactly the descriptors that connections hold."""

    def __init__(self, hostname: str, total: int, per_peer: int) -> None:
        self.total, self.per_peer = total, per_peer
        self._hostname = hostname
        self._open: dict[socket.socket, str] = {}  # connection → peer address

    def refusal(self, conn: socket.socket, peer: str) -> str | None:
        """Why this new connection is turned away, or None after counting it in."""
        self._open = {other: address for other, address in self._open.items() if other.fileno() != -1}
        if len(self._open) >= self.total:
            return f"The server holds as many connections as it may ({self.total}); try again shortly"
        if sum(address == peer for address in self._open.values()) >= self.per_peer:
            return f"{peer} holds as many connections as one address may ({self.per_peer}): close some, or reuse them"
        self._open[conn] = peer
        return None

    def busy_answer(self, reason: str) -> bytes:
        body = json.dumps({"success": False, "code": 503, "hostname": self._hostname, "error": reason}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        )
        return head.encode() + body


def _turn_away(conn: socket.socket, answer: bytes) -> None:
    """Answers and closes at once, so the descriptor is free before the next connection is accepted."""
    try:
        conn.setblocking(False)
        conn.send(answer)
        conn.recv(65536)  # what the client sent: closed unread, it makes the close a reset, which can drop the answer
    except OSError:
        pass  # nothing sent yet (would block) or the client left: either way it is closed now
    finally:
        conn.close()


class GatedSite(web.BaseSite):
    """Serves the runner's app on a bound socket, through the gate. It accepts one connection at a time and answers
    the ones over a cap before the next: loop.create_server accepts up to its backlog (100) per wake-up and answers
    them later, so a flood held hundreds of descriptors at once, over the limit, before the first refusal closed."""

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, gate: ConnectionGate, log: Callable[[str, str], object]
    ) -> None:
        super().__init__(runner)
        self._sock, self._gate, self._log = sock, gate, log
        self._accepting: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "the runner is set up before its sites start"
        self._sock.setblocking(False)
        self._sock.listen(self._backlog)
        self._accepting = asyncio.create_task(self._accept(server))

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        self._sock.close()
        await super().stop()

    async def _accept(self, server: web.Server) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as error:
                if error.errno not in OUT_OF_RESOURCES:
                    raise
                # Other files (uploads, logs) took the reserve: the connection waits in the backlog meanwhile.
                self._log(f"Cannot accept a connection now ({os.strerror(error.errno)}); retrying shortly", "warning")
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            reason = self._gate.refusal(conn, address[0])
            if reason is not None:
                _turn_away(conn, self._gate.busy_answer(reason))
                continue
            try:
                await loop.connect_accepted_socket(server, sock=conn)
            except OSError:
                conn.close()  # the client left before its connection was set up
