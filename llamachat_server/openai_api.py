"""The OpenAI-compatible endpoints, `POST /v1/chat/completions` and `GET /v1/models`, on top of the module's own
protocol: the chat is posted to the module's queue as `POST /v1/text/chat` posts it, then followed piece by piece
through the reply channel the launched module writes to (reply_feed.py), with get_command_status through the same
queue for its start, its end and whatever the channel misses (or, without a channel, by polls alone), and stopped with
cancel_command when the client goes away. The module stays the one engine, so its queue, metrics and cancel apply to
every client: a chat waiting in the module's queue is followed like a running one that has no text yet.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

from aiohttp import HttpVersion11, web

from .client_api import ask_module, why_no_answer
from .live_writer import LiveWriter
from .module_process import ModuleStatus
from .openai_chat import (
    FINISH_REASON_OF_STOP_REASON,
    OPENAI_PARAMS,
    ChatCompletionRequest,
    OpenAIRequestError,
    choice,
    chunk,
    completion,
    error_body,
    parse_chat_request,
    usage,
)
from .openai_tools import message_deltas
from .payload import group_values
from .queues import QueueError, RequestQueueFull
from .reply_feed import extend
from .request_body import MAX_TEXT_BODY_BYTES, JsonInputError, body_limit, parse_json, within_body_deadline
from .server_state import STATE, ServerState

CHAT_ROUTE = "text/chat"
# How long the server waits between two get_command_status polls of a running chat: briefly until the reply's first
# text, so the client sees it within ~15 ms of the module, then longer, because every poll (a queue round trip through
# the server and the module's SDK loop) takes CPU from the model. bench/openai_stream.py on 2 cores, 2 threads: after
# the first text, polls every 15 ms cost a sixth of the model's speed, every 50 ms ~7 %, every 100-120 ms ~3 %; every
# 200 ms, with close polls once max_tokens is due (_next_poll_in), a 512-token stream ran at 0.97-0.99 x raw.
# With the reply channel, polls are only for what it does not carry (a chat's start and end, its metrics), and no poll
# runs while pieces come: see _follow.
FIRST_TEXT_INTERVAL = 0.015
REPLY_INTERVAL = 0.2  # five updates a second: a smooth enough stream
DUE_INTERVAL = 0.005  # once max_tokens is due: a few cheap polls, so the last text is seen within ~5 ms
# With the reply channel: how long a follower waits for the module's next line before it asks get_command_status all
# the same (a chat waiting in the queue or evaluating its prompt, a line the module dropped while the pipe was full).
CHANNEL_SILENCE = 1.0
# The field of the module's refusal when its chat queue has no room (llamachat/chat_answers.py, docs/protocol.md).
QUEUE_FULL_FIELD = "queue_full"
UNFINISHED = ("queued", "running")  # a chat's commandStatus until it has ended

_background: set[asyncio.Task] = set()  # tasks that outlive a disconnected client's handler, held until they finish


class ApiFailure(Exception):
    """An answer in OpenAI's error shape: HTTP status, message, type, and the field at fault and the error's code
    where there are."""

    def __init__(
        self, status: int, message: str, error_type: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.error_type, self.param, self.code = status, error_type, param, code

    def body(self) -> dict:
        return error_body(str(self), self.error_type, self.param, self.code)

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def _refusal(answer: dict, message: str) -> ApiFailure:
    """The 400 for a chat the module refused or ended because of its input, naming the input and kind it reports."""
    param = answer.get("error_param")
    named = OPENAI_PARAMS.get(param, param) if param is not None else None
    return ApiFailure(400, message, "invalid_request_error", named, answer.get("error_code"))


def _model_name(state: ServerState) -> str:
    """The loaded model's file name, as the module reports it in its status; the module's name until it has."""
    return (state.module.status_data or {}).get("model") or state.settings.name


def _fingerprint(state: ServerState) -> str:
    """system_fingerprint: what answers, the model and the llama-cpp-python build (its reply changes with either)."""
    status = state.module.status_data or {}
    return f"{_model_name(state)}/llama-cpp-python-{status.get('llamaCppPython') or 'unknown'}"


async def _ask(state: ServerState, route_path: str, values: list[tuple[str, str]]) -> dict:
    matched = state.routes.match("POST", route_path)
    if matched is None:  # the module's settings declare no such route
        raise ApiFailure(503, f"The module has no route POST /v1/{route_path}", "unavailable_error")
    route = matched.route
    payload = {"command": route.command, "values": group_values(values), "files": [], "urlSegments": []}
    try:
        return await ask_module(state, route, payload)
    except RequestQueueFull as ex:
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
    if answer.get(QUEUE_FULL_FIELD):
        raise ApiFailure(429, message, "rate_limit_error")
    if not (state.module.status_data or {}).get("model"):
        raise ApiFailure(503, message, "unavailable_error")  # no model loaded: nothing the client can fix
    raise _refusal(answer, message)


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


async def _status(state: ServerState, command_id: str) -> dict:
    return await _ask(state, f"{state.settings.module_id}/get_command_status", [("commandId", command_id)])


async def _poll(state: ServerState, command_id: str, max_tokens: int | None) -> AsyncIterator[dict]:
    """The chat's status by polls alone, as it runs, ending with its final one."""
    while True:
        status = await _status(state, command_id)
        yield status
        if status.get("commandStatus") not in UNFINISHED:
            return
        await asyncio.sleep(_next_poll_in(status, max_tokens))


