"""Chatting through llamachat_server: real HTTP, the real SDK in the real module process, the real SmolLM2
model. Response fields are checked against docs/protocol.md §2.2 field for field."""

import pytest
import requests

from live_server import poll, reported_status_data, running_server
from module_harness import METRICS

# What every answer that went through the module carries (the SDK adds the first six, the server the rest).
ENVELOPE = {
    "moduleId",
    "moduleName",
    "code",
    "command",
    "requestId",
    "inferenceDevice",
    "analysisRoundTripMs",
    "processedBy",
    "timestampUTC",
}
ACK_FIELDS = ENVELOPE | {"success", "message", "commandId", "commandStatus"}
RUNNING_FIELDS = ACK_FIELDS | {"reply"}
COMPLETED_FIELDS = RUNNING_FIELDS | {"error", "stop_reason", "processMs", "inferenceMs"}
CANCEL_FIELDS = ACK_FIELDS
STORY = "Write a very long story about a dragon who learns to bake bread. Describe every step in detail."
# Tokens for the story: a reply still running when a test looks, however fast the machine (the context is 2048).
LONG = "1900"


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(smollm2) as url:
        yield url


def post(base_url, route, **form):
    response = requests.post(f"{base_url}/v1/{route}", data=form, timeout=40)
    assert response.status_code == 200, response.text
    return response.json()


def status(base_url, command_id):
    return post(base_url, "LlamaChat/get_command_status", commandId=command_id)


def start_chat(base_url, **form):
    ack = post(base_url, "text/chat", **form)
    assert ack["success"] is True, ack
    return ack


def follow(base_url, command_id, timeout=120):
    """Polls the chat to its end; returns (every running answer seen, the completed answer)."""
    running = []

    def finished():
        answer = status(base_url, command_id)
        assert answer["success"] is True or answer["commandStatus"] == "completed", answer
        if answer["commandStatus"] == "running":
            running.append(answer)
            return None
        return None if answer["commandStatus"] == "queued" else answer

    final = poll(finished, timeout, f"chat {command_id} to complete", interval=0.01)
    return running, final


def assert_fields(answer, expected):
    keys = set(answer)
    assert expected <= keys, f"missing {expected - keys}"
    assert keys - expected <= METRICS, f"unexpected {keys - expected - METRICS}"


def test_form_chat_streams_a_growing_reply(base_url):
    """While the chat runs, the reply grows in every answer, and the server answers some polls itself from the
    module's reply channel (docs/protocol.md §1.10): the module's latest answer, updated by the lines since, so it
    keeps that answer's requestId. Every answer is as the module's would be; the reply and its token count only
    grow."""
    ack = start_chat(base_url, prompt=STORY, max_tokens=LONG, temperature="0")
    assert set(ack) == ACK_FIELDS
    assert ack["message"] == "Command is running in the background"
    assert ack["commandStatus"] == "running"
    assert ack["code"] == 200
    assert ack["command"] == "prompt"
    assert ack["commandId"] == ack["requestId"]
    assert ack["moduleId"] == "LlamaChat"
    assert ack["processedBy"] == "localhost"

    running = []

    def grown_and_answered_by_the_server():
        answer = status(base_url, ack["commandId"])
        running.append(answer)
        grown = len({answer["reply"] for answer in running if answer["reply"]}) >= 2
        return grown and len({answer["requestId"] for answer in running}) < len(running)

    poll(grown_and_answered_by_the_server, 60, "the reply to grow, and a poll the server answered", interval=0.01)
    post(base_url, "LlamaChat/cancel_command", commandId=ack["commandId"])
    _, final = follow(base_url, ack["commandId"])
    for answer in running:
        assert_fields(answer, RUNNING_FIELDS)
        assert answer["success"] is True
        assert answer["commandStatus"] == "running"
        assert answer["message"] == "The long running command is still in progress"
        assert answer["command"] == "get_command_status"
        assert answer["requestId"] != ack["commandId"]
        assert answer["commandId"] == ack["commandId"]
    partials = [answer["reply"] for answer in running if answer["reply"]]
    assert all(final["reply"].startswith(partial) for partial in partials)
    assert [len(p) for p in partials] == sorted(len(p) for p in partials)
    tokens = [answer["completion_tokens"] for answer in running if "completion_tokens" in answer]
    assert tokens == sorted(tokens) and tokens[-1] <= final["completion_tokens"]


def test_form_chat_completes_with_every_field(base_url):
    ack = start_chat(base_url, prompt="List the colours of the rainbow.", max_tokens="40", temperature="0")
    running, final = follow(base_url, ack["commandId"])
    assert all(final["reply"].startswith(answer["reply"]) for answer in running)  # if any was seen: fast or not
    assert_fields(final, COMPLETED_FIELDS)
    assert final["success"] is True
    assert final["error"] is None
    assert final["message"] == "Command has completed"
    assert final["commandStatus"] == "completed"
    assert final["stop_reason"] in ("completed", "length")
    assert final["reply"].strip()
    assert final["completion_tokens"] <= 40
    assert isinstance(final["processMs"], int)
    assert isinstance(final["inferenceMs"], int)


