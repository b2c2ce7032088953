"""Faults injected into a live llamachat_server with the real module on SmolLM2: kill -9 of the module mid-chat and
mid-prepare, SIGTERM of the server mid-chat, a truncated GGUF, clients that disconnect mid-request. Nothing hangs,
every client gets a clear answer, and the next chat works."""

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import psutil
import pytest
import requests

from live_server import ROOT, ServerThread, poll, reported_status_data, running_server, server_log_path, server_status
from llamachat_server.server_state import ServerConfig

STORY = "Write a very long story about a lighthouse keeper and her cat. Describe every single day in detail."
# Cannot end early at any speed: the story asks for far more than 1500 tokens... and if the model stops anyway, the
# assertions below hold either way (a crash loses whatever the module held).
LONG_REPLY = {"prompt": STORY, "max_tokens": "1500"}
HISTORY = json.dumps(
    [
        {"role": "user", "content": f"Tell me fact number {i} about lighthouses, in detail."}
        if i % 2 == 0
        else {"role": "assistant", "content": "Lighthouses guide ships at night. " * 8}
        for i in range(300)
    ]
)


def post(base_url, route, timeout=40, **form):
    response = requests.post(f"{base_url}/v1/{route}", data=form, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def start_chat(base_url, **form):
    ack = post(base_url, "text/chat", **form)
    assert ack["success"] is True, ack
    assert ack["commandStatus"] == "running", ack
    return ack["commandId"]


def chat_status(base_url, command_id):
    return post(base_url, "LlamaChat/get_command_status", commandId=command_id)


def next_chat_completes(base_url, timeout=90):
    """A fresh chat, once the module takes one (it may be restarting, or ending a chat a lost client began)."""

    def accepted():
        ack = post(base_url, "text/chat", prompt="Say hi.", max_tokens="4")
        return ack["commandId"] if ack["success"] else None

    command_id = poll(accepted, timeout, "the module to accept a chat", interval=0.2)
    final = poll(
        lambda: (a := chat_status(base_url, command_id))["commandStatus"] == "completed" and a,
        60,
        "the chat to complete",
    )
    assert final["success"] is True, final
    assert final["reply"], final


def restarted(base_url, old_pid):
    return poll(
        lambda: (s := server_status(base_url))["status"] == "Started" and s["pid"] != old_pid and s,
        90,
        "the module's restart",
    )


def assert_lost(answer, command_id):
    assert answer["success"] is False, answer
    assert answer["commandId"] == command_id, answer
    assert answer["commandStatus"] == "failed"
    assert "chat was lost because the module LlamaChat stopped (exit code -9)" in answer["error"], answer


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(smollm2) as url:
        yield url


def test_kill_9_mid_chat_says_the_chat_was_lost_and_the_next_chat_works(base_url):
    command_id = start_chat(base_url, **LONG_REPLY)
    module_pid = server_status(base_url)["pid"]
    os.kill(module_pid, signal.SIGKILL)

    # Answered by the server at once, while the module restarts, and after the restart too.
    poll(lambda: server_status(base_url)["status"] != "Started", 10, "the server to notice the crash", interval=0.02)
    assert_lost(chat_status(base_url, command_id), command_id)
    cancel = post(base_url, "LlamaChat/cancel_command", commandId=command_id)
    assert_lost(cancel, command_id)
    assert cancel["error"].startswith("Nothing to cancel")
    restarted(base_url, module_pid)
    assert_lost(chat_status(base_url, command_id), command_id)
    next_chat_completes(base_url)


def test_kill_9_mid_prepare_of_a_long_history_gives_a_clear_answer(base_url):
    module = psutil.Process(server_status(base_url)["pid"])
    busy_before = sum(module.cpu_times()[:2])
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(
            post, base_url, "text/chat", 60, prompt="And one more fact?", max_tokens="1500", messages=HISTORY
        )
        # The module working on the request (parsing, tokenizing, fitting the history) is when to strike; a fast
        # machine may be past it already, and every outcome below must still be clear.
        poll(lambda: pending.done() or sum(module.cpu_times()[:2]) > busy_before + 0.05, 20, "the module to work")
        module.kill()
        answer = pending.result(timeout=60)

    if answer["success"]:  # acknowledged before the kill: the chat is lost with the module
        assert_lost(chat_status(base_url, answer["commandId"]), answer["commandId"])
    else:  # taken and never answered, or refused (history too long) before the kill
        assert (
            "The module LlamaChat stopped (exit code -9) before answering" in answer["error"]
            or "messages" in answer["error"]
        ), answer
    restarted(base_url, module.pid)
    next_chat_completes(base_url)


def test_clients_that_disconnect_mid_request_leave_the_server_working(base_url):
    address = urlparse(base_url)
    body = b"prompt=Say+hello.&max_tokens=4"
    request = (
        b"POST /v1/text/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
        b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    for sent in (request[:30], request + body[:10], request + body):  # mid-headers, mid-body, before the answer
        with socket.create_connection((address.hostname, address.port), timeout=10) as client:
            client.sendall(sent)
    # A chat the last client began runs to its (short) end; then chats work as before.
    next_chat_completes(base_url)
    assert "Traceback" not in server_log_path(base_url).read_text()


def test_sigterm_mid_chat_stops_server_and_module_quickly_and_clients_hear_why(smollm2):
    with running_server(smollm2) as base_url:
        module = psutil.Process(server_status(base_url)["pid"])
        server = module.parent()
        command_id = start_chat(base_url, **LONG_REPLY)
        answers = []

        def keep_polling():  # a client polling its chat throughout the stop
            while True:
                try:
                    answers.append(chat_status(base_url, command_id))
                    time.sleep(0.01)  # pacing, not synchronisation
                except (requests.ConnectionError, AssertionError):
                    return

        poller = threading.Thread(target=keep_polling)
        poller.start()
        poll(lambda: answers, 30, "the first status answer")
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs([server, module], timeout=15)
        poller.join(15)
        assert not alive, "the server, its module or a client hung"
        assert not poller.is_alive(), "the server, its module or a client hung"
        assert time.monotonic() - started < 8
        assert {p.pid: p.returncode for p in gone}[server.pid] == 0
        assert "Module LlamaChat stopped" in server_log_path(base_url).read_text()
    for answer in answers:  # the chat's own answers, then at most a clear refusal: never a hang or a crash page
        assert answer["success"] is True or "shutting down" in answer["error"], answer


def test_a_client_waiting_when_the_server_stops_hears_that_it_is_shutting_down(tmp_path):
    """No module here: the request waits in the queue when the stop comes, as one a dying module took would."""
    config = ServerConfig(module_dir=ROOT, port=0, launch_module=False, data_dir=tmp_path, log_level="critical")
    server = ServerThread(config)
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(requests.post, f"{server.url}/v1/text/chat", data={"prompt": "hi"}, timeout=20)
        poll(lambda: server_status(server.url)["queued"] == 1, 10, "the request to wait in the queue")
        server.stop()
        answer = waiting.result(timeout=15).json()
    assert answer["success"] is False, answer
    assert "The server is shutting down" in answer["error"], answer


def test_a_truncated_gguf_gives_a_clear_error_naming_the_file(smollm2, tmp_path):
    truncated = tmp_path / "SmolLM2-truncated.gguf"
    with open(smollm2, "rb") as whole, open(truncated, "wb") as part:
        part.write(whole.read(5 << 20))  # 5 MB of a ~100 MB model: the header is intact, the tensors are not
    with running_server(truncated) as base_url:
        answer = post(base_url, "text/chat", prompt="Hi", max_tokens="4")
        assert answer["success"] is False, answer
        assert "No model is loaded" in answer["error"], answer
        assert truncated.name in answer["error"], answer
        status = server_status(base_url)
        assert status["status"] == "Started"
        status_data = reported_status_data(base_url)
        assert truncated.name in status_data["loadError"]
        assert requests.get(f"{base_url}/v1/server/status/ping", timeout=10).json()["success"] is True
