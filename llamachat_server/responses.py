"""Response shapes of the real server's own endpoints (ServerResponse / ServerErrorResponse, docs/protocol.md §2.2).

Errors come back as HTTP 200 with `success: false`: clients check `success`, not the HTTP status.
"""

from __future__ import annotations

from email.utils import formatdate

from aiohttp import web


def server_response(hostname: str, **fields) -> dict:
    return {"success": True, "code": 200, "hostname": hostname, **fields}


def error_response(hostname: str, error: str, code: int = 500, http_status: int = 200) -> web.Response:
    return web.json_response({"success": False, "code": code, "hostname": hostname, "error": error}, status=http_status)


def utc_timestamp() -> str:
    """RFC 1123, as .NET's DateTime.UtcNow.ToString("R"): 'Tue, 25 Nov 2025 14:29:00 GMT'."""
    return formatdate(usegmt=True)
