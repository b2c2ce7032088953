"""ChatQueue, the module's FIFO of chats, on its own: pure logic, a FakeClock for time, real ChatJob results.
The queue inside the real module, through the real server, is tested in tests/test_server_queue.py."""

from __future__ import annotations

import threading

import pytest

from llamachat.chat_job import ChatJob
from llamachat.chat_queue import DEFAULT_REPLY_TOKENS, MAX_KEPT_RESULTS, ChatQueue, ChatQueueClosed, ChatQueueFull


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def result(command_id: str, stop_reason: str = "completed") -> dict:
    return ChatJob(command_id, "model").finish(stop_reason)


def measured(tokens: int, tokens_per_second: float, first_token_ms: int) -> dict:
    """A finished chat's result with these figures, as the estimate reads them."""
    return {
        **result("done"),
        "completion_tokens": tokens,
        "tokens_per_second": tokens_per_second,
        "time_to_first_token_ms": first_token_ms,
    }


def cancelled(chat) -> dict:
    return result(chat.command_id, "cancelled")


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def queue(clock):
    return ChatQueue(capacity=3, result_ttl=300, clock=clock)


def test_chats_start_in_arrival_order_one_at_a_time(queue):
    chats = [queue.add(f"id{i}", f"request {i}", 0) for i in range(4)]
    assert [queue.place(c)[0] for c in chats] == [0, 1, 2, 3]  # the first starts as soon as the worker takes it
    assert queue.take() is chats[0]
    assert chats[0].state == "running"
    assert queue.take(timeout=0) is None  # the one slot is busy
    assert [queue.place(c)[0] for c in chats] == [0, 1, 2, 3]
    for i in range(4):
        queue.finish(chats[i], result(chats[i].command_id))
        assert chats[i].state == "completed"
        assert queue.get(f"id{i}").result["stop_reason"] == "completed"
        if i < 3:
            assert queue.take() is chats[i + 1]
            assert [queue.place(c)[0] for c in chats[i + 2 :]] == list(range(1, 3 - i))
    assert queue.counts() == (0, 0)


def test_capacity_counts_only_the_chats_that_wait(clock):
    queue = ChatQueue(capacity=2, result_ttl=300, clock=clock)
    first = queue.add("a", None, 0)  # a slot is free for it: it does not wait
    queue.add("b", None, 0)
    queue.add("c", None, 0)
    assert queue.counts() == (2, 0)
    with pytest.raises(ChatQueueFull):
        queue.add("d", None, 0)
    queue.take()
    with pytest.raises(ChatQueueFull):
        queue.add("d", None, 0)
    queue.finish(first, result("a"))  # b now starts as soon as its worker takes it: room for one more
    queue.add("d", None, 0)
    assert queue.counts() == (2, 0)


def test_no_queue_at_all_refuses_every_chat_while_one_runs(clock):
    queue = ChatQueue(capacity=0, result_ttl=300, clock=clock)
    first = queue.add("a", None, 0)
    with pytest.raises(ChatQueueFull):
        queue.add("b", None, 0)
    queue.finish(queue.take(), result("a"))
    assert first.result
    assert queue.add("b", None, 0)


def test_cancel_takes_a_waiting_chat_out_of_the_queue_and_asks_a_running_one_to_stop(queue):
    running, second, third = (queue.add(i, None, 0) for i in ("a", "b", "c"))
    queue.take()
    assert queue.cancel("b", cancelled) is second
    assert second.state == "completed"
    assert second.result["stop_reason"] == "cancelled"
    assert second.result["reply"] == ""
    assert second.result["success"] is True
    assert queue.place(third) == (1, None)  # moved up
    assert queue.cancel("a", cancelled) is running
    assert running.cancel_requested
    assert running.result is None
    queue.finish(running, result("a", "cancelled"))
    assert queue.take() is third  # the cancelled chat never runs
    before = dict(third.result or {})
    queue.finish(third, result("c"))
    assert queue.cancel("c", cancelled).result["stop_reason"] == "completed" != before.get("stop_reason")
    assert queue.cancel("unknown", cancelled) is None


def test_a_finished_chat_keeps_only_its_result(queue):
    chat = queue.add("a", {"history": "megabytes"}, 0)
    queue.take().job = ChatJob("a", "model")
    queue.finish(chat, result("a"))
    assert chat.request is None
    assert chat.job is None
    assert chat.result["stop_reason"] == "completed"


def test_a_result_is_forgotten_result_ttl_seconds_after_the_chat_ended(queue, clock):
    chat = queue.add("a", None, 0)
    queue.take()
    clock.now += 1000  # running time does not count
    queue.finish(chat, result("a"))
    clock.now += 299.9
    assert queue.get("a") is chat
    clock.now += 0.1
    assert queue.get("a") is None
    assert queue.cancel("a", cancelled) is None


