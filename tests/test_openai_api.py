"""The OpenAI-compatible API of llamachat_server, driven by the real `openai` package (and once by plain HTTP for the
exact wire format) against a real server with the real module and SmolLM2. What the client gets is checked against
what the module itself reports for the same command, read through the server's own protocol (the chat's commandId
comes in the X-LlamaChat-Command-Id header; a completion's id is a random one of its own)."""

import json
import re
import socket
import threading
from urllib.parse import urlsplit

import openai
import pytest
import requests

from live_server import ROOT, poll, running_server, serve_in_thread, server_log_path, server_status
from llamachat_server.openai_api import (
    COMMAND_ID_HEADER,
    DUE_INTERVAL,
    FIRST_TEXT_INTERVAL,
    LOGGED_ID_CHARS,
    REPLY_INTERVAL,
    _next_poll_in,
)
from llamachat_server.server_state import ServerConfig

STORY = "Write a very long story about a dragon who learns to bake bread. Describe every step in detail."
LONG = 1900  # tokens for the story: a reply still running when a test looks, however fast the machine
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def base_url(smollm2):
    # A queue of two, so that a full queue is quick to reach (test_a_full_queue_is_a_rate_limit_error...).
    with running_server(smollm2, CPAI_MODULE_LLAMA_QUEUE_SIZE="2") as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    # No retries: a test must see the first answer (the package retries 429s and 5xxs by default).
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="any key", max_retries=0, timeout=120)


def create(client, **request):
    """(the parsed answer or stream, the chat's commandId from the answer's header)."""
    raw = client.chat.completions.with_raw_response.create(**request)
    return raw.parse(), raw.headers[COMMAND_ID_HEADER]


def module_status(base_url, command_id):
    """The module's own get_command_status answer for the chat `command_id`."""
    answer = requests.post(f"{base_url}/v1/LlamaChat/get_command_status", data={"commandId": command_id}, timeout=40)
    return answer.json()


def module_final(base_url, command_id):
    def finished():
        answer = module_status(base_url, command_id)
        return answer if answer["commandStatus"] == "completed" else None

    return poll(finished, 120, f"the module's chat {command_id} to end", interval=0.02)


def test_polls_are_quick_until_the_first_text_then_sparse_until_the_token_limit_is_near():
    assert _next_poll_in({"reply": ""}, 512) == FIRST_TEXT_INTERVAL
    flowing = {"reply": "Once", "completion_tokens": 100, "tokens_per_second": 100.0}
    assert _next_poll_in(flowing, 512) == REPLY_INTERVAL  # 4 s to the limit at 100 tokens/s
    assert _next_poll_in(flowing, None) == REPLY_INTERVAL  # no limit given: a reply ends when the model stops
    near = {**flowing, "completion_tokens": 505}
    assert _next_poll_in(near, 512) == pytest.approx(0.07)  # 7 tokens left: polled when they should be done
    assert _next_poll_in({**flowing, "completion_tokens": 512}, 512) == DUE_INTERVAL  # due: polled closely
    assert _next_poll_in({**flowing, "tokens_per_second": 0}, 512) == REPLY_INTERVAL  # one token so far: no speed
    queued = {"commandStatus": "queued", "reply": "", "queue_position": 1}
    for wait in (None, 30.0, 0.0):  # polled sparsely, whatever the estimate: polls slow the chat that runs meanwhile
        assert _next_poll_in({**queued, "estimated_wait_s": wait}, 512) == REPLY_INTERVAL


def test_models_lists_the_loaded_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert models[0].owned_by == "llamachat"


def test_a_completion_is_the_modules_reply_with_its_token_counts(base_url, client):
    answer, command_id = create(client, model="whatever", messages=HELLO, max_tokens=40, temperature=0)
    final = module_final(base_url, command_id)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == final["reply"] != ""
    assert choice.finish_reason == {"completed": "stop", "length": "length"}[final["stop_reason"]]
    assert answer.object == "chat.completion"
    assert answer.model == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert answer.usage.prompt_tokens == final["prompt_tokens"] > 0
    assert answer.usage.completion_tokens == final["completion_tokens"] > 0
    assert answer.usage.total_tokens == final["prompt_tokens"] + final["completion_tokens"]


