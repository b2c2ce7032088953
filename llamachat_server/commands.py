"""Which long-running commands (chats) the module holds, as seen from the answers that pass through the server,
so that after a module crash a client asking about one hears that it was lost, not the restarted module's
"not started". Both books are bounded: the module runs one chat at a time, so only a client that starts chats
and never reads them to the end leaves entries behind, and the oldest go first.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_TRACKED_COMMANDS = 1000
FINISHED_STATES = ("completed", "cancelled", "failed")


def _remember(book: OrderedDict, key: str, value: object) -> None:
    book[key] = value
    book.move_to_end(key)
    while len(book) > MAX_TRACKED_COMMANDS:
        book.popitem(last=False)


class CommandTracker:
    def __init__(self) -> None:
        self._held: OrderedDict[str, None] = OrderedDict()  # commandIds the running module knows, not finished
        self._lost: OrderedDict[str, str] = OrderedDict()  # commandId → why it was lost

    def saw_answer(self, answer: dict) -> None:
        """Notes a module answer: a command it runs, or one that has finished."""
        command_id, state = answer.get("commandId"), answer.get("commandStatus")
        if not isinstance(command_id, str) or not command_id:
            return
        if state == "running":
            _remember(self._held, command_id, None)
        elif state in FINISHED_STATES:
            self._held.pop(command_id, None)

    def module_stopped(self, reason: str) -> None:
        """The module died: every command it held is lost, with `reason`."""
        for command_id in self._held:
            _remember(self._lost, command_id, reason)
        self._held.clear()

    def lost(self, command_id: str | None) -> str | None:
        """Why `command_id` was lost, or None if it was not."""
        return self._lost.get(command_id) if command_id else None

    def counts(self) -> tuple[int, int]:
        """(commands held, commands lost) in the books."""
        return len(self._held), len(self._lost)
