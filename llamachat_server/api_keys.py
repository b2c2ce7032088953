"""API keys (--api-key, --api-key-file), as llama-server has them: when any is set, every client request needs
`Authorization: Bearer <key>`, or it is answered 401 in its API's own error shape. Off by default, as the real
CodeProject.AI Server has no keys.

Keyless: the module endpoints (only the launched module may use them, module_access.py; the SDK sends no key), the
Explorer page and its files (they hold no data, and must load to ask for the key), and CORS preflights (browsers
never send credentials on them).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from .responses import refusal_response

KEYLESS = "keyless"  # the attribute that marks a handler as answered without a key


class ApiKeyError(ValueError):
    pass


def keyless(handler):
    """Marks `handler` as served without an API key."""
    setattr(handler, KEYLESS, True)
    return handler


def read_key_file(path: Path) -> list[str]:
    """The keys in a file, one a line; blank lines and lines starting with # are skipped. Raises ApiKeyError."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as ex:
        raise ApiKeyError(f"cannot read {path}: {ex}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ApiKeyError(f"{path} holds no key (one a line)")
    return keys


def check_keys(keys: Iterable[str]) -> list[str]:
    checked = []
    for key in keys:
        if not key or any(char.isspace() for char in key) or not key.isprintable():
            raise ApiKeyError("a key must be printable text without spaces")
        checked.append(key)
    return checked


class ApiKeys:
    def __init__(self, keys: Iterable[str], hostname: str) -> None:
        self._keys = [key.encode() for key in keys]
        self._hostname = hostname

    def allows(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given_bytes = given.strip().encode()
        # Compared with every key, in constant time each: the answer's timing tells nothing of a key.
        return any([hmac.compare_digest(given_bytes, key) for key in self._keys])

    def middleware(self):
        @web.middleware
        async def check_key(request: web.Request, handler) -> web.StreamResponse:
            if not self._keys or _is_keyless(request) or self.allows(request.headers.get("Authorization")):
                return await handler(request)
            why = "the API key is not one of this server's" if "Authorization" in request.headers else "no API key"
            response = refusal_response(
                request,
                self._hostname,
                f"Unauthorized: {why}; send 'Authorization: Bearer <key>' with a key the server was started with "
                f"(--api-key)",
                401,
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="LlamaChat"'
            return response

        return check_key


def _is_keyless(request: web.Request) -> bool:
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return True
    return getattr(request.match_info.handler, KEYLESS, False)
