"""Which web pages may call the server (CORS). By default only pages of this machine: the server's own origin and
http(s)://localhost, 127.0.0.1 and [::1] on any port; `--allow-origin` adds more, as Ollama's OLLAMA_ORIGINS does
(`*` for any, `null` for pages opened from a file, `https://*.example.com` patterns).

Other origins get no Access-Control-Allow-Origin header, so their pages cannot read any answer, and their
requests are refused outright (403), GETs included, as Ollama does: a plain form POST needs no preflight, so a header
alone would not stop a foreign page from starting chats, and a GET answered at all still tells the page something.
Requests without an Origin (curl, the SDK, scripts) are not web pages and pass. Unlike the real server, which admits
every origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web

from .responses import refusal_response

ALLOWED_METHODS = "GET, POST, OPTIONS"
_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$")
_ORIGIN_PATTERN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#\s]+$")


class OriginPatternError(ValueError):
    pass


def parse_origin_patterns(values: Iterable[str]) -> list[str]:
    """--allow-origin values (each may hold several, comma-separated) → patterns; raises OriginPatternError."""
    patterns = []
    for value in values:
        for pattern in filter(None, (part.strip().rstrip("/").lower() for part in value.split(","))):
            if pattern not in ("*", "null") and not _ORIGIN_PATTERN.match(pattern):
                raise OriginPatternError(
                    f"{pattern!r} is not an origin: use scheme://host[:port] (e.g. "
                    f"http://example.com:8080, * in the host for any part), * or null"
                )
            patterns.append(pattern)
    return patterns


def _matcher(pattern: str) -> re.Pattern:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


class OriginPolicy:
    def __init__(self, extra_patterns: Iterable[str], hostname: str) -> None:
        patterns = list(extra_patterns)
        self._any = "*" in patterns
        self._matchers = [_matcher(pattern) for pattern in patterns]
        self._hostname = hostname

    def allows(self, origin: str, request: web.Request) -> bool:
        origin = origin.lower()
        return (
            self._any
            or bool(_LOCAL_ORIGIN.match(origin))
            or origin == f"{request.scheme}://{request.host}".lower()  # the server's own pages
            or any(matcher.match(origin) for matcher in self._matchers)
        )

    def _allow(self, headers, origin: str) -> None:
        headers["Access-Control-Allow-Origin"] = "*" if self._any else origin
        if not self._any:
            headers.add("Vary", "Origin")

    def _refuse(self, origin: str, request: web.Request) -> web.Response:
        return refusal_response(
            request,
            self._hostname,
            f"Forbidden: web pages from {origin} may not call this server "
            f"({request.method} {request.path}); start it with --allow-origin {origin} to let "
            f"them",
            403,
        )

    def middleware(self):
        @web.middleware
        async def check_origin(request: web.Request, handler) -> web.StreamResponse:
            origin = request.headers.get("Origin")
            if origin is None:
                return await handler(request)
            allowed = self.allows(origin, request)
            if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                if not allowed:
                    return self._refuse(origin, request)
                preflight = web.Response(
                    status=204,
                    headers={
                        "Access-Control-Allow-Methods": ALLOWED_METHODS,
                        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
                        "Access-Control-Max-Age": "600",
                    },
                )
                if request.headers.get("Access-Control-Request-Private-Network") == "true":
                    preflight.headers["Access-Control-Allow-Private-Network"] = "true"  # Chrome, for an allowed site
                self._allow(preflight.headers, origin)
                return preflight
            if not allowed:  # GETs too: a page must not read the log or the models, nor time how they answer
                return self._refuse(origin, request)
            return await handler(request)

        return check_origin

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """An on_response_prepare signal: an allowed page's answers carry the header as they go out, streamed ones
        and 404s included, so the page can read them."""
        origin = request.headers.get("Origin")
        if origin is None or "Access-Control-Allow-Origin" in response.headers:
            return
        if self.allows(origin, request):
            self._allow(response.headers, origin)
            # Our own headers (the OpenAI answer's X-LlamaChat-Command-Id) are hidden from a page unless exposed.
            ours = [name for name in response.headers if name.lower().startswith("x-llamachat-")]
            if ours:
                response.headers["Access-Control-Expose-Headers"] = ", ".join(ours)
