"""Response shapes of the real server's own endpoints (ServerResponse / ServerErrorResponse, docs/protocol.md §2.2).

Errors come back as HTTP 200 with `success: false`: clients check `success`, not the HTTP status. Refusals made before
any endpoint runs (Host, origin, API key, unknown path) answer in the shape of the API the request was for.
"""

from __future__ import annotations

from email.utils import formatdate

from aiohttp import web

from .openai_chat import error_body

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")


def server_response(hostname: str, **fields) -> dict:
    return {"success": True, "code": 200, "hostname": hostname, **fields}


def error_response(hostname: str, error: str, code: int = 500, http_status: int = 200) -> web.Response:
    return web.json_response({"success": False, "code": code, "hostname": hostname, "error": error}, status=http_status)


def utc_timestamp() -> str:
    """RFC 1123, as .NET's DateTime.UtcNow.ToString("R"): 'Tue, 25 Nov 2025 14:29:00 GMT'."""
    return formatdate(usegmt=True)


def is_openai_path(path: str) -> bool:
    path = path.lower().rstrip("/")
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPENAI_PATHS)


def _openai_error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "permission_error" if status == 403 else "invalid_request_error"


def refusal_response(request: web.Request, hostname: str, error: str, status: int) -> web.Response:
    """An error answer with HTTP `status`, in the shape its API's clients read: OpenAI's error object on the OpenAI
    paths (a 401 with the code "invalid_api_key", as OpenAI's own), the real server's `success: false` elsewhere."""
    if is_openai_path(request.path):
        code = "invalid_api_key" if status == 401 else None
        return web.json_response(error_body(error, _openai_error_type(status), code=code), status=status)
    return error_response(hostname, error, code=status, http_status=status)
