"""The server's OpenAI-compatible stream (POST /v1/chat/completions, stream=True) as the `openai` package's client
sees it, with the module's own figures for the same chat: an engine of `python -m bench` and of bench.openai_stream.

Goals: client TTFT − module TTFT ≤ 60 ms; stream tokens/s ≥ 0.97 × raw llama-cpp-python.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai

from llamachat_server.openai_api import COMMAND_ID_HEADER

from .stream_timing import chunk_gaps, sse_chunks, time_stream
from .workload import FLUSH_PROMPT, FLUSH_SYSTEM_PROMPT, SAMPLING, chat_messages

TTFT_GAP_GOAL_MS = 60.0
SPEED_GOAL = 0.97  # × raw llama-cpp-python's tokens/s
# A chat with another system prompt: the next finds (almost) none of its prompt cached.
FLUSH_MESSAGES = [{"role": "system", "content": FLUSH_SYSTEM_PROMPT}, {"role": "user", "content": FLUSH_PROMPT}]
# What OpenAI's API has no field for goes in extra_body, as llama.cpp's servers take it.
EXTRA_SAMPLING = {name: SAMPLING[name] for name in ("top_k", "min_p", "repeat_penalty")}


class OpenAIStreamEngine:
    """The server's /v1/chat/completions, streamed through the real openai client; the module's own figures for
    the same chat are read from get_command_status afterwards (its commandId comes in the X-LlamaChat-Command-Id
    header; the completion's id is a random one of its own). Another server (llama-server) sends no such header: its
    chats get no module figures."""

    def __init__(self, base_url: str, tokenize) -> None:
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=300)
        self.tokenize = tokenize  # the model's tokenizer, to count the tokens of the first chunk

    def _create(self, messages: list[dict], max_tokens: int, **options: Any):
        sampling = {"temperature": SAMPLING["temperature"], "top_p": SAMPLING["top_p"]}
        return self.client.chat.completions.create(
            model="bench", messages=messages, max_tokens=max_tokens, extra_body=EXTRA_SAMPLING, **sampling, **options
        )

    def _module_final(self, command_id: str) -> dict[str, Any]:
        body = f"commandId={command_id}".encode()
        with urllib.request.urlopen(f"{self.base_url}/v1/LlamaChat/get_command_status", body, timeout=30) as answer:
            return json.load(answer)

    def flush(self) -> None:
        """A chat with another system prompt, so the next finds (almost) none of its prompt cached."""
        self._create(FLUSH_MESSAGES, 1)

    def chat(self, prompt: str, history: list[dict[str, str]], max_tokens: int, fresh: bool) -> dict[str, Any]:
        if fresh:
            self.flush()
        sent = time.perf_counter()
        stream = self._create(
            chat_messages(prompt, history), max_tokens, stream=True, stream_options={"include_usage": True}
        )
        command_id = stream.response.headers.get(COMMAND_ID_HEADER)
        times, parts, used = [], [], None
        for chunk in stream:
            used = chunk.usage or used
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                times.append(time.perf_counter())
                parts.append(text)
        first_at, last_at = times[0], times[-1]
        module = self._module_final(command_id) if command_id else {}
        module_ttft = module.get("time_to_first_token_ms")
        # A chunk carries the tokens generated since the server's last status poll: the speed counts the tokens after
        # the first chunk's over the time between the first and the last chunk, as raw's counts those after its first.
        after_first = used.completion_tokens - len(self.tokenize(parts[0].encode(), add_bos=False, special=True))
        ttft_ms = (first_at - sent) * 1000
        return {
            "ttft_ms": round(ttft_ms, 1),
            "tokens": used.completion_tokens,
            "tokens_per_second": after_first / (last_at - first_at) if last_at > first_at else None,
            "chunks": len(parts),
            "tokens_per_chunk": round(used.completion_tokens / len(parts), 2),
            **chunk_gaps(times),
            "module_ttft_ms": module_ttft,
            "module_tokens_per_second": module.get("tokens_per_second"),
            "ttft_gap_ms": None if module_ttft is None else round(ttft_ms - module_ttft, 1),
            "text": "".join(parts),
        }


class PlainStreamEngine:
    """The server's /v1/chat/completions, streamed and read with json alone (stream_timing.sse_chunks), as
    bench/llama_server.py reads llama-server: what the server's stream costs, without the `openai` package's own work
    per chunk on the same cores."""

    def __init__(self, base_url: str) -> None:
        self.port = int(base_url.rsplit(":", 1)[1])

    def chat(self, prompt: str, history: list[dict[str, str]], max_tokens: int, fresh: bool) -> dict[str, Any]:
        if fresh:
            list(self._stream(FLUSH_MESSAGES, 1))
        used: dict[str, Any] = {}

        def chunks() -> Iterator[dict[str, Any]]:
            for chunk in self._stream(chat_messages(prompt, history), max_tokens):
                used.update(chunk.get("usage") or {})
                yield chunk

        run = vars(time_stream(chunks))
        # time_stream counts the chunks that carry text as tokens; the usage chunk says how many tokens they held.
        chunks_with_text, tokens = run["tokens"], used.get("completion_tokens")
        per_chunk = round(tokens / chunks_with_text, 2) if tokens and chunks_with_text else None
        return {**run, "tokens": tokens, "chunks": chunks_with_text, "tokens_per_chunk": per_chunk}

    def _stream(self, messages: list[dict], max_tokens: int) -> Iterator[dict[str, Any]]:
        options = {"stream": True, "stream_options": {"include_usage": True}, **SAMPLING}
        return sse_chunks(self.port, {"messages": messages, "max_tokens": max_tokens, **options})
