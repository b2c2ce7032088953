"""The engine itself, streamed in this process: raw llama-cpp-python, and the module's LlamaChat wrapper over it."""

from pathlib import Path
from typing import Any

from llama_chat import LlamaChat, plain_llama

from .stream_timing import time_stream
from .workload import N_CTX, SAMPLING, SYSTEM_PROMPT, chat_messages


class RawEngine:
    """llama-cpp-python's create_chat_completion with the GGUF's own chat template: what the module is built on."""

    def __init__(self, model: Path, threads: int) -> None:
        self.llm = plain_llama(model, N_CTX, threads)

    def chat(self, prompt: str, history: list[dict[str, str]], max_tokens: int, fresh: bool) -> dict[str, Any]:
        if fresh:
            self.llm.reset()  # the next prompt is evaluated from its first token
        run = time_stream(
            lambda: self.llm.create_chat_completion(
                messages=chat_messages(prompt, history), stream=True, max_tokens=max_tokens, **SAMPLING
            )
        )
        return vars(run)

    def close(self) -> None:
        self.llm.close()


class WrapperEngine:
    """LlamaChat.do_chat, the module's own layer over llama-cpp-python, without the SDK or a server."""

    def __init__(self, model: Path, threads: int) -> None:
        self.llama_chat = LlamaChat.from_file(model, n_ctx=N_CTX, n_threads=threads)

    def chat(self, prompt: str, history: list[dict[str, str]], max_tokens: int, fresh: bool) -> dict[str, Any]:
        if fresh:
            self.llama_chat.llm.reset()
        run = time_stream(
            lambda: self.llama_chat.do_chat(
                prompt, SYSTEM_PROMPT, history, stream=True, max_tokens=max_tokens, **SAMPLING
            )
        )
        return vars(run)

    def close(self) -> None:
        self.llama_chat.close()
