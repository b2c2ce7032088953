"""How many connections the server holds, and for how long, so that no client can use up its file descriptors (each
connection holds one; at the process's limit the server could accept nothing, not even the module's polls).

- Time: a connection must send a whole request's headers within KEEPALIVE_SECONDS of opening or of its last answer,
  and is closed when idle that long; aiohttp's keep-alive timer does both, as it closes a connection that holds no
  whole request when it fires (its default is an hour). A body must then arrive within request_body.BODY_SECONDS.
- Number: at most a cap in all, derived from the descriptor limit, and half of that from any one address; a
  connection over a cap is answered 503 at once and closed, before any of its bytes are read.
"""

from __future__ import annotations

import asyncio
import json
import socket

from aiohttp import web

try:
    import resource
except ImportError:  # Windows: no descriptor limit to read
    resource = None  # type: ignore[assignment]

KEEPALIVE_SECONDS = 20.0  # over aiohttp's and httpx's client-side 15 s and 5 s, so a client never reuses a closing one
MAX_CONNECTIONS = 1000
RESERVED_DESCRIPTORS = 64  # listening sockets, the module's pipes, the event loop, log and spooled upload files


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
    """Counts the open connections, by peer address, and turns away those over a cap."""

    def __init__(self, hostname: str, total: int, per_peer: int) -> None:
        self.total, self.per_peer = total, per_peer
        self._hostname = hostname
        self._open: dict[asyncio.BaseTransport, str] = {}  # transport → peer address

    def refusal(self, transport: asyncio.BaseTransport) -> str | None:
        """Why this new connection is turned away, or None after counting it in."""
        self._open = {other: peer for other, peer in self._open.items() if not other.is_closing()}
        peer = (transport.get_extra_info("peername") or ("?",))[0]
        if len(self._open) >= self.total:
            return f"The server holds as many connections as it may ({self.total}); try again shortly"
        if sum(other == peer for other in self._open.values()) >= self.per_peer:
            return f"{peer} holds as many connections as one address may ({self.per_peer}): close some, or reuse them"
        self._open[transport] = peer
        return None

    def busy_answer(self, reason: str) -> bytes:
        body = json.dumps({"success": False, "code": 503, "hostname": self._hostname, "error": reason}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
        )
        return head.encode() + body


class _Admission(asyncio.Protocol):
    """A new connection's first protocol: over a cap, it answers 503 and closes; otherwise it hands the connection
    to aiohttp's request handler, which then receives every byte."""

    def __init__(self, gate: ConnectionGate, server: web.Server) -> None:
        self._gate, self._server = gate, server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        reason = self._gate.refusal(transport)
        if reason is not None:
            assert isinstance(transport, asyncio.WriteTransport)  # a TCP server's transports write
            transport.write(self._gate.busy_answer(reason))
            transport.close()
            return
        handler = self._server()
        transport.set_protocol(handler)
        handler.connection_made(transport)


class GatedSite(web.BaseSite):
    """Serves the runner's app on a bound socket, through the gate."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, gate: ConnectionGate) -> None:
        super().__init__(runner)
        self._sock, self._gate = sock, gate

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None, "the runner is set up before its sites start"
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Admission(self._gate, server), sock=self._sock
        )
