"""LlamaChat: a thin wrapper over llama-cpp-python's Llama that loads a GGUF chat model and chats with it.

do_chat passes its keyword arguments on to llama-cpp-python's create_chat_completion.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import llama_cpp
from llama_cpp import CreateChatCompletionResponse, CreateChatCompletionStreamResponse, Llama
from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

import kv_state
from chat_template import choose_template
from llama_log import LLAMA_LOG
from model_file import quick_problem

DEFAULT_SYSTEM_PROMPT = (
    "You're a helpful assistant who answers questions the user asks of you concisely and accurately."
)

# The tiny model install.sh puts in the models folder when the Hub can't be reached.
FALLBACK_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

Message = dict[str, str]


def conversation(
    prompt: str, system_prompt: str | None, history: list[Message] | None, system_role: bool
) -> list[Message]:
    """System prompt (None = the default), earlier turns, then the new prompt, as a template with or without a
    system role needs them."""
    system_prompt = system_prompt or DEFAULT_SYSTEM_PROMPT
    turns = list(history or []) + [{"role": "user", "content": prompt}]
    if system_role:
        return [{"role": "system", "content": system_prompt}] + turns
    # Templates without a system role (Mistral, Gemma) get it at the head of the first user turn instead.
    first = turns[0]
    return [{"role": first["role"], "content": f"{system_prompt}\n\n{first['content']}"}] + turns[1:]


class ModelLoadError(RuntimeError):
    """No model could be loaded; the message lists every place that was tried and why it failed."""


def _never() -> bool:
    return False


_NO_CALLBACK = llama_cpp.ggml_abort_callback(0)  # a NULL function pointer: llama.cpp then never asks


class _CountingLlama(Llama):
    """Llama that counts the tokens it generates. Streamed chunks are not tokens: llama-cpp-python holds back the
    pieces of a multi-byte character and anything that may begin a stop string."""

    generated_tokens = 0

    def sample(self, *args: Any, **kwargs: Any) -> int:
        token = super().sample(*args, **kwargs)
        # The end-of-generation token ends the reply without being part of it (as in llama-cpp-python's usage).
        if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            self.generated_tokens += 1
        return token


class LlamaChat:
    def __init__(
        self,
        repo_id: str,
        fileglob: str,
        filename: str,
        model_dir: str,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        chat_format: str | None = None,
        verbose: bool = False,
    ) -> None:
        options = dict(
            n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, verbose=verbose
        )
        tried: list[str] = []
        self.fallback_reason: str | None = None

        self.llm = self._load_file(os.path.join(model_dir, filename), options, tried) if filename else None
        if self.llm is None and repo_id:
            try:
                # local_dir (not cache_dir) puts the file at model_dir/<name>, so the next start loads it directly.
                self.llm = _CountingLlama.from_pretrained(
                    repo_id=repo_id, filename=fileglob, local_dir=model_dir, **options
                )
            except Exception as ex:
                tried.append(f"downloading '{fileglob}' from Hugging Face repo '{repo_id}': {_reason(ex)}")
        if self.llm is None:
            self.llm = self._load_file(os.path.join(model_dir, FALLBACK_MODEL_FILENAME), options, tried)
            if self.llm is not None:
                self.fallback_reason = "; ".join(tried)
        if self.llm is None:
            raise ModelLoadError(
                "Unable to load a model. Tried " + "; ".join(f"({i}) {attempt}" for i, attempt in enumerate(tried, 1))
            )

        self.model_path = self.llm.model_path
        self.model_name = os.path.basename(self.model_path)
        self.n_ctx = self.llm.n_ctx()

        choice = choose_template(self.llm, chat_format or None)
        self.template = choice.template
        self.template_source = choice.source
        self.system_role = self.template.supports_system_role()
        self.llm.chat_handler = chat_formatter_to_chat_completion_handler(self.template)

        # llama.cpp polls the abort callback between graph nodes, so a cancel also stops the evaluation of a long
        # prompt mid-batch. It asks whatever the current chat's should_abort says.
        self._should_abort: Callable[[], bool] = _never
        self._abort_callback = llama_cpp.ggml_abort_callback(lambda _data: self._aborting())

    @classmethod
    def from_file(cls, path: str | os.PathLike, **options: Any) -> LlamaChat:
        """A LlamaChat on one local GGUF file, nothing downloaded; options as for __init__ (n_ctx, n_threads...)."""
        return cls(repo_id="", fileglob="", filename=os.path.basename(path), model_dir=os.path.dirname(path), **options)

    @staticmethod
    def _load_file(path: str, options: dict[str, Any], tried: list[str]) -> Llama | None:
        if not os.path.isfile(path):
            tried.append(f"'{path}': no such file")
            return None
        # llama.cpp would load a damaged file that still parses and chat in garbage: the cheap checks come first.
        if problem := quick_problem(Path(path)):
            tried.append(f"'{path}' {problem}: not loaded; run the module's install again to replace it")
            return None
        try:
            return _CountingLlama(model_path=path, **options)
        except Exception as ex:
            tried.append(f"'{path}': {_reason(ex)} (is the file a complete GGUF model?)")
            return None

    def messages(
        self, prompt: str, system_prompt: str | None = None, history: list[Message] | None = None
    ) -> list[Message]:
        """The conversation as the template will see it: system prompt, earlier turns, then the new prompt."""
        return conversation(prompt, system_prompt, history, self.system_role)

    def tokenize_messages(self, messages: list[Message]) -> list[int]:
        """The prompt tokens create_chat_completion will evaluate for these messages."""
        return self.llm.tokenize(self.template.render(messages).encode("utf-8"), add_bos=False, special=True)

    def count_tokens(self, text: str) -> int:
        """The tokens of a message's text on its own, as the template's rendering tokenizes it."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    @property
    def generated_tokens(self) -> int:
        """Tokens generated by the current (or last) do_chat, the end-of-generation token not counted."""
        return self.llm.generated_tokens

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many of these prompt tokens are already in the KV cache from the previous chat."""
        cached = Llama.longest_token_prefix(self.llm.input_ids[: self.llm.n_tokens].tolist(), tokens)
        # llama-cpp-python re-evaluates one token when the whole prompt is cached, to get fresh logits.
        return min(cached, max(len(tokens) - 1, 0))

    def capture_state(self) -> tuple[list[int], bytes]:
        """The tokens in the KV cache and their KV bytes (kv_state.capture), to restore_state() later."""
        n_tokens = self.llm.n_tokens
        return self.llm.input_ids[:n_tokens].tolist(), kv_state.capture(self.llm.ctx, self.llm._ctx.memory, 0, n_tokens)

    def restore_state(self, tokens: list[int], state: bytes) -> bool:
        """Puts captured KV bytes holding these tokens back in the cache, for the next do_chat to continue from;
        False (and an empty cache) if llama.cpp refuses them."""
        llm = self.llm
        if not kv_state.restore(llm.ctx, llm._ctx.memory, 0, state):
            llm.n_tokens = 0
            return False
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        # The logits in the context are still the previous chat's: even a prompt equal to these tokens must
        # evaluate its last token again (llama-cpp-python samples at once from live logits otherwise).
        llm._requires_eval = True
        return True

    def do_chat(
        self,
        prompt: str,
        system_prompt: str | None = None,
        history: list[Message] | None = None,
        should_abort: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> CreateChatCompletionResponse | Iterator[CreateChatCompletionStreamResponse]:
        """Generates the reply to a prompt, after the earlier turns in history.

        params:
            prompt: the user's message; system_prompt: how the assistant should behave (None = default);
            history: earlier turns, [{"role": "user"|"assistant", "content": str}], oldest first;
            should_abort: polled by llama.cpp while it computes, True stops it (llama_decode then raises
                RuntimeError). Without stream it is asked throughout; with stream only until the first chunk, while
                the prompt is evaluated: after that the caller stops the stream between chunks;
            **kwargs: passed to create_chat_completion (max_tokens, temperature, stream, stop, seed...).
        """
        self._watch(should_abort)
        self.llm.generated_tokens = 0
        result = self.llm.create_chat_completion(messages=self.messages(prompt, system_prompt, history), **kwargs)
        if should_abort is not None and kwargs.get("stream"):
            return self._watch_until_first_chunk(result)
        return result

    def _aborting(self) -> bool:
        abort = self._should_abort()
        if abort:  # llama.cpp now logs stopping the computation as a warning and an error, which it is not
            LLAMA_LOG.aborting = True
        return abort

    def _watch(self, should_abort: Callable[[], bool] | None) -> None:
        """Lets should_abort stop llama.cpp in the middle of a computation; None stops asking."""
        LLAMA_LOG.aborting = False
        self._should_abort = should_abort or _never
        llama_cpp.llama_set_abort_callback(self.llm.ctx, self._abort_callback if should_abort else _NO_CALLBACK, None)

    def _watch_until_first_chunk(
        self, stream: Iterator[CreateChatCompletionStreamResponse]
    ) -> Iterator[CreateChatCompletionStreamResponse]:
        # The callback runs ~600 times per generated token, each time taking the GIL. Once the prompt is evaluated
        # (the first chunk), the caller's check between chunks already stops a chat within one token.
        try:
            first = next(stream, None)
            self._watch(None)
            if first is not None:
                yield first
                yield from stream
        finally:
            self._watch(None)
            stream.close()

    def set_threads(self, threads: int) -> None:
        """The CPU threads llama.cpp computes with from now on, for the prompt and for generation (cheap)."""
        llama_cpp.llama_set_n_threads(self.llm.ctx, threads, threads)

    def close(self) -> None:
        self.llm.close()


def _reason(ex: Exception) -> str:
    return f"{type(ex).__name__}: {ex}".strip().splitlines()[0]
