"""The small types the parts of a chat pass between them, named once."""

from __future__ import annotations

# One turn of a conversation, as the route's `messages` input and create_chat_completion carry it:
# {"role": "user" | "assistant" | "system", "content": "..."}.
Message = dict[str, str]


def never() -> bool:
    """The cancel check of a chat nobody can cancel (a should_abort or cancelled callback's default)."""
    return False
