"""Times a stream of OpenAI-style chat chunks (llama-cpp-python's and llama-server's) as its reader sees it, and reads
an OpenAI-compatible server's stream with as little work per chunk as a client can do (`sse_chunks`)."""

from __future__ import annotations

import http.client
import json
import math
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class StreamRun:
    ttft_ms: float | None  # from the call to the first chunk carrying text
    tokens: int  # chunks carrying text: one per token, as the module counts them
    tokens_per_second: float | None
    text: str
    gap_median_ms: float | None  # between consecutive chunks carrying text: the cadence a reader sees
    gap_p95_ms: float | None


def tokens_per_second(tokens: int, first_at: float | None, last_at: float | None) -> float | None:
    """Generation speed as the module reports it: the tokens after the first one, over the time they took."""
    if tokens < 2 or first_at is None or last_at is None or last_at <= first_at:
        return None
    return (tokens - 1) / (last_at - first_at)


def chunk_gaps(times: list[float]) -> dict[str, float | None]:
    """The median and 95th percentile (nearest rank) of the gaps between chunks arriving at `times` (seconds), in ms."""
    gaps = sorted((later - earlier) * 1000 for earlier, later in zip(times, times[1:]))
    if not gaps:
        return {"gap_median_ms": None, "gap_p95_ms": None}
    p95 = gaps[max(0, math.ceil(0.95 * len(gaps)) - 1)]
    return {"gap_median_ms": round(statistics.median(gaps), 2), "gap_p95_ms": round(p95, 2)}


def time_stream(start: Callable[[], Iterable[dict[str, Any]]]) -> StreamRun:
    """Calls start() and reads the stream it returns to the end."""
    started = time.perf_counter()
    times, parts = [], []
    for chunk in start():
        choices = chunk.get("choices") or [{}]
        text = (choices[0].get("delta") or {}).get("content")
        if text:
            times.append(time.perf_counter())
            parts.append(text)
    first_at, last_at = (times[0], times[-1]) if times else (None, None)
    return StreamRun(
        ttft_ms=None if first_at is None else (first_at - started) * 1000,
        tokens=len(parts),
        tokens_per_second=tokens_per_second(len(parts), first_at, last_at),
        text="".join(parts),
        **chunk_gaps(times),
    )


class StreamRefused(RuntimeError):
    """The server answered the chat with another HTTP status than 200."""


def sse_chunks(port: int, body: dict[str, Any], timeout: float = 120.0) -> Iterator[dict[str, Any]]:
    """POSTs an OpenAI chat completion body with stream: true to the server on loopback `port`; yields its chunks,
    decoded with json alone (the `openai` package spends several times this per chunk, on the same cores)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise StreamRefused(f"HTTP {response.status}: {response.read()[:300]!r}")
        for line in response:  # server-sent events: "data: {chunk}" lines, then "data: [DONE]"
            data = line.decode("utf-8").strip()
            if not data.startswith("data:"):
                continue
            data = data[len("data:") :].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
    finally:
        connection.close()
