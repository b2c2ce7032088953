"""Builds the server from its parts and runs it: bind, launch the module, serve, stop everything."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from typing import Callable

from aiohttp import web

from .api_keys import ApiKeys
from .client_api import handle_module_route
from .commands import CommandTracker
from .connections import KEEPALIVE_SECONDS, ConnectionGate, GatedSite, connection_caps, descriptor_limit
from .cors import OriginPolicy
from .errors import json_errors
from .explorer import add_explorer_routes
from .host_check import HostCheck, is_loopback_host
from .module_access import MODULE_ACCESS, ModuleAccess
from .module_api import add_module_routes
from .module_process import ModuleProcess, interpreter_command
from .openai_api import add_openai_routes
from .queues import RequestQueues
from .reply_feed import ReplyFeed
from .request_body import MAX_FILE_BODY_BYTES
from .routes import RouteMap
from .server_log import ServerLog
from .server_state import STATE, ServerConfig, ServerState
from .settings import load_module_settings, module_environment
from .status_api import add_status_routes

_WILDCARDS = ("", "0.0.0.0", "::")


def create_app(config: ServerConfig) -> web.Application:
    """The aiohttp application with every endpoint; raises SettingsError for an unusable module folder."""
    settings = load_module_settings(config.module_dir)
    log = ServerLog(echo_level=config.log_level)
    routes = RouteMap()
    routes.register_module(settings)
    queues = RequestQueues(config.response_timeout)
    queues.ensure_queue(settings.queue)
    commands = CommandTracker()

    def module_exited(reason: str) -> None:
        queues.fail_taken(settings.queue, f"The {reason} before answering")
        commands.module_stopped(reason)

    reply_feed = ReplyFeed(log) if config.reply_channel else None
    module = ModuleProcess(
        settings.name,
        interpreter_command(config.python, settings.start_file),
        str(settings.module_dir),
        log,
        on_exit=module_exited,
        open_reply_channel=reply_feed.open if reply_feed else None,
    )

    state = ServerState(config, settings, routes, queues, log, module, commands, reply_feed)
    origins = OriginPolicy(config.allowed_origins, state.hostname)
    # The origin policy's add_headers gives every answer an allowed page may read its CORS headers as it goes out
    # (errors from json_errors and streamed answers included).
    app = web.Application(
        client_max_size=MAX_FILE_BODY_BYTES,  # routes that take no file lower it (request_body.py)
        middlewares=[
            HostCheck(config.host, state.hostname, config.allowed_hosts).middleware(),
            origins.middleware(),
            ApiKeys(config.api_keys, state.hostname).middleware(),
            json_errors,
        ],
    )
    app.on_response_prepare.append(origins.add_headers)
    app[STATE] = state
    app[MODULE_ACCESS] = ModuleAccess(module, config.launch_module, log, state.hostname)
    add_status_routes(app)
    add_module_routes(app)
    add_explorer_routes(app)
    add_openai_routes(app)
    # Last, so the server's own endpoints above win, as the real server's controllers do.
    app.router.add_route("*", "/v1/{tail:.*}", handle_module_route)
    return app


def quit_payload(module_id: str) -> dict:
    """The command the real server sends a module to stop it (docs/protocol.md §1.8)."""
    return {"command": "quit", "values": [{"key": "moduleId", "value": [module_id]}], "files": [], "urlSegments": []}


class ListenError(Exception):
    """The server cannot listen where it was asked to; the message says where and why."""


# The module's SDK always calls http://localhost:<port>, and so do the README and the page; localhost resolves to
# 127.0.0.1 or ::1 (often ::1 first), so the server holds both on its port: a loopback address left free would let
# another local user's listener there receive the module's and the browsers' requests.
LOOPBACKS = ("127.0.0.1", "::1")
PORT_ATTEMPTS = 10  # port 0: free ports to try until both loopback addresses are free on one of them
_IPV6_MISSING = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)  # no ::1 here: nobody else can listen there either


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listen(host: str, port: int) -> socket.socket:
    if host in ("::", "[::]"):
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=socket.has_dualstack_ipv6())
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


def _covers(sock: socket.socket, loopback: str) -> bool:
    """Whether a listening socket already receives connections to `loopback` (as a wildcard of its family does)."""
    address = sock.getsockname()[0]
    if sock.family == socket.AF_INET:
        return loopback == "127.0.0.1" and address in ("127.0.0.1", "0.0.0.0")
    if address == "::":  # dual-stack also receives IPv4
        return loopback == "::1" or not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    return address == loopback


class _Taken(Exception):
    """A loopback address another program holds on the chosen port."""

    def __init__(self, loopback: str, port: int, cause: OSError) -> None:
        super().__init__(loopback, port)
        self.loopback, self.port, self.cause = loopback, port, cause


def _bind_once(host: str, port: int) -> list[socket.socket]:
    first = LOOPBACKS[0] if host == "localhost" else host
    sockets = [_listen(first, port)]
    port = sockets[0].getsockname()[1]
    try:
        for loopback in LOOPBACKS:
            if any(_covers(sock, loopback) for sock in sockets):
                continue
            try:
                sockets.append(_listen(loopback, port))
            except OSError as ex:
                if ex.errno in _IPV6_MISSING:
                    continue
                raise _Taken(loopback, port, ex) from ex
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port (port 0: a free one), plus 127.0.0.1 and ::1 on the same port where `host`
    does not cover them. Refuses to start when either loopback address is taken on that port."""
    for _ in range(PORT_ATTEMPTS if port == 0 else 1):
        try:
            return _bind_once(host, port)
        except _Taken as taken:
            if port == 0:
                continue  # the free port picked for `host` is another program's on a loopback address: pick again
            where = _shown(taken.loopback, taken.port)
            raise ListenError(
                f"cannot listen on {where}: {os.strerror(taken.cause.errno or 0)}; another program (maybe another "
                f"user's) holds that loopback address on port {port}, and the module and browsers calling "
                f"http://localhost:{port} could reach it instead of this server: stop it, or choose another --port"
            ) from None
        except OSError as ex:
            reason = os.strerror(ex.errno) if ex.errno else str(ex)
            raise ListenError(f"cannot listen on {_shown(host, port)}: {reason}") from ex
    raise ListenError(f"cannot listen on {host}: no port was free on both 127.0.0.1 and ::1 in {PORT_ATTEMPTS} tries")


