"""The client side: `POST /v1/<route>` → the module's queue → the module's answer (docs/protocol.md §2.2)."""
from __future__ import annotations

import time

from aiohttp import web

from .context import CONTEXT, ServerContext
from .module_process import ModuleStatus
from .payload import PayloadError, build_payload
from .queues import QueueError, RequestTimedOut
from .responses import error_response, utc_timestamp

_NOT_RUNNING = (ModuleStatus.STOPPING, ModuleStatus.STOPPED)


def _why_no_answer(context: ServerContext) -> str:
    module = context.module
    if module.status in (ModuleStatus.STARTING, ModuleStatus.RESTARTING):
        return (f"module {module.name} is {module.status.value}: it is still loading; try again when "
                f"/v1/module/list/status shows it Started")
    if module.status == ModuleStatus.STARTED:
        return f"module {module.name} did not answer within {context.queues.response_timeout:g} s"
    return f"module {module.name} is {module.status.value}"


async def handle_module_route(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    path = request.match_info["tail"]
    match = context.routes.match(request.method, path)
    if match is None:
        known = ", ".join(f"{r.method} /v1/{r.path}" for r in context.routes.routes())
        return error_response(context.hostname, f"No module answers {request.method} /v1/{path}. "
                              f"Routes: {known}", code=404, http_status=404)
    if context.module.status in _NOT_RUNNING:
        return error_response(context.hostname, f"The server is shutting down: module "
                              f"{context.module.name} is {context.module.status.value}")
    try:
        payload = await build_payload(request, match.route.command, match.url_segments)
    except PayloadError as ex:
        return error_response(context.hostname, str(ex), code=400)

    started = time.perf_counter()
    try:
        answer = await context.queues.send_request(match.route.queue, payload)
    except RequestTimedOut as ex:
        return error_response(context.hostname, f"{ex}: {_why_no_answer(context)}")
    except QueueError as ex:
        return error_response(context.hostname, str(ex))
    answer["analysisRoundTripMs"] = round((time.perf_counter() - started) * 1000)
    answer["processedBy"] = "localhost"
    answer["timestampUTC"] = utc_timestamp()
    return web.json_response(answer)
