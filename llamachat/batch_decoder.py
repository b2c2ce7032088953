"""BatchDecoder: several chats decoded together in one llama.cpp context, one sequence each, in a shared batch.

Each decode step puts the next token of every generating chat into one batch, together with a chunk of a newcomer's
prompt (at most prompt_chunk tokens per step, so a long prompt delays the others by one chunk's compute per token
instead of the whole prompt). On a CPU a step with four tokens costs little more than one with a single token
while the weights, not the arithmetic, are the bottleneck; bench/concurrency.py measures whether it is on a machine.

Every chat keeps its own llama-cpp-python sampler chain (the very one create_completion builds, so replies equal a
chat decoded alone), stop strings, max_tokens, cancel and counts. A sequence's tokens stay in the KV cache after its
chat ends, and a newcomer takes the free sequence that shares the longest prefix with its prompt (a conversation's
next turn finds its earlier turns there), as the single-chat path reuses its one cache. With a ConversationCache,
a finished chat's sequence is also saved there, and a newcomer that finds a longer prefix there than in any free
sequence gets it restored into one (llama_state_seq_set_data).

One worker thread owns the context: submit() may be called from any thread, callbacks run on the worker.
"""

from __future__ import annotations

import codecs
import random
import threading
import time
from collections import deque
from typing import Any, Callable

import llama_cpp
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp import _internals as internals

from llamachat import kv_state
from llamachat.chat_job import StopReason
from llamachat.chat_types import never
from llamachat.conversation_cache import ConversationCache
from llamachat.token_logprobs import logprobs_entry

# A newcomer's prompt tokens evaluated per step beside the generating chats: small enough that they wait one chunk
# (~0.1 s for SmolLM2 on two cores) rather than a whole prompt, large enough to keep prompt evaluation efficient.
PROMPT_CHUNK = 128


def _biased(logit_bias: dict[int, float]) -> Callable:
    """A logits processor adding each token's bias to its score."""

    def add_bias(_input_ids, scores):
        biased = scores.copy()
        for token, bias in logit_bias.items():
            biased[token] += bias
        return biased

    return add_bias


class BatchChat:
    """One chat's request and progress. on_text(piece, completion_tokens) is called after every sampled token
    (the piece may be empty: a character still incomplete, or text that may begin a stop string), as
    ChatJob.add_text takes it."""

    def __init__(
        self,
        prompt_tokens: list[int],
        max_tokens: int,
        sampling: dict[str, Any] | None = None,
        on_text: Callable[[str, int], None] | None = None,
        should_abort: Callable[[], bool] | None = None,
        top_logprobs: int | None = None,
    ) -> None:
        if not prompt_tokens:
            raise ValueError("a chat needs at least one prompt token")
        sampling = dict(sampling or {})
        self.prompt_tokens = list(prompt_tokens)
        self.max_tokens = max_tokens
        self.stop: list[str] = [s for s in sampling.pop("stop", None) or [] if s]
        self.seed: int | None = sampling.pop("seed", None)
        # create_completion's names: temperature, top_p, top_k, min_p, the penalties, logit_bias, grammar
        self.sampling = sampling
        self.top_logprobs = top_logprobs  # not None: each token's logprobs go to logprobs, as LlamaChat's
        self.logprobs: list[dict[str, Any]] = []
        self.on_text = on_text or (lambda _text, _tokens: None)
        self.should_abort = should_abort or never
        self.reply = ""
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.prefix_source: str | None = None  # context, ram, disk or none, as ChatJob's
        self.restore_ms: float | None = None
        self.stop_reason: StopReason | None = None
        self.error: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._done = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the chat has finished (any stop_reason)."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()


