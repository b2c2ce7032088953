"""The server log: what the server does and what its module says (POST /v1/log/, stdout, stderr).

Entries are kept in memory for `GET /v1/log/list` (the dashboard's shape: id, timestamp, entry, level,
category, label) and echoed to the console from a chosen level up.
"""
from __future__ import annotations

import re
import sys
from collections import deque
from datetime import datetime, timezone
from typing import TextIO

LEVELS = ("trace", "debug", "information", "warning", "error", "critical")
_ALIASES = {"trce": "trace", "dbug": "debug", "info": "information", "warn": "warning",
            "fail": "error", "crit": "critical"}
# A stdout line that starts like "warning: ..." or "Info: ..." carries its own level (docs/protocol.md §1.1).
_LEVEL_PREFIX = re.compile(r"^\s*(" + "|".join(LEVELS + tuple(_ALIASES)) + r"):\s?", re.IGNORECASE)
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def normalise_level(level: str | None, default: str = "information") -> str:
    name = (level or "").strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in LEVELS else default


def split_level_prefix(line: str, default: str) -> tuple[str, str]:
    """'warning: disk low' → ('warning', 'disk low'); a line without a level prefix keeps `default`."""
    match = _LEVEL_PREFIX.match(line)
    if not match:
        return default, line
    return normalise_level(match.group(1)), line[match.end():]


class ServerLog:
    def __init__(self, capacity: int = 5000, echo: TextIO | None = sys.stdout,
                 echo_level: str = "information") -> None:
        self._entries: deque[dict] = deque(maxlen=capacity)
        self._next_id = 1
        self._echo = echo
        self._echo_from = LEVELS.index(normalise_level(echo_level))

    def add(self, entry: str, level: str = "information", category: str = "Server", label: str = "") -> dict:
        record = {
            "id": self._next_id,
            "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "entry": _ANSI_COLOUR.sub("", entry),
            "level": normalise_level(level),
            "category": category,
            "label": label,
        }
        self._next_id += 1
        self._entries.append(record)
        if self._echo is not None and LEVELS.index(record["level"]) >= self._echo_from:
            print(f"{record['timestamp'][11:19]} {record['level']:<11} [{category}] {record['entry']}",
                  file=self._echo, flush=True)
        return record

    def list(self, last_id: int = 0, count: int = 10) -> list[dict]:
        """The oldest `count` entries newer than `last_id`, so a poller passing its last id misses none."""
        newer = [record for record in self._entries if record["id"] > last_id]
        return newer[:max(count, 0)]
