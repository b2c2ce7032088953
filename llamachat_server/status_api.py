"""The server endpoints the Explorer and dashboard read (docs/protocol.md §2.3): version/ping, module status,
running modules with their Explorer UI, and the log."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from aiohttp import web

from . import COMPATIBLE_SERVER_VERSION
from .explorer import read_explorer_ui
from .module_process import ModuleStatus
from .responses import server_response
from .server_state import STATE, ServerState


def camel_case(name: str) -> str:
    """.NET's JsonNamingPolicy.CamelCase: 'RouteMaps' → 'routeMaps', 'UIElements' → 'uiElements'."""
    chars = list(name)
    for i, char in enumerate(chars):
        if i == 1 and not char.isupper():
            break
        if i > 0 and i + 1 < len(chars) and not chars[i + 1].isupper():
            break
        chars[i] = char.lower()
    return "".join(chars)


def camel_case_keys(value: Any) -> Any:
    """A settings object as the real server serialises it; EnvironmentVariables keep their names."""
    if isinstance(value, dict):
        return {
            camel_case(key): item if key.lower() == "environmentvariables" else camel_case_keys(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [camel_case_keys(item) for item in value]
    return value


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def version_info() -> dict:
    major, minor, patch = (int(part) for part in COMPATIBLE_SERVER_VERSION.split("."))
    return {
        "major": major,
        "minor": minor,
        "patch": patch,
        "preRelease": None,
        "securityUpdate": False,
        "build": 0,
        "file": None,
        "releaseNotes": "LlamaChat standalone server, speaking the CodeProject.AI Server protocol",
    }


def process_status(state: ServerState) -> dict:
    """The module's ProcessStatus, as `GET /v1/module/list/status` lists it."""
    module, settings = state.module, state.settings
    summary = (
        f"Status Data:  {json.dumps(module.status_data)}\nStarted:      {_iso(module.started) or 'Not seen'}\n"
        f"LastSeen:     {_iso(module.last_seen) or 'Not seen'}\nStatus:       {module.status.value}\n"
        f"Requests:     {module.request_count} (includes status calls)\n"
    )
    return {
        "moduleId": settings.module_id,
        "queue": settings.queue,
        "name": settings.name,
        "version": settings.version,
        "started": _iso(module.started),
        "lastSeen": _iso(module.last_seen),
        "status": module.status.value,
        "statusData": module.status_data,
        "downloadableModels": None,
        "requestCount": module.request_count,
        # Not in the real ProcessStatus: which process runs the module, how often it was restarted, and how many
        # requests wait in its queue.
        "pid": module.pid,
        "restarts": module.restarts,
        "queued": state.queues.pending(settings.queue)[0],
        "menus": None,
        "installSummary": "",
        "startupSummary": " ".join(module.command),
        "summary": summary,
    }


def running_module_config(state: ServerState) -> dict:
    """The module's settings with its Explorer UI, as `GET /v1/module/list/running` lists it."""
    settings = state.settings
    config = camel_case_keys(settings.config)
    config.update({"moduleId": settings.module_id, "version": settings.version})
    config["launchSettings"] = {**config.get("launchSettings", {}), "queue": settings.queue}
    config["uiElements"] = {**config.get("uiElements", {}), "explorerUI": read_explorer_ui(settings.module_dir)}
    return config


async def get_version(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(server_response(state.hostname, message=COMPATIBLE_SERVER_VERSION, version=version_info()))


async def list_module_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(server_response(state.hostname, statuses=[process_status(state)]))


async def list_running_modules(request: web.Request) -> web.Response:
    state = request.app[STATE]
    running = state.module.status == ModuleStatus.STARTED
    return web.json_response(server_response(state.hostname, modules=[running_module_config(state)] if running else []))


def _int_query(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        return default


async def list_log(request: web.Request) -> web.Response:
    """GET /v1/log/list?last_id=&count=: entries newer than last_id (default 0), at most count (default 10)."""
    state = request.app[STATE]
    entries = state.log.list(_int_query(request, "last_id", 0), _int_query(request, "count", 10))
    return web.json_response({"success": True, "entries": entries})


def add_status_routes(app: web.Application) -> None:
    for prefix in ("/v1/server/status", "/v1/status"):  # the second is the pre-2.4 name, still served
        app.router.add_get(f"{prefix}/ping", get_version)
        app.router.add_get(f"{prefix}/version", get_version)
    app.router.add_get("/v1/module/list/status", list_module_status)
    app.router.add_get("/v1/module/list/running", list_running_modules)
    app.router.add_get("/v1/log/list", list_log)
