"""Who may talk to llamachat_server, over real HTTP on loopback:
- the module endpoints serve only the module process the server launched (the real module on SmolLM2 keeps
  working; a rogue local client is refused before it can take a request, forge an answer, fake the status or log);
- with --no-module they serve processes of the server's own user only;
- web pages: this machine's origins and --allow-origin ones may call it, others get no CORS header and their
  POSTs are refused; a Host header that is not a name of this server (DNS rebinding) is refused;
- --host other than loopback warns that the API has no authentication, unless API keys are set; with keys, every
  client route needs one (401 in its API's shape), the page and the module endpoints do not;
- the server holds both loopback addresses of its port, resolves module peers off the event loop, answers the
  names --allow-host adds, and serves its page unframeable with a script policy."""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests

from live_server import (
    ROOT,
    no_module_config,
    poll,
    reported_status_data,
    running_server,
    serve_in_thread,
    server_status,
)
from llamachat_server.host_check import HostCheck
from llamachat_server.peer import find_peer_socket, owner_among, process_tree
from llamachat_server.server_state import ServerConfig

QUEUE = "llamachat_queue"
MODULE_ENDPOINTS = [  # (method, path, form) of every endpoint only the module may use
    ("GET", f"/v1/queue/{QUEUE}?moduleId=LlamaChat", None),
    (
        "POST",
        "/v1/queue/0c6f6d1e-5c1b-4a55-9d3e-7b1a2f4b8c9d?moduleId=LlamaChat",
        json.dumps({"success": True, "reply": "forged"}),
    ),
    ("POST", "/v1/queue/updatemodulestatus/LlamaChat", {"statusData": json.dumps({"model": "forged.gguf"})}),
    ("POST", "/v1/log/", {"entry": "forged log entry", "category": "LlamaChat", "log_level": "error"}),
]


def log_entries(base_url):
    return requests.get(f"{base_url}/v1/log/list", params={"count": 10000}, timeout=10).json()["entries"]


def chat_to_the_end(base_url, prompt="Say hi.", max_tokens="8"):
    ack = requests.post(
        f"{base_url}/v1/text/chat", data={"prompt": prompt, "max_tokens": max_tokens}, timeout=40
    ).json()
    assert ack["success"] is True, ack

    def completed():
        answer = requests.post(
            f"{base_url}/v1/LlamaChat/get_command_status", data={"commandId": ack["commandId"]}, timeout=40
        ).json()
        return answer if answer.get("commandStatus") == "completed" else None

    return poll(completed, 60, "the chat to complete")


# ---- Resolving a connection's peer (peer.py) on real sockets ---------------------------------------------

