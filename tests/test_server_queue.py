"""The module's chat queue through llamachat_server: real HTTP, the real SDK in the real module process, SmolLM2.
Several clients at once, each reaching its chat through its own commandId only; a full queue; results forgotten
after their time; a module crash with chats waiting. The queue's own logic is tested in tests/test_chat_queue.py."""

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from live_server import poll, running_server, server_status
from module_chat import LONG, cancel, cancel_all, follow, post, start_chat, status

QUEUE_SIZE = 4
RESULT_TTL = 3  # seconds: short, so that forgetting is quick to see
UNKNOWN = "No chat has this commandId"


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(
        smollm2, CPAI_MODULE_LLAMA_QUEUE_SIZE=str(QUEUE_SIZE), CPAI_MODULE_LLAMA_RESULT_TTL=str(RESULT_TTL)
    ) as url:
        yield url


CLIENTS = 5
CLIENT_MAX_TOKENS = 32


@dataclass
class Sweep:
    """One pass of the observer over the chats it had not yet seen completed."""

    answers: dict[int, dict]  # get_command_status's answer, by the chat's place in the arrival order
    states: list[str]  # every chat's commandStatus ("completed" for one seen completed before)
    speed_known: bool  # a chat had completed before this sweep, so the module has measured the speed


@dataclass
class Clients:
    acks: list[dict]  # in arrival order
    finals: list[dict]
    sweeps: list[Sweep]

    @property
    def ids(self) -> list[str]:
        return [ack["commandId"] for ack in self.acks]


@pytest.fixture(scope="module")
def clients(base_url) -> Clients:
    """Five clients, each arriving once the previous one's chat was accepted (a known arrival order), each following
    its own chat to the end, and an observer polling every chat meanwhile, the last arrived first: a chat seen started
    means every earlier one had started by then too. A chat seen completed, by the observer or its client, is not asked
    again (it is forgotten RESULT_TTL s later). The tests below check what they all saw."""
    acks, finals = [None] * CLIENTS, [None] * CLIENTS
    arrived = [threading.Event() for _ in range(CLIENTS)]

    def client(i):
        if i:
            arrived[i - 1].wait(60)
        prompt = f"Write a short poem about the number {i + 1}."
        acks[i] = start_chat(base_url, prompt=prompt, max_tokens=str(CLIENT_MAX_TOKENS))
        arrived[i].set()
        finals[i] = follow(base_url, acks[i]["commandId"], interval=0.2)  # a client's pace: the model needs the CPU

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    assert arrived[-1].wait(60), "the clients' chats were not all accepted"
    ids = [ack["commandId"] for ack in acks]
    sweeps: list[Sweep] = []
    completed: set[int] = set()
    deadline = time.monotonic() + 120
    while len(completed) < CLIENTS:
        completed |= {i for i, final in enumerate(finals) if final}  # its client has read it: it may be forgotten
        answers = {i: status(base_url, ids[i]) for i in reversed(range(CLIENTS)) if i not in completed}
        states = [answers[i]["commandStatus"] if i in answers else "completed" for i in range(CLIENTS)]
        sweeps.append(Sweep(answers, states, speed_known=bool(completed)))
        completed |= {i for i, state in enumerate(states) if state == "completed"}
        assert time.monotonic() < deadline, f"the chats did not all complete: {states}"
        time.sleep(0.1)  # an observer's pace, not synchronisation
    for thread in threads:
        thread.join(60)
    return Clients(acks, finals, sweeps)


def test_each_chat_gets_a_command_id_of_its_own(clients):
    assert len(set(clients.ids)) == CLIENTS


def test_a_new_chat_runs_at_once_or_waits_behind_the_earlier_ones(clients):
    for i, ack in enumerate(clients.acks):
        assert ack["commandStatus"] == "running" or 1 <= ack["queue_position"] <= i, ack


def test_chats_start_in_arrival_order(clients):
    for sweep in clients.sweeps:
        started = [state != "queued" for state in sweep.states]
        assert started == sorted(started, reverse=True), f"a chat started before an earlier one: {sweep.states}"


def test_waiting_chats_hold_distinct_places_in_arrival_order(clients):
    for sweep in clients.sweeps:
        positions = [
            answer["queue_position"] for _, answer in sorted(sweep.answers.items()) if "queue_position" in answer
        ]
        assert positions == sorted(set(positions)), sweep.answers
        assert all(position >= 1 for position in positions), sweep.answers


def test_every_answer_is_about_its_own_chat_and_names_no_other(clients):
    for sweep in clients.sweeps:
        for i, answer in sweep.answers.items():
            # The original module's Explorer script polls until "completed" and shows `reply` meanwhile.
            assert answer["success"] is True, answer
            assert answer["commandId"] == clients.ids[i]
            assert isinstance(answer["reply"], str)
            others = [other for other in clients.ids if other != clients.ids[i]]
            assert not any(other in json.dumps(answer) for other in others), answer


def test_a_waiting_chat_s_wait_is_estimated_once_a_chat_has_finished(clients):
    for sweep in clients.sweeps:
        if sweep.speed_known:
            for answer in sweep.answers.values():
                if answer["commandStatus"] == "queued":
                    assert answer["estimated_wait_s"] >= 0, answer


