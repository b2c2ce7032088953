"""The module as a client sees it, through our standalone server: chats for the shared measurements, and the
module-only ones (cancel latency, memory over many chats)."""

import time
from typing import Any

from tests.live_server import rss_mb

from .cpai_client import ChatFailed, ChatTrace, CpaiClient
from .memory import rss_curve
from .stats import summary
from .workload import (
    FLUSH_PROMPT,
    FLUSH_SYSTEM_PROMPT,
    GENERATION_PROMPT,
    SAMPLING,
    SYSTEM_PROMPT,
    Settings,
    memory_prompt,
)

# After asking for a cancel the client polls this often, so that it sees the end within a few ms of it.
CANCEL_POLL_S = 0.005
# Cancel during generation once this many tokens have been streamed, in a chat far from its own end.
CANCEL_AFTER_TOKENS = 16
CANCELLED_CHAT_MAX_TOKENS = 1024
# Cancel during prompt processing this long after the module began with the prompt: well inside its evaluation
# (which takes seconds for the long prompt on a CPU), past the quick tokenizing before it.
CANCEL_INTO_PROMPT_S = 0.2


def chat_fields(
    prompt: str, history: list[dict[str, str]], max_tokens: int, system_prompt: str = SYSTEM_PROMPT
) -> dict[str, Any]:
    fields = {"prompt": prompt, "system_prompt": system_prompt, "max_tokens": max_tokens, **SAMPLING}
    if history:
        fields["messages"] = history
    return fields


def _completed(trace: ChatTrace) -> dict[str, Any]:
    if not trace.final.get("success"):
        raise ChatFailed(f"the chat failed: {trace.final.get('error') or trace.final}")
    return trace.final


class ModuleEngine:
    """The module behind our standalone server, chatted with as the Explorer page does."""

    def __init__(self, client: CpaiClient, settings: Settings, module_pid: int) -> None:
        self.client = client
        self.module_pid = module_pid  # the module's process, whose memory measure_memory reads
        self.poll_s = settings.poll_interval_s

    def flush(self) -> None:
        """A tiny chat with another system prompt: the next chat finds (almost) none of its prompt cached."""
        _completed(self.client.chat(chat_fields(FLUSH_PROMPT, [], 1, FLUSH_SYSTEM_PROMPT), self.poll_s))

    def chat(self, prompt: str, history: list[dict[str, str]], max_tokens: int, fresh: bool) -> dict[str, Any]:
        if fresh:
            self.flush()
        trace = self.client.chat(chat_fields(prompt, history, max_tokens), self.poll_s)
        final = _completed(trace)
        return {
            "ttft_ms": trace.client_ttft_ms(),
            "tokens": final["completion_tokens"],
            "tokens_per_second": trace.client_tokens_per_second(),
            "module_ttft_ms": final["time_to_first_token_ms"],
            "module_tokens_per_second": final["tokens_per_second"],
            "prompt_tokens": final["prompt_tokens"],
            "cached_tokens": final["cached_tokens"],
            "polls": len(trace.polls),
            "text": final["reply"],
        }


def _cancel_and_wait(client: CpaiClient, trace: ChatTrace) -> dict[str, Any]:
    """Cancels the chat, then polls closely until the module reports it ended; the latency is client-visible."""
    tokens_before = trace.polls[-1].completion_tokens
    asked = time.perf_counter()
    answer = client.cancel(trace)
    if not answer.get("success") and client.poll(trace).running:
        raise ChatFailed(f"cancel_command failed: {answer.get('error') or answer}")
    while trace.polls[-1].running and client.poll(trace).running:
        time.sleep(CANCEL_POLL_S)
    final = trace.final
    # A chat that ended on its own before the cancel reached it measured nothing: its latency is left out.
    late = final.get("stop_reason") != "cancelled"
    return {
        "latency_ms": None if late else round((trace.polls[-1].at - asked) * 1000, 2),
        "stop_reason": final.get("stop_reason"),
        "tokens_at_cancel": tokens_before,
        "tokens_after_cancel": final.get("completion_tokens", 0) - tokens_before,
        "prompt_tokens": final.get("prompt_tokens"),
    }


def cancel_during_generation(engine: ModuleEngine, settings: Settings) -> dict[str, Any]:
    runs = []
    for _ in range(settings.cancel_repeats):
        trace = engine.client.start_chat(chat_fields(GENERATION_PROMPT, [], CANCELLED_CHAT_MAX_TOKENS))
        while engine.client.poll(trace).completion_tokens < CANCEL_AFTER_TOKENS:
            if not trace.polls[-1].running:
                raise ChatFailed("the chat ended before it could be cancelled")
            time.sleep(engine.poll_s)
        runs.append(_cancel_and_wait(engine.client, trace))
    return _cancel_summary(runs)


def cancel_during_prompt(engine: ModuleEngine, settings: Settings, prompt: str) -> dict[str, Any]:
    runs = []
    for _ in range(settings.cancel_repeats):
        engine.flush()  # a cancelled evaluation leaves part of the prompt cached: start cold every time
        trace = engine.client.start_chat(chat_fields(prompt, [], 16))
        while not engine.client.poll(trace).prompt_tokens:  # the module has begun evaluating the prompt
            time.sleep(CANCEL_POLL_S)
        time.sleep(CANCEL_INTO_PROMPT_S)
        runs.append(_cancel_and_wait(engine.client, trace))
    result = _cancel_summary(runs)
    # A cancel that came after the first token measured the wrong thing: say so in the results.
    result["all_during_prompt"] = all(r["tokens_at_cancel"] == 0 and r["tokens_after_cancel"] == 0 for r in runs)
    return result


def _cancel_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latency_ms": summary(r["latency_ms"] for r in runs),
        "tokens_after_cancel": summary(r["tokens_after_cancel"] for r in runs),
        "all_cancelled": all(r["stop_reason"] == "cancelled" for r in runs),
        "runs": runs,
    }


def measure_memory(engine: ModuleEngine, settings: Settings) -> dict[str, Any]:
    """The module process's resident memory after loading, then along many different chats."""

    def chat(i: int) -> None:
        _completed(engine.client.chat(chat_fields(memory_prompt(i), [], settings.memory_chat_tokens), engine.poll_s))

    return rss_curve(chat, lambda: rss_mb(engine.module_pid), settings.memory_chats)
