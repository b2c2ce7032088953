"""Every failure answers in JSON: HTTP errors (unknown path, wrong method, body too large) and any exception a
handler did not expect become `success: false` answers saying what happened, so a client never gets aiohttp's
plain-text "500 Server got itself in trouble". Unexpected exceptions are logged with their traceback."""

from __future__ import annotations

import traceback

from aiohttp import web

from .responses import refusal_response
from .server_log import truncated
from .server_state import STATE


def not_utf8_message(ex: UnicodeDecodeError, where: str = "The request body") -> str:
    return f"{where} is not valid UTF-8 (byte 0x{ex.object[ex.start]:02x} where text was expected): send text as UTF-8"


def _http_error_text(request: web.Request, ex: web.HTTPException) -> str:
    if ex.status == 404:
        return f"No endpoint {request.method} {request.path}"
    if ex.status == 405:
        return f"{request.path} does not answer {request.method}; it answers {ex.headers.get('Allow', 'other methods')}"
    return ex.text or ex.reason


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        return await handler(request)
    except web.HTTPException as ex:
        if ex.status < 400:  # redirects and the like are answers, not errors
            raise
        response = refusal_response(request, state.hostname, _http_error_text(request, ex), ex.status)
        if "Allow" in ex.headers:
            response.headers["Allow"] = ex.headers["Allow"]
        return response
    except UnicodeDecodeError as ex:  # a client's bytes, read by an endpoint that expects text
        return refusal_response(request, state.hostname, not_utf8_message(ex), 400)
    except ConnectionResetError:  # aiohttp's "Connection lost": the client left before its body had arrived
        state.log.add(f"{request.method} {request.path}: the client went away before its request had arrived", "debug")
        return web.Response(status=400)  # written nowhere: the connection is gone
    except Exception as ex:  # noqa: BLE001 - the point: nothing unexpected may end as a plain-text 500
        failure = f"{type(ex).__name__}: {truncated(str(ex), 300)}"
        # The failure first: a long traceback is cut at the log's entry limit, from the end.
        state.log.add(f"{request.method} {request.path} failed ({failure}): {traceback.format_exc()}", "error")
        return refusal_response(
            request,
            state.hostname,
            f"The server failed on {request.method} {request.path} ({failure}); "
            f"this is a bug: the server log has the details",
            500,
        )