def test_every_client_gets_a_whole_reply_within_its_limit(clients):
    for final in clients.finals:
        assert final["success"] is True, final
        assert final["reply"].strip(), final
        assert final["stop_reason"] in ("completed", "length"), final
        assert final["completion_tokens"] <= CLIENT_MAX_TOKENS, final


def test_a_full_queue_refuses_clearly_and_a_chat_cancelled_while_waiting_leaves_it(base_url):
    ids = [start_chat(base_url, **LONG)["commandId"] for _ in range(1 + QUEUE_SIZE)]  # one runs, four wait
    try:
        full = post(base_url, "text/chat", prompt="Hello?")
        assert full["success"] is False
        assert full["queue_full"] is True  # for programs: the OpenAI layer answers 429
        assert full["code"] == 500
        assert "queue is full" in full["error"]
        assert f"at most {QUEUE_SIZE} chats may wait" in full["error"]
        assert "CPAI_MODULE_LLAMA_QUEUE_SIZE" in full["error"]
        assert "commandId" not in full
        assert not any(command_id in json.dumps(full) for command_id in ids)
        status_data = poll(
            lambda: (s := server_status(base_url)["statusData"])["queueLength"] == QUEUE_SIZE and s,
            10,
            "the module's status to show the full queue",
        )
        assert status_data["queueSize"] == QUEUE_SIZE
        assert status_data["chatsRunning"] == 1

        # The second chat leaves the queue: it ends at once, empty; those behind it move up, and there is room again.
        assert status(base_url, ids[2])["queue_position"] == 2
        left = cancel(base_url, ids[1])
        assert left["success"] is True
        assert left["commandStatus"] == "cancelled"
        assert left["commandId"] == ids[1]
        gone = status(base_url, ids[1])
        assert gone["success"] is True
        assert gone["commandStatus"] == "completed"
        assert gone["message"]
        assert gone["stop_reason"] == "cancelled"
        assert gone["reply"] == ""
        assert gone["completion_tokens"] == 0
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
                assert answer["success"] is False, answer
                assert UNKNOWN in answer["error"], answer
                assert mine not in json.dumps(answer)
                assert theirs not in json.dumps(answer)
        # Every answer about one chat names that chat only, and the module's status names none.
        for answer in (status(base_url, mine), status(base_url, theirs), cancel(base_url, theirs)):
            other = theirs if answer["commandId"] == mine else mine
            assert other not in json.dumps(answer), answer
        status_data = json.dumps(server_status(base_url)["statusData"])
        assert mine not in status_data
        assert theirs not in status_data
        assert status(base_url, mine)["commandStatus"] == "running"  # the guesses changed nothing
    finally:
        cancel_all(base_url, [mine, theirs])


def test_a_finished_chat_is_forgotten_result_ttl_seconds_after_it_ended(base_url):
    accepted = time.monotonic()
    command_id = start_chat(base_url, prompt="Say hi.", max_tokens="4")["commandId"]
    final = follow(base_url, command_id)
    again = status(base_url, command_id)  # a result can be read more than once
    assert again["commandStatus"] == "completed"
    assert again["reply"] == final["reply"] != ""
    poll(
        lambda: UNKNOWN in (status(base_url, command_id).get("error") or ""),
        RESULT_TTL + 30,
        "the result to be forgotten",
        interval=0.2,
    )
    assert time.monotonic() - accepted >= RESULT_TTL  # it ended after it was accepted, and was kept RESULT_TTL s
    answer = status(base_url, command_id)
    assert answer["success"] is False
    assert f"({RESULT_TTL} s, CPAI_MODULE_LLAMA_RESULT_TTL)" in answer["error"]


def test_a_module_crash_gives_every_waiting_client_a_clear_answer(base_url):
    ids = [start_chat(base_url, **LONG)["commandId"] for _ in range(3)]  # one runs, two wait
    assert [status(base_url, i)["commandStatus"] for i in ids] == ["running", "queued", "queued"]
    module_pid = server_status(base_url)["pid"]
    os.kill(module_pid, signal.SIGKILL)
    poll(lambda: server_status(base_url)["status"] != "Started", 10, "the server to notice the crash", interval=0.02)

    crash = "chat was lost because the module LlamaChat stopped (exit code -9) while it"
    for command_id, doing in zip(ids, ["ran", "waited in the module's queue", "waited in the module's queue"]):
        for answer in (status(base_url, command_id), cancel(base_url, command_id)):
            assert answer["success"] is False, answer
            assert answer["commandStatus"] == "failed", answer
            assert answer["commandId"] == command_id
            assert f"{crash} {doing}; start a new chat" in answer["error"]

    # The restarted module serves new chats, and the lost ones stay lost.
    poll(lambda: (s := server_status(base_url))["status"] == "Started" and s["pid"] != module_pid, 90, "restart")
    assert follow(base_url, start_chat(base_url, prompt="Say hi.", max_tokens="4")["commandId"])["reply"]
    assert "lost because" in status(base_url, ids[1])["error"]
