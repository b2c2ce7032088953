"""What every part of the server shares: its configuration and the live parts built from it."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .commands import CommandTracker
from .module_process import ModuleProcess
from .queues import RequestQueues
from .reply_feed import ReplyFeed
from .routes import RouteMap
from .server_log import ServerLog
from .settings import ModuleSettings

DEFAULT_PORT = 32168
DEFAULT_RESPONSE_TIMEOUT = 30.0  # the real server's response timeout (docs/protocol.md §2.2)


def default_data_dir() -> Path:
    """Where the module's fallback log files go (CPAI_APPROOTPATH/logs), outside the module folder."""
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "llamachat-server"


@dataclass
class ServerConfig:
    module_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port
    python: str = sys.executable
    env_overrides: dict[str, str] = field(default_factory=dict)  # applied last to the module's environment
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    data_dir: Path = field(default_factory=default_data_dir)
    log_level: str = "information"  # the lowest level echoed to the console
    launch_module: bool = True  # False: serve only, for a module started by hand (e.g. in a debugger)
    allowed_origins: list[str] = field(default_factory=list)  # web origins allowed beyond this machine's (cors.py)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names allowed beyond this server's (host_check.py)
    api_keys: list[str] = field(default_factory=list)  # none: no key needed (api_keys.py)
    # False: no reply channel; the OpenAI API follows chats by get_command_status polls only, and every poll goes to
    # the module, as under the real server (the channel's "before", for bench/openai_stream.py and tests)
    reply_channel: bool = True


@dataclass
class ServerState:
    config: ServerConfig
    settings: ModuleSettings
    routes: RouteMap
    queues: RequestQueues
    log: ServerLog
    module: ModuleProcess
    commands: CommandTracker
    reply_feed: ReplyFeed | None = None  # the launched module's pieces of replies as they grow (reply_feed.py)
    hostname: str = field(default_factory=socket.gethostname)

    def is_our_module(self, module_id: str | None) -> bool:
        return (module_id or "").lower() == self.settings.module_id.lower()


STATE = web.AppKey("state", ServerState)
