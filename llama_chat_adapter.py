"""LlamaChat_adapter: connects CodeProject.AI Server's request queue to the LlamaChat wrapper.

A chat is a long process: process() returns self.long_process, which the SDK runs in a worker thread while its
loop keeps answering get_command_status (command_status) and cancel_command (cancel_command_task). The SDK's loop
waits for process(), so process() only reads the request (bounded by the caps in chat_request.py); fitting the
conversation to the context, which grows with it, runs in the long process, where a cancel can stop it.
"""

from __future__ import annotations

import gc
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import llama_cpp
from codeproject_ai_sdk import JSON, LogVerbosity, ModuleRunner, RequestData

from chat_job import FINISH_REASONS, ChatJob
from chat_request import ChatError, ChatInputs, ChatRequest
from context_fit import ContextFitter, FitCancelled
from llama_chat import LlamaChat, ModelLoadError
from llama_log import LLAMA_LOG
from llama_settings import LlamaSettings
from thread_policy import ThreadPolicy

SELFTEST_PROMPT = "How many planets are there in the solar system?"
# Our answer to a chat sent while another runs. The SDK's own would hand out the running chat's commandId, with which
# anyone could read or cancel someone else's chat (docs/protocol.md §4.2, item 5); clients recognise a busy model by
# "already in progress".
BUSY_ERROR = (
    "The model is busy with another chat (a long running command is already in progress); "
    "try again when it has finished"
)


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
        self.job: ChatJob | None = None
        self.fitter: ContextFitter | None = None
        # The request process() has read, handed to the long process it starts: (request id, request).
        self.accepted: tuple[str, ChatRequest] | None = None
        # A cancel names its command, so a late cancel can never stop the next chat (docs/protocol.md §4.1, item 2).
        self.cancel_id: str | None = None
        self.inputs = ChatInputs(os.path.dirname(os.path.abspath(__file__)))
        # Everything that touches the model runs on this one thread: loading, fitting the conversation (tokenizing),
        # generating, thread changes and closing; process() only reads the request. (Only the model-free queries at
        # start-up, the GPU backend and the log hook, run on the SDK's thread.) llama.cpp's OpenMP keeps a team of
        # worker threads for each thread that calls it: chats on the SDK's changing executor threads piled up teams
        # that fought over the cores and halved generation speed (measured in bench/).
        self.llama_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")

        LLAMA_LOG.install(loud=self.log_verbosity == LogVerbosity.Loud)
        library = _gpu_library() if self.enable_GPU else ""
        try:
            settings = LlamaSettings.from_env()
            self.n_ctx = settings.context_size
            self.threads = ThreadPolicy(pinned=settings.threads)  # 0: adaptive
            self.n_gpu_layers = settings.gpu_layers if library else 0
            self.llama_chat = self.llama_thread.submit(
                LlamaChat,
                repo_id=settings.model_repo,
                fileglob=settings.model_fileglob,
                filename=settings.model_filename,
                model_dir=str(settings.model_dir),
                n_ctx=self.n_ctx,
                n_threads=self.threads.threads,
                n_gpu_layers=self.n_gpu_layers,
                chat_format=settings.chat_format,
                verbose=self.log_verbosity == LogVerbosity.Loud,
            ).result()
        except (ModelLoadError, ValueError) as ex:  # ValueError: LlamaSettingsError, an unknown chat format
            self.load_error = str(ex)
            self._log("error", f"LlamaChat has no model, every chat will fail until this is fixed: {ex}")
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
        # Bad input is refused here, before a command exists; a fit that fails ends the command with its error.
        if self.long_running_command_task is not None and not self.long_running_command_task.done():
            return {"success": False, "error": BUSY_ERROR}
        try:
            self.accepted = (data.request_id, self._read(data))
        except ChatError as ex:
            return {"success": False, "error": str(ex)}
        return self.long_process

    def long_process(self, data: RequestData) -> JSON:
        result = self.llama_thread.submit(self._chat, data).result()
        # llama-cpp-python 0.3.36 makes a sampler per completion whose native memory sits in a reference cycle, so
        # only a full collection frees it: without this the process grew 12 % over 100 chats (bench/). Queued behind
        # the chat, it delays no reply.
        self.llama_thread.submit(gc.collect)
        return result

    def _chat(self, data: RequestData) -> JSON:
        chat = self.llama_chat
        job = ChatJob(data.request_id, chat.model_name if chat else "", bool(chat and chat.fallback_reason))
        self.job = job

        def cancelled() -> bool:
            return self.cancel_id == job.command_id

        accepted, self.accepted = self.accepted, None
        try:
            request = accepted[1] if accepted and accepted[0] == data.request_id else self._read(data)
            if chat is None:  # cleanup() closed the model before this chat reached the llama thread
                raise ChatError("The module is shutting down; the chat did not start")
            fitted = self.fitter.fit(request, cancelled)
        except ChatError as ex:
            return self._finished(job.finish("error", str(ex)))
        except FitCancelled:
            return self._finished(job.finish("cancelled"))

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
        return self._finished(job.finish(stop_reason, error))

    def _finished(self, result: dict[str, Any]) -> dict[str, Any]:
        # Count the finished chat: the SDK only counts the "running" acknowledgement (see update_statistics).
        super().update_statistics(result)
        return result

    def update_statistics(self, response: JSON) -> None:
        if response.get("commandStatus") != "running":
            super().update_statistics(response)

    def command_status(self) -> JSON:
        job = self.job
        if job is None or job.command_id != self.long_running_command_id:
            return {"reply": ""}  # the worker thread has not started this command's job yet
        return job.status()

    def _cancel_command_task(self, data: RequestData) -> JSON:
        # SDK 0.0.21 forgets a command that has already finished when a cancel for it arrives, so a client whose Stop
        # crossed the end of the reply could no longer read it; the finished command stays answerable.
        task, command_id = self.long_running_command_task, self.long_running_command_id
        answer = super()._cancel_command_task(data)
        if answer.get("success") and self.long_running_command_task is None:
            self.long_running_command_task, self.long_running_command_id = task, command_id
        return answer

    def cancel_command_task(self) -> None:
        # The SDK has checked that the commandId is the current long process before calling this.
        self.cancel_id = self.long_running_command_id
        self.force_shutdown = False  # we stop the loop ourselves and keep the partial reply

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
        }

    def _get_module_status(self, data: RequestData | None = None) -> JSON:
        # SDK 0.0.21 calls this with the request for 'status' commands but declares no parameter (TypeError).
        return super()._get_module_status()

    def selftest(self, data: RequestData | None = None) -> JSON:
        # Same SDK mismatch as _get_module_status when selftest arrives through the queue.
        if self.llama_chat is None:
            print(f"error: Self-test failed: {self.load_error}")
            return {"success": False, "message": f"Self-test failed: {self.load_error}"}
        request = RequestData()
        request.request_id = "selftest"
        request.add_value("prompt", SELFTEST_PROMPT)
        request.add_value("max_tokens", "48")
        request.add_value("temperature", "0")
        result = self.long_process(request)
        ok = result["success"] and bool(result["reply"].strip())
        summary = (
            f"{result['completion_tokens']} tokens at {result['tokens_per_second']} tokens/s, first token after "
            f"{result['time_to_first_token_ms']} ms, model {self.llama_chat.model_name}"
        )
        verdict = "passed" if ok else "failed"
        print(f"info: Self-test for {self.module_id} {verdict}: {summary}. Reply: {result['reply']!r}")
        return {"success": ok, "message": f"Self-test {verdict}: {summary}", **result}

    def cleanup(self) -> None:
        # The SDK calls this once per main_loop task. Stop a running chat, then free the model on its own thread,
        # behind that chat.
        job, chat = self.job, self.llama_chat
        if chat is None:
            return
        self.llama_chat = None
        if job is not None:
            self.cancel_id = job.command_id
        self.llama_thread.submit(chat.close).result()
        self.threads.close()
        gc.unfreeze()  # what initialise() froze may be collected again


if __name__ == "__main__":
    LlamaChat_adapter().start_loop()
