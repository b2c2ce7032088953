"""Who may use the module endpoints (queue polls, answers, module status, log): only the module process this
server launched, so no other local process can take users' requests, forge answers or fake the module's status.

Judged once per connection (the SDK keeps its connections open, so a poll costs nothing) by resolving the peer to
its process (peer.py). That reads /proc, which takes longer the more connections and processes there are, so it
runs off the event loop, one lookup at a time (a flood of connections queues up there instead of freezing every
other client), and the cheap refusals come first: a remote address needs no lookup, and a socket of another user is
refused without scanning any process.

With --no-module there is no launched process: the module you start yourself is accepted when it runs as the same
OS user as the server, and other users' processes are refused. Where peers cannot be
resolved (no /proc: macOS, Windows) every process on this machine is accepted, and the server says so at startup.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import web

from .api_keys import keyless
from .module_process import ModuleProcess
from .peer import can_resolve_peers, find_peer_socket, normal_ip, owner_among, process_tree
from .responses import error_response
from .server_log import ServerLog

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Refusals are logged once per peer (a user id, or a remote address); past this many peers, no more are logged.
MAX_LOGGED_PEERS = 1024


class ModuleAccess:
    def __init__(self, module: ModuleProcess, launched: bool, log: ServerLog, hostname: str) -> None:
        self._module = module
        self._launched = launched
        self._log = log
        self._hostname = hostname
        self._resolvable = can_resolve_peers()
        self._verdicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transport → refusal or None
        self._warned: set[str] = set()
        # One lookup at a time: a flood of new connections waits here, off the event loop, and cannot use every core.
        self._lookups = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-lookup")

    def startup_notice(self) -> tuple[str, str] | None:
        """(message, level) for the server log when module endpoints are open wider than the launched module."""
        if not self._resolvable:
            return (
                "This platform cannot tell which process is on the other end of a connection: the module "
                "endpoints (/v1/queue, /v1/log) accept any process on this machine",
                "warning",
            )
        if not self._launched:
            return (
                f"--no-module: the module endpoints (/v1/queue, /v1/log) accept any process of this server's "
                f"user (uid {os.geteuid()}) on this machine",
                "information",
            )
        return None

    async def refusal(self, request: web.Request) -> str | None:
        """Why this request may not use a module endpoint, or None when it comes from the module."""
        transport = request.transport
        if transport is None:  # the client has gone already
            return "the connection is closed"
        if transport not in self._verdicts:
            peer, ours = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            verdict, who = await self._judge(peer, ours)
            self._verdicts[transport] = verdict
            if verdict is not None and who not in self._warned and len(self._warned) < MAX_LOGGED_PEERS:
                self._warned.add(who)
                self._log.add(
                    f"Refused {request.method} {request.path} from {who}: {verdict} (further refusals "
                    f"from {who} are not logged)",
                    "warning",
                )
        return self._verdicts[transport]

    async def _off_loop(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._lookups, function, *args)

    async def _judge(self, peer: tuple, ours: tuple) -> tuple[str | None, str]:
        """(refusal or None, who the peer is, for the log)."""
        if not normal_ip(peer[0]).is_loopback:
            return f"the module endpoints serve only the module on this machine, not {peer[0]}", peer[0]
        if not self._resolvable:
            return None, "a local process"
        peer_socket = await self._off_loop(find_peer_socket, peer, ours)
        if peer_socket is None:
            return "cannot tell which process this connection comes from", f"port {peer[1]}"
        who = f"a process of uid {peer_socket.uid}"
        if not self._launched:
            if peer_socket.uid == os.geteuid():
                return None, who
            return (
                f"with --no-module the module endpoints accept processes of uid {os.geteuid()} only, "
                f"this connection comes from uid {peer_socket.uid}"
            ), who
        pid = self._module.pid
        # The launched module runs as this server's user: another user's socket is refused before any process scan.
        if (
            pid is not None
            and peer_socket.uid == os.geteuid()
            and await self._off_loop(_tree_owns, pid, peer_socket.inode)
        ):
            return None, f"module {self._module.name}"
        running = f"{self._module.name}, pid {pid}" if pid is not None else f"{self._module.name}, not running now"
        return (
            f"only the module this server launched ({running}) may use /v1/queue and /v1/log, and this "
            f"connection comes from another process; to serve a module you start yourself, run the server "
            f"with --no-module"
        ), who

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def guard(self, handler: Handler) -> Handler:
        """`handler`, answering 403 to any caller that is not the module."""

        @keyless  # the SDK sends no API key: the process check stands in for it
        async def module_only(request: web.Request) -> web.StreamResponse:
            reason = await self.refusal(request)
            if reason is not None:
                return error_response(self._hostname, f"Forbidden: {reason}", code=403, http_status=403)
            return await handler(request)

        return module_only


def _tree_owns(pid: int, inode: int) -> bool:
    """Whether process `pid` or a descendant holds socket `inode`; the process itself is looked at first, as
    scanning for descendants reads every process's stat."""
    return owner_among(inode, [pid]) is not None or owner_among(inode, process_tree(pid)[1:]) is not None


MODULE_ACCESS = web.AppKey("module_access", ModuleAccess)