def test_system_prompt_and_earlier_turns_reach_the_model(base_url, client):
    """The prompt the model read is counted: the OpenAI request and the native one with the same system prompt and
    history give the same prompt_tokens, and leaving them out gives fewer."""
    system, history = (
        "You are a pirate. Answer in pirate speak.",
        [
            {"role": "user", "content": "What is your ship called?"},
            {"role": "assistant", "content": "The Black Pearl, matey!"},
        ],
    )
    asked = client.chat.completions.create(
        model="m", messages=[{"role": "system", "content": system}, *history, *HELLO], max_tokens=1
    )
    native = requests.post(
        f"{base_url}/v1/text/chat",
        data={"prompt": HELLO[0]["content"], "system_prompt": system, "messages": json.dumps(history), "max_tokens": 1},
        timeout=40,
    ).json()
    native_final = module_final(base_url, native["commandId"])
    bare = client.chat.completions.create(model="m", messages=HELLO, max_tokens=1)
    assert asked.usage.prompt_tokens == native_final["prompt_tokens"] > bare.usage.prompt_tokens


def test_a_response_id_is_its_own_and_does_not_open_the_chat(base_url, client):
    """The id OpenAI tooling logs as harmless used to be chatcmpl-<commandId>: whoever saw it could read or cancel the
    chat through the CodeProject routes. Now it is a random id of its own; the chat stays the client's."""
    answer, command_id = create(client, model="m", messages=HELLO, max_tokens=2)
    stream, streamed_id = create(client, model="m", messages=HELLO, max_tokens=2, stream=True)
    chunks = list(stream)
    for response_id, chat in ((answer.id, command_id), (chunks[0].id, streamed_id)):
        assert (
            response_id.startswith("chatcmpl-") and chat not in response_id and chat.replace("-", "") not in response_id
        )
        for guess in (response_id, response_id[len("chatcmpl-") :]):
            read = module_status(base_url, guess)
            assert read["success"] is False, read
            assert "reply" not in read, read
        assert module_final(base_url, chat)["success"] is True  # the header's id is the chat's
    assert len({answer.id, chunks[0].id}) == 2


def test_max_tokens_ends_the_reply_with_finish_reason_length(client):
    answer = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": STORY}], max_completion_tokens=5
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5


def test_a_stop_string_ends_the_reply_before_it(client):
    answer = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": STORY}], max_tokens=60, stop=[" "], temperature=0
    )
    assert answer.choices[0].finish_reason == "stop"
    assert " " not in answer.choices[0].message.content
    assert answer.usage.completion_tokens < 60


def test_a_stream_sends_the_reply_as_deltas_then_finish_reason_then_usage(base_url, client):
    stream, command_id = create(
        client,
        model="m",
        messages=[{"role": "user", "content": STORY}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    final = module_final(base_url, command_id)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    contents = [c.choices[0].delta.content for c in with_choice[1:-1]]
    assert all(contents)
    assert "".join(contents) == final["reply"]
    assert [c.choices[0].finish_reason for c in with_choice] == [None] * (len(with_choice) - 1) + ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == final["completion_tokens"] == 40
    assert chunks[-1].usage.prompt_tokens == final["prompt_tokens"]


def test_a_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=5, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_the_raw_stream_is_server_sent_events_ending_with_done(base_url):
    """The exact wire format, as curl sees it: `data: <json>` events separated by blank lines, then [DONE]."""
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "m", "messages": HELLO, "max_tokens": 8, "stream": True},
        stream=True,
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    body = response.content.decode()
    assert body.endswith("\n\ndata: [DONE]\n\n")
    events = body[: -len("data: [DONE]\n\n")].split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-1])
    parsed = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert parsed[-1]["choices"][0]["delta"] == {}
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(set(p) == {"id", "object", "created", "model", "system_fingerprint", "choices"} for p in parsed)