def test_json_request_payload_chat_works_too(base_url):
    body = {"values": [{"key": "prompt", "value": ["Say hello."]}, {"key": "max_tokens", "value": ["12"]}]}
    response = requests.post(f"{base_url}/v1/text/chat", json=body, timeout=40)
    ack = response.json()
    assert ack["success"] is True, ack
    assert ack["commandStatus"] == "running", ack
    _, final = follow(base_url, ack["commandId"])
    assert final["success"] is True
    assert final["reply"].strip()
    assert final["completion_tokens"] <= 12


def test_cancel_mid_reply_keeps_the_partial_reply(base_url):
    ack = start_chat(base_url, prompt=STORY, max_tokens=LONG)
    partial = poll(
        lambda: status(base_url, ack["commandId"])["reply"], 60, "the first words of the reply", interval=0.01
    )

    cancelled = post(base_url, "LlamaChat/cancel_command", commandId=ack["commandId"])
    assert set(cancelled) == CANCEL_FIELDS
    assert cancelled["success"] is True
    assert cancelled["message"] == "The command has been cancelled"
    assert cancelled["commandId"] == ack["commandId"]
    assert cancelled["commandStatus"] == "cancelled"
    assert cancelled["command"] == "cancel_command"
    assert cancelled["requestId"] != ack["commandId"]

    _, final = follow(base_url, ack["commandId"])
    assert_fields(final, COMPLETED_FIELDS)
    assert final["stop_reason"] == "cancelled"
    assert final["reply"].startswith(partial)
    assert final["reply"].strip()
    assert final["completion_tokens"] < int(LONG)


def test_a_second_chat_while_one_runs_waits_in_the_queue(base_url):
    first = start_chat(base_url, prompt=STORY, max_tokens=LONG)
    second = start_chat(base_url, prompt="Hello?", max_tokens="8")
    assert set(second) == ACK_FIELDS | {"queue_position", "estimated_wait_s"}
    assert second["commandStatus"] == "queued"
    assert second["queue_position"] == 1
    assert second["code"] == 200
    assert second["commandId"] == second["requestId"] != first["commandId"]
    assert first["commandId"] not in str(second)  # nobody else's chat id is handed out (docs/protocol.md §4.2, item 5)
    waiting = status(base_url, second["commandId"])
    assert_fields(waiting, ACK_FIELDS | {"reply", "queue_position", "estimated_wait_s"})
    assert waiting["commandStatus"] == "queued"
    assert waiting["reply"] == ""
    assert waiting["queue_position"] == 1
    post(base_url, "LlamaChat/cancel_command", commandId=first["commandId"])
    follow(base_url, first["commandId"])
    _, final = follow(base_url, second["commandId"])  # it starts once the first has ended
    assert final["success"] is True
    assert final["reply"].strip()
    assert final["stop_reason"] in ("completed", "length")


@pytest.mark.parametrize(
    "form, error",
    [
        ({"commandId": "no-such-command"}, "No chat has this commandId"),
        ({}, "No command ID provided"),
    ],
)
def test_unknown_or_missing_command_id_gets_a_clear_error(base_url, form, error):
    ack = start_chat(base_url, prompt="Hi", max_tokens="4")
    follow(base_url, ack["commandId"])
    for route in ("LlamaChat/get_command_status", "LlamaChat/cancel_command"):
        answer = post(base_url, route, **form)
        assert answer["success"] is False, answer
        assert error in answer["error"], answer
        assert ack["commandId"] not in str(answer)


def test_bad_chat_input_is_refused_before_a_command_starts(base_url):
    answer = post(base_url, "text/chat", prompt="Hi", max_tokens="lots")
    assert answer["success"] is False
    assert "max_tokens" in answer["error"]
    assert "commandId" not in answer


def test_the_adaptive_default_shows_its_thread_count_in_the_status_and_the_log(smollm2):
    from live_server import server_log_path
    from llamachat.thread_policy import default_max_threads

    with running_server(smollm2, CPAI_MODULE_LLAMA_THREADS="0") as url:
        assert "adaptive threads (up to" in server_log_path(url).read_text()
        status_data = reported_status_data(url)
        assert status_data["threadMode"] == "adaptive"
        assert 1 <= status_data["threads"] <= default_max_threads()
        ack = start_chat(url, prompt=STORY, max_tokens="24", temperature="0")
        running, final = follow(url, ack["commandId"])
        for answer in running + [final]:
            assert answer["threads"] is None or 1 <= answer["threads"] <= default_max_threads()
        assert final["success"]
        assert 1 <= final["threads"] <= default_max_threads()
