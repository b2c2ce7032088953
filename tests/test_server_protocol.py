"""llamachat_server's wire protocol over real HTTP, with the test itself in the module's seat: it long-polls
the queue, reads the queued request exactly as a module receives it, and posts answers back (docs/protocol.md §1, §2).
No module process is launched here (--no-module); tests/test_server_chat.py runs the real module."""

import base64
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from live_server import ROOT, serve_in_thread
from llamachat_server.server_state import ServerConfig

QUEUE = "llamachat_queue"
RESPONSE_TIMEOUT = 2.0
RFC1123 = re.compile(r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """The server on a free port in a background thread, serving the repository's module folder. With --no-module
    its module endpoints accept any process of this user, so the test can play the module."""
    config = ServerConfig(
        module_dir=ROOT,
        port=0,
        response_timeout=RESPONSE_TIMEOUT,
        launch_module=False,
        data_dir=tmp_path_factory.mktemp("data"),
        log_level="critical",
    )
    with serve_in_thread(config) as url:
        yield url


@pytest.fixture(scope="module")
def client():
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def take_request(base_url):
    """One long poll, as the SDK does it: the queued request, or None (204)."""
    response = requests.get(f"{base_url}/v1/queue/{QUEUE}", params={"moduleId": "LlamaChat"}, timeout=15)
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else None


def answer(base_url, reqid, body):
    # The SDK posts json.dumps(output) as the raw body (aiohttp sends it as text/plain).
    return requests.post(
        f"{base_url}/v1/queue/{reqid}",
        params={"moduleId": "LlamaChat"},
        data=body if isinstance(body, str) else json.dumps(body),
        timeout=10,
    )


def values_of(request):
    return {item["key"]: item["value"] for item in request["payload"]["values"]}


def round_trip(base_url, client, module_answer, *args, **kwargs):
    """Sends a client request, serves it as the module with `module_answer`, returns (queued, response)."""
    pending = client.submit(requests.post, *args, timeout=30, **kwargs)
    queued = take_request(base_url)
    assert queued is not None
    assert answer(base_url, queued["reqid"], module_answer).text == "Response saved."
    return queued, pending.result()


def test_multipart_form_becomes_the_queued_request_and_the_answer_comes_back_with_server_fields(base_url, client):
    queued, response = round_trip(
        base_url,
        client,
        {"success": True, "reply": "héllo <b>"},
        f"{base_url}/v1/Text/Chat/Extra/Seg?moduleId=LlamaChat&prompt=from-query",
        data={"prompt": "from-form", "max_tokens": "16"},
        files={"image1": ("a.png", b"\x89PNG\0data", "image/png")},
    )

    assert set(queued) == {"reqid", "reqtype", "payload"}
    assert queued["reqtype"] == "prompt"
    assert queued["payload"]["command"] == "prompt"
    # Query-string values come first, then the form's, one entry per key (as ASP.NET serialises them).
    assert queued["payload"]["values"][:2] == [
        {"key": "moduleId", "value": ["LlamaChat"]},
        {"key": "prompt", "value": ["from-query"]},
    ]
    assert {"key": "prompt", "value": ["from-form"]} in queued["payload"]["values"]
    assert values_of(queued)["max_tokens"] == ["16"]
    assert queued["payload"]["files"] == [
        {
            "name": "image1",
            "filename": "a.png",
            "contentType": "image/png",
            "data": base64.b64encode(b"\x89PNG\0data").decode(),
        }
    ]
    assert queued["payload"]["urlSegments"] == ["Extra", "Seg"]

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["success"] is True
    assert body["reply"] == "héllo <b>"
    assert "\\u00e9" in response.text  # non-ASCII escaped, like System.Text.Json's default encoder
    assert isinstance(body["analysisRoundTripMs"], int)
    assert body["analysisRoundTripMs"] >= 0
    assert body["processedBy"] == "localhost"
    assert RFC1123.match(body["timestampUTC"]), body["timestampUTC"]


def test_urlencoded_form_repeated_keys_keep_every_value(base_url, client):
    queued, response = round_trip(
        base_url,
        client,
        {"success": True},
        f"{base_url}/v1/text/chat",
        data=[("stop", "a"), ("stop", "b"), ("prompt", "x")],
    )
    assert values_of(queued) == {"stop": ["a", "b"], "prompt": ["x"]}
    assert queued["payload"]["files"] == []
    assert queued["payload"]["urlSegments"] == []
    assert response.json()["success"] is True


def test_json_request_payload_body_keeps_the_query_string(base_url, client):
    payload = {
        "values": [{"key": "prompt", "value": ["Hi"]}],
        "files": [{"name": "f", "filename": "f.txt", "contentType": "text/plain", "data": "aGk="}],
    }
    queued, response = round_trip(
        base_url, client, {"success": True}, f"{base_url}/v1/text/chat?max_tokens=8", json=payload
    )
    assert values_of(queued) == {"max_tokens": ["8"], "prompt": ["Hi"]}
    assert queued["payload"]["files"] == payload["files"]
    assert response.json()["success"] is True


def test_bodyless_post_keeps_its_query_parameters(base_url, client):
    queued, _ = round_trip(
        base_url, client, {"success": True}, f"{base_url}/v1/LlamaChat/get_command_status?commandId=abc"
    )
    assert queued["payload"]["command"] == "get_command_status"
    assert values_of(queued) == {"commandId": ["abc"]}


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"json": {"prompt": "Hi"}}, "RequestPayload shape"),
        ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
        ({"json": {"values": [{"key": "prompt", "value": "Hi"}]}}, "values[0]"),
        ({"data": b"raw", "headers": {"Content-Type": "application/octet-stream"}}, "Unsupported Content-Type"),
    ],
)
def test_bad_bodies_get_a_clear_error_and_never_reach_the_module(base_url, client, kwargs, expected):
    response = requests.post(f"{base_url}/v1/text/chat", timeout=10, **kwargs)
    assert response.status_code == 200  # errors are HTTP 200 with success: false, as the real server does
    body = response.json()
    assert body["success"] is False
    assert body["code"] == 400
    assert expected in body["error"]
    assert "prompt" in body["error"] or "Content-Type" in body["error"]  # says what to send instead
    queued, _ = round_trip(base_url, client, {"success": True}, f"{base_url}/v1/text/chat", data={"prompt": "next"})
    assert values_of(queued) == {"prompt": ["next"]}


