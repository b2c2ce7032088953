"""The route map: which module queue and command answer `POST /v1/<route>` (docs/protocol.md §2.1).

Routes compare case-insensitively; a path longer than a route still matches it, the longest route
winning, and the rest of the path becomes the request's urlSegments (`/v1/text/chat/a/b` → ["a", "b"]).
One deliberate difference from the real server: a route matches only at a `/` boundary, so a typo
like `/v1/text/chats` is a 404 rather than a chat with urlSegments ["s"].
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import ModuleSettings, lookup

# Every module also answers these two, for long-running commands (docs/protocol.md §2.1).
STATUS_COMMAND = "get_command_status"
SYSTEM_COMMANDS = (STATUS_COMMAND, "cancel_command")


@dataclass(frozen=True)
class Route:
    path: str  # lower-case, without surrounding slashes: "text/chat"
    method: str  # upper-case: "POST"
    queue: str
    command: str
    module_id: str
    takes_files: bool = False  # an input of Type "File": the request body may be large


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    url_segments: list[str]


def _normalise(path: str) -> str:
    return path.strip("/").lower()


class RouteMap:
    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Route] = {}

    def register(self, route: Route) -> None:
        self._routes[(route.method, route.path)] = route

    def register_module(self, settings: ModuleSettings) -> None:
        """The module's RouteMaps plus the system routes `<ModuleId>/get_command_status|cancel_command`."""
        for route_map in settings.route_maps:
            self.register(
                Route(
                    path=_normalise(lookup(route_map, "Route", default="")),
                    method=str(lookup(route_map, "Method", default="POST")).upper(),
                    queue=settings.queue,
                    command=lookup(route_map, "Command", default=""),
                    module_id=settings.module_id,
                    takes_files=any(
                        str(lookup(item, "Type", default="")).lower() == "file"
                        for item in lookup(route_map, "Inputs", default=[]) or []
                        if isinstance(item, dict)
                    ),
                )
            )
        for command in SYSTEM_COMMANDS:
            self.register(
                Route(
                    _normalise(f"{settings.module_id}/{command}"), "POST", settings.queue, command, settings.module_id
                )
            )

    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def match(self, method: str, path: str) -> RouteMatch | None:
        wanted = _normalise(path)
        best: Route | None = None
        for (route_method, route_path), route in self._routes.items():
            if route_method != method.upper():
                continue
            if wanted == route_path or wanted.startswith(route_path + "/"):
                if best is None or len(route_path) > len(best.path):
                    best = route
        if best is None:
            return None
        rest = path.strip("/")[len(best.path) :]
        return RouteMatch(best, [segment for segment in rest.split("/") if segment])
