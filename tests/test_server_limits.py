"""llamachat_server's own bounds, with the server's real parts in this process (real asyncio, real HTTP on loopback
through aiohttp's TestServer, real subprocesses): requests whose client has gone leave the queue at once, the
queue and the log are bounded, a module's endless output line cannot end the supervisor, the command books are
bounded, and an unexpected exception becomes a JSON answer. No module is launched here; the hostile-input battery
(tests/test_hostile_inputs.py) and the fault tests (tests/test_faults.py) run the real module."""

import asyncio
import sys

import aiohttp
from aiohttp.test_utils import TestServer

from live_server import ROOT
from llamachat_server.app import create_app
from llamachat_server.commands import MAX_TRACKED_COMMANDS, CommandTracker
from llamachat_server.module_process import ModuleProcess
from llamachat_server.queues import RequestQueueFull, RequestQueues, RequestTimedOut
from llamachat_server.server_log import MAX_ENTRY_CHARS, MAX_LIST_COUNT, ServerLog
from llamachat_server.server_state import STATE, ServerConfig

QUEUE = "llamachat_queue"
BIG_PROMPT = "x" * (5 * 1024 * 1024)


def payload(prompt: str) -> dict:
    return {"command": "prompt", "values": [{"key": "prompt", "value": [prompt]}], "files": [], "urlSegments": []}


