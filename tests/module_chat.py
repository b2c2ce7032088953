"""A client of the module's chat routes through a live server (tests/live_server.py), for the tests that drive
several chats: start, poll, cancel, follow to the end."""

from __future__ import annotations

import requests

from live_server import poll

STORY = "Write a very long story about a dragon who learns to bake bread. Describe every step in detail."
# A chat still running when a test looks, however fast the machine (the context is 2048).
LONG = {"prompt": STORY, "max_tokens": "1900"}


def post(base_url, route, **form):
    response = requests.post(f"{base_url}/v1/{route}", data=form, timeout=40)
    assert response.status_code == 200, response.text
    return response.json()


def start_chat(base_url, **form):
    ack = post(base_url, "text/chat", **form)
    assert ack["success"] is True, ack
    assert ack["commandStatus"] in ("running", "queued"), ack
    return ack


def status(base_url, command_id):
    return post(base_url, "LlamaChat/get_command_status", commandId=command_id)


def cancel(base_url, command_id):
    return post(base_url, "LlamaChat/cancel_command", commandId=command_id)


def follow(base_url, command_id, timeout=120, interval=0.05):
    """Polls the chat until it has completed; its final answer."""

    def completed():
        answer = status(base_url, command_id)
        assert answer["success"] is True or answer["commandStatus"] == "completed", answer
        return answer if answer["commandStatus"] == "completed" else None

    return poll(completed, timeout, f"chat {command_id} to complete", interval=interval)


def cancel_all(base_url, command_ids):
    for command_id in reversed(command_ids):  # the waiting ones first, so none starts meanwhile
        cancel(base_url, command_id)
    return [follow(base_url, command_id) for command_id in command_ids]
