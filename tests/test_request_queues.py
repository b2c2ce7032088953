"""RequestQueues on real asyncio, without a server: order, who gets which answer, requests whose client went, the
bounds per queue, and failing requests a module will never answer. tests/test_server_limits.py covers the bounds and
abandoned requests through the whole server; this file covers the queue's own bookkeeping."""

from __future__ import annotations

import asyncio
import json

import pytest

from llamachat_server.queues import ITEM_OVERHEAD_BYTES, QueueError, RequestQueueFull, RequestQueues, payload_size

QUEUE = "llamachat_queue"


def payload(prompt: str, command: str = "prompt") -> dict:
    return {"command": command, "values": [{"key": "prompt", "value": [prompt]}], "files": [], "urlSegments": []}


def new_queues(**bounds: int) -> RequestQueues:
    queues = RequestQueues(response_timeout=30, **bounds)
    queues.ensure_queue(QUEUE)
    return queues


async def send(queues: RequestQueues, prompt: str, queue: str = QUEUE) -> asyncio.Task:
    """A client's request, queued by the time this returns."""
    task = asyncio.create_task(queues.send_request(queue, payload(prompt)))
    await asyncio.sleep(0)  # one turn of the loop: send_request runs up to its await
    assert not task.done(), task.result()
    return task


def prompt_of(request: dict) -> str:
    return request["payload"]["values"][0]["value"][0]


def test_payload_size_counts_keys_values_files_and_url_segments():
    size = payload_size(
        {
            "values": [{"key": "prompt", "value": ["héllo", "x"]}, {"key": "k", "value": []}],
            "files": [{"name": "f", "data": "aGk="}, {"name": "g"}],
            "urlSegments": ["ab", "c"],
        }
    )
    items = 2 + 2 + 2 + 2  # entries, value strings, files, url segments
    assert size == len("prompt") + len("héllo") + 1 + len("k") + len("aGk=") + 3 + items * ITEM_OVERHEAD_BYTES
    assert payload_size({}) == 0


def test_payload_size_counts_what_many_tiny_values_hold_in_memory():
    """10,000 empty values are 20 KB of characters but over a MB of Python objects; the queue's bound counts that."""
    tiny = {"values": [{"key": f"k{i}", "value": []} for i in range(10_000)]}
    assert payload_size(tiny) >= 10_000 * ITEM_OVERHEAD_BYTES >= 1_000_000


def test_requests_are_handed_out_oldest_first_and_each_client_gets_its_own_answer():
    async def scenario():
        queues = RequestQueues(response_timeout=30)
        queues.ensure_queue("LlamaChat_Queue")
        assert queues.has_queue("LLAMACHAT_QUEUE")  # queue names are case-insensitive, as in the real server
        clients = [await send(queues, prompt, "llamachat_QUEUE") for prompt in ("one", "two", "three")]
        assert queues.pending(QUEUE) == (3, sum(payload_size(payload(p)) for p in ("one", "two", "three")))
        taken = [await queues.take(QUEUE, 1) for _ in clients]
        assert [prompt_of(request) for request in taken] == ["one", "two", "three"]
        assert all(
            request["reqtype"] == "prompt" and set(request) == {"reqid", "reqtype", "payload"} for request in taken
        )
        assert queues.pending(QUEUE) == (0, 0)
        for request in reversed(taken):  # answered in any order, each reaches its own client
            assert queues.answer(request["reqid"], json.dumps({"reply": prompt_of(request)}))
        assert [await client for client in clients] == [{"reply": "one"}, {"reply": "two"}, {"reply": "three"}]

    asyncio.run(scenario())


def test_a_take_waiting_on_an_empty_queue_gets_the_next_request_and_an_idle_one_gets_none():
    async def scenario():
        queues = new_queues()
        assert await queues.take(QUEUE, 0) is None
        poll = asyncio.create_task(queues.take(QUEUE, 30))
        await asyncio.sleep(0)
        client = await send(queues, "hi")
        request = await asyncio.wait_for(poll, 5)  # woken by the arrival, long before its 30 s
        assert prompt_of(request) == "hi"
        queues.answer(request["reqid"], "{}")
        assert await client == {}

    asyncio.run(scenario())


def test_a_request_whose_client_went_leaves_from_the_middle_of_the_queue_and_its_bytes_with_it():
    async def scenario():
        queues = new_queues()
        first, gone, last = [await send(queues, prompt) for prompt in ("first", "gone" * 1000, "last")]
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert queues.pending(QUEUE) == (2, payload_size(payload("first")) + payload_size(payload("last")))
        assert [prompt_of(await queues.take(QUEUE, 1)) for _ in range(2)] == ["first", "last"]
        assert await queues.take(QUEUE, 0.05) is None  # the module never sees the abandoned one
        for task in (first, last):
            task.cancel()
        await asyncio.gather(first, last, return_exceptions=True)

    asyncio.run(scenario())


