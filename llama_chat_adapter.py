"""LlamaChat_adapter: connects CodeProject.AI Server's request queue to the LlamaChat wrapper.

A chat is a long process, but not the SDK's: SDK 0.0.21 runs one long process per module and refuses any other chat
while it runs (docs/protocol.md §1.7), and its refusal hands out the running chat's commandId. So process() only
reads the request (bounded by the caps in chat_request.py) and queues it in the ChatQueue, answering at once with the
chat's own commandId; a worker thread runs the queued chats one after another, and the adapter overrides the SDK's
get_command_status and cancel_command handlers to answer from that queue. Fitting the conversation to the context,
which grows with it, runs in the chat, where a cancel can stop it. The engine is in llamachat/.

Running a chat on the model is the ChatRunner's job (llamachat/chat_runner.py); with CPAI_MODULE_LLAMA_PARALLEL above
1 that many workers take chats at once and the runner decodes them together.
"""

from __future__ import annotations

import gc
import os
import sys
import threading

import llama_cpp
from codeproject_ai_sdk import JSON, LogVerbosity, ModuleRunner, RequestData

from llama_chat import LlamaChat, ModelLoadError
from llamachat import chat_answers
from llamachat.chat_job import ChatJob, StopReason
from llamachat.chat_queue import ChatQueue, ChatQueueClosed, ChatQueueFull, ChatState, QueuedChat
from llamachat.chat_request import ChatError, ChatInputs, ChatRequest
from llamachat.chat_runner import SHUTTING_DOWN, ChatRunner
from llamachat.llama_log import LLAMA_LOG
from llamachat.llama_settings import MODULE_DIR, LlamaSettings
from llamachat.reply_channel import ReplyChannel, ReplyChannelError

SELFTEST_PROMPT = "How many planets are there in the solar system?"
# How to fix "no model could be loaded", for the log, the status and a failed self-test.
# Logged at start when the server passed a reply channel (tests look for it).
REPLY_CHANNEL_NOTICE = "Each piece of a reply also goes to the server's reply channel as it is made"
# How long a thread may hold the GIL while another waits for it (see initialise).
GIL_SWITCH_SECONDS = 0.0005
NO_MODEL_HINT = "install one with bash install.sh (install.bat on Windows) or python fetch_model.py [--small]"


def _gpu_library() -> str:
    """The GPU backend llama.cpp was built with ('' for a CPU-only build), from its own system info."""
    if not llama_cpp.llama_supports_gpu_offload():
        return ""
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    backends = [part.split(" : ")[0].strip() for part in info.split("|") if " : " in part]
    return next((b for b in backends if b != "CPU"), "GPU")


def _self_test() -> bool:
    """Whether this process runs the command-line self-test (`--selftest`), as the server's setup does."""
    return sys.argv[1:2] == ["--selftest"]


