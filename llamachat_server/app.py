"""Builds the server from its parts and runs it: bind, launch the module, serve, stop everything."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Callable

from aiohttp import web

from .client_api import handle_module_route
from .commands import CommandTracker
from .cors import OriginPolicy
from .errors import json_errors
from .explorer import add_explorer_routes
from .host_check import HostCheck, is_loopback_host
from .module_access import MODULE_ACCESS, ModuleAccess
from .module_api import add_module_routes
from .module_process import ModuleProcess, interpreter_command
from .openai_api import add_openai_routes
from .queues import RequestQueues
from .routes import RouteMap
from .server_log import ServerLog
from .server_state import STATE, ServerConfig, ServerState
from .settings import load_module_settings, module_environment
from .status_api import add_status_routes

# Requests carry images for other modules; the real server (Kestrel) accepts ~30 MB bodies.
MAX_REQUEST_BYTES = 50 * 1024 * 1024
_LOOPBACK_NAMES = ("127.0.0.1", "localhost")
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

    module = ModuleProcess(
        settings.name,
        interpreter_command(config.python, settings.start_file),
        str(settings.module_dir),
        log,
        on_exit=module_exited,
    )

    state = ServerState(config, settings, routes, queues, log, module, commands)
    origins = OriginPolicy(config.allowed_origins, state.hostname)
    # The origin policy's add_headers gives every answer an allowed page may read its CORS headers as it goes out
    # (errors from json_errors and streamed answers included).
    app = web.Application(
        client_max_size=MAX_REQUEST_BYTES,
        middlewares=[
            HostCheck(config.host, state.hostname).middleware(),
            origins.middleware(),
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


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for host:port (port 0: a free one). The SDK always calls http://localhost:<port>,
    so a server bound to another single address also listens on 127.0.0.1."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sockets = [socket.create_server((host, port), family=family)]
        if host not in _LOOPBACK_NAMES + _WILDCARDS:
            sockets.append(socket.create_server(("127.0.0.1", sockets[0].getsockname()[1])))
    except OSError as ex:
        raise ListenError(f"cannot listen on {host}:{port}: {ex.strerror or ex}") from ex
    return sockets


def no_authentication_warning(host: str) -> str | None:
    """The warning for a server that other machines may reach, or None for a loopback one."""
    if is_loopback_host(host):
        return None
    return (
        f"Listening on {host or 'every interface'}: the API has no authentication, so anyone who can reach this "
        f"address can chat with the model and read the server's log; use it only on a network you trust"
    )


def base_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in _WILDCARDS else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


async def serve(config: ServerConfig, stop: asyncio.Event, on_ready: Callable[[str], None]) -> None:
    """Runs the server until `stop` is set; `on_ready(url)` is called once it listens and the module
    has been launched. Stopping ends the module first (so its last words are still logged), then HTTP."""
    app = create_app(config)
    state = app[STATE]
    exposed = no_authentication_warning(config.host)
    if exposed:
        print(f"WARNING: {exposed}", file=sys.stderr, flush=True)
        state.log.add(exposed, "warning")
    access_notice = app[MODULE_ACCESS].startup_notice()
    if access_notice:
        state.log.add(*access_notice)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    try:
        sockets = bind_sockets(config.host, config.port)
        for sock in sockets:
            await web.SockSite(runner, sock).start()
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
        state.queues.fail_all("The server is shutting down")  # clients still waiting hear why, at once
        await runner.cleanup()
