"""The module's chat queue through llamachat_server: real HTTP, the real SDK in the real module process, SmolLM2.
Several clients at once, each reaching its chat through its own commandId only; a full queue; results forgotten
after their time; a module crash with chats waiting. The queue's own logic is tested in tests/test_chat_queue.py."""

import json
import os
import signal
import threading
import time
import uuid

import pytest
import requests

from live_server import poll, running_server, server_status

QUEUE_SIZE = 4
RESULT_TTL = 3  # seconds: short, so that forgetting is quick to see
STORY = "Write a very long story about a dragon who learns to bake bread. Describe every step in detail."
# A chat still running when a test looks, however fast the machine (the context is 2048).
LONG = {"prompt": STORY, "max_tokens": "1900"}
UNKNOWN = "No chat has this commandId"


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(
        smollm2, CPAI_MODULE_LLAMA_QUEUE_SIZE=str(QUEUE_SIZE), CPAI_MODULE_LLAMA_RESULT_TTL=str(RESULT_TTL)
    ) as url:
        yield url


def post(base_url, route, **form):
    response = requests.post(f"{base_url}/v1/{route}", data=form, timeout=40)
    assert response.status_code == 200, response.text
    return response.json()


def start_chat(base_url, **form):
    ack = post(base_url, "text/chat", **form)
    assert ack["success"] is True and ack["commandStatus"] in ("running", "queued"), ack
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


def test_five_clients_get_their_replies_in_arrival_order(base_url):
    clients = 5
    acks, finals = [None] * clients, [None] * clients
    arrived = [threading.Event() for _ in range(clients)]

    def client(i):
        if i:
            arrived[i - 1].wait(60)  # arrive after the previous client's chat was accepted: a known arrival order
        acks[i] = start_chat(base_url, prompt=f"Write a short poem about the number {i + 1}.", max_tokens="32")
        arrived[i].set()
        finals[i] = follow(base_url, acks[i]["commandId"], interval=0.2)  # a client's pace: the model needs the CPU

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    assert arrived[-1].wait(60), "the clients' chats were not all accepted"
    ids = [ack["commandId"] for ack in acks]
    assert len(set(ids)) == clients
    for i, ack in enumerate(acks):
        assert ack["commandStatus"] == "running" or 1 <= ack["queue_position"] <= i, ack

    # An observer polls every chat, the last arrived first: a chat seen started means every earlier one had started
    # by then too, so in each sweep the started chats are the first ones, and the waiting ones keep their order. A
    # chat seen completed is not asked again (its result is forgotten RESULT_TTL seconds later).
    completed, speed_known = set(), False
    deadline = time.monotonic() + 120
    while len(completed) < clients:
        answers = {i: status(base_url, ids[i]) for i in reversed(range(clients)) if i not in completed}
        states = [answers[i]["commandStatus"] if i in answers else "completed" for i in range(clients)]
        started = [state != "queued" for state in states]
        assert started == sorted(started, reverse=True), f"a chat started before an earlier one: {states}"
        positions = [answer["queue_position"] for _, answer in sorted(answers.items()) if "queue_position" in answer]
        assert positions == sorted(set(positions)) and all(p >= 1 for p in positions), answers
        for i, answer in answers.items():
            # The original module's Explorer script polls until "completed" and shows `reply` meanwhile.
            assert answer["success"] is True and answer["commandId"] == ids[i] and isinstance(answer["reply"], str)
            assert not any(other in json.dumps(answer) for other in ids if other != ids[i])  # names no other chat
            if answer["commandStatus"] == "queued" and speed_known:  # a chat has finished: the speed is measured
                assert answer["estimated_wait_s"] >= 0, answer
        completed |= {i for i, state in enumerate(states) if state == "completed"}
        speed_known = bool(completed)
        assert time.monotonic() < deadline, f"the chats did not all complete: {states}"
        time.sleep(0.1)  # an observer's pace, not synchronisation

    for thread in threads:
        thread.join(60)
    for final in finals:
        assert final["success"] is True and final["reply"].strip(), final
        assert final["stop_reason"] in ("completed", "length") and final["completion_tokens"] <= 32