def _grown(reply: str, lines: list[dict]) -> tuple[list[str], bool]:
    """The reply as each line's piece extends it, and whether the status must be asked now: a line says the chat has
    ended, a piece is missing (the module dropped a line), or no line came."""
    replies: list[str] = []
    for line in lines:
        grown = None if line.get("end") else extend(reply, line["at"], line["text"])
        if grown is None:
            return replies, True
        if len(grown) > len(reply):  # a piece the last status had already is skipped
            reply = grown
            replies.append(reply)
    return replies, not lines


async def _follow(
    state: ServerState,
    command_id: str,
    max_tokens: int | None,
    by_piece: bool = True,
    write: Callable[[str], bool] | None = None,
) -> AsyncGenerator[dict, None]:
    """The chat's status as it runs, ending with its final one. With the reply channel live (and `by_piece`), a
    status for each piece of the reply as the module appends it (the last status asked, with the reply grown), and
    statuses asked only at the start, at the end, to fill a gap, after CHANNEL_SILENCE, or by polls once the channel
    has closed; without it, polled statuses. `write`, when given, sends a piece to the client on the pipe reader's
    callback (LiveWriter.write): a piece it sends yields no status, and the reply of the next status includes it."""
    feed = state.reply_feed
    if feed is None or not feed.live or not by_piece:
        async for status in _poll(state, command_id, max_tokens):
            yield status
        return
    with feed.follow(command_id) as pieces:
        status = await _status(state, command_id)  # after subscribing: any piece this lacks comes as a line
        reply = status.get("reply") or ""
        yield status
        if write is not None:

            def direct(line: dict) -> bool:
                nonlocal reply
                grown = None if line.get("end") else extend(reply, line["at"], line["text"])
                if grown is None:  # the end, or a piece after a missing one: the status is asked
                    return False
                if len(grown) > len(reply):
                    if not write(grown[len(reply) :]):
                        return False
                    reply = grown
                return True

            pieces.direct = direct
        while status.get("commandStatus") in UNFINISHED:
            lines = await pieces.take(CHANNEL_SILENCE)
            replies, ask = _grown(reply, lines)  # the reply as it is now: `direct` may have grown it meanwhile
            for reply in replies:
                yield {**status, "commandStatus": "running", "reply": reply}
            if pieces.closed:  # the module has ended, or the server is stopping: polls say what became of the chat
                async for status in _poll(state, command_id, max_tokens):
                    yield status
                return
            if ask:
                status = await _status(state, command_id)
                reply = max(reply, status.get("reply") or "", key=len)  # both are the start of the same reply
                yield {**status, "reply": reply}


def _finish_reason(status: dict) -> str:
    """OpenAI's finish_reason for a finished chat, or ApiFailure for one that failed or was lost: a 400 when its
    input was at fault (a conversation too long for the context, a schema llama.cpp could not parse)."""
    reason = FINISH_REASON_OF_STOP_REASON.get(str(status.get("stop_reason")))
    if status.get("success") and reason:
        return reason
    message = str(status.get("error") or status.get("message") or f"The chat ended as {status.get('commandStatus')}")
    if status.get("error_param") or status.get("error_code"):
        raise _refusal(status, message)
    raise ApiFailure(500, message, "server_error")


def _started(status: dict) -> bool:
    """Whether the chat is past the checks that can refuse it (its prompt fitted, its grammar parsed): generating,
    or over."""
    return status.get("commandStatus") not in UNFINISHED or bool(status.get("prompt_tokens") or status.get("reply"))


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
# read or cancel its chat, so the id is a random one of its own. With n > 1 the header names the first choice's chat.
COMMAND_ID_HEADER = "X-LlamaChat-Command-Id"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _message(chat: ChatCompletionRequest, final: dict) -> tuple[dict, str]:
    """The assistant's message and finish_reason for a finished chat: with tools, its calls or its text."""
    reply, reason = final.get("reply") or "", _finish_reason(final)
    if chat.tools is None:
        return {"role": "assistant", "content": reply}, reason
    try:
        message = chat.tools.message(reply, complete=reason == "stop")
    except ValueError as ex:
        raise ApiFailure(500, str(ex), "server_error") from None
    return message, "tool_calls" if message.get("tool_calls") else reason