async def wait_until(condition, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        await asyncio.sleep(0.01)


def run_with_server(scenario, tmp_path, response_timeout=30.0):
    """Runs `scenario(server, context)` against the whole app (no module launched) served on loopback."""
    config = ServerConfig(
        module_dir=ROOT,
        port=0,
        response_timeout=response_timeout,
        launch_module=False,
        data_dir=tmp_path,
        log_level="critical",
    )

    async def main():
        app = create_app(config)
        async with TestServer(app, host="127.0.0.1", handler_cancellation=True) as server:
            await scenario(server, app[STATE])

    asyncio.run(main())


def test_a_request_whose_client_gave_up_leaves_the_queue_at_once(tmp_path):
    async def scenario(server, context):
        async with aiohttp.ClientSession() as client:
            try:
                await client.post(
                    server.make_url("/v1/text/chat"),
                    data={"prompt": BIG_PROMPT},
                    timeout=aiohttp.ClientTimeout(total=1.5),
                )
                raise AssertionError("nobody answers this request, yet it got an answer")
            except asyncio.TimeoutError:
                pass
        # The server's own timeout is 30 s: the request goes because its client went, not because it timed out.
        await wait_until(lambda: context.queues.pending(QUEUE) == (0, 0), 2, "the abandoned request to leave")
        assert await context.queues.take(QUEUE, 0.2) is None  # a module never sees it

    run_with_server(scenario, tmp_path)


def test_a_timed_out_request_leaves_the_queue_and_is_never_handed_out():
    async def scenario():
        queues = RequestQueues(response_timeout=0.2)
        queues.ensure_queue(QUEUE)
        try:
            await queues.send_request(QUEUE, payload(BIG_PROMPT))
            raise AssertionError("nobody answers this request, yet it got an answer")
        except RequestTimedOut as ex:
            assert "timed out" in str(ex)
        assert queues.pending(QUEUE) == (0, 0)
        assert await queues.take(QUEUE, 0.1) is None

    asyncio.run(scenario())


def test_the_queue_is_bounded_in_bytes_and_in_requests_with_a_clear_error():
    async def scenario():
        queues = RequestQueues(response_timeout=30, max_queue_length=3, max_queue_bytes=12 * 1024 * 1024)
        queues.ensure_queue(QUEUE)
        first = asyncio.create_task(queues.send_request(QUEUE, payload(BIG_PROMPT)))
        second = asyncio.create_task(queues.send_request(QUEUE, payload(BIG_PROMPT)))
        await wait_until(lambda: queues.pending(QUEUE)[0] == 2, 2, "two requests queued")
        try:
            await queues.send_request(QUEUE, payload(BIG_PROMPT))
            raise AssertionError("a third 5 MB request fitted in a 12 MB queue")
        except RequestQueueFull as ex:
            assert "is full" in str(ex)
            assert "MB" in str(ex)
            assert "at most 13 MB" in str(ex)
        assert queues.pending(QUEUE)[0] == 2  # the refused one holds nothing

        small = asyncio.create_task(queues.send_request(QUEUE, payload("hi")))  # small ones still fit...
        await wait_until(lambda: queues.pending(QUEUE)[0] == 3, 2, "the small request queued")
        try:
            await queues.send_request(QUEUE, payload("hi"))
            raise AssertionError("a fourth request fitted in a queue of 3")
        except RequestQueueFull as ex:
            assert "3 requests wait" in str(ex)
            assert "at most 3" in str(ex)
        queues.post(QUEUE, {"command": "quit", "values": [], "files": [], "urlSegments": []})  # stopping gets through
        assert (await queues.take(QUEUE, 1))["reqtype"] == "prompt"  # oldest first; the quit waits its turn

        for task in (first, second, small):  # the clients go: their requests leave, the quit stays
            task.cancel()
        await asyncio.gather(first, second, small, return_exceptions=True)
        assert queues.pending(QUEUE)[0] == 1
        assert (await queues.take(QUEUE, 1))["reqtype"] == "quit"
        assert queues.pending(QUEUE) == (0, 0)

    asyncio.run(scenario())


def test_log_entries_are_cut_with_a_marker_and_the_log_is_bounded():
    log = ServerLog(echo=None, capacity=100, max_chars=200_000)
    record = log.add("y" * 5_000_000, "warning", category="c" * 1000, label="l" * 1000)
    assert len(record["entry"]) < MAX_ENTRY_CHARS + 100
    assert record["entry"].startswith("y" * 100)
    assert record["entry"].endswith(f"[... {5_000_000 - MAX_ENTRY_CHARS} more characters cut]")
    assert len(record["category"]) < 200
    assert len(record["label"]) < 200

    for i in range(40):  # 40 × 5 MB sent: the log keeps at most its 200,000 characters
        log.add(f"{i}" + "z" * 5_000_000)
    assert log.chars <= 200_000
    kept = log.list(0, 1000)
    assert kept[-1]["entry"].startswith("39z")
    assert len(kept) < 40
    assert all(e["id"] > record["id"] for e in kept)  # the oldest went first

    for i in range(150):
        log.add(f"short {i}")
    assert len(log.list(0, 1000)) == 100  # at most `capacity` entries
    assert log.list(0, 1000)[-1]["entry"] == "short 149"


def test_log_list_count_is_capped_and_pages_on_with_last_id(tmp_path):
    async def scenario(server, context):
        for i in range(MAX_LIST_COUNT + 500):
            context.log.add(f"entry {i}")
        async with aiohttp.ClientSession() as client:
            url = server.make_url("/v1/log/list")
            async with client.get(url, params={"count": "5000"}) as response:
                first = (await response.json())["entries"]
            assert len(first) == MAX_LIST_COUNT
            async with client.get(url, params={"count": "5000", "last_id": str(first[-1]["id"])}) as response:
                rest = (await response.json())["entries"]
        assert rest
        assert rest[0]["id"] == first[-1]["id"] + 1
        assert rest[-1]["entry"] == f"entry {MAX_LIST_COUNT + 499}"

    run_with_server(scenario, tmp_path)


# A real process whose output a real module cannot produce on demand: a 3 MB line, then ordinary lines.
LONG_LINE_MODULE = (
    "import sys; sys.stdout.write('A' * 3_000_000 + '\\n'); print('after the long line', flush=True); "
    "sys.stderr.write('B' * 200_000 + '\\n'); sys.stderr.flush(); import time; time.sleep(60)"
)


def test_a_module_output_line_over_the_limit_is_logged_cut_and_reading_goes_on():
    async def scenario():
        log = ServerLog(echo=None)
        module = ModuleProcess(
            "LongLines", [sys.executable, "-c", LONG_LINE_MODULE], str(ROOT), log, on_exit=lambda reason: None
        )
        module.start(dict(__import__("os").environ))

        def entries():
            return [e["entry"] for e in log.list(0, 1000)]

        await wait_until(lambda: "after the long line" in entries(), 20, "the line after the long one")
        await wait_until(lambda: any(e.startswith("BBB") for e in entries()), 20, "the long stderr line")
        long_entry = next(e for e in entries() if e.startswith("AAA"))
        assert long_entry.endswith("more bytes cut]")
        assert len(long_entry) < MAX_ENTRY_CHARS + 100
        assert module.status.value == "Starting"  # still supervised, not crashed: the process runs on
        assert module.pid is not None
        await module.stop(lambda: None)
        assert module.status.value == "Stopped"

    asyncio.run(scenario())


def test_command_books_are_bounded_and_a_crash_marks_held_commands_lost():
    tracker = CommandTracker()
    for i in range(MAX_TRACKED_COMMANDS + 50):
        tracker.saw_answer({"commandId": f"c{i}", "commandStatus": "running"})
    tracker.saw_answer({"commandId": "q1", "commandStatus": "queued"})
    tracker.saw_answer({"commandId": "q2", "commandStatus": "queued"})
    tracker.saw_answer({"commandId": "q2", "commandStatus": "running"})  # it left the queue
    tracker.saw_answer({"commandId": "c60", "commandStatus": "completed"})
    tracker.saw_answer({"success": False, "error": "no id"})
    held, lost = tracker.counts()
    assert held == MAX_TRACKED_COMMANDS - 1
    assert lost == 0
    tracker.module_stopped("module LlamaChat stopped (exit code -9)")
    assert tracker.counts() == (0, MAX_TRACKED_COMMANDS - 1)
    crash = "module LlamaChat stopped (exit code -9)"
    assert tracker.lost(f"c{MAX_TRACKED_COMMANDS + 49}") == f"{crash} while it ran"
    assert tracker.lost("q1") == f"{crash} while it waited in the module's queue"
    assert tracker.lost("q2") == f"{crash} while it ran"
    assert tracker.lost("c60") is None  # finished before the crash
    assert tracker.lost("c0") is None  # the oldest were dropped to stay bounded
    assert tracker.lost(None) is None


def test_an_unexpected_exception_becomes_a_json_500_with_cors_and_is_logged(tmp_path):
    async def failing_handler(request):  # a fault no real endpoint produces on demand
        raise KeyError("no such thing")

    config = ServerConfig(module_dir=ROOT, port=0, launch_module=False, data_dir=tmp_path, log_level="critical")

    async def main():
        app = create_app(config)
        app.router.add_get("/test/fail", failing_handler)
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as client:
            async with client.get(server.make_url("/test/fail"), headers={"Origin": "http://localhost:8080"}) as r:
                assert r.status == 500
                assert r.content_type == "application/json"
                assert "Access-Control-Allow-Origin" in r.headers
                body = await r.json()
            async with client.get(server.make_url("/v1/server/status/ping")) as r:
                assert (await r.json())["success"] is True  # still serving
        assert body["success"] is False
        assert body["code"] == 500
        assert "GET /test/fail" in body["error"]
        assert "KeyError" in body["error"]
        assert "server log" in body["error"]
        logged = [e for e in app[STATE].log.list(0, 1000) if e["level"] == "error"]
        assert any("Traceback" in e["entry"] and "no such thing" in e["entry"] for e in logged)

    asyncio.run(main())
