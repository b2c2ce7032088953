"""The reply channel's two ends on real pipes: the module's writer (llamachat/reply_channel.py), which must never
block decoding nor write a partial line, and the server's reader (llamachat_server/reply_feed.py), which hands each
chat's lines to its followers; and how a follower merges pieces (openai_api._grown). The whole path, module to OpenAI
client, is tests/test_openai_stream.py's."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from types import SimpleNamespace

import pytest

from llamachat.chat_job import ChatJob
from llamachat.chat_queue import ChatQueue
from llamachat.reply_channel import ATOMIC_BYTES, ReplyChannel, ReplyChannelError
from llamachat_server import openai_api, reply_feed
from llamachat_server.openai_api import _grown
from llamachat_server.reply_feed import ReplyFeed
from llamachat_server.server_log import ServerLog
from llamachat_server.settings import REPLY_CHANNEL_VARIABLE

pytestmark = pytest.mark.skipif(os.name == "nt", reason="no reply channel on Windows: the server polls there")


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:  # a test closed it
            pass


def read_lines(fd) -> list[dict]:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    return [json.loads(line) for line in data.splitlines()]


def test_no_variable_is_no_channel_and_a_variable_that_names_no_pipe_is_refused(pipe):
    assert ReplyChannel.from_environment({}) is None
    assert ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: ""}) is None
    with pytest.raises(ReplyChannelError, match=REPLY_CHANNEL_VARIABLE):
        ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: "three"})
    with tempfile.TemporaryFile() as file, pytest.raises(ReplyChannelError, match="not a pipe"):
        ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: str(file.fileno())})
    read_fd, write_fd = pipe
    os.close(read_fd)
    with pytest.raises(ReplyChannelError):
        ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: str(read_fd)})  # closed
    assert ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: str(write_fd)}) is not None


def test_a_job_writes_each_piece_at_its_offset_and_the_queue_an_end_when_the_chat_has_its_result(pipe):
    read_fd, write_fd = pipe
    channel = ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: str(write_fd)})
    queue = ChatQueue(capacity=2, result_ttl=60, on_complete=channel.ended)
    chat = queue.add("chat-1", request=None, max_tokens=8)
    queue.take()
    job = ChatJob("chat-1", "model", channel=channel)
    for piece, tokens in (("Once", 1), ("", 2), (" upon", 3), (" a tïme", 5)):
        job.add_text(piece, tokens)
    queue.finish(chat, job.finish("completed"))
    before = time.monotonic()
    lines = read_lines(read_fd)
    metrics = [line.pop("metrics") for line in lines[:3]]
    stamps = [line.pop("t") for line in lines[:3]]
    assert stamps == sorted(stamps) and stamps[-1] <= before  # when written, on the clock the server reads too
    assert lines == [
        {"id": "chat-1", "at": 0, "text": "Once"},
        {"id": "chat-1", "at": 4, "text": " upon"},
        {"id": "chat-1", "at": 9, "text": " a tïme"},
        {"id": "chat-1", "end": True},
    ]
    assert "".join(line.get("text", "") for line in lines) == job.reply
    # Each piece carries the metrics a poll would have seen just after it: what changes in a running chat's status.
    assert [m["completion_tokens"] for m in metrics] == [1, 3, 5]
    assert metrics[-1].keys() == job.metrics().keys() == job.status().keys() - {"success", "reply"}


def test_a_chat_with_log_probabilities_writes_its_pieces_without_metrics(pipe):
    read_fd, write_fd = pipe
    channel = ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: str(write_fd)})
    job = ChatJob("chat-2", "model", channel=channel)
    job.logprobs = []  # a status holds them, and a line has no room for them: the module answers its polls
    job.add_text("Hi", 1)
    assert [{k: v for k, v in line.items() if k != "t"} for line in read_lines(read_fd)] == [
        {"id": "chat-2", "at": 0, "text": "Hi"}
    ]


def test_a_full_pipe_drops_lines_at_once_and_a_closed_one_is_left_alone(pipe):
    read_fd, write_fd = pipe
    channel = ReplyChannel.from_environment({REPLY_CHANNEL_VARIABLE: str(write_fd)})
    written = 0
    while channel.dropped == 0:  # nobody reads: the pipe fills, and the writer never waits
        channel.text("chat", written, "x" * 100)
        written += 100
    lines = read_lines(read_fd)
    assert all(len(line["text"]) == 100 for line in lines)  # each line whole
    assert len(lines) == written // 100 - 1
    channel.text("chat", written, "y" * ATOMIC_BYTES)  # too long to be written whole
    assert channel.dropped == 2 and read_lines(read_fd) == []
    os.close(read_fd)  # the server has gone
    channel.text("chat", 0, "z")
    channel.ended("chat")
    assert channel.dropped == 2  # not dropped: no longer written at all


def test_a_follower_merges_pieces_by_offset_and_asks_for_the_status_when_one_is_missing_or_the_chat_ends():
    assert _grown("Once", [{"at": 0, "text": "Once"}, {"at": 4, "text": " upon"}]) == (["Once upon"], False)
    assert _grown("Once up", [{"at": 4, "text": " upon"}, {"at": 9, "text": " a"}]) == (
        ["Once upon", "Once upon a"],
        False,
    )
    assert _grown("Once", [{"at": 9, "text": " a"}]) == ([], True)  # " upon" was dropped
    assert _grown("Once", [{"at": 4, "text": " upon"}, {"end": True}]) == (["Once upon"], True)
    assert _grown("Once", []) == ([], True)  # silence


def test_a_stream_sends_pieces_from_the_reader_while_it_can_and_the_rest_through_statuses_in_order(monkeypatch):
    """openai_api._follow with a LiveWriter's `write`: a piece that extends the reply sent so far goes to the client
    from the pipe's reader (no status, no poll of the module); one it refuses, one after a gap, and the end go through
    the follower's statuses. Together they give the client the module's reply once, in order. The module's answers
    are scripted (a stand-in for its get_command_status: what matters here is when they are asked)."""
    answers = iter(
        [
            {"commandStatus": "running", "reply": "Once"},
            {"commandStatus": "running", "reply": "Once upon a time,"},  # asked after the gap
            {"commandStatus": "completed", "reply": "Once upon a time, there"},  # asked after the end line
        ]
    )
    asked = []

    async def scripted_status(state, command_id):
        asked.append(command_id)
        return next(answers)

    monkeypatch.setattr(openai_api, "_status", scripted_status)
    sent: list[tuple[str, str]] = []  # ("written", piece) from the reader, ("status", reply) from the follower
    accepting = [True]

    def write(text: str) -> bool:
        if accepting[0]:
            sent.append(("written", text))
        return accepting[0]

    async def until(condition) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, "the pipe's line never reached the follower"
            await asyncio.sleep(0.005)

    async def scenario():
        feed = ReplyFeed(ServerLog(echo=None))
        write_fd = feed.open()
        statuses = openai_api._follow(SimpleNamespace(reply_feed=feed), "a", None, write=write)

        async def next_status():
            status = await statuses.__anext__()
            sent.append(("status", status["reply"]))
            return status

        await next_status()  # "Once"
        following = asyncio.ensure_future(next_status())
        os.write(write_fd, piece(4, " upon"))
        await until(lambda: ("written", " upon") in sent)
        assert asked == ["a"] and not following.done()  # the reader sent it: no status, no poll
        accepting[0] = False  # the connection is full, say
        os.write(write_fd, piece(9, " a"))
        assert (await following)["reply"] == "Once upon a"
        accepting[0] = True
        following = asyncio.ensure_future(next_status())
        os.write(write_fd, piece(16, ","))  # the piece at 11 was dropped
        assert (await following)["reply"] == "Once upon a time,"
        following = asyncio.ensure_future(next_status())
        os.write(write_fd, piece(17, " there"))
        await until(lambda: ("written", " there") in sent)
        os.write(write_fd, b'{"id":"a","end":true}\n')
        assert (await following)["commandStatus"] == "completed"
        with pytest.raises(StopAsyncIteration):
            await statuses.__anext__()
        feed.close()

    asyncio.run(scenario())
    assert len(asked) == 3
    client = ""  # what the client got: each written piece, and what each status adds to that
    for kind, text in sent:
        client += text if kind == "written" else text[len(client) :]
    assert client == "Once upon a time, there"
    assert [text for kind, text in sent if kind == "written"] == [" upon", " there"]


def test_a_piece_the_live_writer_sends_while_a_write_waits_for_the_client_is_not_sent_again():
    """openai_api._send_choices counts the text of a write before the write, which may wait for a slow client: a
    piece the LiveWriter sends meanwhile adds to that count, and the next status sends only what comes after it.
    The response is a stand-in whose write waits when told to: loopback's socket buffers grow to megabytes, more than
    a test's reply fills, so a real client cannot make aiohttp wait at will."""

    class PausingResponse:
        def __init__(self) -> None:
            self.sent: list[str] = []  # each chunk's text, in the order it reached the connection
            self.paused: asyncio.Future | None = None

        async def write(self, data: bytes) -> None:
            if data.startswith(b"data: {"):
                self.sent.append(json.loads(data[len(b"data: ") :])["choices"][0]["delta"].get("content") or "")
            if self.paused is not None:
                await self.paused

        async def write_eof(self) -> None:
            pass

    class StartedLive:  # what LiveWriter.start is given: the chunk of a piece it sends
        def start(self, event) -> None:
            self.event = event

    async def scenario():
        response, live, updates = PausingResponse(), StartedLive(), asyncio.Queue()

        async def statuses():
            while True:
                yield 0, await updates.get()

        chat = SimpleNamespace(logprobs=False, tools=None, include_usage=False)
        latest = {0: {"commandStatus": "running", "reply": "Once"}}
        sending = asyncio.ensure_future(
            openai_api._send_choices(response, chat, latest, statuses(), live, "id", 0, "m", "f")
        )

        async def until_sent(text: str) -> None:
            deadline = time.monotonic() + 10
            while response.sent[-1:] != [text]:
                assert time.monotonic() < deadline and not sending.done(), f"{text!r} was never sent"
                await asyncio.sleep(0.001)

        await until_sent("Once")
        response.paused = asyncio.get_running_loop().create_future()
        await updates.put({"commandStatus": "running", "reply": "Once upon"})
        await until_sent(" upon")  # the handler's write of " upon" now waits for the client
        response.sent.append(live.event(" a")["choices"][0]["delta"]["content"])  # the LiveWriter sends meanwhile
        response.paused.set_result(None)
        response.paused = None
        await updates.put(
            {"commandStatus": "completed", "success": True, "stop_reason": "completed", "reply": "Once upon a"}
        )
        await asyncio.wait_for(sending, 10)
        return response.sent

    assert "".join(asyncio.run(scenario())) == "Once upon a"