async def _final(state: ServerState, command_id: str, max_tokens: int | None) -> dict:
    final = {}
    async for status in _follow(state, command_id, max_tokens):
        final = status
    return final


async def _complete(
    state: ServerState, command_ids: list[str], created: int, chat: ChatCompletionRequest
) -> web.Response:
    followers = [asyncio.ensure_future(_final(state, command_id, chat.max_tokens)) for command_id in command_ids]
    try:
        # wait(), not gather(): a cancel (the client went away) reaches this handler at once, whatever a follower
        # is in the middle of.
        await asyncio.wait(followers)
    finally:
        for follower in followers:
            follower.cancel()
    finals = [follower.result() for follower in followers]
    choices = [choice(i, *_message(chat, final), final.get("logprobs")) for i, final in enumerate(finals)]
    model, fingerprint = _model_name(state), _fingerprint(state)
    body = completion(completion_id(), created, model, choices, finals, fingerprint)
    return web.json_response(body, headers={COMMAND_ID_HEADER: command_ids[0]})


async def _stream(
    request: web.Request, state: ServerState, command_ids: list[str], created: int, chat: ChatCompletionRequest
) -> web.StreamResponse:
    """The chats (one per choice) as server-sent events. Nothing is sent until every chat has started generating, so
    that a chat the module refuses on the way (a conversation too long, a schema llama.cpp cannot parse) gets its
    HTTP error."""
    response_id, model, fingerprint = completion_id(), _model_name(state), _fingerprint(state)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", COMMAND_ID_HEADER: command_ids[0]}
    )
    live = None
    if len(command_ids) == 1 and chat.tools is None and not chat.logprobs and request.version == HttpVersion11:
        response.enable_chunked_encoding()  # as aiohttp would for HTTP/1.1 (only): LiveWriter frames its chunks so too
        live = LiveWriter(request, response)
    latest: dict[int, dict] = {}
    async with aclosing(_statuses(state, command_ids, chat, live)) as statuses:
        try:
            while len(latest) < len(command_ids) or not all(_started(status) for status in latest.values()):
                index, latest[index] = await statuses.__anext__()
            for status in latest.values():
                if status.get("commandStatus") not in UNFINISHED and not status.get("success"):
                    _finish_reason(status)  # raises the chat's error as an HTTP answer
            await response.prepare(request)
            await _send_choices(response, chat, latest, statuses, live, response_id, created, model, fingerprint)
        except ConnectionResetError:  # the client closed the connection between two chunks
            for command_id in command_ids:
                _cancel_in_background(state, command_id)  # a finished chat stays as it was
    return response


async def _statuses(
    state: ServerState, command_ids: list[str], chat: ChatCompletionRequest, live: LiveWriter | None
) -> AsyncGenerator[tuple[int, dict], None]:
    """Every choice's chat's statuses as they come, as (the choice's index, status); ApiFailure when following one
    fails (the server's queue refused a poll, say). One chat's are read straight from its follower (a task and a queue
    in between would cost a wake-up more per token), and with `live` its pieces mostly go to the client directly."""
    by_piece = not chat.logprobs  # the channel carries no log probabilities: a chat that asks for them is polled
    if len(command_ids) == 1:
        write = live.write if live is not None else None
        async with aclosing(_follow(state, command_ids[0], chat.max_tokens, by_piece, write)) as statuses:
            async for status in statuses:
                yield 0, status
        return
    updates: asyncio.Queue[tuple[int, dict | ApiFailure]] = asyncio.Queue()

    async def follow(index: int, command_id: str) -> None:
        try:
            async for status in _follow(state, command_id, chat.max_tokens, by_piece):
                await updates.put((index, status))
        except ApiFailure as ex:
            await updates.put((index, ex))

    followers = [asyncio.ensure_future(follow(i, command_id)) for i, command_id in enumerate(command_ids)]
    try:
        while True:
            index, update = await updates.get()
            if isinstance(update, ApiFailure):
                raise update
            yield index, update
    finally:
        for follower in followers:
            follower.cancel()