def test_a_request_taken_and_then_abandoned_gets_no_late_answer_and_is_not_failed_later():
    async def scenario():
        queues = new_queues()
        client = await send(queues, "hi")
        request = await queues.take(QUEUE, 1)
        client.cancel()
        await asyncio.gather(client, return_exceptions=True)
        assert queues.answer(request["reqid"], "{}") is False  # nobody waits for it any more
        assert queues.fail_taken(QUEUE, "module stopped") == 0
        assert queues.fail_all("stopping") == 0

    asyncio.run(scenario())


def test_the_byte_bound_admits_a_request_that_fills_it_exactly_and_refuses_one_byte_more():
    async def scenario():
        first, filling = payload("x" * 100), payload("y" * 50)
        queues = new_queues(max_queue_bytes=payload_size(first) + payload_size(filling))
        clients = [await send(queues, "x" * 100)]
        with pytest.raises(RequestQueueFull) as raised:
            await queues.send_request(QUEUE, payload("y" * 51))
        assert str(raised.value).startswith(f"Request queue '{QUEUE}' is full: ")
        assert "this one adds" in str(raised.value)
        assert "try again later (#reqid " in str(raised.value)
        assert queues.pending(QUEUE) == (1, payload_size(first))  # the refused one holds nothing
        clients.append(await send(queues, "y" * 50))
        assert queues.pending(QUEUE) == (2, payload_size(first) + payload_size(filling))
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        assert queues.pending(QUEUE) == (0, 0)

    asyncio.run(scenario())


def test_each_queue_has_its_own_bounds():
    async def scenario():
        queues = new_queues(max_queue_length=1)
        queues.ensure_queue("other_queue")
        full = await send(queues, "one")
        with pytest.raises(RequestQueueFull, match="1 requests wait for the module \\(at most 1\\)"):
            await queues.send_request(QUEUE, payload("two"))
        other = await send(queues, "elsewhere", "other_queue")  # another module's queue still takes requests
        assert queues.pending("other_queue")[0] == 1
        for client in (full, other):
            client.cancel()
        await asyncio.gather(full, other, return_exceptions=True)

    asyncio.run(scenario())


def test_fail_taken_fails_only_what_that_module_took_and_the_rest_carry_on():
    async def scenario():
        queues = new_queues()
        queues.ensure_queue("other_queue")
        taken_a, taken_b, waiting = [await send(queues, prompt) for prompt in ("a", "b", "waiting")]
        elsewhere = await send(queues, "elsewhere", "other_queue")
        a, b = await queues.take(QUEUE, 1), await queues.take(QUEUE, 1)
        other = await queues.take("other_queue", 1)

        assert queues.fail_taken(QUEUE.upper(), "module LlamaChat stopped") == 2
        for client, request in ((taken_a, a), (taken_b, b)):
            with pytest.raises(QueueError) as raised:
                await client
            assert str(raised.value) == f"module LlamaChat stopped (#reqid {request['reqid']})"
        assert queues.fail_taken(QUEUE, "again") == 0  # each is failed once
        assert queues.pending(QUEUE)[0] == 1
        assert not waiting.done()  # not taken yet: a restarted module gets it
        assert queues.answer(other["reqid"], '{"ok": true}')
        assert await elsewhere == {"ok": True}
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    asyncio.run(scenario())


def test_fail_all_fails_every_waiting_client_taken_or_not():
    async def scenario():
        queues = new_queues()
        clients = [await send(queues, prompt) for prompt in ("taken", "queued")]
        taken = await queues.take(QUEUE, 1)
        assert queues.fail_all("The server is stopping") == 2
        errors = [str(error) for error in await asyncio.gather(*clients, return_exceptions=True)]
        assert errors[0] == f"The server is stopping (#reqid {taken['reqid']})"
        assert errors[1].startswith("The server is stopping (#reqid ")
        assert queues.pending(QUEUE) == (0, 0)
        assert queues.fail_all("again") == 0

    asyncio.run(scenario())


def test_an_answer_for_an_unknown_or_already_answered_request_is_refused():
    async def scenario():
        queues = new_queues()
        assert queues.answer("no-such-reqid", "{}") is False
        client = await send(queues, "hi")
        request = await queues.take(QUEUE, 1)
        assert queues.answer(request["reqid"], '{"first": 1}') is True
        assert queues.answer(request["reqid"], '{"second": 2}') is False
        assert await client == {"first": 1}

    asyncio.run(scenario())


def test_a_posted_request_has_no_waiter_and_ignores_the_bounds():
    async def scenario():
        queues = new_queues(max_queue_length=1, max_queue_bytes=1)
        reqid = queues.post(QUEUE, payload("bye", command="quit"))
        queues.post(QUEUE, payload("again", command="quit"))  # a full queue still takes it
        assert queues.pending(QUEUE)[0] == 2
        request = await queues.take(QUEUE, 1)
        assert (request["reqid"], request["reqtype"], request["payload"]["command"]) == (reqid, "quit", "quit")
        assert queues.answer(reqid, "{}") is False  # nobody waits for its answer
        assert queues.fail_taken(QUEUE, "stopped") == 0
        assert queues.fail_all("stopping") == 0

    asyncio.run(scenario())
