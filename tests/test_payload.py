"""build_payload over real HTTP on loopback (aiohttp's TestServer), without the rest of the server: how each kind of
body becomes the RequestPayload a module receives, and every body it refuses with what to send instead.
tests/test_server_protocol.py sends the common bodies through the whole server to a module's seat."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from llamachat_server.payload import JSON_SHAPE_HINT, MAX_JSON_DEPTH, PayloadError, build_payload, json_depth

FORM_MALFORMED = "send a complete multipart/form-data or application/x-www-form-urlencoded body"


async def _payload_or_error(request: web.Request) -> web.Response:
    segments = [segment for segment in request.match_info["tail"].split("/") if segment]
    try:
        return web.json_response(await build_payload(request, "prompt", segments))
    except PayloadError as ex:
        return web.json_response({"error": str(ex)})


def exchange(path: str = "/", method: str = "POST", **request) -> dict:
    """What build_payload makes of one real HTTP request to `path`: the payload, or {"error": ...}."""

    async def main() -> dict:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _payload_or_error)
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as client:
            async with client.request(method, server.make_url(path), **request) as response:
                assert response.status == 200
                return await response.json()

    return asyncio.run(main())


def error_for(data: str | bytes, content_type: str, path: str = "/") -> str:
    answer = exchange(path, data=data, headers={"Content-Type": content_type})
    assert set(answer) == {"error"}, answer
    return answer["error"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_multipart_form_keeps_its_fields_and_every_file_s_bytes():
    form = aiohttp.FormData()
    form.add_field("prompt", "héllo")
    form.add_field("image", b"\x89PNG\x00\xff\xfe", filename="a.png", content_type="image/png")
    form.add_field("image", b"second", filename="b.txt", content_type="text/plain")
    answer = exchange("/v1/vision/detect/extra?mode=fast", data=form)
    assert answer == {
        "command": "prompt",
        "values": [{"key": "mode", "value": ["fast"]}, {"key": "prompt", "value": ["héllo"]}],
        "files": [
            {
                "name": "image",
                "filename": "a.png",
                "contentType": "image/png",
                "data": base64.b64encode(b"\x89PNG\x00\xff\xfe").decode(),  # files are bytes: never checked as text
            },
            {"name": "image", "filename": "b.txt", "contentType": "text/plain", "data": "c2Vjb25k"},
        ],
        "urlSegments": ["v1", "vision", "detect", "extra"],
    }


def test_query_values_come_first_and_repeated_keys_keep_every_value_in_order():
    answer = exchange("/?stop=q&max_tokens=8", data=[("stop", "a"), ("prompt", "x"), ("stop", "b")])
    assert answer["values"] == [
        {"key": "stop", "value": ["q"]},
        {"key": "max_tokens", "value": ["8"]},
        {"key": "stop", "value": ["a", "b"]},
        {"key": "prompt", "value": ["x"]},
    ]


def test_a_json_body_in_request_payload_shape_is_read_with_net_s_case_insensitive_keys():
    body = {
        "Values": [{"Key": "prompt", "Value": ["Hi"]}, {"key": "seed", "value": []}],
        "FILES": [{"name": "f", "filename": "f.txt", "contentType": "text/plain", "data": "aGk="}],
    }
    answer = exchange("/?max_tokens=8", json=body)
    assert answer["values"] == [
        {"key": "max_tokens", "value": ["8"]},
        {"key": "prompt", "value": ["Hi"]},
        {"key": "seed", "value": []},
    ]
    assert answer["files"] == body["FILES"]


def test_a_json_body_cannot_choose_the_command_or_the_url_segments():
    # The route decides what a module is asked to do: a client may not turn a chat into, say, a quit.
    answer = exchange("/text/chat", json={"command": "quit", "urlSegments": ["x"], "queue": "other", "values": []})
    assert answer == {"command": "prompt", "values": [], "files": [], "urlSegments": ["text", "chat"]}


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"method": "GET"},
        {"data": b"", "headers": {"Content-Type": "application/json"}},
        {"data": b"  \n", "headers": {"Content-Type": "application/json"}},
        {"data": b"", "headers": {"Content-Type": "text/plain"}},
    ],
    ids=["no-body", "empty-json", "blank-json", "empty-text"],
)
def test_an_empty_body_leaves_just_the_query_values(request_kwargs):
    answer = exchange("/?commandId=abc", **request_kwargs)
    assert answer == {
        "command": "prompt",
        "values": [{"key": "commandId", "value": ["abc"]}],
        "files": [],
        "urlSegments": [],
    }


def test_a_body_of_another_type_is_refused_naming_it():
    assert error_for(b"raw", "text/plain") == (
        "Unsupported Content-Type 'text/plain': send multipart/form-data, application/x-www-form-urlencoded or a "
        "JSON RequestPayload"
    )


@pytest.mark.parametrize(
    "body, error",
    [
        ('["prompt", "Hi"]', f"A JSON body must be an object: {JSON_SHAPE_HINT}"),
        (
            '{"prompt": "Hi", "values": []}',
            f"A JSON body must be in RequestPayload shape, not a plain object (found 'prompt'): send {JSON_SHAPE_HINT}",
        ),
        ('{"values": {"prompt": "Hi"}}', f"'values' must be a list, like {JSON_SHAPE_HINT}"),
        (
            '{"values": [{"key": "prompt", "value": ["Hi"]}, {"key": "n", "value": [1]}]}',
            f'values[1] must be {{"key": <text>, "value": [<text>, ...]}}, like {JSON_SHAPE_HINT}',
        ),
        ('{"values": [{"value": ["Hi"]}]}', "values[0] must be"),
        ('{"files": {"name": "f"}}', "'files' must be a list of"),
        ('{"files": [{"name": "f", "data": 5}]}', '"data": <base64 text>'),
        ('{"values": [', f"The JSON body is not valid JSON (Expecting value at character 12): send {JSON_SHAPE_HINT}"),
        ("[" * 100_000, f"The JSON body is nested too deeply to read: send {JSON_SHAPE_HINT}"),
    ],
    ids=[
        "array",
        "plain-object",
        "values-not-list",
        "value-not-text",
        "no-key",
        "files-not-list",
        "file-data",
        "not-json",
        "deep",
    ],
)
def test_a_json_body_not_in_request_payload_shape_is_refused_with_the_shape_to_send(body, error):
    assert error in error_for(body, "application/json")


@pytest.mark.parametrize(
    "data, content_type, where",
    [
        (b'{"values": [{"key": "prompt", "value": ["\xff"]}]}', "application/json", "The JSON body"),
        (b"prompt=caf\xe9", "application/x-www-form-urlencoded", "The form"),
        (
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n\xfe\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            "The form",
        ),
    ],
    ids=["json", "urlencoded", "multipart-field"],
)
def test_text_that_is_not_utf8_is_refused_naming_the_byte(data, content_type, where):
    byte = next(b for b in data if b >= 0x80)
    assert error_for(data, content_type) == (
        f"{where} is not valid UTF-8 (byte 0x{byte:02x} where text was expected): send text as UTF-8"
    )


@pytest.mark.parametrize(
    "data, content_type, problem",
    [
        (b"garbage", "multipart/form-data; boundary=b", "Could not find starting boundary"),
        (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nabc', "multipart/form-data; boundary=b", ""),
        (b"--b--\r\n", "multipart/form-data", "boundary missed"),
    ],
    ids=["no-boundary-in-body", "cut-short", "no-boundary-in-header"],
)
def test_a_broken_multipart_body_is_refused_as_malformed(data, content_type, problem):
    error = error_for(data, content_type)
    assert error.startswith("The form body is malformed (")
    assert error.endswith(FORM_MALFORMED)
    assert problem in error


def test_a_value_nested_deeper_than_the_limit_is_refused_naming_its_key():
    error = f"'messages' holds JSON nested more than {MAX_JSON_DEPTH} levels deep, far more than any request needs"
    assert error in error_for(f"messages={nested(MAX_JSON_DEPTH + 1)}", "application/x-www-form-urlencoded")
    assert error in exchange(f"/?messages={nested(MAX_JSON_DEPTH + 1)}", method="GET")["error"]  # query values too
    body = {"values": [{"key": "messages", "value": ["ok", nested(MAX_JSON_DEPTH + 1)]}]}
    assert error in exchange(json=body)["error"]  # every value of a key, in a JSON body as well
    # Deep enough that Python's own parser gives up: still a clear refusal, not a crash.
    assert error in error_for(f"messages={'[' * 100_000}", "application/x-www-form-urlencoded")


@pytest.mark.parametrize(
    "value",
    [nested(MAX_JSON_DEPTH), "[" * 500 + " is how a shouting user types", '{"a": ' * 150 + "1"],
    ids=["at-the-limit", "brackets-not-json", "broken-json"],
)
def test_values_at_the_limit_or_not_json_at_all_pass_on_to_the_module(value):
    # Text that only looks like JSON is the module's to judge (it refuses bad `messages` with its own error).
    assert exchange(data={"messages": value})["values"] == [{"key": "messages", "value": [value]}]


def test_json_depth_counts_nesting_without_recursing():
    assert [json_depth(v) for v in ("text", 3, None, [], {}, [1, [2]], {"a": [{"b": 1}]})] == [0, 0, 0, 1, 1, 2, 3]
    deep: list = []
    for _ in range(50_000):  # far beyond Python's recursion limit
        deep = [deep]
    assert json_depth(deep) == 50_001
