"""Cross-origin access from any origin, as the real server allows (its CORS policy admits all origins), so that
explore.html opened from a file or another host can talk to the server."""
from aiohttp import web

ALLOWED_METHODS = "GET, POST, OPTIONS"


def _allow(headers) -> None:
    headers["Access-Control-Allow-Origin"] = "*"


@web.middleware
async def allow_any_origin(request: web.Request, handler) -> web.StreamResponse:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        preflight = web.Response(status=204, headers={
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
            "Access-Control-Max-Age": "600",
        })
        _allow(preflight.headers)
        return preflight
    try:
        response = await handler(request)
    except web.HTTPException as ex:  # 404s and the like keep the header, so the page can read the status
        _allow(ex.headers)
        raise
    _allow(response.headers)
    return response