@pytest.mark.parametrize("path", ["/v1/nothing/here", "/v1/text/chats", "/v1/LlamaChat"])
def test_unknown_route_is_404(base_url, path):
    response = requests.post(f"{base_url}{path}", data={"prompt": "x"}, timeout=10)
    assert response.status_code == 404
    body = response.json()
    assert body["success"] is False
    assert "POST /v1/text/chat" in body["error"]  # lists the routes that do exist


def test_unanswered_request_times_out_with_the_real_servers_error_shape(base_url):
    started = time.monotonic()
    response = requests.post(f"{base_url}/v1/text/chat", data={"prompt": "x"}, timeout=30)
    elapsed = time.monotonic() - started
    body = response.json()
    assert response.status_code == 200
    assert body["success"] is False
    assert body["code"] == 500
    assert body["hostname"]
    assert body["error"].startswith("The request timed out (#reqid ")
    assert RESPONSE_TIMEOUT <= elapsed < RESPONSE_TIMEOUT + 2
    # The abandoned request is dropped, not handed to the next poll: a fresh request is what comes next.
    with ThreadPoolExecutor(max_workers=1) as pool:
        fresh = pool.submit(requests.post, f"{base_url}/v1/text/chat", data={"prompt": "fresh"}, timeout=30)
        queued = take_request(base_url)
        assert values_of(queued)["prompt"] == ["fresh"]
        answer(base_url, queued["reqid"], {"success": True})
        assert fresh.result().json()["success"] is True


def test_late_and_unknown_answers_are_refused(base_url):
    response = answer(base_url, "no-such-reqid", {"success": True})
    assert response.status_code == 400
    assert response.text == "failure to set response."


@pytest.mark.parametrize(
    "module_body, error",
    [
        ("this is not json", "Invalid JSON response from backend (#reqid "),
        ("null", "null json returned from backend (#reqid "),
    ],
)
def test_broken_module_answers_become_clear_errors(base_url, client, module_body, error):
    _, response = round_trip(base_url, client, module_body, f"{base_url}/v1/text/chat", data={"prompt": "x"})
    body = response.json()
    assert body["success"] is False
    assert body["error"].startswith(error)


def test_polling_an_unknown_queue_is_an_error_so_the_sdk_backs_off(base_url):
    started = time.monotonic()
    response = requests.get(f"{base_url}/v1/queue/wrong_queue", params={"moduleId": "LlamaChat"}, timeout=15)
    assert time.monotonic() - started < 1
    # Not 200/204: an empty success would make the SDK re-poll at once, in a tight loop.
    assert response.status_code == 404
    assert "llamachat_queue" in response.json()["error"]


def test_module_status_data_and_logs_reach_the_status_endpoints(base_url):
    status_data = {"inferenceDevice": "CPU", "numInferences": 3, "canUseGPU": "false"}
    response = requests.post(
        f"{base_url}/v1/queue/updatemodulestatus/LlamaChat", data={"statusData": json.dumps(status_data)}, timeout=10
    )
    assert response.status_code == 200
    assert response.text == "Module status updated"
    assert (
        requests.post(
            f"{base_url}/v1/queue/updatemodulestatus/Other", data={"statusData": "{}"}, timeout=10
        ).status_code
        == 404
    )

    logged = requests.post(
        f"{base_url}/v1/log/",
        data={"entry": "protocol-test entry", "category": "LlamaChat", "label": "test", "log_level": "warning"},
        timeout=10,
    )
    assert logged.json() == {"success": True}

    statuses = requests.get(f"{base_url}/v1/module/list/status", timeout=10).json()
    assert statuses["success"] is True
    status = statuses["statuses"][0]
    assert status["moduleId"] == "LlamaChat"
    assert status["queue"] == QUEUE
    assert status["name"] == "LlamaChat"
    assert status["statusData"] == status_data
    assert status["status"] in ("NotStarted", "Started")

    entries = requests.get(f"{base_url}/v1/log/list", params={"count": 1000}, timeout=10).json()["entries"]
    mine = [e for e in entries if e["entry"] == "protocol-test entry"]
    assert len(mine) == 1
    assert mine[0]["level"] == "warning"
    assert mine[0]["category"] == "LlamaChat"
    assert mine[0]["label"] == "test"
    assert set(mine[0]) == {"id", "timestamp", "entry", "level", "category", "label"}
    later = requests.get(f"{base_url}/v1/log/list", params={"last_id": mine[0]["id"], "count": 1000}, timeout=10)
    assert all(e["id"] > mine[0]["id"] for e in later.json()["entries"])


def test_version_and_ping(base_url):
    for path in ("/v1/server/status/version", "/v1/server/status/ping", "/v1/status/ping"):
        body = requests.get(f"{base_url}{path}", timeout=10).json()
        assert body["success"] is True
        assert body["message"] == "2.9.6"
        assert (body["version"]["major"], body["version"]["minor"], body["version"]["patch"]) == (2, 9, 6)