def test_a_client_that_goes_away_mid_stream_cancels_its_chat(base_url, client):
    stream, command_id = create(
        client, model="m", messages=[{"role": "user", "content": STORY}], max_tokens=LONG, stream=True
    )
    for piece in stream:
        if piece.choices and piece.choices[0].delta.content:
            break
    stream.close()
    final = module_final(base_url, command_id)
    assert final["stop_reason"] == "cancelled"
    assert 0 < final["completion_tokens"] < LONG
    assert final["reply"]
    logged = f"chat {command_id[:LOGGED_ID_CHARS]}… cancelled"
    poll(lambda: logged in server_log_path(base_url).read_text(), 10, "the server to log the cancel")
    # The model is free again: the next chat is taken, not refused as busy.
    assert client.chat.completions.create(model="m", messages=HELLO, max_tokens=2).choices[0].finish_reason


def cancelled_in_log(base_url) -> set:
    """The chats the server cancelled because their OpenAI client went away."""
    return set(re.findall(r"OpenAI client went away: chat (\S+)… cancelled", server_log_path(base_url).read_text()))


def wait_until_the_model_is_free(base_url) -> None:
    def model_free():
        # A probe that starts at once finds nothing running or waiting; one that would wait leaves the queue again.
        probe = native_chat(base_url, prompt="Hi", max_tokens="1")
        if probe["commandStatus"] != "running":
            requests.post(f"{base_url}/v1/LlamaChat/cancel_command", data={"commandId": probe["commandId"]}, timeout=40)
        module_final(base_url, probe["commandId"])
        return probe["commandStatus"] == "running"

    poll(model_free, 10, "the model to be free (a long chat nobody reads would hold it for many seconds)")


def send_raw_chat(base_url, body: dict) -> socket.socket:
    """A chat request on a socket of its own, which the test can close before any answer."""
    address = urlsplit(base_url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((address.hostname, address.port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def test_a_client_that_goes_away_before_its_answer_cancels_its_chat(base_url):
    already = cancelled_in_log(base_url)
    answered = server_status(base_url)["requestCount"]
    sock = send_raw_chat(base_url, {"messages": [{"role": "user", "content": STORY}], "max_tokens": LONG})
    # The module has answered the chat's start and the server's first poll of it (two answers: a late answer to an
    # earlier test's poll cannot pass for both): the chat runs, the answer is far off.
    poll(lambda: server_status(base_url)["requestCount"] >= answered + 2, 30, "the module to start the chat")
    sock.close()
    cancelled = poll(lambda: cancelled_in_log(base_url) - already, 10, "the server to cancel the chat")
    assert [len(short_id) for short_id in cancelled] == [LOGGED_ID_CHARS]  # the log never holds a whole chat id
    wait_until_the_model_is_free(base_url)


def test_a_client_that_goes_away_at_once_leaves_no_chat_running(base_url):
    """Gone before the module answered the start: the chat it may have started is cancelled once its id is known."""
    send_raw_chat(base_url, {"messages": [{"role": "user", "content": STORY}], "max_tokens": LONG}).close()
    wait_until_the_model_is_free(base_url)


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"n": 9}, "n must be a whole number from 1 to 8"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "JSON Schema object"),
        ({"response_format": {"type": "json_object", "schema": {"type": "object", "not": {}}}}, "uses 'not'"),
        ({"temperature": 5}, "temperature must be a number from 0.0 to 2.0"),  # the module's own check
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop must be one string or a JSON array of 1 to 4"),
    ],
)
def test_bad_requests_raise_bad_request_error_with_the_reason(client, fields, says):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=HELLO, **fields)
    assert caught.value.status_code == 400
    assert says in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"


def test_images_and_a_conversation_without_a_users_message_are_refused(client):
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match="only text is supported"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": image}])
    with pytest.raises(openai.BadRequestError, match="must end with a user message") as caught:
        client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."}])
    assert caught.value.param == "messages"


def test_a_body_that_is_not_json_is_a_400_in_openais_shape(base_url):
    answer = requests.post(f"{base_url}/v1/chat/completions", data="{not json", timeout=10)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"] == (
        "The body is not valid JSON (Expecting property name enclosed in double quotes at character 1): "
        "send a JSON object"
    )
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)


