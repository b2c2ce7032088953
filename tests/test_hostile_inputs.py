"""A hostile-input battery over every endpoint of llamachat_server, against one live server with the real module on
SmolLM2: path traversal, oversized bodies, headers and URLs, bad numbers, bad, huge and deep `messages`, bad and
deep `stop`, unknown ids, bytes that are not UTF-8, deeply nested JSON, wrong methods and unknown routes. Each case
asserts the exact kind of answer (HTTP status, `success: false`, an error that names the problem), then that the
server still answers and a normal chat still completes."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pytest
import requests

from live_server import poll, running_server

CHAT = "/v1/text/chat"
STATUS = "/v1/LlamaChat/get_command_status"
CANCEL = "/v1/LlamaChat/cancel_command"
FORM = "application/x-www-form-urlencoded"
ORIGIN = "http://localhost:5173"  # a local page: allowed to read answers, errors included
DEEP = "[" * 100_000 + "]" * 100_000
SECRETS = ("root:x:0", "def create_app", "[pytest]")  # /etc/passwd, a server source file, a repository file


@dataclass
class Case:
    method: str
    path: str
    status: int | tuple  # the HTTP status (or the statuses that are each right)
    error: str | None  # text the error must contain; None: a success answer
    code: int | None = None  # the answer's `code`, where the server sets one
    body: bytes = b""
    headers: dict = field(default_factory=dict)


def urlencoded(path: str, status: int, error: str | None, code: int | None = None, **values) -> Case:
    body = "&".join(f"{k}={requests.utils.quote(v, safe='')}" for k, v in values.items()).encode()
    return Case("POST", path, status, error, code, body, {"Content-Type": FORM})


def raw(
    method: str,
    path: str,
    status: int,
    error: str | None,
    code: int | None = None,
    body: bytes = b"",
    content_type: str | None = None,
    **headers,
) -> Case:
    if content_type:
        headers["Content-Type"] = content_type
    return Case(method, path, status, error, code, body, headers)


def multipart(field_name: str, value: bytes) -> bytes:
    return (
        b'--XyZ\r\nContent-Disposition: form-data; name="'
        + field_name.encode()
        + b'"\r\n\r\n'
        + value
        + b"\r\n--XyZ--\r\n"
    )


MULTIPART = "multipart/form-data; boundary=XyZ"
# A module endpoint called by a process that is not the module: refused as bad input, or as not the module's (403).
NOT_FOR_US = (400, 403)
PAIRS = json.dumps([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "ok"}] * 3)

CASES = {
    # Path traversal: nothing outside the served files, a JSON 404/403 instead.
    "traversal-dotdot": raw("GET", "/../../../../etc/passwd", 404, "No endpoint", 404),
    "traversal-encoded": raw("GET", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", 404, "No endpoint", 404),
    "traversal-assets": raw("GET", "/assets/../../app.py", 404, "No endpoint", 404),
    "traversal-assets-encoded": raw("GET", "/assets/..%2f..%2fapp.py", 404, "No endpoint", 404),
    "traversal-assets-double-encoded": raw(
        "GET", "/assets/%252e%252e%252f%252e%252e%252fpytest.ini", 404, "No endpoint", 404
    ),
    "traversal-assets-absolute": raw("GET", "/assets//etc/passwd", 404, "No endpoint", 404),
    "traversal-backslash": raw("GET", "/assets/..\\..\\app.py", 404, "No endpoint", 404),
    "traversal-assets-sibling": raw("GET", "/assets/..%5c__init__.py", 404, "No endpoint", 404),
    "traversal-v1": raw("GET", "/v1/../../etc/passwd", 404, "No module answers GET", 404),
    "traversal-in-route-segments": urlencoded(CHAT + "/..%2f..%2fetc%2fpasswd", 200, "prompt", None),
    # Oversized requests.
    # A route that takes no file accepts 8 MiB (routes with a File input: 50 MB).
    "body-over-8MiB": raw("POST", CHAT, 413, "Maximum request body size", 413, b"p=" + b"x" * (9 << 20), FORM),
    "header-100KB": raw("GET", "/v1/server/status/ping", 400, "", None, **{"X-Big": "h" * 100_000}),
    "url-100KB": raw("GET", "/v1/server/status/ping?q=" + "u" * 100_000, 400, "", None),
    "prompt-300KB": urlencoded(CHAT, 200, "", None, prompt="word " * 60_000, max_tokens="4"),
    # Bad numbers.
    "max_tokens-text": urlencoded(CHAT, 200, "max_tokens", None, prompt="Hi", max_tokens="many"),
    "max_tokens-negative": urlencoded(CHAT, 200, "max_tokens", None, prompt="Hi", max_tokens="-5"),
    "max_tokens-huge": urlencoded(CHAT, 200, "max_tokens", None, prompt="Hi", max_tokens="1" + "0" * 400),
    "temperature-nan": urlencoded(CHAT, 200, "temperature", None, prompt="Hi", temperature="NaN"),
    "temperature-inf": urlencoded(CHAT, 200, "temperature", None, prompt="Hi", temperature="1e999"),
    "top_p-over-1": urlencoded(CHAT, 200, "top_p", None, prompt="Hi", top_p="2.5"),
    "log-count-huge": raw("GET", "/v1/log/list?count=" + "9" * 30, 200, None),
    "log-last_id-text": raw("GET", "/v1/log/list?last_id=abc&count=-4", 200, None),
    # Bad, huge and deep `messages`.
    "messages-not-json": urlencoded(CHAT, 200, "messages", None, prompt="Hi", messages="[{oops"),
    "messages-object": urlencoded(CHAT, 200, "messages", None, prompt="Hi", messages='{"role": "user"}'),
    "messages-bad-role": urlencoded(
        CHAT, 200, "role", None, prompt="Hi", messages='[{"role": "system", "content": "x"}]'
    ),
    "messages-no-content": urlencoded(CHAT, 200, "content", None, prompt="Hi", messages='[{"role": "user"}]'),
    "messages-deep-100000": urlencoded(
        CHAT, 200, "'messages' holds JSON nested more than 100 levels", 400, prompt="Hi", messages=DEEP
    ),
    "messages-deep-500": urlencoded(
        CHAT, 200, "'messages' holds JSON nested more than 100 levels", 400, prompt="Hi", messages="[" * 500 + "]" * 500
    ),
    "messages-huge-turn": urlencoded(
        CHAT,
        200,
        None,
        None,
        prompt="Hi",
        max_tokens="2",
        messages=json.dumps([{"role": "user", "content": "long " * 20_000}, {"role": "assistant", "content": "ok"}]),
    ),
    # Bad and deep `stop`.
    "stop-deep-100000": urlencoded(
        CHAT, 200, "'stop' holds JSON nested more than 100 levels", 400, prompt="Hi", stop=DEEP
    ),
    "stop-1000-strings": urlencoded(CHAT, 200, "stop", None, prompt="Hi", stop=json.dumps(["x"] * 1000)),
    # Unknown and missing ids.
    "status-unknown-id": urlencoded(STATUS, 200, "command", None, commandId="no-such-command"),
    "status-no-id": raw("POST", STATUS, 200, "No command ID provided"),
    "cancel-unknown-id": urlencoded(CANCEL, 200, "command", None, commandId="../../etc/passwd"),
    "cancel-no-id": raw("POST", CANCEL, 200, "No command ID provided"),
    # Bytes that are not UTF-8, and deeply nested JSON bodies.
    "non-utf8-urlencoded": raw(
        "POST", CHAT, 200, "The form is not valid UTF-8 (byte 0xff", 400, b"prompt=\xff\xfehi", FORM
    ),
    "non-utf8-multipart": raw(
        "POST", CHAT, 200, "The form is not valid UTF-8 (byte 0xc3", 400, multipart("prompt", b"caf\xc3("), MULTIPART
    ),
    "non-utf8-json": raw(
        "POST",
        CHAT,
        200,
        "The JSON body is not valid UTF-8 (byte 0xff",
        400,
        b'{"values": [{"key": "prompt", "value": ["\xff"]}]}',
        "application/json",
    ),
    "non-utf8-module-log": raw("POST", "/v1/log/", NOT_FOR_US, "", None, b"entry=\xff\xfe", FORM),
    "json-deep-100000": raw(
        "POST", CHAT, 200, "The JSON body is nested too deeply", 400, DEEP.encode(), "application/json"
    ),
    "json-deep-values": raw(
        "POST",
        CHAT,
        200,
        "'prompt' holds JSON nested more than 100 levels",
        400,
        json.dumps({"values": [{"key": "prompt", "value": ["[" * 300 + "]" * 300]}]}).encode(),
        "application/json",
    ),
    "json-number-5000-digits": raw(
        "POST",
        CHAT,
        200,
        "number of more than 4300 digits",
        400,
        b'{"values": [], "n": ' + b"9" * 5000 + b"}",
        "application/json",
    ),
    "json-not-payload-shape": raw(
        "POST", CHAT, 200, "RequestPayload shape", 400, b'{"prompt": "hi"}', "application/json"
    ),
    "multipart-broken": raw(
        "POST", CHAT, 200, "The form body is malformed", 400, b"--XyZ\r\nnonsense", "multipart/form-data"
    ),
    "content-type-unknown": raw("POST", CHAT, 200, "Unsupported Content-Type", 400, b"\x00\x01", "image/png"),
    "no-prompt": urlencoded(CHAT, 200, "prompt", None, messages=PAIRS),
    # Wrong methods and unknown routes.
    "chat-by-get": raw("GET", CHAT + "?prompt=hi", 404, "No module answers GET /v1/text/chat", 404),
    "chat-by-put": raw("PUT", CHAT, 404, "No module answers PUT", 404),
    "ping-by-delete": raw("DELETE", "/v1/server/status/ping", 404, "No module answers DELETE", 404),
    "explorer-by-post": raw("POST", "/explorer.html", 405, "does not answer POST", 405),
    "unknown-v1-route": raw("POST", "/v1/vision/detection", 404, "Routes: POST /v1/text/chat", 404),
    "route-typo": raw("POST", "/v1/text/chats", 404, "No module answers POST /v1/text/chats", 404),
    "unknown-page": raw("GET", "/admin", 404, "No endpoint GET /admin", 404),
    # Module endpoints, from a process that is not the module, with nothing to answer: refused either way.
    "module-answer-unknown-reqid": raw(
        "POST",
        "/v1/queue/00000000-0000-0000-0000-000000000000?moduleId=LlamaChat",
        NOT_FOR_US,
        "",
        None,
        b'{"success": true}',
        "text/plain",
    ),
    "module-status-other-module": raw(
        "POST", "/v1/queue/updatemodulestatus/Other", NOT_FOR_US + (404,), "", None, b"statusData=%7B%7D", FORM
    ),
}


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(smollm2) as url:
        yield url


def send(base_url: str, case: Case) -> tuple[int, dict, bytes]:
    """The case as raw HTTP (no client-side normalising of paths, bodies or headers): (status, headers, body)."""
    address = urlparse(base_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.putrequest(case.method, case.path, skip_accept_encoding=True)
        headers = {"Origin": ORIGIN, **case.headers, "Content-Length": str(len(case.body))}
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        try:
            connection.send(case.body)
        except (BrokenPipeError, ConnectionResetError):  # the server answered before reading all of it
            pass
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def chat_completes(base_url: str) -> None:
    ack = requests.post(f"{base_url}{CHAT}", data={"prompt": "Say hi.", "max_tokens": "3"}, timeout=60).json()
    assert ack["success"] is True, ack

    def completed():
        answer = requests.post(f"{base_url}{STATUS}", data={"commandId": ack["commandId"]}, timeout=60).json()
        return answer if answer.get("commandStatus") == "completed" else None

    final = poll(completed, 60, "a normal chat to complete")
    assert final["success"] is True, final
    assert final["reply"], final


def is_running(answer: dict) -> bool:
    return answer.get("success") is True and answer.get("commandStatus") == "running"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_hostile_input_gets_a_clear_answer_and_the_server_carries_on(base_url, case):
    status, headers, body = send(base_url, case)

    assert status in (case.status if isinstance(case.status, tuple) else (case.status,)), body[:300]
    assert not any(secret.encode() in body for secret in SECRETS)
    if headers.get("Content-Type", "").startswith("application/json"):
        answer = json.loads(body)
        assert "Access-Control-Allow-Origin" in headers  # a local page can read why it failed
        if is_running(answer):
            # Input that is fine after all (a long prompt, or a history that fits by dropping turns): a chat started,
            # and runs to its end.
            assert case.error in (None, ""), answer
            poll(
                lambda: (
                    requests.post(f"{base_url}{STATUS}", data={"commandId": answer["commandId"]}, timeout=60).json()[
                        "commandStatus"
                    ]
                    == "completed"
                ),
                120,
                "the chat to end",
            )
        elif case.error is None:
            assert answer["success"] is True, answer
            assert len(answer.get("entries", [])) <= 1000
        else:
            assert answer["success"] is False, answer
            assert case.error in answer["error"], answer["error"]
            if case.code is not None:
                assert answer["code"] == case.code
    else:  # refused before any handler ran (the HTTP parser), or by an endpoint that answers in plain text
        assert case.error == "", body[:300]
        assert status >= 400, body[:300]

    assert requests.get(f"{base_url}/v1/server/status/ping", timeout=10).json()["success"] is True
    chat_completes(base_url)