def test_a_direct_taker_that_fails_leaves_its_lines_to_the_follower():
    """`direct` runs on the pipe's reader: should it raise, the line (and the next ones) are queued for the follower,
    and the reader goes on delivering."""

    def broken(line: dict) -> bool:
        raise ConnectionError("the connection broke mid-write")

    async def scenario():
        pieces = reply_feed.ReplyPieces()
        pieces.direct = broken
        pieces.put({"id": "a", "at": 0, "text": "Once"})
        pieces.put({"id": "a", "at": 4, "text": " upon"})
        return pieces.direct, await pieces.take(5)

    direct, lines = asyncio.run(scenario())
    assert direct is None and [line["text"] for line in lines] == ["Once", " upon"]


def test_the_feed_hands_each_chat_its_own_lines_and_closes_its_followers_when_the_module_ends():
    log = ServerLog(echo=None)

    async def scenario():
        feed = ReplyFeed(log)
        write_fd = feed.open()
        with feed.follow("a") as a, feed.follow("b") as b:
            os.write(write_fd, b'{"id":"a","at":0,"text":"Hi"}\n{"id":"b","end":true}\nnot json\n{"id":"a","at":"0"}\n')
            os.write(write_fd, b'{"id":"c","at":0,"text":"nobody follows c"}\n{"id":"a","at":2,"text":"!"}\n')
            first = await a.take(5)
            got_a = first + (await a.take(5) if len(first) < 2 else [])
            got_b = await b.take(5)
            os.close(write_fd)  # the module has ended
            assert await a.take(5) == [] and a.closed
        assert not feed.live
        with feed.follow("a") as late:
            assert late.closed  # no channel: its follower polls
        feed.close()
        return got_a, got_b

    got_a, got_b = asyncio.run(scenario())
    assert got_a == [{"id": "a", "at": 0, "text": "Hi"}, {"id": "a", "at": 2, "text": "!"}]
    assert got_b == [{"id": "b", "end": True}]
    warnings = [entry["entry"] for entry in log.list(count=10) if "reply channel" in entry["entry"]]
    assert len(warnings) == 2  # the line that is not JSON, and the piece whose offset is not a number


