"""LlamaChat_adapter: connects CodeProject.AI Server's request queue to the LlamaChat wrapper.

A chat is a long process, but not the SDK's: SDK 0.0.21 runs one long process per module and refuses any other chat
while it runs (docs/protocol.md §1.7), and its refusal hands out the running chat's commandId. So process() only
reads the request (bounded by the caps in chat_request.py) and queues it in chat_queue.ChatQueue, answering at once
with the chat's own commandId; a worker thread runs the queued chats one after another, and the adapter overrides the
SDK's get_command_status and cancel_command handlers to answer from that queue. Fitting the conversation to the
context, which grows with it, runs in the chat, where a cancel can stop it.

With CPAI_MODULE_LLAMA_PARALLEL above 1 that many workers take chats at once and hand them to batch_decoder's
BatchDecoder, which decodes them together in one context (bench/results/concurrency.md has the measurements).
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import llama_cpp
from codeproject_ai_sdk import JSON, LogVerbosity, ModuleRunner, RequestData

import chat_answers
from batch_decoder import BatchChat, BatchDecoder
from chat_job import FINISH_REASONS, ChatJob
from chat_queue import ChatQueue, QueueClosed, QueuedChat, QueueFull
from chat_request import ChatError, ChatInputs, ChatRequest
from context_fit import ContextFitter, FitCancelled, FittedChat
from llama_chat import LlamaChat, ModelLoadError
from llama_log import LLAMA_LOG
from llama_settings import LlamaSettings
from thread_policy import ThreadPolicy

SELFTEST_PROMPT = "How many planets are there in the solar system?"
# How to fix "no model could be loaded", for the log, the status and a failed self-test.
NO_MODEL_HINT = "install one with bash install.sh (install.bat on Windows) or python fetch_model.py [--small]"
SHUTTING_DOWN = "The module is shutting down; the chat did not start"


def _gpu_library() -> str:
    """The GPU backend llama.cpp was built with ('' for a CPU-only build), from its own system info."""
    if not llama_cpp.llama_supports_gpu_offload():
        return ""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    backends = [part.split(" : ")[0].strip() for part in info.split("|") if " : " in part]
    return next((b for b in backends if b != "CPU"), "GPU")


class LlamaChat_adapter(ModuleRunner):
    def initialise(self) -> None:
        self.llama_chat: LlamaChat | None = None
        self.load_error: str | None = None
        self.fitter: ContextFitter | None = None
        # Every chat, waiting, running or finished, by its commandId. A cancel marks its own chat, so a late cancel
        # can never stop the next one (docs/protocol.md §4.1, item 2).
        self.queue: ChatQueue | None = None
        self.decoder: BatchDecoder | None = None  # with CPAI_MODULE_LLAMA_PARALLEL > 1: decodes the chats together
        self.inputs = ChatInputs(os.path.dirname(os.path.abspath(__file__)))
        # Everything that touches the model runs on this one thread: loading, fitting the conversation (tokenizing),
        # generating, thread changes and closing; process() only reads the request. (Only the model-free queries at
        # start-up, the GPU backend and the log hook, run on the SDK's thread.) llama.cpp's OpenMP keeps a team of
        # worker threads for each thread that calls it: chats on the SDK's changing executor threads piled up teams
        # that fought over the cores and halved generation speed (measured in bench/).
        self.llama_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")

        LLAMA_LOG.install(loud=self.log_verbosity == LogVerbosity.Loud)
        library = _gpu_library() if self.enable_GPU else ""
        # The server's setup runs the self-test (`--selftest`, the SDK's own test for it) with none of the module's
        # EnvironmentVariables: the settings come from modulesettings.json all the same, but the test uses only the
        # model files already installed and never starts a 4 GB download, nor waits on the network.
        self_test = sys.argv[1:2] == ["--selftest"]
        # SDK 0.0.21's package check before a self-test checks nothing, and fails when the CPU architecture is unknown
        # (as without PATH).
        self.selftest_check_pkgs = False
        try:
            settings = LlamaSettings.from_env()
            self.queue = ChatQueue(settings.queue_size, settings.result_ttl, slots=settings.parallel)
            self.n_ctx = settings.context_size
            self.threads = ThreadPolicy(pinned=settings.threads)  # 0: adaptive
            self.n_gpu_layers = settings.gpu_layers if library else 0
            self.llama_chat = self.llama_thread.submit(
                LlamaChat,
                repo_id="" if self_test else settings.model_repo,
                fileglob=settings.model_fileglob,
                filename=settings.model_filename,
                model_dir=str(settings.model_dir),
                n_ctx=self.n_ctx,
                n_threads=self.threads.threads,
                n_gpu_layers=self.n_gpu_layers,
                chat_format=settings.chat_format,
                verbose=self.log_verbosity == LogVerbosity.Loud,
            ).result()
            if settings.parallel > 1:
                # Its worker is then the only thread that computes: the llama thread only loads and tokenizes. A
                # second OpenMP team, even idle, slowed the working one by ~30 % (bench/concurrency.py).
                self.decoder = self.llama_thread.submit(
                    BatchDecoder, self.llama_chat.llm, settings.parallel, self.n_ctx
                ).result()
        except (ModelLoadError, ValueError) as ex:  # ValueError: LlamaSettingsError, an unknown chat format
            self.load_error = f"{ex}; {NO_MODEL_HINT}" if isinstance(ex, ModelLoadError) else str(ex)
            self._log("error", f"LlamaChat has no model, every chat will fail until this is fixed: {self.load_error}")
            return

        chat = self.llama_chat
        self.fitter = ContextFitter(chat)
        self.inference_device = "GPU" if library and self.n_gpu_layers != 0 else "CPU"
        self.inference_library = library if self.inference_device == "GPU" else ""
        self.can_use_GPU = bool(library)
        if chat.fallback_reason:
            self._log(
                "warning",
                f"Using the small fallback model '{chat.model_path}' because the configured model "
                f"could not be loaded: {chat.fallback_reason}",
            )
        # What is loaded by now (~160,000 objects: the SDK, llama-cpp-python, the model's wrappers) lives as long as
        # the model. Frozen, it is left out of later full collections, such as the one after each chat, which
        # otherwise walked it for ~80 ms holding the GIL: the status poll that saw a reply's end waited for it (bench/:
        # the OpenAI stream's last chunk came ~15 ms late, 1 % of a 256-token reply's tokens/s).
        gc.freeze()
        self._log(
            "info",
            f"Using model '{chat.model_path}' ({self.n_ctx}-token context, {self.threads.mode} threads "
            f"(up to {self.threads.max_threads}), "
            f"{self.inference_device}{' ' + self.inference_library if self.inference_library else ''}) "
            f"with {chat.template_source}"
            f"{'' if chat.system_role else '; the system prompt goes into the first user turn'}",
        )
        # The queue's workers, one per chat that may decode at a time.
        for i in range(self.queue.slots):
            threading.Thread(target=self._serve_queue, name=f"chat-queue-{i}", daemon=True).start()

    @staticmethod
    def _log(level: str, message: str) -> None:
        # initialise() runs before the SDK's logging loop, whose log() would print the text without its level; the
        # server reads the level from a line's prefix.
        print(f"{level}: {message}", flush=True)

    # --- chats -------------------------------------------------------------------------------------------------

    def _read(self, data: RequestData) -> ChatRequest:
        if self.llama_chat is None:
            raise ChatError(f"No model is loaded: {self.load_error}")
        return self.inputs.parse(data)

    def process(self, data: RequestData) -> JSON:
        # Bad input is refused here, before a command exists; a fit that fails ends the command with its error. The
        # answer is a plain result, not a long process for the SDK (see the module's docstring).
        try:
            request = self._read(data)
            chat = self.queue.add(data.request_id, request, request.max_tokens)
        except ChatError as ex:
            return {"success": False, "error": str(ex)}
        except QueueFull:
            return chat_answers.queue_full(self.queue)
        except QueueClosed:
            return {"success": False, "error": SHUTTING_DOWN}
        return chat_answers.acknowledgement(self.queue, chat)

    def _serve_queue(self) -> None:
        while (chat := self.queue.take()) is not None:
            try:
                result = self._chat(chat)
            except Exception as ex:  # a bug, not the chat's failure: end this chat with it and serve the next
                self.report_error(ex, __file__)
                result = ChatJob(chat.command_id, "").finish("error", f"The chat failed: {ex}")
            # llama-cpp-python 0.3.36 makes a sampler per completion whose native memory sits in a reference cycle,
            # so only a full collection frees it: without this the process grew 12 % over 100 chats (bench/). Queued
            # behind the chat, it delays no reply, only a waiting chat's start, by ~7 ms (SmolLM2, this machine).
            self.llama_thread.submit(gc.collect)
            self.update_statistics(result)  # the finished chat is what counts (docs/protocol.md §4.2, item 3)
            self.queue.finish(chat, result)

    def _chat(self, queued: QueuedChat) -> JSON:
        """Runs a chat: fits it on the llama thread, then generates there or, in parallel mode, in the decoder."""
        chat = self.llama_chat
        job = ChatJob(queued.command_id, chat.model_name if chat else "", bool(chat and chat.fallback_reason))
        queued.job = job

        def cancelled() -> bool:
            return queued.cancel_requested

        try:
            if chat is None:  # cleanup() closed the model before this chat reached the llama thread
                raise ChatError(SHUTTING_DOWN)
            request: ChatRequest = queued.request
            fitted = self.llama_thread.submit(self.fitter.fit, request, cancelled).result()
        except ChatError as ex:
            return job.finish("error", str(ex))
        except FitCancelled:
            return job.finish("cancelled")
        if self.decoder is not None:
            return self._generate_batched(job, request, fitted, cancelled)
        return self.llama_thread.submit(self._generate, job, request, fitted, cancelled).result()

    def _generate(self, job: ChatJob, request: ChatRequest, fitted: FittedChat, cancelled: Callable[[], bool]) -> JSON:
        chat = self.llama_chat
        if chat is None:  # cleanup() closed the model before this chat reached the llama thread
            return job.finish("error", SHUTTING_DOWN)
        job.threads = self.threads.update(chat.set_threads, force=True)
        job.begin_inference(len(fitted.prompt_tokens), chat.cached_prefix(fitted.prompt_tokens), fitted.dropped_turns)
        stop_reason, error = "completed", None
        stream = None
        try:
            stream = chat.do_chat(
                request.prompt,
                request.system_prompt,
                fitted.history,
                should_abort=cancelled,
                stream=True,
                max_tokens=request.max_tokens,
                **request.sampling,
            )
            for chunk in stream:
                if cancelled():
                    break
                job.threads = self.threads.update(chat.set_threads)  # the load may change during a long reply
                choice = chunk["choices"][0]
                job.add_text(choice["delta"].get("content") or "", chat.generated_tokens)
                if choice.get("finish_reason"):
                    stop_reason = FINISH_REASONS.get(choice["finish_reason"], "completed")
        except Exception as ex:
            # A cancel aborts llama_decode, which raises; anything else is a real failure, reported with the text so far
            if not cancelled():
                self.report_error(ex, __file__)
                stop_reason, error = "error", f"Generation failed after {chat.generated_tokens} tokens: {ex}"
        finally:
            if stream is not None:
                stream.close()
        job.count_tokens(chat.generated_tokens)
        if cancelled():
            stop_reason, error = "cancelled", None
        return job.finish(stop_reason, error)

    def _generate_batched(
        self, job: ChatJob, request: ChatRequest, fitted: FittedChat, cancelled: Callable[[], bool]
    ) -> JSON:
        decoder, chat = self.decoder, self.llama_chat
        if chat is None:  # cleanup() closed the model before this chat started
            return job.finish("error", SHUTTING_DOWN)
        # The template's end-of-turn markers are stop strings too, as create_chat_completion adds them.
        sampling = {**request.sampling, "stop": [*request.sampling.get("stop", []), *chat.template.stops]}
        batch = BatchChat(fitted.prompt_tokens, request.max_tokens, sampling, should_abort=cancelled)

        def on_text(text: str, tokens: int) -> None:  # on the decoder's thread, between two steps
            job.cached_tokens = batch.cached_tokens
            job.threads = self.threads.update(decoder.set_threads)  # the load may change during a long reply
            job.add_text(text, tokens)

        batch.on_text = on_text
        job.threads = self.threads.threads
        job.begin_inference(len(fitted.prompt_tokens), 0, fitted.dropped_turns)
        try:
            decoder.submit(batch)
        except RuntimeError:  # cleanup() has closed the decoder
            return job.finish("error", SHUTTING_DOWN)
        batch.wait()
        job.cached_tokens = batch.cached_tokens
        job.count_tokens(batch.completion_tokens)
        error = batch.error and f"Generation failed after {batch.completion_tokens} tokens: {batch.error}"
        return job.finish(batch.stop_reason, error)

    def update_statistics(self, response: JSON) -> None:
        # The SDK counts process()'s answer; only a refusal is an inference then, an accepted chat counts when it ends.
        if response.get("commandStatus") not in ("queued", "running"):
            super().update_statistics(response)

    # --- get_command_status and cancel_command, answered from the queue -----------------------------------------
    # SDK 0.0.21's handlers know only its single long process; these overrides look the commandId up in the queue.
    # Ids are the server's request ids (random UUIDs), and no answer names another chat (chat_answers.py), so only
    # the client that started a chat can read or cancel it.

    def _get_command_status(self, data: RequestData) -> JSON:
        chat = chat_answers.find(self.queue, data.get_value("commandId"))
        return chat_answers.status(self.queue, chat) if isinstance(chat, QueuedChat) else chat

    def _cancel_command_task(self, data: RequestData) -> JSON:
        chat = chat_answers.find(self.queue, data.get_value("commandId"))
        if not isinstance(chat, QueuedChat):
            return {"success": False, "error": chat["error"]}
        return chat_answers.cancel(self.queue, chat, self._cancelled_while_queued)

    def _cancelled_while_queued(self, chat: QueuedChat) -> JSON:
        model = self.llama_chat
        return ChatJob(chat.command_id, model.model_name if model else "").finish("cancelled")

    # --- status, self-test, shutdown ---------------------------------------------------------------------------

    def module_status(self) -> JSON:
        chat = self.llama_chat
        if chat is None:
            return {"model": None, "loadError": self.load_error}
        return {
            "model": chat.model_name,
            "modelPath": chat.model_path,
            "fallbackReason": chat.fallback_reason,
            "chatTemplate": chat.template_source,
            "contextSize": chat.n_ctx,
            "threads": self.threads.threads,
            "threadMode": self.threads.mode,
            "gpuLayers": self.n_gpu_layers,
            "parallelChats": self.queue.slots,
            **self._queue_status(),
        }

    def _queue_status(self) -> JSON:
        waiting, running = self.queue.counts()
        return {"queueLength": waiting, "queueSize": self.queue.capacity, "chatsRunning": running}

    def _get_module_status(self, data: RequestData | None = None) -> JSON:
        # SDK 0.0.21 calls this with the request for 'status' commands but declares no parameter (TypeError).
        return super()._get_module_status()

    def selftest(self, data: RequestData | None = None) -> JSON:
        # Same SDK mismatch as _get_module_status when selftest arrives through the queue.
        if self.llama_chat is None:
            print(f"error: Self-test failed: {self.load_error}")
            return {"success": False, "message": f"Self-test failed: {self.load_error}"}
        data = RequestData()
        data.add_value("prompt", SELFTEST_PROMPT)
        data.add_value("max_tokens", "48")
        data.add_value("temperature", "0")
        request = self.inputs.parse(data)
        # Straight to the model, past the queue: the command-line self-test has no queue traffic, and one sent through
        # the server waits its turn on the llama thread (or in the decoder).
        result = self._chat(QueuedChat("selftest", request, request.max_tokens))
        ok = result["success"] and bool(result["reply"].strip())
        summary = (
            f"{result['completion_tokens']} tokens at {result['tokens_per_second']} tokens/s, first token after "
            f"{result['time_to_first_token_ms']} ms, model {self.llama_chat.model_name}"
        )
        verdict = "passed" if ok else "failed"
        print(f"info: Self-test for {self.module_id} {verdict}: {summary}. Reply: {result['reply']!r}")
        return {"success": ok, "message": f"Self-test {verdict}: {summary}", **result}

    def cleanup(self) -> None:
        # The SDK calls this once per main_loop task. Waiting chats end with an error, a running one is stopped, then
        # the model is freed on its own thread, behind that chat.
        chat = self.llama_chat
        if chat is None:
            return
        self.llama_chat = None
        self.queue.close(lambda queued: ChatJob(queued.command_id, chat.model_name).finish("error", SHUTTING_DOWN))
        if self.decoder is not None:
            self.decoder.close()  # its running chats end as cancelled, as the queue has asked them to
        self.llama_thread.submit(chat.close).result()
        self.threads.close()
        gc.unfreeze()  # what initialise() froze may be collected again


if __name__ == "__main__":
    LlamaChat_adapter().start_loop()
