"""llamachat_server's own bounds, with the server's real parts in this process (real asyncio, real HTTP on loopback
through aiohttp's TestServer, real subprocesses): requests whose client has gone leave the queue at once, the
queue and the log are bounded, a module's endless output line cannot end the supervisor, the command books are
bounded, an unexpected exception becomes a JSON answer, JSON bodies are bounded in items and fields (and in size
where no file is taken), control characters reach the console escaped, and connections are capped and closed when
they send nothing. No module is launched here; the hostile-input battery
(tests/test_hostile_inputs.py) and the fault tests (tests/test_faults.py) run the real module."""

import asyncio
import io
import json
import socket
import sys

import aiohttp
import requests
from aiohttp.test_utils import TestServer

from live_server import ROOT, closed_by_peer, free_port, poll, start_no_module_server, stop_process
from llamachat_server.app import create_app
from llamachat_server.commands import MAX_TRACKED_COMMANDS, CommandTracker
from llamachat_server.connections import connection_caps
from llamachat_server.module_process import ModuleProcess
from llamachat_server.queues import RequestQueueFull, RequestQueues, RequestTimedOut
from llamachat_server.request_body import MAX_JSON_ITEMS, MAX_TEXT_BODY_BYTES
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


# ---- Bodies: item and field caps, a smaller limit where no file is taken, numbers too long to read ------------


async def post_json(server, path: str, body: bytes, **headers) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as client:
        async with client.post(
            server.make_url(path), data=body, headers={"Content-Type": "application/json", **headers}
        ) as response:
            return response.status, await response.json()


def test_a_json_body_of_many_tiny_values_is_refused_before_it_becomes_python_objects(tmp_path):
    """6.9 MB of `{"key": "k", "value": []}` entries used to be parsed into ~1 GB of objects per 47 MB (and queued,
    counted as a few bytes); it is refused with why, from a count of its commas and brackets."""
    tiny = b'{"values": [' + b",".join([b'{"key":"k","value":[]}'] * 300_000) + b"]}"
    too_many_fields = json.dumps({"values": [{"key": f"k{i}", "value": ["v"]} for i in range(1001)]}).encode()

    async def scenario(server, state):
        status, answer = await post_json(server, "/v1/text/chat", tiny)
        assert status == 200
        assert answer["success"] is False
        assert answer["code"] == 400
        assert f"more than {MAX_JSON_ITEMS:,} JSON items" in answer["error"]
        status, answer = await post_json(server, "/v1/text/chat", too_many_fields)
        assert answer["success"] is False
        assert "1001 fields" in answer["error"]
        assert "at most 1000" in answer["error"]
        assert state.queues.pending(QUEUE) == (0, 0)  # neither reached the queue

    run_with_server(scenario, tmp_path, response_timeout=1.0)


def test_routes_that_take_no_file_accept_smaller_bodies(tmp_path):
    over = b"x" * (MAX_TEXT_BODY_BYTES + 1024)

    async def scenario(server, state):
        async with aiohttp.ClientSession() as client:
            form = aiohttp.FormData({"prompt": over.decode()})
            async with client.post(server.make_url("/v1/text/chat"), data=form) as response:
                assert response.status == 413
                assert "Maximum request body size" in (await response.json())["error"]
            body = json.dumps({"messages": [{"role": "user", "content": over.decode()}]}).encode()
        status, answer = await post_json(server, "/v1/chat/completions", body)
        assert status == 413
        assert "Maximum request body size" in answer["error"]["message"]  # OpenAI's shape
        assert state.queues.pending(QUEUE) == (0, 0)

    run_with_server(scenario, tmp_path, response_timeout=1.0)


def test_a_number_too_long_to_read_is_a_400_not_a_server_bug(tmp_path):
    """Python refuses to convert an integer of over 4300 digits: that ValueError was an unexpected 500."""
    digits = "9" * 5000

    async def scenario(server, state):
        status, answer = await post_json(server, "/v1/text/chat", f'{{"values": [], "n": {digits}}}'.encode())
        assert status == 200
        assert answer["code"] == 400
        assert "number of more than 4300 digits" in answer["error"]
        chat = f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": {digits}}}'.encode()
        status, answer = await post_json(server, "/v1/chat/completions", chat)
        assert status == 400
        assert "number of more than 4300 digits" in answer["error"]["message"]
        value = json.dumps({"values": [{"key": "messages", "value": ["[" * 101 + digits + "]" * 101]}]}).encode()
        status, answer = await post_json(server, "/v1/text/chat", value)  # parsed for its depth: read as text
        assert "this is a bug" not in answer.get("error", "")
        assert not [e for e in state.log.list(0, 1000) if e["level"] == "error"]

    run_with_server(scenario, tmp_path, response_timeout=1.0)