def no_authentication_warning(host: str, has_keys: bool) -> str | None:
    """The warning for a server that other machines may reach without a key, or None."""
    if is_loopback_host(host) or has_keys:
        return None
    return (
        f"Listening on {host or 'every interface'}: the API has no authentication, so anyone who can reach this "
        f"address can chat with the model and read the server's log; set --api-key, or use it only on a network you "
        f"trust"
    )


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in _WILDCARDS else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


async def serve(config: ServerConfig, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
    """Runs the server until `stop` is set; `on_ready(url)` is called once it listens and the module
    has been launched. Stopping ends the module first (so its last words are still logged), then HTTP."""
    app = create_app(config)
    state = app[STATE]
    exposed = no_authentication_warning(config.host, bool(config.api_keys))
    if exposed:
        print(f"WARNING: {exposed}", file=sys.stderr, flush=True)
        state.log.add(exposed, "warning")
    access_notice = app[MODULE_ACCESS].startup_notice()
    if access_notice:
        state.log.add(*access_notice)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0, keepalive_timeout=KEEPALIVE_SECONDS)
    await runner.setup()
    try:
        sockets = bind_sockets(config.host, config.port)
        gate = ConnectionGate(state.hostname, *connection_caps(descriptor_limit()))
        state.log.add(
            f"At most {gate.total} connections at once, {gate.per_peer} from one address; a connection is closed "
            f"after {KEEPALIVE_SECONDS:g} s without a request",
            "debug",
        )
        for sock in sockets:
            await GatedSite(runner, sock, gate, state.log.add).start()
        port = sockets[0].getsockname()[1]
        if config.launch_module:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            state.module.start(
                module_environment(
                    state.settings,
                    port=port,
                    python=config.python,
                    data_dir=config.data_dir,
                    base_env=os.environ,
                    overrides=config.env_overrides,
                )
            )
        on_ready(base_url(config.host, port))
        await stop.wait()
    finally:
        await state.module.stop(lambda: state.queues.post(state.settings.queue, quit_payload(state.settings.module_id)))
        if state.reply_feed is not None:
            state.reply_feed.close()
        state.queues.fail_all("The server is shutting down")  # clients still waiting hear why, at once
        await runner.cleanup()
        app[MODULE_ACCESS].close()
