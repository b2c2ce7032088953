"""Which long-running commands (chats) the module holds, running or waiting in its queue, as seen from the answers
that pass through the server, so that after a module crash a client asking about one hears that it was lost, not the
restarted module's "unknown commandId". Both books are bounded: the module holds a few chats at a time (one running,
a bounded queue), so only a client that starts chats and never reads them to the end leaves entries behind, and the
oldest go first.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_TRACKED_COMMANDS = 1000
HELD_STATES = {"running": "ran", "queued": "waited in the module's queue"}  # state → what the chat was doing
FINISHED_STATES = ("completed", "cancelled", "failed")


def _remember(book: OrderedDict, key: str, value: object) -> None:
    book[key] = value
    book.move_to_end(key)
    while len(book) > MAX_TRACKED_COMMANDS:
        book.popitem(last=False)


class CommandTracker:
    def __init__(self) -> None:
        self._held: OrderedDict[str, str] = OrderedDict()  # commandIds the running module knows, not finished → state
        self._lost: OrderedDict[str, str] = OrderedDict()  # commandId → why it was lost

    def saw_answer(self, answer: dict) -> None:
        """Notes a module answer: a command it runs or queues, or one that has finished."""
        command_id, state = answer.get("commandId"), answer.get("commandStatus")
        if not isinstance(command_id, str) or not command_id:
            return
        if state in HELD_STATES:
            _remember(self._held, command_id, state)
        elif state in FINISHED_STATES:
            self._held.pop(command_id, None)

    def module_stopped(self, reason: str) -> None:
        """The module died: every command it held is lost, with `reason` and what the chat was doing then."""
        for command_id, state in self._held.items():
            _remember(self._lost, command_id, f"{reason} while it {HELD_STATES[state]}")
        self._held.clear()

    def lost(self, command_id: str | None) -> str | None:
        """Why `command_id` was lost, or None if it was not."""
        return self._lost.get(command_id) if command_id else None

    def counts(self) -> tuple[int, int]:
        """(commands held, commands lost) in the books."""
        return len(self._held), len(self._lost)
