"""ChatRunner: runs a queued chat on the model, from fitting its conversation to the context to its last token.

It owns what running a chat needs: the LlamaChat, the one llama thread every call into the model runs on, the
ContextFitter, the ThreadPolicy and, with CPAI_MODULE_LLAMA_PARALLEL above 1, batch_decoder's BatchDecoder, which
decodes the chats together in one context (bench/results/concurrency.md has the measurements). The adapter feeds it
chats from its queue and answers the SDK; stop() and close() shut it down behind the chat that is running.
"""

from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, cast

from codeproject_ai_sdk import JSON

from llama_chat import ChunkStream, LlamaChat
from llamachat.batch_decoder import BatchChat, BatchDecoder
from llamachat.chat_job import STOP_REASON_OF_FINISH_REASON, ChatJob, StopReason
from llamachat.chat_queue import QueuedChat
from llamachat.chat_request import INVALID_JSON_SCHEMA, ChatError, ChatRequest
from llamachat.context_fit import ContextFitter, FitCancelled, FittedChat
from llamachat.conversation_cache import ConversationCache
from llamachat.kv_state import fingerprint
from llamachat.reply_channel import ReplyChannel
from llamachat.thread_policy import ThreadPolicy

SHUTTING_DOWN = "The module is shutting down; the chat did not start"
# An error leaves the KV cache's contents unknown: only these chats are saved.
SAVED_STOP_REASONS = (StopReason.COMPLETED, StopReason.LENGTH, StopReason.CANCELLED)


