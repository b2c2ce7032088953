"""The one place that starts, waits for and stops a real `python -m llamachat_server`, for tests and benchmarks
(bench/ imports it as `tests.live_server`), with the real module on a small model.

    from live_server import running_server, server_status

    with running_server(smollm2_path()) as base_url:          # e.g. "http://127.0.0.1:41234"
        requests.post(f"{base_url}/v1/text/chat", data={"prompt": "Hi", "max_tokens": "16"})

running_server(model_path, module_dir=ROOT, *, context_size=2048, start_timeout=120, server_args=(), **env)
  Starts the server on a free loopback port as a subprocess, the module loading `model_path`; extra keyword
  arguments become the module's environment variables (e.g. CPAI_MODULE_LLAMA_THREADS="2"), over its
  settings; `server_args` are more command-line options (e.g. ("--allow-origin", "null")). Yields the base
  URL once the module's status is Started; stops the server on leaving (stop_process). If startup fails, the
  error shows the server's log. The server's console log is kept at `server_log_path(base_url)` while it runs.
server_status(base_url, api_key=None) -> dict
  The module's ProcessStatus from GET /v1/module/list/status (status, pid, restarts, statusData...); api_key for a
  server started with --api-key (running_server passes the one in its server_args while it waits).
rss_mb(pid) -> float
  A process's resident memory in MiB (the module's pid is server_status(base_url)["pid"]).
no_module_config(data_dir, **fields) -> ServerConfig
  A config for a server in this process with no module (the test plays it), on a free port, logging nothing to the
  console; `fields` override (api_keys, allowed_hosts, response_timeout...).
start_no_module_server(port, log_path, descriptor_limit=None, *args) -> subprocess.Popen
  `python -m llamachat_server --no-module` as a subprocess (its open-file limit lowered to `descriptor_limit`), once
  it listens; stop it with stop_process.
closed_by_peer(sock) -> bool
  Whether the server has closed a non-blocking socket (what it sent first is read and dropped).
ServerThread(config) / serve_in_thread(config) -> base URL
  llamachat_server.app.serve(config) in a background thread of this process (a ServerConfig, usually
  launch_module=False so the test itself plays the module); ServerThread.stop() ends it, serve_in_thread stops it
  on leaving.
stop_process(process)
  SIGTERM (handled like Ctrl+C), then kill if it has not ended within 15 s: how every server here is stopped.
module_threads() -> int
  The threads a test's module computes with unless the test pins its own: CPAI_MODULE_LLAMA_THREADS when the run
  exports it (the suite is run with 1 and with 2), else 1.
poll(condition, timeout, what) -> value
  Calls condition() until it returns something truthy and returns that; AssertionError after `timeout` s.
free_port() -> int
  A loopback port nothing listens on now (for a server that cannot take port 0, or one that must be unreachable).
log_tail(path, lines=40) -> str
  The end of a log file, for error messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import psutil

from llamachat_server.__main__ import READY_PREFIX
from llamachat_server.app import serve
from llamachat_server.server_state import ServerConfig

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the module folder (tests and bench/ use it)

STOP_TIMEOUT = 15.0


def module_threads() -> int:
    # One by default: two llama.cpp threads collapse to a few tokens/s when the browser or anything else wants a core
    # of a 2-core machine, and tests need steady progress more than speed. A run may export another count, to show
    # the tests hold with it.
    return int(os.environ.get("CPAI_MODULE_LLAMA_THREADS") or 1)


_log_paths: dict[str, Path] = {}


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def server_status(base_url: str, api_key: str | None = None) -> dict:
    request = urllib.request.Request(f"{base_url}/v1/module/list/status")
    if api_key:  # a server started with --api-key
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["statuses"][0]


def reported_status_data(base_url: str) -> dict:
    """The module's statusData, once it has sent one: it reports every 2 s, and the server may hear from its first
    queue poll before its first status."""
    return poll(lambda: server_status(base_url)["statusData"], 10, "the module's status data")


def server_log_path(base_url: str) -> Path:
    return _log_paths[base_url]


def log_tail(log_path: Path, lines: int = 40) -> str:
    text = log_path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _started(process: subprocess.Popen, log_path: Path, api_key: str | None) -> Callable[[], str | None]:
    """A poll condition: the base URL once the module is Started; raises if the server has exited."""
    url: list[str] = []

    def check() -> str | None:
        if process.poll() is not None:
            raise RuntimeError(f"llamachat_server exited with code {process.returncode}:\n{log_tail(log_path)}")
        if not url:
            ready = [
                line for line in log_path.read_text(errors="replace").splitlines() if line.startswith(READY_PREFIX)
            ]
            if not ready:
                return None
            url.append(ready[0][len(READY_PREFIX) :].rstrip("/"))
        try:
            return url[0] if server_status(url[0], api_key)["status"] == "Started" else None
        except (urllib.error.URLError, OSError):
            return None

    return check


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # handled like Ctrl+C; SIGINT is ignored in background jobs
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server(
    model_path: os.PathLike,
    module_dir: os.PathLike = ROOT,
    *,
    context_size: int = 2048,
    start_timeout: float = 120.0,
    server_args: tuple[str, ...] = (),
    **env: str,
) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="llamachat-server-") as scratch:
        module_env = {
            "CPAI_MODULE_LLAMA_CONTEXT_SIZE": str(context_size),
            "CPAI_MODULE_LLAMA_THREADS": str(module_threads()),
            # Conversations' KV states go to the server's scratch folder, never the module folder (tests, benches).
            "CPAI_MODULE_LLAMA_CACHE_DIR": str(Path(scratch) / "conversation-cache"),
            **{k: str(v) for k, v in env.items()},
        }
        log_path = Path(scratch) / "server.log"
        command = [
            sys.executable,
            "-m",
            "llamachat_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--module-dir",
            str(module_dir),
            "--model",
            str(model_path),
            "--data-dir",
            scratch,
        ]
        for name, value in module_env.items():
            command += ["--env", f"{name}={value}"]
        command += list(server_args)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            try:
                api_key = next(
                    (value for flag, value in zip(server_args, server_args[1:]) if flag == "--api-key"), None
                )
                started = _started(process, log_path, api_key)
                base_url = poll(started, start_timeout, "the module to start", interval=0.1)
            except AssertionError as ex:
                raise AssertionError(f"{ex}; the server's log:\n{log_tail(log_path)}") from None
            _log_paths[base_url] = log_path
            try:
                yield base_url
            finally:
                del _log_paths[base_url]
        finally:
            stop_process(process)


def no_module_config(data_dir: os.PathLike, **fields: Any) -> ServerConfig:
    defaults = {
        "module_dir": ROOT,
        "port": 0,
        "launch_module": False,
        "data_dir": Path(data_dir),
        "log_level": "critical",
    }
    return ServerConfig(**{**defaults, **fields})


def start_no_module_server(
    port: int, log_path: Path, descriptor_limit: int | None = None, *args: str
) -> subprocess.Popen:
    def lower_limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptor_limit, descriptor_limit))

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llamachat_server", "--no-module", "--port", str(port), *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=lower_limit if descriptor_limit else None,
        )
    try:
        poll(lambda: process.poll() is None and READY_PREFIX in log_path.read_text(), 30, "the server to listen")
    except AssertionError:
        stop_process(process)
        raise AssertionError(f"the server did not start:\n{log_tail(log_path)}") from None
    return process


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


class ServerThread:
    """llamachat_server's serve(config) running in a daemon thread of this process, on its own event loop."""

    def __init__(self, config: ServerConfig) -> None:
        ready, handles = threading.Event(), {}

        async def run():
            handles["loop"], handles["stop"] = asyncio.get_running_loop(), asyncio.Event()
            await serve(config, handles["stop"], lambda url: (handles.setdefault("url", url.rstrip("/")), ready.set()))

        self._thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
        self._thread.start()
        assert ready.wait(15), "the server did not start"
        self.url: str = handles["url"]
        self._loop, self._stop = handles["loop"], handles["stop"]

    def stop(self) -> None:
        """Asks the server to stop, as Ctrl+C does, and waits until it has."""
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the server did not stop"


@contextmanager
def serve_in_thread(config: ServerConfig) -> Iterator[str]:
    server = ServerThread(config)
    try:
        yield server.url
    finally:
        server.stop()
