"""Refuses requests whose Host header is not a name of this server, against DNS rebinding: a web page whose own
domain name was re-pointed at 127.0.0.1 reaches the server as "same-origin", but its requests still carry that
domain as Host. Loopback names and addresses always pass, and so does the address the server listens on; a server
listening on every interface (0.0.0.0, ::) also answers to any IP address and to this machine's host name. An IP
address cannot be rebound, so only names need checking. `--allow-host` adds names (patterns with `*`), for a server
reached through Docker (`host.docker.internal`) or a reverse proxy that passes on the client's Host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from aiohttp import web

from .responses import refusal_response

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
_HOST_PATTERN = re.compile(
    r"^(\*|[a-z0-9*]([a-z0-9*_-]*[a-z0-9*])?)(\.(\*|[a-z0-9*]([a-z0-9*_-]*[a-z0-9*])?))*$|^[0-9a-f:.]+$"
)


class HostPatternError(ValueError):
    pass


def parse_host_patterns(values: Iterable[str]) -> list[str]:
    """--allow-host values (each may hold several, comma-separated) → lower-case patterns; raises HostPatternError."""
    patterns = []
    for value in values:
        for part in filter(None, (part.strip() for part in value.split(","))):
            pattern = host_name(part) if part.startswith("[") else part.lower().rstrip(".")
            if not _HOST_PATTERN.match(pattern):
                raise HostPatternError(
                    f"{part!r} is not a host name: use a name or address without scheme or port (e.g. "
                    f"host.docker.internal, *.example.com, 192.168.1.5), * in a name for any part"
                )
            patterns.append(pattern)
    return patterns


def host_name(host_header: str) -> str:
    """'LocalHost:32168' → 'localhost', '[::1]:80' → '::1', 'example.com.' → 'example.com'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    name, sep, port = host.rpartition(":")
    host = name if sep and port.isdigit() else host
    return host.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return None


def is_loopback_host(name: str) -> bool:
    """Whether a bare name or address (no port, no brackets) is loopback: localhost, *.localhost (browsers resolve
    those to loopback themselves), 127.0.0.0/8 or ::1."""
    name = name.lower().rstrip(".")
    ip = _ip(name)
    return ip.is_loopback if ip is not None else name == "localhost" or name.endswith(".localhost")


class HostCheck:
    def __init__(self, bind_host: str, hostname: str, allowed: Iterable[str] = ()) -> None:
        """`bind_host`: the --host the server listens on; `hostname`: this machine's name; `allowed`: --allow-host
        patterns."""
        bound = bind_host.lower()
        self._hostname = hostname
        self._wildcard = bound in WILDCARD_HOSTS
        self._names = {bound} | ({hostname.lower(), f"{hostname.lower()}.local"} if self._wildcard else set())
        self._patterns = [
            re.compile("^" + "[^.]*".join(re.escape(part) for part in pattern.split("*")) + "$")
            for pattern in allowed
            if pattern != "*"
        ]
        self._any = "*" in allowed

    def allows(self, host_header: str) -> bool:
        name = host_name(host_header)
        return (
            self._any
            or is_loopback_host(name)
            or name in self._names
            or (self._wildcard and _ip(name) is not None)
            or any(pattern.match(name) for pattern in self._patterns)
        )

    def middleware(self):
        @web.middleware
        async def check_host(request: web.Request, handler) -> web.StreamResponse:
            host = request.headers.get("Host")
            if host is not None and not self.allows(host):
                return refusal_response(
                    request,
                    self._hostname,
                    f"Forbidden: Host '{host}' is not a name of this server (a "
                    f"web page reached through a re-pointed domain name, DNS rebinding, is "
                    f"refused); use localhost or 127.0.0.1, or start the server with --allow-host "
                    f"{host_name(host) or '<name>'} if that is a name it is reached by (Docker, a reverse proxy)",
                    403,
                )
            return await handler(request)

        return check_host