class ChatRunner:
    def __init__(
        self, report_error: Callable[[Exception, str], None], reply_channel: ReplyChannel | None = None
    ) -> None:
        self.report_error = report_error  # the SDK's: a bug goes to the server's log
        self.reply_channel = reply_channel  # each chat's new text goes there too, under our standalone server
        self.llama_chat: LlamaChat | None = None  # None until load(), and again once stop() has run
        # Set by load(); a chat reaches them only once a model is loaded (run() asks _model() first).
        self.fitter: ContextFitter
        self.threads: ThreadPolicy
        self.decoder: BatchDecoder | None = None  # with CPAI_MODULE_LLAMA_PARALLEL > 1: decodes the chats together
        self.cache: ConversationCache | None = None  # conversations' KV states, when a tier is on
        # Everything that touches the model runs on this one thread: loading, fitting the conversation (tokenizing),
        # generating, thread changes and closing; process() only reads the request. (Only the model-free queries at
        # start-up, the GPU backend and the log hook, run on the SDK's thread.) llama.cpp's OpenMP keeps a team of
        # worker threads for each thread that calls it: chats on the SDK's changing executor threads piled up teams
        # that fought over the cores and halved generation speed (measured in bench/).
        self.llama_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")

    def load(
        self,
        pinned_threads: int,
        parallel: int,
        n_ctx: int,
        cache_bounds: tuple[int, int] = (0, 0),
        cache_dir: Path | None = None,
        log: Callable[[str, str], None] | None = None,
        **model: Any,
    ) -> LlamaChat:
        """Loads the model (LlamaChat's other keywords) on the llama thread, with parallel > 1 the decoder too.

        pinned_threads: the thread count, 0 for adaptive. cache_bounds: the conversation cache's bytes in RAM and on
        disk (in cache_dir), (0, 0) for none; log(level, message) hears about its evictions and corrupt entries.
        Raises what LlamaChat raises (ModelLoadError, ValueError).
        """
        self.threads = ThreadPolicy(pinned=pinned_threads)
        chat = self.llama_thread.submit(LlamaChat, n_ctx=n_ctx, n_threads=self.threads.threads, **model).result()
        ram_bytes, disk_bytes = cache_bounds
        if ram_bytes > 0 or disk_bytes > 0:
            # The batch decoder's context has a KV stream per sequence, and llama.cpp's bytes record how many.
            valid_for = fingerprint(chat.model_path, chat.llm, n_ctx, parallel)
            self.cache = ConversationCache(valid_for, ram_bytes, disk_bytes, cache_dir, log)
        if parallel > 1:
            # Its worker is then the only thread that computes: the llama thread only loads and tokenizes. A
            # second OpenMP team, even idle, slowed the working one by ~30 % (bench/concurrency.py).
            self.decoder = self.llama_thread.submit(BatchDecoder, chat.llm, parallel, n_ctx, cache=self.cache).result()
        self.fitter = ContextFitter(chat)
        self.llama_chat = chat
        return chat

    def run(self, queued: QueuedChat) -> JSON:
        """Runs a chat: fits it on the llama thread, then generates there or, in parallel mode, in the decoder."""
        chat = self.llama_chat
        model = chat.model_name if chat else ""
        job = ChatJob(queued.command_id, model, bool(chat and chat.fallback_reason), self.reply_channel)
        queued.job = job

        def cancelled() -> bool:
            return queued.cancel_requested

        request: ChatRequest = queued.request
        try:
            fitted, extra = self.llama_thread.submit(self._prepare, request, cancelled).result()
            if request.logprobs:
                job.logprobs = []
            if self.decoder is not None:  # it saves each sequence's conversation itself
                return self._generate_batched(self.decoder, job, request, fitted, extra, cancelled)
            result = self.llama_thread.submit(self._generate, job, request, fitted, extra, cancelled).result()
        except ChatError as ex:  # the input does not fit, or the module is shutting down
            return job.finish(StopReason.ERROR, str(ex), ex.code, ex.param)
        except FitCancelled:
            return job.finish(StopReason.CANCELLED)
        if self.cache is not None and chat is not None and job.stop_reason in SAVED_STOP_REASONS:
            # Queued behind the chat, on the llama thread, after its client can see that it ended; with the model it
            # ran on, which close() frees only behind this save, however soon stop() comes.
            self.llama_thread.submit(self._save, chat)
        return result

    def _model(self) -> LlamaChat:
        """The model, or ChatError(SHUTTING_DOWN) once stop() has run: checked as a chat reaches each step, since
        cleanup() may close the model while the chat waits for the llama thread or the decoder."""
        if self.llama_chat is None:
            raise ChatError(SHUTTING_DOWN)
        return self.llama_chat

    def _prepare(self, request: ChatRequest, cancelled: Callable[[], bool]) -> tuple[FittedChat, dict[str, Any]]:
        """On the llama thread: the conversation fitted to the context, and the sampling keywords that need the
        model (the grammar llama.cpp has parsed); ChatError for what the model cannot take."""
        chat, extra = self._model(), {}
        bias = request.sampling.get("logit_bias") or {}
        if bias and max(bias) >= chat.llm.n_vocab():
            last = chat.llm.n_vocab() - 1
            raise ChatError(f"logit_bias names token {max(bias)}, but the model's tokens are 0 to {last}", "logit_bias")
        if request.json_schema is not None:
            try:
                extra["grammar"] = chat.grammar(request.json_schema)
            except ValueError as ex:
                raise ChatError(str(ex), "json_schema", INVALID_JSON_SCHEMA) from None
        return self.fitter.fit(request, cancelled), extra

    def _save(self, chat: LlamaChat) -> None:
        if self.cache is None:
            return
        try:
            self.cache.save(*chat.capture_state())
        except Exception as ex:  # a bug: the chat has ended well, only its entry is lost
            self.report_error(ex, __file__)

    def _restore(self, chat: LlamaChat, job: ChatJob, tokens: list[int]) -> int:
        """Restores the conversation cache's longest prefix of these prompt tokens when it beats the live context's;
        notes where the prefix came from in the job. Returns the prompt tokens now cached."""
        cached = chat.cached_prefix(tokens)
        job.prefix_source = "context" if cached else "none"
        if self.cache is None:
            return cached
        started = time.perf_counter()
        hit = self.cache.find(tokens, cached)
        if hit is not None:
            if chat.restore_state(hit.tokens, hit.state):
                cached, job.prefix_source = hit.prefix, hit.source
            else:  # llama.cpp refused the bytes (they were checked, so a bug): the chat is evaluated in full
                cached, job.prefix_source = 0, "none"
            job.restore_ms = round((time.perf_counter() - started) * 1000, 2)
        self.cache.count(job.prefix_source)
        return cached

    def collect_garbage(self) -> None:
        """Queues a full collection on the llama thread, behind the chat that just ended."""
        # llama-cpp-python 0.3.36 makes a sampler per completion whose native memory sits in a reference cycle,
        # so only a full collection frees it: without this the process grew 12 % over 100 chats (bench/). Queued
        # behind the chat, it delays no reply, only a waiting chat's start, by ~7 ms (SmolLM2, this machine).
        self.llama_thread.submit(gc.collect)

    def _generate(
        self,
        job: ChatJob,
        request: ChatRequest,
        fitted: FittedChat,
        extra: dict[str, Any],
        cancelled: Callable[[], bool],
    ) -> JSON:
        chat = self._model()
        job.threads = self.threads.update(chat.set_threads, force=True)
        job.begin_inference(len(fitted.prompt_tokens), 0, fitted.dropped_turns)
        job.cached_tokens = self._restore(chat, job, fitted.prompt_tokens)
        stop_reason, error = StopReason.COMPLETED, None
        stream: ChunkStream | None = None
        try:
            chunks = chat.do_chat(
                request.prompt,
                request.system_prompt,
                fitted.history,
                should_abort=cancelled,
                as_sent=request.as_sent,
                prefill=request.prefill,
                top_logprobs=request.top_logprobs if request.logprobs else None,
                tools=request.tools,
                stream=True,
                max_tokens=request.max_tokens,
                **request.sampling,
                **extra,
            )
            stream = cast(ChunkStream, chunks)  # stream=True: the generator of chunks
            for chunk in stream:
                if cancelled():
                    break
                job.threads = self.threads.update(chat.set_threads)  # the load may change during a long reply
                if job.logprobs is not None:
                    job.logprobs.extend(chat.token_logprobs[len(job.logprobs) :])
                choice = chunk["choices"][0]
                job.drafted_tokens, job.accepted_tokens = chat.drafted_tokens, chat.accepted_tokens
                job.add_text(str(choice["delta"].get("content") or ""), chat.generated_tokens)
                if finish_reason := choice.get("finish_reason"):
                    stop_reason = STOP_REASON_OF_FINISH_REASON.get(finish_reason, StopReason.COMPLETED)
        except Exception as ex:
            # A cancel aborts llama_decode, which raises; anything else is a real failure, reported with the text so far
            if not cancelled():
                self.report_error(ex, __file__)
                stop_reason, error = StopReason.ERROR, generation_failed(chat.generated_tokens, ex)
        finally:
            if stream is not None:
                stream.close()
        job.count_tokens(chat.generated_tokens)
        job.drafted_tokens, job.accepted_tokens = chat.drafted_tokens, chat.accepted_tokens
        if cancelled():
            stop_reason, error = StopReason.CANCELLED, None
        return job.finish(stop_reason, error)

    def _generate_batched(
        self,
        decoder: BatchDecoder,
        job: ChatJob,
        request: ChatRequest,
        fitted: FittedChat,
        extra: dict[str, Any],
        cancelled: Callable[[], bool],
    ) -> JSON:
        chat = self._model()
        # The template's end-of-turn markers are stop strings too, as create_chat_completion adds them.
        sampling = {**request.sampling, **extra, "stop": [*request.sampling.get("stop", []), *chat.template.stops]}
        batch = BatchChat(
            fitted.prompt_tokens,
            request.max_tokens,
            sampling,
            should_abort=cancelled,
            top_logprobs=request.top_logprobs if request.logprobs else None,
        )

        def on_text(text: str, tokens: int) -> None:  # on the decoder's thread, between two steps
            job.cached_tokens, job.prefix_source, job.restore_ms = (
                batch.cached_tokens,
                batch.prefix_source,
                batch.restore_ms,
            )
            if job.logprobs is not None:
                job.logprobs.extend(batch.logprobs[len(job.logprobs) :])
            job.threads = self.threads.update(decoder.set_threads)  # the load may change during a long reply
            job.add_text(text, tokens)

        batch.on_text = on_text
        job.threads = self.threads.threads
        job.begin_inference(len(fitted.prompt_tokens), 0, fitted.dropped_turns)
        try:
            decoder.submit(batch)
        except RuntimeError:  # cleanup() has closed the decoder
            raise ChatError(SHUTTING_DOWN) from None
        batch.wait()
        assert batch.stop_reason is not None  # wait() returns once the chat has ended
        job.cached_tokens, job.prefix_source, job.restore_ms = (
            batch.cached_tokens,
            batch.prefix_source,
            batch.restore_ms,
        )
        job.count_tokens(batch.completion_tokens)
        error = batch.error and generation_failed(batch.completion_tokens, batch.error)
        return job.finish(batch.stop_reason, error)

    def stop(self) -> LlamaChat | None:
        """From now on a chat that reaches the model ends with SHUTTING_DOWN. Returns the model for close(), None
        where there is none (it never loaded, or stop() ran before)."""
        chat, self.llama_chat = self.llama_chat, None
        return chat

    def close(self, chat: LlamaChat) -> None:
        """Frees the model stop() returned, once the queue has ended its waiting chats and asked the running to stop."""
        if self.decoder is not None:
            self.decoder.close()  # its running chats end as cancelled, as the queue has asked them to
        self.llama_thread.submit(chat.close).result()  # on its own thread, behind the chat running there
        if self.cache is not None:
            self.cache.close()  # after the last save: what is queued for the disk is written first
        self.threads.close()


def generation_failed(tokens: int, why: object) -> str:
    """The error of a chat that failed while it generated (it keeps the text it had)."""
    return f"Generation failed after {tokens} tokens: {why}"
