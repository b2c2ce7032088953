"""Drives LlamaChat_adapter the way the SDK's main_loop does, without a server: requests are real RequestData
built from the queue's JSON, long processes run in a worker thread, and status/cancel go through the SDK's own
_get_command_status / _cancel_command_task."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from codeproject_ai_sdk import RequestData

from live_server import poll
from llama_chat_adapter import LlamaChat_adapter

_executor = ThreadPoolExecutor(max_workers=2)

# LlamaChat's own live metrics in every chat status and result, on top of the fields of docs/protocol.md §2.2.
METRICS = {
    "model",
    "model_fallback",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "tokens_per_second",
    "time_to_first_token_ms",
    "elapsed_ms",
    "dropped_turns",
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
    # One thread: two collapse when anything else wants a core of a 2-core machine (see tests/live_server.py).
    monkeypatch.setenv("CPAI_MODULE_LLAMA_THREADS", "1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    adapter = LlamaChat_adapter()
    adapter.initialise()
    return adapter


def start_chat(adapter: LlamaChat_adapter, **values: Any) -> dict[str, Any]:
    """What the SDK answers to the chat request: an error, the busy refusal, or the 'running' acknowledgement."""
    data = request("prompt", **values)
    output = adapter.process(data)
    if not callable(output):
        return output
    task = adapter.long_running_command_task
    if task is not None and not task.done():
        return {
            "success": False,
            "commandId": adapter.long_running_command_id,
            "error": "A long running command is already in progress",
        }
    adapter.long_running_command_id = data.request_id
    adapter.last_long_running_output = None
    adapter.long_running_command_task = _executor.submit(output, data)
    return {"success": True, "commandId": data.request_id, "commandStatus": "running"}


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