class LlamaChat_adapter(ModuleRunner):
    def initialise(self) -> None:
        """The SDK calls this once, before its loops: reads the settings, loads the model, starts the workers. A
        failure leaves the module running without a model, answering every chat with load_error."""
        self.load_error: str | None = None
        # Every chat, waiting, running or finished, by its commandId. A cancel marks its own chat, so a late cancel
        # can never stop the next one (docs/protocol.md §4.1, item 2).
        self.queue: ChatQueue | None = None
        self.inputs: ChatInputs | None = None
        self.reply_channel = self._open_reply_channel()
        self.runner = ChatRunner(self.report_error, self.reply_channel)
        # SDK 0.0.21's package check before a self-test checks nothing, and fails when the CPU architecture is unknown
        # (as without PATH).
        self.selftest_check_pkgs = False
        LLAMA_LOG.install(loud=self.log_verbosity == LogVerbosity.Loud)
        library = _gpu_library() if self.enable_GPU else ""
        try:
            settings = LlamaSettings.from_env()
            ended = self.reply_channel.ended if self.reply_channel else None
            self.queue = ChatQueue(settings.queue_size, settings.result_ttl, slots=settings.parallel, on_complete=ended)
            self.inputs = ChatInputs(MODULE_DIR)
            chat = self._load_model(settings, library)
        except (ModelLoadError, ValueError) as ex:  # ValueError: LlamaSettingsError, an unknown chat format
            self.load_error = f"{ex}; {NO_MODEL_HINT}" if isinstance(ex, ModelLoadError) else str(ex)
            self._log("error", f"LlamaChat has no model, every chat will fail until this is fixed: {self.load_error}")
            return
        self._note_device(library)
        # What is loaded by now (~160,000 objects: the SDK, llama-cpp-python, the model's wrappers) lives as long as
        # the model. Frozen, it is left out of later full collections, such as the one after each chat, which
        # otherwise walked it for ~80 ms holding the GIL: the status poll that saw a reply's end waited for it (bench/:
        # the OpenAI stream's last chunk came ~15 ms late, 1 % of a 256-token reply's tokens/s).
        gc.freeze()
        # A status poll runs ~1-2 ms of the SDK's Python on the main thread; when the llama thread comes back from
        # llama_decode meanwhile, it waits for the GIL up to the switch interval (5 ms by default) before sampling.
        # At 10 polls a second that cost the idle module ~5 % of raw llama-cpp-python's tokens/s (bench/threads.py).
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        self._log_model(chat, settings.draft_tokens)
        self._start_workers()

    def _open_reply_channel(self) -> ReplyChannel | None:
        """The pipe our standalone server passes for replies' pieces (llamachat/reply_channel.py); None under the real
        server, which passes none and polls, as it does when the pipe is unusable."""
        try:
            channel = ReplyChannel.from_environment(os.environ)
        except ReplyChannelError as ex:
            self._log("warning", f"No reply channel, the server will poll for replies: {ex}")
            return None
        if channel is not None:
            self._log("info", REPLY_CHANNEL_NOTICE)
        return channel

    def _load_model(self, settings: LlamaSettings, library: str) -> LlamaChat:
        self.n_ctx = settings.context_size
        self.n_gpu_layers = settings.gpu_layers if library else 0
        return self.runner.load(
            pinned_threads=settings.threads,  # 0: adaptive
            parallel=settings.parallel,
            n_ctx=self.n_ctx,
            # The self-test answers one prompt: nothing to resume, and nothing of it is kept.
            cache_bounds=(0, 0) if _self_test() else (settings.cache_ram_mb << 20, int(settings.cache_disk_gb * 2**30)),
            cache_dir=settings.cache_dir,
            log=self._log,
            # The server's setup runs the self-test (`--selftest`, the SDK's own test for it) with none of the
            # module's EnvironmentVariables: the settings come from modulesettings.json all the same, but the test
            # uses only the model files already installed and never starts a 4 GB download, nor waits on the network.
            repo_id="" if _self_test() else settings.model_repo,
            fileglob=settings.model_fileglob,
            filename=settings.model_filename,
            model_dir=str(settings.model_dir),
            n_gpu_layers=self.n_gpu_layers,
            chat_format=settings.chat_format,
            max_draft=settings.draft_tokens,
            verbose=self.log_verbosity == LogVerbosity.Loud,
        )

    def _note_device(self, library: str) -> None:
        """What the server shows of the module's hardware: the GPU only when layers are offloaded to it."""
        self.inference_device = "GPU" if library and self.n_gpu_layers != 0 else "CPU"
        self.inference_library = library if self.inference_device == "GPU" else ""
        self.can_use_GPU = bool(library)

    def _log_model(self, chat: LlamaChat, drafts_asked: int) -> None:
        if chat.fallback_reason:
            self._log(
                "warning",
                f"Using the small fallback model '{chat.model_path}' because the configured model "
                f"could not be loaded: {chat.fallback_reason}",
            )
        library = f" {self.inference_library}" if self.inference_library else ""
        self._log(
            "info",
            f"Using model '{chat.model_path}' ({self.n_ctx}-token context, {self.runner.threads.mode} threads "
            f"(up to {self.runner.threads.max_threads}), {self.inference_device}{library}) "
            f"with {chat.template_source}"
            f"{'' if chat.system_role else '; the system prompt goes into the first user turn'}",
        )
        if drafts_asked:
            capped = (
                ""
                if chat.max_draft == drafts_asked
                else f" (CPAI_MODULE_LLAMA_DRAFT_TOKENS asks for {drafts_asked}, but this machine's llama.cpp computes "
                "a longer draft's logits otherwise than a one-token step's, which could change a reply)"
            )
            self._log("info", f"Speculative decoding: drafts of up to {chat.max_draft} tokens{capped}")

    def _start_workers(self) -> None:
        """The queue's workers, one per chat that may decode at a time."""
        for i in range(self.chats.slots):
            threading.Thread(target=self._serve_queue, name=f"chat-queue-{i}", daemon=True).start()

    @property
    def chats(self) -> ChatQueue:
        """The chat queue. It is made before the model loads, so whatever has a model to run chats on has it."""
        if self.queue is None:
            raise ChatError(f"No model is loaded: {self.load_error}")
        return self.queue

    @staticmethod
    def _log(level: str, message: str) -> None:
        # initialise() and the command-line self-test run outside the SDK's logging loop, whose log() would print the
        # text without its level; the server reads the level from a line's prefix.
        print(f"{level}: {message}", flush=True)

    # --- chats -------------------------------------------------------------------------------------------------

    def _read(self, data: RequestData) -> ChatRequest:
        if self.runner.llama_chat is None or self.inputs is None:
            raise ChatError(f"No model is loaded: {self.load_error}")
        return self.inputs.parse(data)

    def process(self, data: RequestData) -> JSON:
        # Bad input is refused here, before a command exists; a fit that fails ends the command with its error. The
        # answer is a plain result, not a long process for the SDK (see the module's docstring).
        try:
            request = self._read(data)
            chat = self.chats.add(data.request_id, request, request.max_tokens)
        except ChatError as ex:
            return ex.answer()
        except ChatQueueFull:
            return chat_answers.queue_full(self.chats)
        except ChatQueueClosed:
            return {"success": False, "error": SHUTTING_DOWN}
        return chat_answers.acknowledgement(self.chats, chat)

    def _serve_queue(self) -> None:
        while (chat := self.chats.take()) is not None:
            try:
                result = self.runner.run(chat)
            except Exception as ex:  # a bug, not the chat's failure: end this chat with it and serve the next
                self.report_error(ex, __file__)
                result = ChatJob(chat.command_id, "").finish(StopReason.ERROR, f"The chat failed: {ex}")
            self.runner.collect_garbage()  # frees what the finished chat left in reference cycles (see there)
            self.update_statistics(result)  # the finished chat is what counts (docs/protocol.md §4.2, item 3)
            self.chats.finish(chat, result)

    def update_statistics(self, response: JSON) -> None:
        # The SDK counts process()'s answer; only a refusal is an inference then, an accepted chat counts when it ends.
        if response.get("commandStatus") not in (ChatState.QUEUED, ChatState.RUNNING):
            super().update_statistics(response)

    # --- get_command_status and cancel_command, answered from the queue -----------------------------------------
    # SDK 0.0.21's handlers know only its single long process; these overrides look the commandId up in the queue.
    # Ids are the server's request ids (random UUIDs), and no answer names another chat (chat_answers.py), so only
    # the client that started a chat can read or cancel it.

    def _get_command_status(self, data: RequestData) -> JSON:
        chat = chat_answers.find(self.queue, data.get_value("commandId"))
        return chat_answers.status(self.chats, chat) if isinstance(chat, QueuedChat) else chat

    def _cancel_command_task(self, data: RequestData) -> JSON:
        chat = chat_answers.find(self.queue, data.get_value("commandId"))
        if not isinstance(chat, QueuedChat):
            return {"success": False, "error": chat["error"]}
        return chat_answers.cancel(self.chats, chat, self._cancelled_while_queued)

    def _cancelled_while_queued(self, chat: QueuedChat) -> JSON:
        model = self.runner.llama_chat
        return ChatJob(chat.command_id, model.model_name if model else "").finish(StopReason.CANCELLED)

    # --- status, self-test, shutdown ---------------------------------------------------------------------------

    def module_status(self) -> JSON:
        chat = self.runner.llama_chat
        if chat is None:
            return {"model": None, "loadError": self.load_error}
        return {
            "model": chat.model_name,
            "modelPath": chat.model_path,
            "fallbackReason": chat.fallback_reason,
            "chatTemplate": chat.template_source,
            "templateRendersTools": chat.renders_tools,  # the OpenAI API then has the template describe tools
            "llamaCppPython": llama_cpp.__version__,  # with the model, what a reply depends on (system_fingerprint)
            "contextSize": chat.n_ctx,
            "threads": self.runner.threads.threads,
            "threadMode": self.runner.threads.mode,
            "gpuLayers": self.n_gpu_layers,
            "draftTokens": chat.max_draft,  # speculative decoding: the most drafted a pass, as probed at load
            "parallelChats": self.chats.slots,
            "conversationCache": self.runner.cache.stats() if self.runner.cache else None,
            **self._queue_status(),
        }

    def _queue_status(self) -> JSON:
        waiting, running = self.chats.counts()
        return {"queueLength": waiting, "queueSize": self.chats.capacity, "chatsRunning": running}

    def _get_module_status(self, data: RequestData | None = None) -> JSON:
        # SDK 0.0.21 calls this with the request for 'status' commands but declares no parameter (TypeError).
        return super()._get_module_status()

    def selftest(self, data: RequestData | None = None) -> JSON:
        # Same SDK mismatch as _get_module_status when selftest arrives through the queue.
        if self.runner.llama_chat is None:
            self._log("error", f"Self-test failed: {self.load_error}")
            return {"success": False, "message": f"Self-test failed: {self.load_error}"}
        data = RequestData()
        data.add_value("prompt", SELFTEST_PROMPT)
        data.add_value("max_tokens", "48")
        data.add_value("temperature", "0")
        request = self._read(data)
        # Straight to the model, past the queue: the command-line self-test has no queue traffic, and one sent through
        # the server waits its turn on the llama thread (or in the decoder).
        result = self.runner.run(QueuedChat("selftest", request, request.max_tokens))
        ok = result["success"] and bool(result["reply"].strip())
        summary = (
            f"{result['completion_tokens']} tokens at {result['tokens_per_second']} tokens/s, first token after "
            f"{result['time_to_first_token_ms']} ms, model {self.runner.llama_chat.model_name}"
        )
        verdict = "passed" if ok else "failed"
        self._log("info", f"Self-test for {self.module_id} {verdict}: {summary}. Reply: {result['reply']!r}")
        return {"success": ok, "message": f"Self-test {verdict}: {summary}", **result}

    def cleanup(self) -> None:
        # The SDK calls this once per main_loop task. Waiting chats end with an error, a running one is stopped, then
        # the model is freed on its own thread, behind that chat.
        chat = self.runner.stop()
        if chat is None:
            return
        self.chats.close(
            lambda queued: ChatJob(queued.command_id, chat.model_name).finish(StopReason.ERROR, SHUTTING_DOWN)
        )
        self.runner.close(chat)
        gc.unfreeze()  # what initialise() froze may be collected again


if __name__ == "__main__":
    LlamaChat_adapter().start_loop()
