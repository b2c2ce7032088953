"""Our standalone server (python -m llamachat_server) with the module on the benchmark's model, started through
its command line as a user would, with the module's memory readable from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from llamachat_server.__main__ import READY_PREFIX

from .workload import N_CTX

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerFailed(RuntimeError):
    """The server or its module did not start; the message carries the end of the server's log."""


class CpaiServer:
    def __init__(self, model: Path, threads: int, log_path: Path, start_timeout: float = 180.0) -> None:
        self.log_path = log_path
        command = [
            sys.executable,
            "-m",
            "llamachat_server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            str(model),
            "--data-dir",
            str(log_path.parent),
            "--log-level",
            "warning",
            "--env",
            f"CPAI_MODULE_LLAMA_THREADS={threads}",
            "--env",
            f"CPAI_MODULE_LLAMA_CONTEXT_SIZE={N_CTX}",
        ]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            self.base_url = self._wait_for(self._ready_url, start_timeout, "the server to listen")
            self.module_pid: int = self._wait_for(self._started_module_pid, start_timeout, "the module to load")
        except BaseException:
            self.stop()
            raise

    def _wait_for(self, check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"llamachat_server exited (code {self.process.returncode}) "
                    f"while waiting for {what}:\n{self.log_tail()}"
                )
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise ServerFailed(f"timed out after {timeout:g} s waiting for {what}:\n{self.log_tail()}")

    def _ready_url(self) -> str | None:
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].strip().rstrip("/")
        return None

    def _started_module_pid(self) -> int | None:
        with urllib.request.urlopen(f"{self.base_url}/v1/module/list/status", timeout=10) as response:
            status = json.load(response)["statuses"][0]
        return status["pid"] if status["status"] == "Started" else None

    def module_rss_mb(self) -> float:
        return psutil.Process(self.module_pid).memory_info().rss / 2**20

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Ctrl+C, as a person stops it; killed if it has not ended in 15 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