# ---- Control characters never reach the console ---------------------------------------------------------------

FORGED = "\r\x1b[2K12:00:00 information [Server] all fine\n12:00:01 information [Server] all fine\x1b]0;pwned\x07\u202e"


def test_control_characters_are_escaped_and_an_entrys_next_lines_cannot_pass_for_entries():
    console = io.StringIO()
    log = ServerLog(echo=console)
    record = log.add(f"GET /v1/queue/{FORGED}", "warning", category="c\x1bat", label="l\rab")
    shown = console.getvalue()
    for raw in ("\r", "\x1b", "\x07", "\u202e"):
        assert raw not in shown
        assert raw not in record["entry"] + record["category"] + record["label"]
    assert "\\x0d\\x1b[2K12:00:00" in shown
    assert "\\x1b]0;pwned\\x07\\u202e" in shown
    lines = shown.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("    12:00:01")  # a continuation, not an entry of its own


def test_a_request_path_with_control_characters_is_logged_escaped(tmp_path):
    async def scenario(server, state):
        async with aiohttp.ClientSession() as client:
            url = server.make_url("/v1/queue/%0D%1B%5B2Kinformation%20%5BServer%5D%20all%20fine")
            async with client.get(url, params={"moduleId": "LlamaChat"}) as response:
                assert response.status == 404  # an unknown queue (this test plays a module of the same user)
        logged = [e["entry"] for e in state.log.list(0, 1000) if "unknown queue" in e["entry"]]
        assert logged
        assert "\\x0d\\x1b[2Kinformation [Server] all fine" in logged[0]
        assert "\r" not in logged[0]
        assert "\x1b" not in logged[0]

    run_with_server(scenario, tmp_path)


# ---- Connections: caps under a low descriptor limit, header and idle deadlines ----------------------------------

DESCRIPTORS = 256  # the server's RLIMIT_NOFILE in the test below: low enough to reach in a bounded loop
HALF_HEADERS = b"GET /v1/server/status/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: "


def test_half_sent_and_idle_connections_cannot_use_up_the_descriptors(tmp_path):
    """With 1,024 descriptors, 1,100 connections that each sent half their headers made the server log EMFILE and
    stay unreachable: none was ever closed. Now connections over the caps are answered 503 and closed at once,
    half-sent and idle ones are closed after the keep-alive time, and the server answers again."""
    total, per_peer = connection_caps(DESCRIPTORS)
    port = free_port()
    log_path = tmp_path / "server.log"
    server = start_no_module_server(port, log_path, DESCRIPTORS, "--log-level", "debug")
    sockets = []
    try:
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /v1/server/status/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")  # answered, then left idle on a kept-alive connection
        for address in ("127.0.0.1", "::1"):
            for _ in range(DESCRIPTORS + 50):
                sock = socket.create_connection((address, port))
                sock.sendall(HALF_HEADERS)
                sock.setblocking(False)
                sockets.append((address, sock))

        def refused(address):
            return [s for a, s in sockets if a == address and _peek(s).startswith(b"HTTP/1.1 503")]

        extra = DESCRIPTORS + 50 - per_peer  # over one address's cap: answered 503 at once (the idle one counts)
        for address in ("127.0.0.1", "::1"):
            poll(lambda a=address: len(refused(a)) >= extra, 30, f"{address}'s extra connections")
        assert per_peer * 2 <= total + 1
        assert b"as many connections as" in _peek(refused("::1")[0])

        poll(lambda: all(closed_by_peer(s) for _, s in sockets), 60, "the half-sent connections to be closed")
        idle.setblocking(False)
        poll(lambda: closed_by_peer(idle), 60, "the idle connection to be closed")
        ping = requests.get(f"http://127.0.0.1:{port}/v1/server/status/ping", timeout=10)
        assert ping.status_code == 200
        output = log_path.read_text()
        assert "Too many open files" not in output, output[-3000:]
        assert "EMFILE" not in output, output[-3000:]
    finally:
        for _, sock in sockets:
            sock.close()
        stop_process(server)


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(4096, socket.MSG_PEEK)
    except (BlockingIOError, OSError):
        return b""
