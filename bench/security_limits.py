"""python -m bench.security_limits: what the standalone server's bounds cost and hold, measured against real servers
on loopback (issue "Security, round two"). Writes security_limits.json and security_limits.md into --out.

1. Bodies: the JSON bodies of empty values that used to cost hundreds of MB (11.5 MB, 46.9 MB) and the largest
   such bodies under the new limits, each posted to /v1/text/chat of a --no-module server: the answer, how long it
   took, the server's RSS growth, and the longest a ping (sent every 10 ms meanwhile) waited.
2. Connections: a --no-module server whose descriptor limit is 1,024 gets 1,100 connections that each send half
   their headers (as in the issue): how many are answered 503 at once, how long until the server has closed the
   rest, whether a ping is answered meanwhile and after, and whether it ever ran out of descriptors (EMFILE).
3. Module-peer lookups: a server with the real module (SmolLM2) gets 1,000 connections to a module endpoint from
   this (rogue) process: the longest a ping waited meanwhile, and how long until all were refused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from tests.live_server import (
    ROOT,
    closed_by_peer,
    free_port,
    poll,
    rss_mb,
    running_server,
    server_status,
    start_no_module_server,
    stop_process,
)
from tests.model_paths import smollm2_path

from . import machine

DESCRIPTORS = 1024
HALF_HEADERS = b"GET /v1/server/status/ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: "
ENTRY = b'{"key":"k","value":[]}'


class PingWatch:
    """Pings the server every 10 ms in a thread; the longest any ping waited."""

    def __init__(self, base_url: str) -> None:
        self._url, self._stop, self.worst, self.failed = f"{base_url}/v1/server/status/ping", threading.Event(), 0.0, 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    session.get(self._url, timeout=60)
                except requests.RequestException:
                    self.failed += 1
                self.worst = max(self.worst, time.perf_counter() - started)
                time.sleep(0.01)

    def __enter__(self) -> PingWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(70)


def tiny_values_body(size: int) -> bytes:
    count = (size - 14) // (len(ENTRY) + 1)
    return b'{"values": [' + b",".join([ENTRY] * count) + b"]}"


def measure_bodies(base_url: str, server_pid: int) -> list[dict[str, Any]]:
    bodies = [
        ("the issue's 11.5 MB", tiny_values_body(11_500_000)),
        ("the issue's 46.9 MB", tiny_values_body(46_900_000)),
        ("7.9 MB, under the 8 MiB text-route limit", tiny_values_body(7_900_000)),
        # 4 items a value (its braces, its list, the comma after it): 49,000 values are under the 200,000-item cap.
        ("49,000 values, 1.1 MB: under the item cap, over the field cap", tiny_values_body(49_000 * 23 + 14)),
    ]
    rows = []
    for name, body in bodies:
        before = rss_mb(server_pid)
        with PingWatch(base_url) as watch:
            started = time.perf_counter()
            answer = requests.post(
                f"{base_url}/v1/text/chat", data=body, headers={"Content-Type": "application/json"}, timeout=120
            )
            took = time.perf_counter() - started
            time.sleep(0.2)  # a few more pings after the answer
        error = answer.json().get("error", "")
        rows.append(
            {
                "body": name,
                "bytes": len(body),
                "http_status": answer.status_code,
                "answer": error if len(error) <= 80 else error[:80] + "…",
                "answered_in_ms": round(took * 1000),
                "server_rss_growth_mb": round(rss_mb(server_pid) - before, 1),
                "worst_ping_ms": round(watch.worst * 1000),
            }
        )
    return rows


def measure_connections(base_url: str, port: int, log_path: Path, count: int) -> dict[str, Any]:
    sockets, busy = [], 0
    started = time.perf_counter()
    with PingWatch(base_url) as watch:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(HALF_HEADERS)
            sock.setblocking(False)
            sockets.append(sock)
        opened = time.perf_counter() - started

        def refused() -> int:
            peeked = 0
            for sock in sockets:
                try:
                    peeked += sock.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 503")
                except OSError:
                    pass
            return peeked

        time.sleep(1.0)  # the 503s are sent as each connection is accepted
        busy = refused()
        poll(lambda: all(closed_by_peer(s) for s in sockets), 120, "the server to close every half-sent connection")
        all_closed = time.perf_counter() - started
    for sock in sockets:
        sock.close()
    after = requests.get(f"{base_url}/v1/server/status/ping", timeout=10)
    output = log_path.read_text(errors="replace")
    return {
        "connections": count,
        "opened_in_s": round(opened, 2),
        "answered_503_at_once": busy,
        "held_then_closed": count - busy,
        "all_closed_after_s": round(all_closed, 1),
        "worst_ping_meanwhile_ms": round(watch.worst * 1000),
        "pings_failed_meanwhile": watch.failed,
        "ping_after": after.status_code,
        "emfile_logged": "Too many open files" in output or "EMFILE" in output,
    }


def measure_idle_close(port: int) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /v1/server/status/ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.recv(65536)
    started = time.perf_counter()
    sock.settimeout(120)
    while sock.recv(65536):
        pass
    sock.close()
    return round(time.perf_counter() - started, 1)


def measure_peer_lookups(model: Path, count: int) -> dict[str, Any]:
    with running_server(model) as base_url:
        status = server_status(base_url)
        assert status["status"] == "Started"
        port = int(base_url.rsplit(":", 1)[1])
        request = f"GET /v1/queue/x?moduleId=LlamaChat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

        def rogue(_: int) -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                sock.sendall(request)
                return sock.recv(64).startswith(b"HTTP/1.1 403")

        with PingWatch(base_url) as watch, ThreadPoolExecutor(max_workers=100) as pool:
            started = time.perf_counter()
            refused = sum(pool.map(rogue, range(count)))
            took = time.perf_counter() - started
        return {
            "connections": count,
            "refused_403": refused,
            "all_refused_after_s": round(took, 1),
            "worst_ping_meanwhile_ms": round(watch.worst * 1000),
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    load = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="llamachat-security-") as scratch:
        log_path, port = Path(scratch) / "server.log", free_port()
        server = start_no_module_server(port, log_path, DESCRIPTORS, "--response-timeout", "2")
        try:
            base_url = f"http://127.0.0.1:{port}"
            bodies = measure_bodies(base_url, server.pid)
            connections = measure_connections(base_url, port, log_path, args.connections)
            idle_closed_after = measure_idle_close(port)
            server_rss = round(rss_mb(server.pid), 1)
        finally:
            stop_process(server)
    lookups = measure_peer_lookups(args.model, args.lookups)
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": machine.commit(),
        "machine": machine.describe(),
        "load_1min_at_start": load,
        "descriptor_limit": DESCRIPTORS,
        "bodies": bodies,
        "connections": connections,
        "idle_connection_closed_after_s": idle_closed_after,
        "server_rss_mb_at_end": server_rss,
        "peer_lookups": lookups,
    }


def markdown(result: dict[str, Any]) -> str:
    c, p = result["connections"], result["peer_lookups"]
    return "\n".join(
        [
            "# Security limits: what the server's bounds hold, measured",
            "",
            f"{result['when']}, commit {result['commit']}, {result['machine']['cpu']} "
            f"({result['machine']['logical_cpus']} logical CPUs), 1-minute load {result['load_1min_at_start']} at "
            f"start. Command: `.venv/bin/python -m bench.security_limits`.",
            "",
            "## JSON bodies of empty values, posted to /v1/text/chat",
            "",
            "| body | bytes | HTTP | answer | answered in | server RSS growth | longest ping meanwhile |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {r['body']} | {r['bytes']:,} | {r['http_status']} | {r['answer']} | {r['answered_in_ms']} ms | "
                f"{r['server_rss_growth_mb']} MB | {r['worst_ping_ms']} ms |"
                for r in result["bodies"]
            ],
            "",
            f"## {c['connections']:,} connections sending half their headers, descriptor limit "
            f"{result['descriptor_limit']:,}",
            "",
            f"Opened in {c['opened_in_s']} s; {c['answered_503_at_once']} answered 503 at once, "
            f"{c['held_then_closed']} held until the header deadline; all closed by the server "
            f"{c['all_closed_after_s']} s after the first was opened. Longest ping meanwhile "
            f"{c['worst_ping_meanwhile_ms']} ms ({c['pings_failed_meanwhile']} failed); ping after: HTTP "
            f"{c['ping_after']}; out of descriptors (EMFILE) logged: {'yes' if c['emfile_logged'] else 'no'}. An idle "
            f"kept-alive connection was closed {result['idle_connection_closed_after_s']} s after its answer. Server "
            f"RSS at the end: {result['server_rss_mb_at_end']} MB.",
            "",
            f"## {p['connections']:,} connections to a module endpoint from another process (real module, SmolLM2)",
            "",
            f"{p['refused_403']} refused with 403, all within {p['all_refused_after_s']} s; the longest a ping waited "
            f"meanwhile: {p['worst_ping_meanwhile_ms']} ms (the issue measured 22.6 s before the lookup left the "
            f"event loop).",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.security_limits", description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="GGUF for the module (default: SmolLM2)")
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    machine.add_wait_idle_option(parser)
    args = parser.parse_args(argv)
    args.model = args.model or smollm2_path()
    machine.wait_until_idle(args.wait_idle)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "security_limits.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "security_limits.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