CHILD_CONNECTS = """
import socket, sys
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(client.getsockname()[1], flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("family, address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_peer_of_a_connection_is_found_with_its_owner(family, address):
    with socket.create_server((address, 0), family=family) as listener:
        with socket.create_connection(listener.getsockname()[:2]) as client:
            accepted, peer = listener.accept()
            with accepted:
                found = find_peer_socket(peer, accepted.getsockname())
                assert found is not None
                assert found.uid == os.geteuid()
                assert owner_among(found.inode, [os.getpid()]) == os.getpid()
                if family == socket.AF_INET:  # as a dual-stack listener sees an IPv4 client
                    assert find_peer_socket(("::ffff:" + peer[0], peer[1]), accepted.getsockname()) == found
                # The server's own end of the connection is a different socket.
                ours = find_peer_socket(accepted.getsockname(), client.getsockname())
                assert ours is not None
                assert ours.inode != found.inode


def test_a_socket_held_by_a_grandchild_belongs_to_the_process_tree():
    """A module started through a wrapper (a shell running python as its child) is still the module."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        wrapper = subprocess.Popen(
            ["/bin/sh", "-c", f'"{sys.executable}" -c "$0" "$1"; true', CHILD_CONNECTS, str(listener.getsockname()[1])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            wrapper.stdout.readline()
            accepted, peer = listener.accept()
            with accepted:
                found = find_peer_socket(peer, accepted.getsockname())
                assert found is not None
                tree = process_tree(wrapper.pid)
                assert tree[0] == wrapper.pid
                assert len(tree) >= 2
                assert owner_among(found.inode, [wrapper.pid]) is None  # the shell itself does not hold it
                assert owner_among(found.inode, tree) in tree[1:]
        finally:
            wrapper.communicate("", timeout=10)


# ---- The launched module, and a rogue local client -------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(smollm2):
    with running_server(smollm2) as url:
        yield url


@pytest.mark.parametrize("method, path, form", MODULE_ENDPOINTS, ids=["poll", "answer", "status", "log"])
def test_rogue_local_client_is_refused_on_every_module_endpoint(real_server, method, path, form):
    response = requests.request(method, f"{real_server}{path}", data=form, timeout=5)  # answered at once, no poll
    assert response.status_code == 403
    body = response.json()
    assert body["success"] is False
    assert body["code"] == 403
    assert "only the module this server launched (LlamaChat, pid " in body["error"]
    assert "--no-module" in body["error"]  # says how to serve a module you start yourself


def test_rogue_polls_cannot_take_a_users_chat_and_the_module_still_serves_it(real_server):
    """Eight rogue polls took a user's request before the fix; now the real module gets every request."""
    stop = threading.Event()

    def rogue_polls():
        codes = []
        with requests.Session() as rogue:  # a kept-alive connection, judged once
            while not stop.is_set():
                codes.append(
                    rogue.get(
                        f"{real_server}/v1/queue/{QUEUE}", params={"moduleId": "LlamaChat"}, timeout=15
                    ).status_code
                )
        return codes

    with ThreadPoolExecutor(max_workers=8) as pool:
        rogues = [pool.submit(rogue_polls) for _ in range(8)]
        try:
            final = chat_to_the_end(real_server, prompt="Name three colours.", max_tokens="16")
        finally:
            stop.set()
        codes = [code for rogue in rogues for code in rogue.result()]
    assert final["success"] is True
    assert final["reply"].strip()
    assert codes
    assert set(codes) == {403}


def test_forged_status_and_log_do_not_reach_the_server_and_the_refusal_is_logged_once(real_server, smollm2):
    for method, path, form in MODULE_ENDPOINTS[2:] * 3:
        assert requests.request(method, f"{real_server}{path}", data=form, timeout=5).status_code == 403
    # The module's own status reports still arrive (every 2 s) and are not replaced by the forgery.
    status_data = reported_status_data(real_server)
    assert status_data["model"] == smollm2.name
    entries = log_entries(real_server)
    assert not any(e["entry"] == "forged log entry" for e in entries)
    refusals = [e for e in entries if e["entry"].startswith("Refused ") and e["level"] == "warning"]
    assert len(refusals) == 1, refusals  # once per peer (this test's user), not once per request
    assert "further refusals" in refusals[0]["entry"]


def test_launched_module_polls_answers_and_reports_unhindered(real_server, smollm2):
    final = chat_to_the_end(real_server)
    assert final["success"] is True
    assert final["reply"].strip()
    status = server_status(real_server)
    assert status["status"] == "Started"
    assert status["requestCount"] > 0
    status_data = reported_status_data(real_server)
    assert status_data["model"] == smollm2.name  # updatemodulestatus from the module is accepted


# ---- --no-module: processes of the server's own user ---------------------------------------------------


@pytest.fixture(scope="module")
def no_module_server(tmp_path_factory):
    with serve_in_thread(no_module_config(tmp_path_factory.mktemp("data"), response_timeout=5.0)) as url:
        yield url


def test_no_module_serves_a_module_of_the_same_user(no_module_server):
    status = requests.post(
        f"{no_module_server}/v1/queue/updatemodulestatus/LlamaChat",
        data={"statusData": json.dumps({"model": "by-hand.gguf"})},
        timeout=5,
    )
    assert status.status_code == 200
    assert status.text == "Module status updated"
    entries = log_entries(no_module_server)
    assert any(
        "--no-module: the module endpoints" in e["entry"] and f"uid {os.geteuid()}" in e["entry"] for e in entries
    ), "the server should say at startup whom it accepts"


def test_a_connection_is_judged_once_however_many_requests_it_carries(no_module_server, monkeypatch):
    """The SDK keeps its connection open: its polls must not each pay for the /proc lookup (counted by a wrapper
    around the real lookup)."""
    import llamachat_server.module_access as module_access

    lookups = []
    real_lookup = module_access.find_peer_socket
    monkeypatch.setattr(module_access, "find_peer_socket", lambda *args: lookups.append(args) or real_lookup(*args))
    for _ in range(2):
        with requests.Session() as module:
            for _ in range(5):
                assert module.post(f"{no_module_server}/v1/log/", data={"entry": "kept-alive"}, timeout=5).json() == {
                    "success": True
                }
    assert len(lookups) == 2  # one per connection, not ten


ROGUE_OF_ANOTHER_USER = """
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=b"statusData=%7B%7D"), timeout=10)
    print(200)
except urllib.error.HTTPError as ex:
    print(ex.code, ex.read().decode())
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run as another user")
def test_no_module_refuses_processes_of_another_user(no_module_server):
    result = subprocess.run(
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            ROGUE_OF_ANOTHER_USER,
            f"{no_module_server}/v1/queue/updatemodulestatus/LlamaChat",
        ],
        user=65534,
        group=65534,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    code, _, body = result.stdout.partition(" ")
    assert code == "403", result
    assert "accept processes of uid 0 only, this connection comes from uid 65534" in json.loads(body)["error"]


# ---- Web origins ------------------------------------------------------------------------------------------

FOREIGN_ORIGINS = [
    "https://evil.example",
    "null",
    "http://localhost.evil.example",
    "http://127.0.0.1.nip.io:32168",
    "http://evil.example:32168",
    "file://",
]
LOCAL_ORIGINS = ["http://localhost:3000", "https://localhost", "http://127.0.0.1:8080", "http://[::1]:5173"]


def preflight(base_url, origin):
    return requests.options(
        f"{base_url}/v1/text/chat",
        timeout=5,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_foreign_origin_gets_no_cors_header_and_its_requests_are_refused(no_module_server, origin):
    headers = {"Origin": origin}
    chat = requests.post(f"{no_module_server}/v1/text/chat", data={"prompt": "x"}, headers=headers, timeout=10)
    assert chat.status_code == 403  # at once: the request never reaches the queue (no 5 s timeout)
    assert "Access-Control-Allow-Origin" not in chat.headers
    body = chat.json()
    assert body["success"] is False
    assert f"web pages from {origin} may not call this server" in body["error"]
    assert f"--allow-origin {origin}" in body["error"]

    # GETs too, as Ollama does: a page may not read the log or the models, nor learn anything from how they answer.
    for path in ("/v1/server/status/ping", "/v1/log/list", "/v1/models", "/v1/module/list/status"):
        got = requests.get(f"{no_module_server}{path}", headers=headers, timeout=5)
        assert got.status_code == 403, path
        assert "Access-Control-Allow-Origin" not in got.headers, path
        assert "entries" not in got.text
        assert "statuses" not in got.text
    models = requests.get(f"{no_module_server}/v1/models", headers=headers, timeout=5).json()
    assert f"web pages from {origin} may not call this server" in models["error"]["message"]  # OpenAI's shape
    answer = preflight(no_module_server, origin)
    assert answer.status_code == 403
    assert "Access-Control-Allow-Origin" not in answer.headers


@pytest.mark.parametrize("origin", LOCAL_ORIGINS)
def test_this_machines_origins_may_call_the_server(no_module_server, origin):
    answer = preflight(no_module_server, origin)
    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == origin
    assert answer.headers["Vary"] == "Origin"
    assert "POST" in answer.headers["Access-Control-Allow-Methods"]
    assert answer.headers["Access-Control-Allow-Headers"] == "content-type"
    for response in (
        requests.get(f"{no_module_server}/v1/server/status/ping", headers={"Origin": origin}, timeout=5),
        requests.post(f"{no_module_server}/v1/no/such/route", headers={"Origin": origin}, timeout=5),
    ):
        assert response.headers["Access-Control-Allow-Origin"] == origin
    assert response.status_code == 404  # errors carry the header too, so the page can read them


def test_the_servers_own_origin_may_post(no_module_server):
    """The Explorer page the server serves posts with its own origin, whatever name it was reached by."""
    port = urlparse(no_module_server).port
    for name in ("127.0.0.1", "localhost", "app.localhost"):
        own = f"http://{name}:{port}"
        response = requests.post(
            f"{no_module_server}/v1/no/such/route", timeout=5, headers={"Origin": own, "Host": f"{name}:{port}"}
        )
        assert response.status_code == 404
        assert response.headers["Access-Control-Allow-Origin"] == own


@pytest.mark.parametrize(
    "allowed, origin, expected",
    [
        (["https://app.example.com"], "https://app.example.com", "https://app.example.com"),
        (["http://*.trusted.test"], "http://chat.trusted.test", "http://chat.trusted.test"),
        (["null"], "null", "null"),
        (["*"], "https://anywhere.example", "*"),
        (["*"], "null", "*"),
    ],
)
def test_allow_origin_admits_more_origins(tmp_path, allowed, origin, expected):
    config = ServerConfig(
        module_dir=ROOT, port=0, launch_module=False, allowed_origins=allowed, data_dir=tmp_path, log_level="critical"
    )
    with serve_in_thread(config) as url:
        answer = preflight(url, origin)
        assert answer.status_code == 204
        assert answer.headers["Access-Control-Allow-Origin"] == expected
        route = requests.post(f"{url}/v1/no/such/route", headers={"Origin": origin}, timeout=5)
        assert route.status_code == 404
        assert route.headers["Access-Control-Allow-Origin"] == expected
        if allowed != ["*"]:  # a pattern admits what it names, nothing more
            other = requests.post(f"{url}/v1/text/chat", headers={"Origin": "https://evil.example"}, timeout=5)
            assert other.status_code == 403


def run_cli(*args, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "llamachat_server", "--no-module", "--port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("value", ["localhost:3000", "http://", "http://a b"])
def test_a_malformed_allow_origin_is_refused_at_startup(value):
    result = run_cli("--allow-origin", value)
    assert result.returncode == 2
    assert "--allow-origin" in result.stderr
    assert "scheme://host[:port]" in result.stderr


# ---- Host header (DNS rebinding) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "10.0.0.1:{port}", "localhost.evil.example"],
)
def test_a_host_that_is_not_a_name_of_this_server_is_refused(no_module_server, host):
    host = host.format(port=urlparse(no_module_server).port)
    for method, path in (("GET", "/v1/server/status/ping"), ("POST", "/v1/text/chat"), ("GET", "/")):
        response = requests.request(method, f"{no_module_server}{path}", headers={"Host": host}, timeout=5)
        assert response.status_code == 403, (method, path)
        error = response.json()["error"]
        assert f"Host '{host}' is not a name of this server" in error
        assert "DNS rebinding" in error


@pytest.mark.parametrize(
    "host",
    [
        "localhost:{port}",
        "LOCALHOST:{port}",
        "127.0.0.1:{port}",
        "127.0.0.1",
        "[::1]:{port}",
        "chat.localhost:{port}",
        "localhost.",
    ],
)
def test_loopback_hosts_are_served(no_module_server, host):
    host = host.format(port=urlparse(no_module_server).port)
    response = requests.get(f"{no_module_server}/v1/server/status/ping", headers={"Host": host}, timeout=5)
    assert response.status_code == 200
    assert response.json()["success"] is True


def test_a_server_on_every_interface_answers_to_ip_addresses_and_its_host_name_only():
    check = HostCheck("0.0.0.0", "mybox")
    for host in ("192.168.1.5:32168", "[fe80::1]:32168", "mybox:32168", "MyBox.local", "localhost:32168"):
        assert check.allows(host), host
    for host in ("evil.example:32168", "mybox.evil.example", "192.168.1.5.nip.io"):
        assert not check.allows(host), host
    bound = HostCheck("192.168.1.5", "mybox")
    assert bound.allows("192.168.1.5:32168")
    assert not bound.allows("192.168.1.6")
    assert not bound.allows("mybox")


# ---- --host -----------------------------------------------------------------------------------------------


def test_a_host_other_than_loopback_warns_that_there_is_no_authentication():
    # 192.0.2.1 (TEST-NET-1) is on no interface: the server warns, then cannot listen, and nothing leaves loopback.
    result = run_cli("--host", "192.0.2.1", "--log-level", "warning")
    assert result.returncode == 2
    assert "cannot listen on 192.0.2.1" in result.stderr
    warning = "Listening on 192.0.2.1: the API has no authentication"
    assert f"WARNING: {warning}" in result.stderr
    assert warning in result.stdout  # the server log (echoed to the console)


def test_loopback_hosts_do_not_warn(tmp_path):
    for host in ("127.0.0.1", "::1", "localhost"):
        config = ServerConfig(
            module_dir=ROOT, host=host, port=0, launch_module=False, data_dir=tmp_path, log_level="critical"
        )
        with serve_in_thread(config) as url:
            assert not [e for e in log_entries(url) if "no authentication" in e["entry"]], host


# ---- Both loopback addresses of the port (localhost's IPv6 side) -------------------------------------------


def port_free_on_both_loopbacks() -> int:
    for _ in range(50):
        with socket.create_server(("127.0.0.1", 0)) as v4:
            port = v4.getsockname()[1]
            try:
                socket.create_server(("::1", port), family=socket.AF_INET6).close()
            except OSError:
                continue
            return port
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


def test_the_server_holds_localhosts_ipv6_side_of_its_port_too(no_module_server):
    """The SDK, the README and the page call http://localhost:<port>, which often resolves to ::1 first: a server
    holding only 127.0.0.1 left [::1]:<port> to any local user's listener."""
    port = urlparse(no_module_server).port
    ping = requests.get(f"http://[::1]:{port}/v1/server/status/ping", timeout=5)
    assert ping.status_code == 200
    assert ping.json()["success"] is True
    with pytest.raises(OSError):  # nobody else can listen there now
        socket.create_server(("::1", port), family=socket.AF_INET6).close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_port_whose_ipv6_loopback_another_program_holds_is_refused_at_startup(host):
    """A listener of another program (here: this test's) on [::1]:<port> would receive the module's and browsers'
    requests to localhost: the server says so and does not start."""
    port = port_free_on_both_loopbacks()
    with socket.create_server(("::1", port), family=socket.AF_INET6):
        result = run_cli("--host", host, "--port", str(port), timeout=20)
    assert result.returncode == 2, result
    assert f"cannot listen on [::1]:{port}" in result.stderr
    assert "another program" in result.stderr


# ---- The module-peer lookup, off the event loop ------------------------------------------------------------


def test_the_module_peer_lookup_does_not_hold_up_other_clients(no_module_server, monkeypatch):
    """Resolving a connection's process reads /proc, which took 22.8 s for 1,000 connections on the event loop:
    every other client waited. With the lookup held up (a gate around the real lookup: /proc cannot be made slow on
    demand), a client that needs no lookup is still answered, and lookups run one at a time."""
    import llamachat_server.module_access as module_access

    gate, running, most = threading.Event(), [], []
    real_lookup = module_access.find_peer_socket

    def gated_lookup(*args):
        running.append(1)
        most.append(len(running))
        try:
            gate.wait(30)
            return real_lookup(*args)
        finally:
            running.pop()

    monkeypatch.setattr(module_access, "find_peer_socket", gated_lookup)
    with ThreadPoolExecutor(max_workers=4) as pool:
        try:
            waiting = [
                pool.submit(requests.post, f"{no_module_server}/v1/log/", data={"entry": "x"}, timeout=40)
                for _ in range(3)
            ]
            poll(lambda: most, 10, "a lookup to start")
            ping = requests.get(f"{no_module_server}/v1/server/status/ping", timeout=5)
            assert ping.status_code == 200
            assert not any(w.done() for w in waiting)
        finally:
            gate.set()
        assert all(w.result().json() == {"success": True} for w in waiting)
    assert max(most) == 1  # one lookup at a time


# ---- --allow-host -----------------------------------------------------------------------------------------


def test_allow_host_admits_docker_and_proxy_names_and_nothing_more(tmp_path):
    config = no_module_config(tmp_path, allowed_hosts=["host.docker.internal", "*.example.com"])
    with serve_in_thread(config) as url:
        port = urlparse(url).port

        def status(host):
            return requests.get(f"{url}/v1/server/status/ping", headers={"Host": host}, timeout=5).status_code

        for host in (f"host.docker.internal:{port}", "HOST.docker.internal.", "chat.example.com:8080"):
            assert status(host) == 200, host
        for host in ("example.com", "a.b.example.com", "host.docker.internal.evil.test", "evil.test"):
            assert status(host) == 403, host
        page = requests.get(f"{url}/", headers={"Host": f"host.docker.internal:{port}"}, timeout=5)
        assert page.status_code == 200  # Open WebUI in Docker, or a proxy keeping the Host, reaches the page too


def test_a_refused_host_is_told_about_allow_host(no_module_server):
    error = requests.get(
        f"{no_module_server}/v1/server/status/ping", headers={"Host": "host.docker.internal:32168"}, timeout=5
    ).json()["error"]
    assert "--allow-host host.docker.internal" in error


@pytest.mark.parametrize("value", ["http://example.com", "example.com/path", "a b", "exa mple"])
def test_a_malformed_allow_host_is_refused_at_startup(value):
    result = run_cli("--allow-host", value)
    assert result.returncode == 2
    assert "--allow-host" in result.stderr
    assert "not a host name" in result.stderr


# ---- API keys ---------------------------------------------------------------------------------------------

KEYS = ["first-key-0123", "second-key-4567"]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    with serve_in_thread(no_module_config(tmp_path_factory.mktemp("data"), response_timeout=1.0, api_keys=KEYS)) as url:
        yield url


CLIENT_ROUTES = [  # (method, path) of client routes of every kind: the module's, the server's, OpenAI's
    ("POST", "/v1/text/chat"),
    ("POST", "/v1/LlamaChat/get_command_status"),
    ("GET", "/v1/server/status/ping"),
    ("GET", "/v1/module/list/running"),
    ("GET", "/v1/log/list"),
    ("POST", "/v1/no/such/route"),
]


@pytest.mark.parametrize("method, path", CLIENT_ROUTES)
def test_with_api_keys_a_client_route_needs_one_in_codeprojects_shape(keyed_server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEYS[0]}):
        refused = requests.request(method, f"{keyed_server}{path}", headers=headers, timeout=10)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        body = refused.json()
        assert body["success"] is False
        assert body["code"] == 401
        assert "Authorization: Bearer" in body["error"]
    for key in KEYS:  # either key; the route itself answers (the chat times out: no module here)
        answer = requests.request(
            method,
            f"{keyed_server}{path}",
            headers={"Authorization": f"Bearer {key}"},
            data={"commandId": "x"},
            timeout=10,
        )
        assert answer.status_code != 401, answer.text