RUNNING_ANSWER = {
    "success": True,
    "commandId": "a",
    "commandStatus": "running",
    "message": "The long running command is still in progress",
    "moduleId": "LlamaChat",
    "reply": "Once",
    "completion_tokens": 1,
}


def piece(at: int, text: str, tokens: int | None = None, chat: str = "a", written: float | None = None) -> bytes:
    metrics = {} if tokens is None else {"metrics": {"completion_tokens": tokens}}
    stamp = {} if written is None else {"t": written}
    return json.dumps({"id": chat, "at": at, "text": text, **metrics, **stamp}).encode() + b"\n"


def test_the_feed_answers_a_running_chats_status_from_the_modules_last_answer_and_the_lines_since(monkeypatch):
    """Polls of a running chat cost the module nothing while its lines keep the server's answer current; whatever
    the lines cannot vouch for (no answer yet, a gap, silence, the end, a cancel) is the module's to answer."""
    clock = [100.0]
    monkeypatch.setattr(reply_feed, "monotonic", lambda: clock[0])  # silence without waiting for it

    async def settle(feed: ReplyFeed, write_fd: int, data: bytes, chat: str = "a") -> None:
        with feed.follow(chat) as pieces:
            os.write(write_fd, data)
            got = []
            while len(got) < data.count(b"\n"):
                got += await pieces.take(5)

    async def scenario():
        feed = ReplyFeed(ServerLog(echo=None))
        write_fd = feed.open()
        assert feed.status("a") is None
        await settle(feed, write_fd, piece(0, "Once", 1))
        assert feed.status("a") is None  # no answer of the module's yet: the envelope is its to give
        feed.answered("a", "get_command_status", RUNNING_ANSWER)
        assert feed.status("a") is None  # the module's answer is the newest word
        await settle(feed, write_fd, piece(4, " upon", 2) + piece(9, " a", 3))
        assert feed.status("a") == {**RUNNING_ANSWER, "reply": "Once upon a", "completion_tokens": 3}
        feed.answered("a", "get_command_status", {**RUNNING_ANSWER, "reply": "Once upon", "completion_tokens": 2})
        assert feed.status("a")["reply"] == "Once upon a"  # an answer behind the lines never shortens the reply
        clock[0] += reply_feed.LIVE_SILENCE + 0.1
        assert feed.status("a") is None  # silence: the module says what has become of the chat
        await settle(feed, write_fd, piece(11, " time", 4))
        assert feed.status("a")["reply"] == "Once upon a time"
        await settle(feed, write_fd, piece(30, "!", 6))  # the piece at 16 was dropped
        assert feed.status("a") is None
        feed.answered("a", "get_command_status", {**RUNNING_ANSWER, "reply": "Once upon a time, there", "x": 1})
        await settle(feed, write_fd, piece(16, ", there", 6))  # written before that answer: its metrics are older
        assert feed.status("a") is None
        await settle(feed, write_fd, piece(23, " was", 7))
        grown = {"reply": "Once upon a time, there was", "completion_tokens": 7}
        assert feed.status("a") == {**RUNNING_ANSWER, "x": 1, **grown}
        await settle(feed, write_fd, piece(27, " a", None))  # a chat with log probabilities: no metrics
        assert feed.status("a") is None
        await settle(feed, write_fd, piece(29, " king", 9))
        assert feed.status("a") is not None
        feed.answered("a", "cancel_command", {"success": True, "commandStatus": "cancelled"})
        assert feed.status("a") is None  # being cancelled: the module's answers say when it has stopped
        feed.answered("a", "get_command_status", RUNNING_ANSWER)  # sent before the cancel, come late
        await settle(feed, write_fd, piece(34, " who", 10))
        assert feed.status("a") is None  # that late answer left nothing to answer from

        b_running = {**RUNNING_ANSWER, "commandId": "b", "reply": "Hi"}
        await settle(feed, write_fd, piece(0, "Hi", 1, "b"), "b")
        feed.answered("b", "get_command_status", b_running)
        await settle(feed, write_fd, piece(2, "!", 2, "b", written=clock[0]), "b")
        assert feed.status("b")["reply"] == "Hi!"
        # Read long after the module wrote it (nobody read the pipe meanwhile): the chat may have ended since, its
        # end line dropped from a full pipe.
        await settle(feed, write_fd, piece(3, " Bye", 3, "b", written=clock[0] - reply_feed.LIVE_SILENCE - 1), "b")
        assert feed.status("b") is None
        await settle(feed, write_fd, piece(7, ".", 4, "b") + b'{"id":"b","end":true}\n', "b")
        assert feed.status("b") is None  # over: the result is the module's
        feed.answered("b", "get_command_status", b_running)
        assert feed.status("b") is None

        await settle(feed, write_fd, piece(0, "Yo", 1, "c"), "c")
        feed.answered("c", "get_command_status", {**RUNNING_ANSWER, "commandId": "c", "reply": "Yo"})
        os.write(write_fd, piece(2, "!", 2, "c"))  # nobody follows the chat: the pipe is read when a poll needs it
        assert feed.status("c")["reply"] == "Yo!"
        os.write(write_fd, piece(3, "?", 3, "c"))
        os.close(write_fd)  # the module has ended, a line of its still unread: the read goes on to the pipe's end
        assert feed.status("c") is None and not feed.live
        feed.close()

    asyncio.run(scenario())
