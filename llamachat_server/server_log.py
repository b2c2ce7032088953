"""The server log: what the server does and what its module says (POST /v1/log/, stdout, stderr).

Entries are kept in memory for `GET /v1/log/list` (the dashboard's shape: id, timestamp, entry, level,
category, label) and echoed to the console from a chosen level up. Whatever a client or module sends, the log
stays small: long entries are cut (with a marker saying how much), and the oldest entries go once the log holds
too many or too many characters.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections import deque
from datetime import datetime, timezone
from typing import Any, TextIO

LEVELS = ("trace", "debug", "information", "warning", "error", "critical")
_ALIASES = {
    "trce": "trace",
    "dbug": "debug",
    "info": "information",
    "warn": "warning",
    "fail": "error",
    "crit": "critical",
}
# A stdout line that starts like "warning: ..." or "Info: ..." carries its own level (docs/protocol.md §1.1).
_LEVEL_PREFIX = re.compile(r"^\s*(" + "|".join(LEVELS + tuple(_ALIASES)) + r"):\s?", re.IGNORECASE)
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# What a terminal acts on rather than shows: C0 controls but tab and newline (CR rewrites the line, ESC starts cursor,
# erase and title sequences), DEL, C1 controls, and Unicode's bidirectional overrides and line separators. A client's
# path or body reaches the log (a refused request, a module's echo), so these are shown escaped, never sent raw.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
CONTINUATION = "\n    "  # how a console entry's next lines start, so no line of an entry can pass for an entry

MAX_ENTRY_CHARS = 8 * 1024  # a traceback line or a model dump line fits; a 5 MB "entry" does not
MAX_NAME_CHARS = 100  # category and label
MAX_LOG_CHARS = 8 * 1024 * 1024
MAX_LIST_COUNT = 1000  # entries per GET /v1/log/list; a poller pages on with last_id


def normalise_level(level: str | None, default: str = "information") -> str:
    name = (level or "").strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in LEVELS else default


def truncated(text: str, limit: int) -> str:
    """`text` cut to about `limit` characters, with a marker saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [... {len(text) - limit} more characters cut]"


def escape_controls(text: str) -> str:
    """`text` with every control character but tab and newline written as an escape: '\\x1b', '\\u202e'."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def split_level_prefix(line: str, default: str) -> tuple[str, str]:
    """'warning: disk low' → ('warning', 'disk low'); a line without a level prefix keeps `default`."""
    match = _LEVEL_PREFIX.match(line)
    if not match:
        return default, line
    return normalise_level(match.group(1)), line[match.end() :]


class ServerLog:
    def __init__(
        self,
        capacity: int = 5000,
        echo: TextIO | None = sys.stdout,
        echo_level: str = "information",
        max_chars: int = MAX_LOG_CHARS,
    ) -> None:
        self._entries: deque[dict] = deque()
        self._capacity = capacity
        self._max_chars = max_chars
        self._chars = 0
        self._next_id = 1
        self._echo = echo
        self._echo_from = LEVELS.index(normalise_level(echo_level))

    def add(self, entry: str, level: str = "information", category: str = "Server", label: str = "") -> dict:
        record: dict[str, Any] = {
            "id": self._next_id,
            "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "entry": escape_controls(_ANSI_COLOUR.sub("", truncated(entry, MAX_ENTRY_CHARS))),
            "level": normalise_level(level),
            "category": escape_controls(truncated(category, MAX_NAME_CHARS).replace("\n", " ")),
            "label": escape_controls(truncated(label, MAX_NAME_CHARS).replace("\n", " ")),
        }
        self._next_id += 1
        self._entries.append(record)
        self._chars += _size(record)
        while len(self._entries) > self._capacity or self._chars > self._max_chars:
            self._chars -= _size(self._entries.popleft())
        if self._echo is not None and LEVELS.index(record["level"]) >= self._echo_from:
            print(
                f"{record['timestamp'][11:19]} {record['level']:<11} [{record['category']}] "
                f"{record['entry'].replace(chr(10), CONTINUATION)}",
                file=self._echo,
                flush=True,
            )
        return record

    def list(self, last_id: int = 0, count: int = 10) -> list[dict]:
        """The oldest `count` (at most MAX_LIST_COUNT) entries newer than `last_id`, so a poller passing its last
        id misses none that are still kept."""
        newer = (record for record in self._entries if record["id"] > last_id)
        return list(itertools.islice(newer, min(max(count, 0), MAX_LIST_COUNT)))

    @property
    def chars(self) -> int:
        """The characters the kept entries hold (their text, category and label)."""
        return self._chars


def _size(record: dict) -> int:
    return len(record["entry"]) + len(record["category"]) + len(record["label"])