def test_wrong_methods_and_unknown_paths_answer_in_openais_shape(base_url, client):
    """OpenAI clients read errors from {"error": {...}}; a 405 or 404 in CodeProject's shape says nothing to them."""
    wrong = requests.get(f"{base_url}/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "POST"
    assert "does not answer GET" in wrong.json()["error"]["message"]
    assert requests.delete(f"{base_url}/v1/models", timeout=10).json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def native_chat(base_url, **form):
    answer = requests.post(f"{base_url}/v1/text/chat", data=form, timeout=40).json()
    assert answer["success"], answer
    return answer


def cancel_and_wait(base_url, *command_ids):
    for cid in command_ids:
        requests.post(f"{base_url}/v1/LlamaChat/cancel_command", data={"commandId": cid}, timeout=40)
    for cid in command_ids:
        module_final(base_url, cid)


def test_a_full_queue_is_a_rate_limit_error_with_the_modules_message(base_url, client):
    # One story runs and two wait: the module's queue of two is full.
    natives = [native_chat(base_url, prompt=STORY, max_tokens=LONG)["commandId"] for _ in range(3)]
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full") as caught:
            client.chat.completions.create(model="m", messages=HELLO)
        assert caught.value.status_code == 429
        assert "at most 2 chats may wait" in caught.value.message
    finally:
        cancel_and_wait(base_url, *natives)


def test_a_chat_that_waits_in_the_queue_streams_once_it_starts(base_url, client):
    """Nothing is sent while the chat waits (its HTTP status is not known until it has started: a conversation too
    long for the context is a 400); once the chat ahead ends, the whole reply streams."""
    running = native_chat(base_url, prompt=STORY, max_tokens=LONG)["commandId"]
    answered = server_status(base_url)["requestCount"]
    chunks, opened, command_ids = [], threading.Event(), []

    def read_stream():
        stream, command_id = create(client, model="m", messages=HELLO, max_tokens=8, temperature=0, stream=True)
        command_ids.append(command_id)
        opened.set()
        chunks.extend(stream)

    reader = threading.Thread(target=read_stream)
    reader.start()
    try:
        poll(lambda: server_status(base_url)["requestCount"] > answered, 30, "the module to queue the chat")
        ahead = module_status(base_url, running)
        assert not opened.is_set() or ahead["commandStatus"] == "completed", ahead
    finally:
        cancel_and_wait(base_url, running)
    reader.join(120)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = module_final(base_url, command_ids[0])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == final["reply"] != ""
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_foreign_web_page_may_not_chat_and_cannot_read_the_models(base_url):
    evil = {"Origin": "https://evil.example"}
    chat = requests.post(f"{base_url}/v1/chat/completions", json={"messages": HELLO}, headers=evil, timeout=10)
    assert chat.status_code == 403
    assert "Access-Control-Allow-Origin" not in chat.headers
    error = chat.json()["error"]  # OpenAI's shape
    assert "evil.example" in error["message"]
    assert error["type"] == "permission_error"
    models = requests.get(f"{base_url}/v1/models", headers=evil, timeout=10)
    assert models.status_code == 403
    assert "Access-Control-Allow-Origin" not in models.headers
    assert "data" not in models.json()


def test_a_local_web_page_can_read_a_stream(base_url):
    """The CORS header goes out with a streamed answer too (added as its headers are sent), exposing the chat's
    commandId header to the page."""
    origin = "http://localhost:3000"
    response = requests.post(
        f"{base_url}/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 2, "stream": True},
        headers={"Origin": origin},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert response.headers["Access-Control-Expose-Headers"] == COMMAND_ID_HEADER
    assert response.text.endswith("data: [DONE]\n\n")


def test_no_module_is_a_503_saying_why(tmp_path):
    config = ServerConfig(module_dir=ROOT, port=0, launch_module=False, data_dir=tmp_path, log_level="critical")
    with serve_in_thread(config) as url:
        lonely = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="module LlamaChat is NotStarted") as caught:
            lonely.chat.completions.create(model="m", messages=HELLO)
        assert caught.value.status_code == 503
        assert caught.value.body["type"] == "unavailable_error"
        assert lonely.models.list().data == []  # no model has been reported