async def _send_choices(
    response: web.StreamResponse,
    chat: ChatCompletionRequest,
    latest: dict[int, dict],
    statuses: AsyncIterator[tuple[int, dict]],
    live: LiveWriter | None,
    response_id: str,
    created: int,
    model: str,
    fingerprint: str,
) -> None:
    """The chunks of every choice as its chat's statuses come, from the latest seen so far; with `live`, once those
    are sent, most pieces of the reply go out through it instead."""

    async def send(event: dict) -> None:
        await response.write(f"data: {json.dumps(event)}\n\n".encode())

    def piece(index: int, delta: dict | None, finish_reason: str | None = None, logprobs: list | None = None) -> dict:
        return chunk(response_id, created, model, fingerprint, delta, finish_reason, logprobs, index=index)

    sent, sent_logprobs = [0] * len(latest), [0] * len(latest)

    def sent_live(text: str) -> dict:  # the one choice's piece that LiveWriter sends now
        sent[0] += len(text)
        return piece(0, {"content": text})

    finals: dict[int, dict] = {}
    waiting = sorted(latest.items())
    try:
        for index in range(len(latest)):
            await send(piece(index, {"role": "assistant", "content": ""}, logprobs=[] if chat.logprobs else None))
        while len(finals) < len(latest):
            if waiting:
                index, status = waiting.pop(0)
            else:
                if live is not None:  # everything before the pieces to come has been sent
                    live.start(sent_live)
                index, status = await statuses.__anext__()
            reply, entries = status.get("reply") or "", status.get("logprobs")
            if len(reply) > sent[index] and chat.tools is None:  # calls are sent once complete, below
                new_logprobs = entries[sent_logprobs[index] :] if entries is not None else None
                new_text = reply[sent[index] :]
                # Counted before the write, which may wait for a slow client: LiveWriter may send on meanwhile.
                sent[index], sent_logprobs[index] = len(reply), len(entries or [])
                await send(piece(index, {"content": new_text}, logprobs=new_logprobs))
            if status.get("commandStatus") not in UNFINISHED:
                message, reason = _message(chat, status)
                if chat.tools is not None:
                    for delta in message_deltas(message):
                        await send(piece(index, delta))
                await send(piece(index, {}, reason))
                finals[index] = status
    except ApiFailure as ex:  # the status line has gone: the error travels as an event, which clients raise
        await send(ex.body())
        return
    if chat.include_usage:
        await send(
            chunk(response_id, created, model, fingerprint, None, usage=usage([finals[i] for i in sorted(finals)]))
        )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()


def _failure(chat: ChatCompletionRequest, failure: ApiFailure) -> web.Response:
    if chat.tools is not None and failure.param == "response_format":  # the grammar came from the tools
        failure.param = "tools"
    return failure.response()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        text = await within_body_deadline(body_limit(request, MAX_TEXT_BODY_BYTES).text())
        renders_tools = bool((state.module.status_data or {}).get("templateRendersTools"))
        chat = parse_chat_request(parse_json(text, "The body"), renders_tools)
    except UnicodeDecodeError:
        return ApiFailure(400, "The body must be a JSON object in UTF-8", "invalid_request_error").response()
    except JsonInputError as ex:
        return ApiFailure(400, f"{ex}: send a JSON object", "invalid_request_error").response()
    except OpenAIRequestError as ex:
        return web.json_response(error_body(str(ex), "invalid_request_error", ex.param), status=400)
    command_ids = []
    try:
        for values in chat.choice_values():  # one chat per choice: decoded together with parallel decoding on
            command_ids.append(await _start_for_client(state, values))
    except ApiFailure as ex:
        for command_id in command_ids:
            _cancel_in_background(state, command_id)
        return _failure(chat, ex)
    except asyncio.CancelledError:
        for command_id in command_ids:
            _cancel_in_background(state, command_id)
        raise
    created = int(time.time())
    try:
        if chat.stream:
            return await _stream(request, state, command_ids, created, chat)
        return await _complete(state, command_ids, created, chat)
    except ApiFailure as ex:
        for command_id in command_ids:  # the others of n > 1 are of no use now
            _cancel_in_background(state, command_id)
        return _failure(chat, ex)
    except asyncio.CancelledError:  # the client went away: aiohttp cancels its handler
        for command_id in command_ids:
            _cancel_in_background(state, command_id)
        raise


def _loaded_model(state: ServerState) -> dict | None:
    """The loaded model as OpenAI describes a model, once the module has reported it."""
    model = (state.module.status_data or {}).get("model")
    started = state.module.started
    created = int(started.timestamp()) if started else 0
    return {"id": model, "object": "model", "created": created, "owned_by": "llamachat"} if model else None


async def list_models(request: web.Request) -> web.Response:
    model = _loaded_model(request.app[STATE])
    return web.json_response({"object": "list", "data": [model] if model else []})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the loaded model under its id, else OpenAI's 404."""
    model, wanted = _loaded_model(request.app[STATE]), request.match_info["model"]
    if model is None or model["id"] != wanted:
        message = f"The model '{wanted}' does not exist" + (f": the one loaded is '{model['id']}'" if model else "")
        return web.json_response(error_body(message, "invalid_request_error", "model", "model_not_found"), status=404)
    return web.json_response(model)


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
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_route("*", "/v1/models", _only("GET"))