def test_a_full_queue_refuses_clearly_and_a_chat_cancelled_while_waiting_leaves_it(base_url):
    ids = [start_chat(base_url, **LONG)["commandId"] for _ in range(1 + QUEUE_SIZE)]  # one runs, four wait
    try:
        full = post(base_url, "text/chat", prompt="Hello?")
        assert full["success"] is False and full["code"] == 500
        assert "queue is full" in full["error"] and f"at most {QUEUE_SIZE} chats may wait" in full["error"]
        assert "CPAI_MODULE_LLAMA_QUEUE_SIZE" in full["error"] and "commandId" not in full
        assert not any(command_id in json.dumps(full) for command_id in ids)
        status_data = poll(
            lambda: (s := server_status(base_url)["statusData"])["queueLength"] == QUEUE_SIZE and s,
            10,
            "the module's status to show the full queue",
        )
        assert status_data["queueSize"] == QUEUE_SIZE and status_data["chatsRunning"] == 1

        # The second chat leaves the queue: it ends at once, empty; those behind it move up, and there is room again.
        assert status(base_url, ids[2])["queue_position"] == 2
        left = cancel(base_url, ids[1])
        assert left["success"] is True and left["commandStatus"] == "cancelled" and left["commandId"] == ids[1]
        gone = status(base_url, ids[1])
        assert gone["success"] is True and gone["commandStatus"] == "completed" and gone["message"]
        assert gone["stop_reason"] == "cancelled" and gone["reply"] == "" and gone["completion_tokens"] == 0
        assert status(base_url, ids[2])["queue_position"] == 1
        assert status(base_url, ids[0])["commandStatus"] == "running"
        ids.append(start_chat(base_url, prompt="Hello?")["commandId"])
        assert status(base_url, ids[-1])["queue_position"] == QUEUE_SIZE
    finally:
        finals = cancel_all(base_url, ids)
    assert all(final["stop_reason"] == "cancelled" for final in finals)
    assert all(final["reply"] == "" for final in finals[1:])  # none of the waiting chats ever ran


def test_a_chat_cannot_be_read_or_cancelled_with_a_guessed_or_another_chats_id(base_url):
    mine = start_chat(base_url, **LONG)["commandId"]
    theirs = start_chat(base_url, **LONG)["commandId"]
    try:
        guesses = [str(uuid.uuid4()), mine.upper(), mine[:-1], mine + "0", "*", mine.replace("-", "")]
        for guess in guesses:
            for answer in (status(base_url, guess), cancel(base_url, guess)):
                assert answer["success"] is False and UNKNOWN in answer["error"], answer
                assert mine not in json.dumps(answer) and theirs not in json.dumps(answer)
        # Every answer about one chat names that chat only, and the module's status names none.
        for answer in (status(base_url, mine), status(base_url, theirs), cancel(base_url, theirs)):
            other = theirs if answer["commandId"] == mine else mine
            assert other not in json.dumps(answer), answer
        status_data = json.dumps(server_status(base_url)["statusData"])
        assert mine not in status_data and theirs not in status_data
        assert status(base_url, mine)["commandStatus"] == "running"  # the guesses changed nothing
    finally:
        cancel_all(base_url, [mine, theirs])


def test_a_finished_chat_is_forgotten_result_ttl_seconds_after_it_ended(base_url):
    accepted = time.monotonic()
    command_id = start_chat(base_url, prompt="Say hi.", max_tokens="4")["commandId"]
    final = follow(base_url, command_id)
    again = status(base_url, command_id)  # a result can be read more than once
    assert again["commandStatus"] == "completed" and again["reply"] == final["reply"] != ""
    poll(
        lambda: UNKNOWN in (status(base_url, command_id).get("error") or ""),
        RESULT_TTL + 30,
        "the result to be forgotten",
        interval=0.2,
    )
    assert time.monotonic() - accepted >= RESULT_TTL  # it ended after it was accepted, and was kept RESULT_TTL s
    answer = status(base_url, command_id)
    assert answer["success"] is False and f"({RESULT_TTL} s, CPAI_MODULE_LLAMA_RESULT_TTL)" in answer["error"]


def test_a_module_crash_gives_every_waiting_client_a_clear_answer(base_url):
    ids = [start_chat(base_url, **LONG)["commandId"] for _ in range(3)]  # one runs, two wait
    assert [status(base_url, i)["commandStatus"] for i in ids] == ["running", "queued", "queued"]
    module_pid = server_status(base_url)["pid"]
    os.kill(module_pid, signal.SIGKILL)
    poll(lambda: server_status(base_url)["status"] != "Started", 10, "the server to notice the crash", interval=0.02)

    crash = "chat was lost because the module LlamaChat stopped (exit code -9) while it"
    for command_id, doing in zip(ids, ["ran", "waited in the module's queue", "waited in the module's queue"]):
        for answer in (status(base_url, command_id), cancel(base_url, command_id)):
            assert answer["success"] is False and answer["commandStatus"] == "failed", answer
            assert answer["commandId"] == command_id and f"{crash} {doing}; start a new chat" in answer["error"]

    # The restarted module serves new chats, and the lost ones stay lost.
    poll(lambda: (s := server_status(base_url))["status"] == "Started" and s["pid"] != module_pid, 90, "restart")
    assert follow(base_url, start_chat(base_url, prompt="Say hi.", max_tokens="4")["commandId"])["reply"]
    assert "lost because" in status(base_url, ids[1])["error"]