def test_a_chat_cancelled_while_waiting_is_forgotten_after_the_ttl_too(queue, clock):
    queue.add("a", None, 0)
    queue.add("b", None, 0)
    queue.cancel("b", cancelled)
    clock.now += 300
    assert queue.get("b") is None
    assert queue.get("a") is not None  # a still waits: never forgotten


def test_at_most_max_kept_results_are_kept_whatever_the_ttl(clock):
    queue = ChatQueue(capacity=1, result_ttl=10**9, clock=clock)
    blocker = queue.add("blocker", None, 0)
    queue.take()
    for i in range(MAX_KEPT_RESULTS + 1):
        queue.add(f"c{i}", None, 0)
        queue.cancel(f"c{i}", cancelled)
    assert queue.get("c0") is None
    assert queue.get("c1") is not None
    assert queue.get("blocker") is blocker  # a running chat is never forgotten


def test_the_wait_is_unknown_until_a_speed_has_been_measured(queue):
    running, waiting = queue.add("a", None, 0), queue.add("b", None, 0)
    queue.take()
    assert queue.place(waiting) == (1, None)
    running.job = ChatJob("a", "model")  # started, no token yet: no speed either
    assert queue.place(waiting) == (1, None)


def test_the_wait_counts_the_tokens_still_to_come_before_the_chat_at_the_measured_speed(queue):
    first = queue.add("first", None, 0)
    queue.finish(queue.take(), measured(tokens=100, tokens_per_second=50.0, first_token_ms=500))
    assert first.result
    running = queue.add("a", None, 0)  # no max_tokens: a typical reply, 100 tokens
    capped = queue.add("b", None, 40)  # fewer than typical
    third = queue.add("c", None, 0)
    queue.take()
    # The running chat has not started generating: 0.5 s to its first token + 100 tokens at 50/s.
    assert queue.place(capped) == (1, pytest.approx(0.5 + 2.0))
    running.job = ChatJob("a", "model")
    running.job.add_text("x" * 60, 60)
    # 40 tokens left for the running chat, then b: 0.5 s + its 40 tokens.
    assert queue.place(capped) == (1, pytest.approx(40 / 50))
    assert queue.place(third) == (2, pytest.approx(40 / 50 + 0.5 + 40 / 50))
    running.job.add_text("y" * 100, 160)  # longer than typical: it may end any moment
    assert queue.place(capped) == (1, pytest.approx(0.0))


def test_before_any_chat_ended_on_its_own_a_reply_is_expected_to_be_a_few_paragraphs(queue):
    queue.add("a", None, 0)
    queue.finish(queue.take(), {**measured(10, 100.0, 0), "stop_reason": "cancelled"})
    assert queue.estimate.reply_tokens(0) == DEFAULT_REPLY_TOKENS
    assert queue.estimate.reply_tokens(32) == 32


def test_take_waits_for_a_chat_and_close_ends_waiting_chats_and_stops_running_ones(queue):
    taken = []
    worker = threading.Thread(target=lambda: taken.append(queue.take(timeout=30)))
    worker.start()
    running = queue.add("a", None, 0)
    worker.join(30)
    assert taken == [running]
    waiting = queue.add("b", None, 0)
    queue.close(lambda chat: result(chat.command_id, "error"))
    assert waiting.result["stop_reason"] == "error"
    assert running.cancel_requested
    assert queue.take(timeout=30) is None
    with pytest.raises(ChatQueueClosed):
        queue.add("c", None, 0)
    queue.finish(running, result("a", "cancelled"))  # the running chat still ends, and stays readable
    assert queue.get("a").result["stop_reason"] == "cancelled"


def test_a_worker_blocked_in_take_wakes_when_the_queue_closes(queue):
    taken = []
    worker = threading.Thread(target=lambda: taken.append(queue.take()))
    worker.start()
    queue.close(cancelled)
    worker.join(30)
    assert not worker.is_alive()
    assert taken == [None]


def test_several_slots_run_that_many_chats_and_share_the_wait(clock):
    queue = ChatQueue(capacity=4, result_ttl=300, slots=2, clock=clock)
    chats = [queue.add(f"c{i}", None, 50) for i in range(4)]
    assert [queue.place(c)[0] for c in chats] == [0, 0, 1, 2]
    assert queue.take() is chats[0]
    assert queue.take() is chats[1]
    assert queue.take(timeout=0) is None
    queue.estimate.record(measured(tokens=50, tokens_per_second=100.0, first_token_ms=0))
    # Two running chats with 50 tokens to go each, shared by two slots: 0.5 s.
    assert queue.place(chats[2]) == (1, pytest.approx(0.5))
    queue.finish(chats[1], result("c1"))
    assert queue.take() is chats[2]


def test_a_command_id_is_used_once(queue):
    queue.add("a", None, 0)
    with pytest.raises(ValueError, match="already in use"):
        queue.add("a", None, 0)
