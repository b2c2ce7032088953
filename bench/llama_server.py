"""llama.cpp's own llama-server (optional): the C++ reference users compare against, asked the same chats through
its OpenAI-compatible streaming API."""

import http.client
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.live_server import free_port, log_tail, poll, stop_process

from .stream_timing import StreamRefused, sse_chunks, time_stream
from .workload import N_CTX, SAMPLING, chat_messages


class LlamaServerFailed(RuntimeError):
    """llama-server did not start; the message carries the end of its log."""


class LlamaServerEngine:
    """llama-server started on a free loopback port, chatted with over HTTP."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        threads: int,
        log_path: Path,
        start_timeout: float = 120.0,
        parallel: int = 1,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        # `parallel` slots of N_CTX tokens each, the model's own Jinja chat template and flash attention (as the
        # module's engine, llama_chat.ENGINE_OPTIONS): as close to the module's engine as it goes.
        command = [
            str(binary),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(N_CTX * parallel),
            "-np",
            str(parallel),
            "--jinja",
            "-fa",
            "on",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra_args,  # e.g. a speculative decoding type
        ]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_healthy(start_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise LlamaServerFailed(
                    f"llama-server exited (code {self.process.returncode}):\n{log_tail(self.log_path)}"
                )
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                return connection.getresponse().status == 200
            except OSError:
                return False

        try:
            poll(healthy, timeout, "llama-server to be healthy", interval=0.2)
        except AssertionError as ex:
            raise LlamaServerFailed(f"{ex}:\n{log_tail(self.log_path)}") from None

    def stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POSTs an OpenAI chat completion body with stream: true; yields its chunks."""
        try:
            yield from sse_chunks(self.port, body)
        except StreamRefused as ex:
            raise LlamaServerFailed(f"llama-server answered {ex}") from None

    def chat(self, prompt: str, history: list[dict[str, str]], max_tokens: int, fresh: bool) -> dict[str, Any]:
        body = {
            "messages": chat_messages(prompt, history),
            "stream": True,
            "max_tokens": max_tokens,
            "cache_prompt": not fresh,
            **SAMPLING,
        }
        return vars(time_stream(lambda: self.stream(body)))

    def close(self) -> None:
        stop_process(self.process)