def test_with_api_keys_the_openai_routes_answer_401_as_openai_does(keyed_server):
    import openai

    for key in ("wrong-key", KEYS[0] + "x"):
        client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=key, max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.models.list()
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    raw = requests.get(f"{keyed_server}/v1/models", timeout=5)
    assert raw.json()["error"]["type"] == "invalid_request_error"
    assert raw.json()["error"]["code"] == "invalid_api_key"
    listed = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEYS[1], max_retries=0, timeout=10).models.list()
    assert listed.data == []  # allowed: no module has reported a model here


def test_with_api_keys_the_page_preflights_and_module_endpoints_need_none(keyed_server):
    for path in ("/", "/explorer.html", "/assets/explorer.js"):
        assert requests.get(f"{keyed_server}{path}", timeout=5).status_code == 200, path
    preflight_answer = preflight(keyed_server, "http://localhost:3000")
    assert preflight_answer.status_code == 204
    # The SDK sends no key: the module endpoints keep their process check instead (--no-module: this user's).
    log = requests.post(f"{keyed_server}/v1/log/", data={"entry": "from the module"}, timeout=5)
    assert log.json() == {"success": True}


def test_api_keys_come_from_the_command_line_and_key_files(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# LlamaChat keys\n\nfile-key-1\n  file-key-2  \n")
    from llamachat_server.__main__ import config_from_args, parse_args

    config = config_from_args(parse_args(["--api-key", "cli-key", "--api-key-file", str(key_file)]))
    assert config.api_keys == ["cli-key", "file-key-1", "file-key-2"]
    assert config_from_args(parse_args([])).api_keys == []  # off by default
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    for args in (("--api-key-file", str(empty)), ("--api-key-file", str(tmp_path / "missing")), ("--api-key", "a b")):
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert "--api-key" in result.stderr, args


def test_a_host_other_than_loopback_with_a_key_does_not_warn():
    result = run_cli("--host", "192.0.2.1", "--api-key", "k", "--log-level", "warning")
    assert result.returncode == 2
    assert "no authentication" not in result.stderr + result.stdout


# ---- The page: no framing, no inline script but the module's -----------------------------------------------


def test_the_page_may_not_be_framed_and_runs_only_its_own_scripts(no_module_server):
    from llamachat_server.explorer import module_script, read_explorer_ui

    for path in ("/", "/explorer.html"):
        page = requests.get(f"{no_module_server}{path}", timeout=5)
        assert page.headers["X-Frame-Options"] == "DENY"
        policy = dict(
            (part.split()[0], part.split()[1:]) for part in page.headers["Content-Security-Policy"].split(";")
        )
        assert policy["frame-ancestors"] == ["'none'"]
        assert policy["object-src"] == ["'none'"]
        script = module_script(read_explorer_ui(ROOT), "LlamaChat")
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert policy["script-src"] == ["'self'", f"'sha256-{digest}'"]  # no 'unsafe-inline', no other source
