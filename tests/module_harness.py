"""Drives LlamaChat_adapter the way the SDK's main_loop does, without a server: requests are real RequestData
built from the queue's JSON, chats go through process(), and status/cancel through the handlers the SDK's loop
calls, _get_command_status / _cancel_command_task (the adapter's, answering from its chat queue)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from codeproject_ai_sdk import RequestData

from live_server import module_threads, poll
from llama_chat_adapter import LlamaChat_adapter

# LlamaChat's own live metrics in every chat status and result, on top of the fields of docs/protocol.md §2.2.
METRICS = {
    "model",
    "model_fallback",
    "prompt_tokens",
    "cached_tokens",
    "prefix_source",
    "restore_ms",
    "completion_tokens",
    "tokens_per_second",
    "time_to_first_token_ms",
    "elapsed_ms",
    "dropped_turns",
    "drafted_tokens",
    "accepted_tokens",
    "threads",
}


def request(command: str, **values: Any) -> RequestData:
    """A RequestData exactly as the server queues it: values are lists of strings."""
    payload = {
        "command": command,
        "files": [],
        "urlSegments": [],
        "values": [{"key": k, "value": [v if isinstance(v, str) else json.dumps(v)]} for k, v in values.items()],
    }
    return RequestData(json.dumps({"reqid": str(uuid.uuid4()), "reqtype": command, "payload": payload}))


def load_adapter(monkeypatch, model_path, **env: str) -> LlamaChat_adapter:
    monkeypatch.setenv("CPAI_MODULE_LLAMA_MODEL_DIR", str(model_path.parent))
    monkeypatch.setenv("CPAI_MODULE_LLAMA_MODEL_FILENAME", model_path.name)
    monkeypatch.setenv("CPAI_MODULE_LLAMA_THREADS", str(module_threads()))  # 1 unless the run exports another
    # The conversation cache's RAM tier as configured, its disk tier only where a test gives it a folder.
    monkeypatch.setenv("CPAI_MODULE_LLAMA_CACHE_DISK_GB", "0")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    adapter = LlamaChat_adapter()
    adapter.initialise()
    return adapter


def start_chat(adapter: LlamaChat_adapter, **values: Any) -> dict[str, Any]:
    """What the SDK answers to the chat request: an error, or the chat's 'running' or 'queued' acknowledgement."""
    return adapter.process(request("prompt", **values))


def status(adapter: LlamaChat_adapter, command_id: str) -> dict[str, Any]:
    return adapter._get_command_status(request("get_command_status", commandId=command_id))


def cancel(adapter: LlamaChat_adapter, command_id: str) -> dict[str, Any]:
    return adapter._cancel_command_task(request("cancel_command", commandId=command_id))


def wait_until(condition, timeout: float = 60.0, what: str = "condition"):
    """poll(), checking often: a module command moves on within milliseconds."""
    return poll(condition, timeout, what, interval=0.005)


def run_chat(adapter: LlamaChat_adapter, timeout: float = 120.0, **values: Any) -> dict[str, Any]:
    ack = start_chat(adapter, **values)
    assert ack["success"], ack
    final: dict[str, Any] | None = wait_until(
        lambda: (s := status(adapter, ack["commandId"]))["commandStatus"] == "completed" and s,
        timeout,
        "the chat to end",
    )
    return final