class _Sequence:
    """A chat decoding in one of the context's sequences: its KV contents, sampler and reply text."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.tokens: list[int] = []  # what this sequence holds in the KV cache, in order
        self.last_used = 0.0
        self.chat: BatchChat | None = None

    @property
    def active_chat(self) -> BatchChat:
        """The chat an active sequence decodes (the decode step touches active sequences only)."""
        assert self.chat is not None, "a free sequence has no chat"
        return self.chat

    def start(self, chat: BatchChat, sampler: internals.LlamaSampler, room: int, cached: int) -> None:
        """room: the tokens the reply may have before the sequence's context is full."""
        self.chat, self.sampler, self.room = chat, sampler, room
        self.max_tokens = min(chat.max_tokens, room) if chat.max_tokens > 0 else room  # 0: until the model stops
        self.tokens = self.tokens[:cached]
        self.pending = chat.prompt_tokens[cached:]  # prompt tokens still to evaluate
        self.next_token: int | None = None  # the sampled token to evaluate in the next step
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text = ""  # the reply decoded so far; chat.reply is the part that cannot belong to a stop string
        self.longest_stop = max((len(s) for s in chat.stop), default=0)
        chat.cached_tokens = cached


class BatchDecoder:
    """Decodes up to n_seq chats at once on llm's model, in a context of its own with n_ctx tokens per chat."""

    def __init__(
        self,
        llm: Llama,
        n_seq: int,
        n_ctx: int | None = None,
        prompt_chunk: int = PROMPT_CHUNK,
        cache: ConversationCache | None = None,
    ) -> None:
        if n_seq < 1:
            raise ValueError(f"n_seq must be at least 1, not {n_seq}")
        self.llm = llm
        self.n_seq = n_seq
        self.prompt_chunk = prompt_chunk
        self.cache = cache
        source = llm.context_params
        params = type(source).from_buffer_copy(source)  # the same threads, batch size and rope settings as llm's
        # Each sequence gets a stream of its own of n_ctx cells (not one pool shared by all), so one long chat cannot
        # crowd out the others.
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_ctx = (n_ctx or llm.n_ctx()) * n_seq
        params.n_batch = max(params.n_batch, n_seq + prompt_chunk)
        params.n_ubatch = params.n_batch
        self._ctx = internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
        self.n_ctx_seq = self._ctx.n_ctx() // n_seq
        self._batch = internals.LlamaBatch(n_tokens=params.n_batch, embd=0, n_seq_max=1, verbose=llm.verbose)
        self._n_batch = params.n_batch
        self._vocab = llm._model.vocab
        self._sequences = [_Sequence(i) for i in range(n_seq)]
        self._waiting: deque[BatchChat] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="batch-decoder", daemon=True)
        self._worker.start()

    # --- the callers' side ------------------------------------------------------------------------------------

    def submit(self, chat: BatchChat) -> BatchChat:
        """Queues the chat; it starts as soon as a sequence is free. Returns it, to wait() on."""
        with self._wake:
            if self._closing:
                raise RuntimeError("the batch decoder is closed")
            self._waiting.append(chat)
            self._wake.notify()
        return chat

    def set_threads(self, threads: int) -> None:
        """The CPU threads llama.cpp computes with from the next step on."""
        self._ctx.set_n_threads(threads, threads)

    def close(self) -> None:
        """Cancels what runs and waits, then frees the context."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join()
        self._batch.close()
        self._ctx.close()

    # --- the worker ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not self._active():
                    self._wake.wait()
                if self._closing:
                    break
                free = sum(s.chat is None for s in self._sequences)
                arriving = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._admit(arriving)  # outside the lock: a restore may read the disk, and submit() must not wait on it
            try:
                self._step()
            except Exception as ex:  # a failing callback must not leave every other chat waiting forever
                for sequence in self._active():
                    self._forget(sequence)
                    self._finish(sequence, StopReason.ERROR, f"{type(ex).__name__}: {ex}")
        for chat in [s.active_chat for s in self._active()] + list(self._waiting):
            self._end(chat, StopReason.CANCELLED)

    def _active(self) -> list[_Sequence]:
        return [s for s in self._sequences if s.chat is not None]

    def _admit(self, arriving: list[BatchChat]) -> None:
        """Starts the chats on free sequences (there is one for each), each on the one whose cache shares most of
        its prompt."""
        for chat in arriving:
            free = [s for s in self._sequences if s.chat is None]
            if chat.should_abort():
                self._end(chat, StopReason.CANCELLED)
                continue
            prompt = chat.prompt_tokens
            best = max(free, key=lambda s: (Llama.longest_token_prefix(s.tokens, prompt), -s.last_used))
            # Like llama-cpp-python, a fully cached prompt re-evaluates its last token, for fresh logits.
            cached = min(Llama.longest_token_prefix(best.tokens, prompt), len(prompt) - 1)
            if len(prompt) >= self.n_ctx_seq:
                self._end(
                    chat, StopReason.ERROR, f"the prompt has {len(prompt)} tokens; the context holds {self.n_ctx_seq}"
                )
                continue
            cached = self._restore(best, chat, cached)
            if not llama_cpp.llama_memory_seq_rm(self._ctx.memory, best.seq_id, cached, -1):
                cached = 0
                llama_cpp.llama_memory_seq_rm(self._ctx.memory, best.seq_id, -1, -1)
            try:
                sampler = self._sampler(chat)
            except (TypeError, ValueError) as ex:  # a sampling setting llama-cpp-python does not take
                self._end(chat, StopReason.ERROR, f"bad sampling settings: {ex}")
                continue
            best.start(chat, sampler, self.n_ctx_seq - len(prompt), cached)

    def _restore(self, sequence: _Sequence, chat: BatchChat, cached: int) -> int:
        """Restores the cache's longest prefix of the chat's prompt into the sequence when it beats what the sequence
        holds; notes where the prefix came from. Returns the prompt tokens now cached."""
        chat.prefix_source = "context" if cached else "none"
        if self.cache is None:
            return cached
        started = time.perf_counter()
        hit = self.cache.find(chat.prompt_tokens, cached)
        if hit is not None:
            if kv_state.restore(self._ctx.ctx, self._ctx.memory, sequence.seq_id, hit.state):
                sequence.tokens, cached, chat.prefix_source = list(hit.tokens), hit.prefix, hit.source
            else:  # llama.cpp refused the bytes (they were checked, so a bug): the chat is evaluated in full
                sequence.tokens, cached, chat.prefix_source = [], 0, "none"
            chat.restore_ms = round((time.perf_counter() - started) * 1000, 2)
        self.cache.count(chat.prefix_source)
        return cached

    def _save(self, cache: ConversationCache, sequence: _Sequence) -> None:
        tokens = sequence.tokens
        try:
            cache.save(tokens, kv_state.capture(self._ctx.ctx, self._ctx.memory, sequence.seq_id, len(tokens)))
        except Exception as ex:  # a bug: the chat has ended well, only its entry is lost (the others decode on)
            cache.log("error", f"conversation cache: could not save a conversation: {type(ex).__name__}: {ex}")

    def _sampler(self, chat: BatchChat) -> internals.LlamaSampler:
        # llama-cpp-python's own chain for these settings, seeded as create_completion seeds it (the runs hold the
        # GIL for this, on the one worker thread).
        llm = self.llm
        llm.set_seed(chat.seed if chat.seed is not None else random.Random(llm._seed).randint(0, 2**32))
        settings = dict(chat.sampling)
        if "temperature" in settings:
            settings["temp"] = settings.pop("temperature")
        if "logit_bias" in settings:  # create_completion turns it into a logits processor; _init_sampler takes that
            settings["logits_processor"] = LogitsProcessorList([_biased(settings.pop("logit_bias"))])
        return llm._init_sampler(**settings)

    def _step(self) -> None:
        """One llama_decode: the next token of every generating chat, then prompt chunks while room is left."""
        batch = self._batch.batch
        batch.n_tokens = 0
        outputs: list[tuple[int, _Sequence]] = []

        def add(sequence: _Sequence, token: int, logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, len(sequence.tokens), 1
            batch.seq_id[i][0], batch.logits[i] = sequence.seq_id, logits
            batch.n_tokens += 1
            sequence.tokens.append(token)
            if logits:
                outputs.append((i, sequence))

        active = self._active()
        for sequence in active:
            if sequence.active_chat.should_abort():
                self._finish(sequence, StopReason.CANCELLED)
            elif sequence.next_token is not None:
                add(sequence, sequence.next_token, True)
                sequence.next_token = None
        room = min(self.prompt_chunk, self._n_batch - batch.n_tokens)
        for sequence in active:
            if sequence.chat is None or not sequence.pending or room <= 0:
                continue
            chunk, sequence.pending = sequence.pending[:room], sequence.pending[room:]
            for k, token in enumerate(chunk):
                add(sequence, token, not sequence.pending and k == len(chunk) - 1)
            room -= len(chunk)
        if batch.n_tokens == 0:
            return
        code = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if code != 0:
            for sequence in {id(s): s for _, s in outputs}.values():
                self._forget(sequence)
                self._finish(sequence, StopReason.ERROR, f"llama_decode returned {code}")
            return
        for i, sequence in outputs:
            token = sequence.sampler.sample(self._ctx, i)
            chat = sequence.active_chat
            if chat.top_logprobs is not None and not llama_cpp.llama_vocab_is_eog(self._vocab, token):
                chat.logprobs.append(logprobs_entry(self.llm, self._ctx.ctx, i, token, chat.top_logprobs))
            self._accept(sequence, token)

    def _accept(self, sequence: _Sequence, token: int) -> None:
        chat = sequence.active_chat
        if chat.first_token_at is None:
            chat.first_token_at = time.perf_counter()
        # The end-of-generation token ends the reply without being part of it (as in create_completion).
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(sequence, StopReason.COMPLETED)
            return
        chat.completion_tokens += 1
        sequence.next_token = token
        before = len(sequence.text)
        sequence.text += sequence.decoder.decode(self.llm.detokenize([token]))
        stop_at = self._stop_position(sequence, before)
        if stop_at is not None:
            sequence.text = sequence.text[:stop_at]
            self._finish(sequence, StopReason.COMPLETED)
        elif chat.completion_tokens >= sequence.room or (
            # Like create_completion, a character cut by max_tokens is completed first (at most 3 more tokens).
            chat.completion_tokens >= sequence.max_tokens and not sequence.decoder.getstate()[0]
        ):
            self._finish(sequence, StopReason.LENGTH)
        else:
            self._emit(sequence, held=self._stop_prefix(sequence))

    @staticmethod
    def _stop_position(sequence: _Sequence, before: int) -> int | None:
        """Where the first stop string begins in the reply, looking only where the new text could complete one."""
        start = max(0, before - sequence.longest_stop + 1)
        found = [i for i in (sequence.text.find(s, start) for s in sequence.active_chat.stop) if i >= 0]
        return min(found) if found else None

    @staticmethod
    def _stop_prefix(sequence: _Sequence) -> int:
        """How many characters at the reply's end could begin a stop string: they are held back until known."""
        text, stops = sequence.text, sequence.active_chat.stop
        return max(
            (n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
            default=0,
        )

    def _emit(self, sequence: _Sequence, held: int = 0) -> None:
        chat = sequence.active_chat
        shown = len(sequence.text) - held
        piece = sequence.text[len(chat.reply) : shown] if shown > len(chat.reply) else ""
        chat.reply += piece
        chat.on_text(piece, chat.completion_tokens)

    def _finish(self, sequence: _Sequence, stop_reason: StopReason, error: str | None = None) -> None:
        chat = sequence.active_chat
        # A cancelled or failed chat keeps what it has shown.
        if stop_reason in (StopReason.COMPLETED, StopReason.LENGTH):
            sequence.text += sequence.decoder.decode(b"", final=True)
            self._emit(sequence)
        sequence.chat, sequence.next_token, sequence.pending = None, None, []
        sequence.sampler.close()
        sequence.last_used = time.perf_counter()
        self._end(chat, stop_reason, error)
        if self.cache is not None and stop_reason != StopReason.ERROR:  # after the chat's end: its client need not wait
            self._save(self.cache, sequence)

    def _forget(self, sequence: _Sequence) -> None:
        """Empties a sequence whose cache contents are unknown (a failed decode)."""
        llama_cpp.llama_memory_seq_rm(self._ctx.memory, sequence.seq_id, -1, -1)
        sequence.tokens = []

    @staticmethod
    def _end(chat: BatchChat, stop_reason: StopReason, error: str | None = None) -> None:
        chat.stop_reason, chat.error = stop_reason, error
        chat.finished_at = time.perf_counter()
        chat._done.set()
