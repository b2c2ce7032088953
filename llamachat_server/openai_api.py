"""The OpenAI-compatible endpoints, `POST /v1/chat/completions` and `GET /v1/models`, on top of the module's own
protocol: the chat is posted to the module's queue as `POST /v1/text/chat` posts it, then followed with
get_command_status through the same queue (a short interval while it runs) and stopped with cancel_command when the
client goes away. The module stays the one engine, so its queue, metrics and cancel apply to every client: a chat
waiting in the module's queue is followed like a running one that has no text yet.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from .client_api import ask_module, why_no_answer
from .module_process import ModuleStatus
from .openai_chat import (
    FINISH_REASONS,
    ChatCompletionRequest,
    OpenAIRequestError,
    chunk,
    completion,
    error_body,
    parse_chat_request,
    usage,
)
from .payload import group_values
from .queues import QueueError, QueueFull
from .request_body import MAX_TEXT_BODY_BYTES, JsonInputError, body_limit, parse_json, within_body_deadline
from .server_state import STATE, ServerState

CHAT_ROUTE = "text/chat"
# How long the server waits between two get_command_status polls of a running chat: briefly until the reply's first
# text, so the client sees it within ~15 ms of the module, then longer, because every poll (a queue round trip through
# the server and the module's SDK loop) takes CPU from the model. bench/openai_stream.py on 2 cores, 2 threads: after
# the first text, polls every 15 ms cost a sixth of the model's speed, every 50 ms ~7 %, every 100-120 ms ~3 %; every
# 200 ms, with close polls once max_tokens is due (_next_poll_in), a 512-token stream ran at 0.97-0.99 x raw.
FIRST_TEXT_INTERVAL = 0.015
REPLY_INTERVAL = 0.2  # five updates a second: a smooth enough stream
DUE_INTERVAL = 0.005  # once max_tokens is due: a few cheap polls, so the last text is seen within ~5 ms
QUEUE_FULL_MARK = "queue is full"  # how the module refuses a chat when its queue has no room (llama_chat_adapter.py)
UNFINISHED = ("queued", "running")  # a chat's commandStatus until it has ended

_background: set[asyncio.Task] = set()  # tasks that outlive a disconnected client's handler, held until they finish


class ApiFailure(Exception):
    """An answer in OpenAI's error shape: HTTP status, message, type."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status, self.error_type = status, error_type

    def response(self) -> web.Response:
        return web.json_response(error_body(str(self), self.error_type), status=self.status)


def _model_name(state: ServerState) -> str:
    """The loaded model's file name, as the module reports it in its status; the module's name until it has."""
    return (state.module.status_data or {}).get("model") or state.settings.name


async def _ask(state: ServerState, route_path: str, values: list[tuple[str, str]]) -> dict:
    route = state.routes.match("POST", route_path).route
    payload = {"command": route.command, "values": group_values(values), "files": [], "urlSegments": []}
    try:
        return await ask_module(state, route, payload)
    except QueueFull as ex:
        raise ApiFailure(429, str(ex), "rate_limit_error") from None
    except QueueError as ex:
        raise ApiFailure(503, str(ex), "unavailable_error") from None


async def _start_chat(state: ServerState, values: list[tuple[str, str]]) -> str:
    """Posts the chat to the module; its commandId, or ApiFailure with the module's reason."""
    if state.module.status != ModuleStatus.STARTED:
        raise ApiFailure(503, why_no_answer(state), "unavailable_error")
    answer = await _ask(state, CHAT_ROUTE, values)
    if answer.get("success") and answer.get("commandStatus") in UNFINISHED:
        return answer["commandId"]
    message = str(answer.get("error") or answer.get("message") or "The module refused the chat")
    if QUEUE_FULL_MARK in message:
        raise ApiFailure(429, message, "rate_limit_error")
    if not (state.module.status_data or {}).get("model"):
        raise ApiFailure(503, message, "unavailable_error")  # no model loaded: nothing the client can fix
    raise ApiFailure(400, message, "invalid_request_error")


def _next_poll_in(status: dict, max_tokens: int | None) -> float:
    """Seconds until the next poll: FIRST_TEXT_INTERVAL until the first text; then REPLY_INTERVAL, or less when the
    reply reaches max_tokens sooner at the module's speed so far, so that its end is seen within ~DUE_INTERVAL of the
    module (a reply that stops on its own is seen up to REPLY_INTERVAL late). A chat waiting in the module's queue is
    polled every REPLY_INTERVAL: closer polls would slow the chat running meanwhile, and the module's wait estimate can
    be 0 for as long as a reply runs past the typical length. (The chat starts on time in the module; its first text
    reaches the client at most REPLY_INTERVAL later.)"""
    if status.get("commandStatus") == "queued":
        return REPLY_INTERVAL
    if not status.get("reply"):
        return FIRST_TEXT_INTERVAL
    speed, done = status.get("tokens_per_second") or 0, status.get("completion_tokens") or 0
    if max_tokens is None or speed <= 0:
        return REPLY_INTERVAL
    return min(REPLY_INTERVAL, max(DUE_INTERVAL, (max_tokens - done) / speed))


async def _follow(state: ServerState, command_id: str, max_tokens: int | None) -> AsyncIterator[dict]:
    """The chat's status as it runs, ending with its final one."""
    module_id = state.settings.module_id
    while True:
        status = await _ask(state, f"{module_id}/get_command_status", [("commandId", command_id)])
        yield status
        if status.get("commandStatus") not in UNFINISHED:
            return
        await asyncio.sleep(_next_poll_in(status, max_tokens))


