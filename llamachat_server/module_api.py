"""The module side (docs/protocol.md §1.2, §1.4–1.6): the module long-polls
its queue, posts answers, reports its status and sends log entries."""

from __future__ import annotations

import json

from aiohttp import web

from .module_access import MODULE_ACCESS
from .request_body import within_body_deadline
from .server_state import STATE

# A poll returns empty (204) after this long, well inside the SDK's 15 s client timeout, so a request is
# never handed to a poll the module has already given up on.
QUEUE_POLL_SECONDS = 10.0


async def get_queue(request: web.Request) -> web.Response:
    """GET /v1/queue/<queue>?moduleId=<id>: the next request for the module, or 204 when none came."""
    state = request.app[STATE]
    name = request.match_info["name"]
    if state.is_our_module(request.query.get("moduleId")):
        state.module.seen()
    if not state.queues.has_queue(name):
        # An empty 200/204 would make the SDK poll again at once, in a tight loop (docs/protocol.md §1.2); an error
        # status makes it back off (1 s, doubling, up to 60 s).
        state.log.add(
            f"A module polled the unknown queue '{name}' (this server serves "
            f"'{state.settings.queue}'): check CPAI_MODULE_QUEUENAME",
            "warning",
        )
        return web.json_response(
            {"success": False, "error": f"No queue named '{name}'; this server serves '{state.settings.queue}'"},
            status=404,
        )
    queued = await state.queues.take(name, QUEUE_POLL_SECONDS)
    return web.Response(status=204) if queued is None else web.json_response(queued)


async def post_response(request: web.Request) -> web.Response:
    """POST /v1/queue/<reqid>?moduleId=<id>: the module's answer, passed to the client verbatim."""
    state = request.app[STATE]
    text = await within_body_deadline(request.text())
    try:
        answer = json.loads(text)
    except (ValueError, RecursionError):  # not JSON: handed on as it is
        answer = None
    module_id = request.query.get("moduleId") or (answer.get("moduleId") if isinstance(answer, dict) else None)
    if state.is_our_module(module_id):
        state.module.seen()
        if not (isinstance(answer, dict) and answer.get("command") == "status"):
            state.module.request_count += 1
    if state.queues.answer(request.match_info["reqid"], text):
        return web.Response(text="Response saved.")
    return web.Response(status=400, text="failure to set response.")


async def update_module_status(request: web.Request) -> web.Response:
    """POST /v1/queue/updatemodulestatus/<id>, form statusData=<JSON object>: shown on the dashboard."""
    state = request.app[STATE]
    if not state.is_our_module(request.match_info["module_id"]):
        return web.Response(status=404, text=f"No module '{request.match_info['module_id']}'")
    form = await within_body_deadline(request.post())
    try:
        status_data = json.loads(str(form.get("statusData") or "null"))
    except (ValueError, RecursionError):
        return web.Response(status=400, text="statusData must be a JSON object")
    if isinstance(status_data, dict):
        state.module.status_data = status_data
    return web.Response(text="Module status updated")


async def add_log(request: web.Request) -> web.Response:
    """POST /v1/log/, form entry, category, label, log_level."""
    state = request.app[STATE]
    form = await within_body_deadline(request.post())
    entry = form.get("entry")
    if entry is None:
        return web.json_response({"success": False, "error": "No log entry provided"})
    state.log.add(
        str(entry),
        str(form.get("log_level") or ""),
        category=str(form.get("category") or state.settings.name),
        label=str(form.get("label") or ""),
    )
    return web.json_response({"success": True})


def add_module_routes(app: web.Application) -> None:
    """Every one of them for the module alone (module_access.py)."""
    module_only = app[MODULE_ACCESS].guard
    app.router.add_get("/v1/queue/{name}", module_only(get_queue))
    app.router.add_post("/v1/queue/updatemodulestatus/{module_id}", module_only(update_module_status))
    app.router.add_post("/v1/queue/{reqid}", module_only(post_response))
    app.router.add_post("/v1/log/", module_only(add_log))
    app.router.add_post("/v1/log", module_only(add_log))
