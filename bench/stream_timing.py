"""Times a stream of OpenAI-style chat chunks (llama-cpp-python's and llama-server's) as its reader sees it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class StreamRun:
    ttft_ms: float | None  # from the call to the first chunk carrying text
    tokens: int  # chunks carrying text: one per token, as the module counts them
    tokens_per_second: float | None
    text: str


def tokens_per_second(tokens: int, first_at: float | None, last_at: float | None) -> float | None:
    """Generation speed as the module reports it: the tokens after the first one, over the time they took."""
    if tokens < 2 or first_at is None or last_at is None or last_at <= first_at:
        return None
    return (tokens - 1) / (last_at - first_at)


def time_stream(start: Callable[[], Iterable[dict[str, Any]]]) -> StreamRun:
    """Calls start() and reads the stream it returns to the end."""
    started = time.perf_counter()
    first_at = last_at = None
    parts = []
    for chunk in start():
        choices = chunk.get("choices") or [{}]
        text = (choices[0].get("delta") or {}).get("content")
        if text:
            last_at = time.perf_counter()
            first_at = first_at or last_at
            parts.append(text)
    return StreamRun(
        ttft_ms=None if first_at is None else (first_at - started) * 1000,
        tokens=len(parts),
        tokens_per_second=tokens_per_second(len(parts), first_at, last_at),
        text="".join(parts),
    )
