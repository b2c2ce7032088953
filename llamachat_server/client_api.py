"""The client side: `POST /v1/<route>` → the module's queue → the module's answer (docs/protocol.md §2.2)."""

from __future__ import annotations

import time

from aiohttp import web

from .module_process import ModuleStatus
from .payload import PayloadError, build_payload
from .queues import QueueError, RequestTimedOut
from .request_body import MAX_FILE_BODY_BYTES, MAX_TEXT_BODY_BYTES, body_limit
from .responses import error_response, is_openai_path, utc_timestamp
from .routes import STATUS_COMMAND, SYSTEM_COMMANDS, Route
from .server_state import STATE, ServerState

_NOT_RUNNING = (ModuleStatus.STOPPING, ModuleStatus.STOPPED)


def why_no_answer(state: ServerState) -> str:
    module = state.module
    if module.status in (ModuleStatus.STARTING, ModuleStatus.RESTARTING):
        return (
            f"module {module.name} is {module.status.value}: it is still loading; try again when "
            f"/v1/module/list/status shows it Started"
        )
    if module.status == ModuleStatus.STARTED:
        return f"module {module.name} did not answer within {state.queues.response_timeout:g} s"
    return f"module {module.name} is {module.status.value}"


def _command_id(payload: dict) -> str | None:
    return next((item["value"][0] for item in payload["values"] if item["key"] == "commandId" and item["value"]), None)


def _lost_answer(state: ServerState, command: str, command_id: str, reason: str) -> dict:
    """The answer for a command the module lost when it stopped, instead of the restarted module's "not started"."""
    what = "Nothing to cancel: the" if command == "cancel_command" else "The"
    return {
        "success": False,
        "code": 500,
        "moduleId": state.settings.module_id,
        "command": command,
        "commandId": command_id,
        "commandStatus": "failed",
        "error": f"{what} chat was lost because the {reason}; start a new chat",
    }


async def ask_module(state: ServerState, route: Route, payload: dict) -> dict:
    """The module's answer; for a command the module lost when it stopped, the server's own. QueueError if none."""
    command_id = _command_id(payload) if route.command in SYSTEM_COMMANDS else None
    feed = state.reply_feed
    if feed is not None and route.command == STATUS_COMMAND and (live := feed.status(command_id)) is not None:
        return live  # a running chat, as the module last answered and its reply channel has told since
    answer, failure = None, None
    if not state.commands.lost(command_id):
        try:
            answer = await state.queues.send_request(route.queue, payload)
            state.commands.saw_answer(answer)
            if feed is not None:
                feed.answered(command_id, route.command, answer)
        except RequestTimedOut as ex:
            failure = QueueError(f"{ex}: {why_no_answer(state)}")
        except QueueError as ex:
            failure = ex
    lost_reason = state.commands.lost(command_id)  # asked again: the module may have stopped meanwhile
    if lost_reason and command_id and not (answer and answer.get("success")):
        return _lost_answer(state, route.command, command_id, lost_reason)
    if answer is None:
        raise failure or QueueError(why_no_answer(state))
    return answer


async def handle_module_route(request: web.Request) -> web.Response:
    state = request.app[STATE]
    path = request.match_info["tail"]
    match = state.routes.match(request.method, path)
    if match is None and is_openai_path(request.path):
        raise web.HTTPNotFound()  # answered in OpenAI's shape (errors.py)
    if match is None:
        known = ", ".join(f"{r.method} /v1/{r.path}" for r in state.routes.routes())
        return error_response(
            state.hostname,
            f"No module answers {request.method} /v1/{path}. Routes: {known}",
            code=404,
            http_status=404,
        )
    if state.module.status in _NOT_RUNNING:
        return error_response(
            state.hostname,
            f"The server is shutting down: module {state.module.name} is {state.module.status.value}",
        )
    limit = MAX_FILE_BODY_BYTES if match.route.takes_files else MAX_TEXT_BODY_BYTES
    try:
        payload = await build_payload(body_limit(request, limit), match.route.command, match.url_segments)
    except PayloadError as ex:
        return error_response(state.hostname, str(ex), code=400)

    started = time.perf_counter()
    try:
        answer = await ask_module(state, match.route, payload)
    except QueueError as ex:
        return error_response(state.hostname, str(ex))
    answer["analysisRoundTripMs"] = round((time.perf_counter() - started) * 1000)
    answer["processedBy"] = "localhost"
    answer["timestampUTC"] = utc_timestamp()
    return web.json_response(answer)