def _finish_reason(status: dict) -> str:
    """OpenAI's finish_reason for a finished chat, or ApiFailure for one that failed or was lost."""
    reason = FINISH_REASONS.get(status.get("stop_reason"))
    if status.get("success") and reason:
        return reason
    message = status.get("error") or status.get("message") or f"The chat ended as {status.get('commandStatus')}"
    raise ApiFailure(500, str(message), "server_error")


def _in_background(coroutine) -> asyncio.Task:
    task = asyncio.ensure_future(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


LOGGED_ID_CHARS = 8


def _cancel_in_background(state: ServerState, command_id: str) -> None:
    """Stops the chat of a client that went away; runs on after the client's handler has been cancelled."""

    # The log names the chat by the start of its id only: /v1/log/list serves the log to every local client, and a
    # whole id would let them read the cancelled chat's reply.
    short_id = command_id[:LOGGED_ID_CHARS]

    async def cancel() -> None:
        try:
            await _ask(state, f"{state.settings.module_id}/cancel_command", [("commandId", command_id)])
            state.log.add(f"OpenAI client went away: chat {short_id}… cancelled")
        except ApiFailure as ex:
            state.log.add(f"OpenAI client went away; cancelling chat {short_id}… failed: {ex}", "warning")

    _in_background(cancel())


async def _start_for_client(state: ServerState, values: list[tuple[str, str]]) -> str:
    """_start_chat, carried on if the client goes away meanwhile: the module may already have started the chat, which
    is then cancelled as soon as its commandId is known."""
    start = _in_background(_start_chat(state, values))
    try:
        return await asyncio.shield(start)
    except asyncio.CancelledError:

        def cancel_started(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is None:
                _cancel_in_background(state, task.result())

        start.add_done_callback(cancel_started)
        raise


# The chat's commandId goes to the client that started it in this header only, so it can follow the chat through the
# CodeProject routes: OpenAI tooling logs and shows a response's id as harmless, and whoever knows a commandId can
# read or cancel its chat, so the id is a random one of its own.
COMMAND_ID_HEADER = "X-LlamaChat-Command-Id"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


async def _complete(state: ServerState, command_id: str, created: int, max_tokens: int | None) -> web.Response:
    final = {}
    async for status in _follow(state, command_id, max_tokens):
        final = status
    body = completion(
        completion_id(), created, _model_name(state), final.get("reply") or "", _finish_reason(final), final
    )
    return web.json_response(body, headers={COMMAND_ID_HEADER: command_id})


async def _stream(
    request: web.Request, state: ServerState, command_id: str, created: int, chat: ChatCompletionRequest
) -> web.StreamResponse:
    response_id, model = completion_id(), _model_name(state)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", COMMAND_ID_HEADER: command_id}
    )
    await response.prepare(request)

    async def send(event: dict) -> None:
        await response.write(f"data: {json.dumps(event)}\n\n".encode())

    sent, final = 0, {}
    try:
        await send(chunk(response_id, created, model, {"role": "assistant", "content": ""}))
        try:
            async for status in _follow(state, command_id, chat.max_tokens):
                final, reply = status, status.get("reply") or ""
                if len(reply) > sent:
                    await send(chunk(response_id, created, model, {"content": reply[sent:]}))
                    sent = len(reply)
            await send(chunk(response_id, created, model, {}, _finish_reason(final)))
        except ApiFailure as ex:  # the status line has gone: the error travels as an event, which clients raise
            await send(error_body(str(ex), ex.error_type))
            return response
        if chat.include_usage:
            await send(chunk(response_id, created, model, None, usage=usage(final)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:  # the client closed the connection between two chunks
        if final.get("commandStatus") in (None, *UNFINISHED):
            _cancel_in_background(state, command_id)
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        text = await within_body_deadline(body_limit(request, MAX_TEXT_BODY_BYTES).text())
        chat = parse_chat_request(parse_json(text, "The body"))
        command_id = await _start_for_client(state, chat.values)
    except UnicodeDecodeError:
        return ApiFailure(400, "The body must be a JSON object in UTF-8", "invalid_request_error").response()
    except JsonInputError as ex:
        return ApiFailure(400, f"{ex}: send a JSON object", "invalid_request_error").response()
    except OpenAIRequestError as ex:
        return web.json_response(error_body(str(ex), "invalid_request_error", ex.param), status=400)
    except ApiFailure as ex:
        return ex.response()
    created = int(time.time())
    try:
        if chat.stream:
            return await _stream(request, state, command_id, created, chat)
        return await _complete(state, command_id, created, chat.max_tokens)
    except ApiFailure as ex:
        return ex.response()
    except asyncio.CancelledError:  # the client went away: aiohttp cancels its handler
        _cancel_in_background(state, command_id)
        raise


async def list_models(request: web.Request) -> web.Response:
    """The loaded model, once the module has reported it."""
    state = request.app[STATE]
    model = (state.module.status_data or {}).get("model")
    started = state.module.started
    models = [
        {"id": model, "object": "model", "created": int(started.timestamp()) if started else 0, "owned_by": "llamachat"}
    ]
    return web.json_response({"object": "list", "data": models if model else []})


def _only(*methods: str):
    """A handler for any other method on an OpenAI path: a 405 in OpenAI's shape (errors.py), not the module routes'
    404."""

    async def method_not_allowed(request: web.Request) -> web.Response:
        raise web.HTTPMethodNotAllowed(request.method, methods)

    return method_not_allowed


def add_openai_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_route("*", "/v1/chat/completions", _only("POST"))
    app.router.add_get("/v1/models", list_models)
    app.router.add_route("*", "/v1/models", _only("GET"))
