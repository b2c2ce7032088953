"""LlamaChat: a thin wrapper over llama-cpp-python's Llama that loads a GGUF chat model and chats with it.

do_chat passes its keyword arguments on to llama-cpp-python's create_chat_completion.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, cast

import llama_cpp
import numpy as np
from llama_cpp import CreateChatCompletionResponse, CreateChatCompletionStreamResponse, Llama, LlamaGrammar
from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler
from llama_cpp.llama_tokenizer import LlamaTokenizer

from llamachat import kv_state
from llamachat.chat_template import choose_template
from llamachat.chat_types import Message, never
from llamachat.grammar_sampler import GrammarCheckedSampler
from llamachat.llama_log import LLAMA_LOG
from llamachat.model_file import SMALL_MODEL_FILENAME, quick_problem, small_model_chosen
from llamachat.prompt_lookup import PromptLookup
from llamachat.token_logprobs import logprobs_entry
from llamachat.token_pieces import TokenPieces

DEFAULT_SYSTEM_PROMPT = (
    "You're a helpful assistant who answers questions the user asks of you concisely and accurately."
)


def conversation(
    prompt: str,
    system_prompt: str | None,
    history: list[Message] | None,
    system_role: bool,
    as_sent: bool = False,
    prefill: str | None = None,
) -> list[Message]:
    """System prompt, earlier turns, the new prompt, then any assistant text to continue (prefill), as a template
    with or without a system role needs them. A system prompt of None is the default one, unless the conversation
    is as the client sent it (as_sent): then only the system messages in its history are there, where they are."""
    turns = list(history or []) + [{"role": "user", "content": prompt}]
    if prefill is not None:
        turns.append({"role": "assistant", "content": prefill})
    if not as_sent:
        turns.insert(0, {"role": "system", "content": system_prompt or DEFAULT_SYSTEM_PROMPT})
    if system_role:
        return turns
    # Templates without a system role (Mistral, Gemma) get each system message at the head of the next user turn.
    folded: list[Message] = []
    pending: list[str] = []
    for message in turns:
        if message["role"] == "system":
            pending.append(message["content"])
        elif message["role"] == "user" and pending:
            folded.append({"role": "user", "content": "\n\n".join([*pending, message["content"]])})
            pending = []
        else:
            folded.append(message)
    return folded


class ModelLoadError(RuntimeError):
    """No model could be loaded; the message lists every place that was tried and why it failed."""


# What create_chat_completion(stream=True) returns: a generator of chunks, closed to stop it early.
ChunkStream = Generator[CreateChatCompletionStreamResponse, None, None]
_NO_CALLBACK = llama_cpp.ggml_abort_callback(0)  # a NULL function pointer: llama.cpp then never asks

# Flash attention computes each token's attention row on its own, so on the CPU a token's logits come out the same,
# bit for bit, whether it is evaluated alone or behind others in a batch (a verified draft, docs/speculative.md);
# without it llama.cpp's attention matmul changes kernels with the batch and moves them by up to ~0.9. It is llama.cpp's
# own default (auto) wherever a backend has it. Tests and benches give raw llama-cpp-python the same, like for like.
ENGINE_OPTIONS: dict[str, Any] = {"flash_attn": True}


def plain_llama(model_path: str | os.PathLike, n_ctx: int, n_threads: int, **options: Any) -> Llama:
    """llama-cpp-python's own Llama with the module's engine options: what tests and benches compare the module with."""
    return Llama(
        model_path=str(model_path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        verbose=False,
        **ENGINE_OPTIONS,
        **options,
    )


# What the draft probe (_CountingLlama.invariant_draft) evaluates: ordinary text, repeated to the length it needs.
_PROBE_TEXT = b"The quick brown fox jumps over the lazy dog, and the dog sleeps on in the warm afternoon sun. "
_PROBE_PREFIX = 8  # tokens evaluated in one batch before the steps compared, so the steps attend to a prompt


class _CountingLlama(Llama):
    """Llama that counts the tokens it generates. Streamed chunks are not tokens: llama-cpp-python holds back the
    pieces of a multi-byte character and anything that may begin a stop string."""

    generated_tokens = 0
    top_logprobs: int | None = None  # not None: each generated token's logprobs go to token_logprobs
    token_logprobs: list[dict[str, Any]] = []
    # With speculative decoding: generate() asks the drafter (as its draft_model) for tokens after each step and
    # evaluates them behind the last one; drafted_tokens of them were evaluated, accepted_tokens sampled as drafted.
    drafter: PromptLookup | None = None
    drafted_tokens = 0
    accepted_tokens = 0
    _pieces: TokenPieces | None = None

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        """llama-cpp-python's detokenize, from pieces kept once asked for (llamachat/token_pieces.py)."""
        if type(self.tokenizer_) is not LlamaTokenizer:  # a tokenizer of the caller's: its own detokenize
            return super().detokenize(tokens, prev_tokens, special)
        if self._pieces is None:
            self._pieces = TokenPieces(self._model.vocab)
        return self._pieces.detokenize(tokens, special)

    def eval(self, tokens: Sequence[int]) -> None:
        drafted = min(self.drafter.pending, len(tokens) - 1) if self.drafter else 0
        started = time.perf_counter()
        if drafted:
            self._verify(tokens, drafted)
        else:
            super().eval(tokens)
        if self.drafter is not None and len(tokens) == drafted + 1:  # a step of the reply, not a prompt
            self.drafter.timed(drafted, time.perf_counter() - started)

    def _verify(self, tokens: Sequence[int], drafted: int) -> None:
        assert self.drafter is not None
        self.drafter.pending = 0
        self._decode_outputs(tokens, drafted + 1)
        self.drafted_tokens += drafted

    def _decode_outputs(self, tokens: Sequence[int], outputs: int) -> None:
        """Evaluates tokens behind those already evaluated, in one batch (far under n_batch), with logits for the
        last `outputs` of them: for a draft, exactly the positions sample() reads, where Llama would compute them for
        every position only with logits_all, prompt included."""
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        n_past = self.n_tokens
        self._batch.set_batch(batch=tokens, n_past=n_past, logits_all=False)
        for i in range(len(tokens) - outputs, len(tokens)):
            self._batch.batch.logits[i] = True
        self._ctx.decode(self._batch)
        self.input_ids[n_past : n_past + len(tokens)] = tokens
        self.n_tokens += len(tokens)
        self._requires_eval = False

    def invariant_draft(self, most: int) -> int:
        """The longest draft, up to `most` tokens, whose verification gives every position the very logits, bit for
        bit, that a one-token step gives it with this model, build, backend and CPU: a batch of the last token and
        up to that many drafted ones, against the same tokens evaluated one at a time. Within it a greedy reply with
        drafts is the one without; llama.cpp switches kernels at batch sizes of its own (e.g. a weight layout that
        multiplies 4 rows at once, measured here on Q4_K), which the drafts then stay under."""
        needed = _PROBE_PREFIX + most + 1
        sample = self.tokenize(_PROBE_TEXT * needed, add_bos=False)[:needed]
        prefix, steps = sample[:_PROBE_PREFIX], sample[_PROBE_PREFIX:]
        n_vocab = self.n_vocab()

        def logits(index: int) -> np.ndarray:
            return np.ctypeslib.as_array(self._ctx.get_logits_ith(index), shape=(n_vocab,)).copy()

        self.reset()
        self.eval(prefix)
        alone = []
        for token in steps:
            self.eval([token])
            alone.append(logits(-1))
        longest = most
        for size in range(2, len(steps) + 1):
            self.n_tokens = len(prefix)  # the batch replaces the steps behind the prefix, which stays in the KV cache
            self._decode_outputs(steps[:size], size)
            if not all(np.array_equal(logits(i), alone[i]) for i in range(size)):
                longest = size - 2
                break
        self.reset()
        return longest

    def _init_sampler(self, *args: Any, grammar: LlamaGrammar | None = None, **kwargs: Any) -> Any:
        """llama-cpp-python's chain, with the grammar checked on the chain's pick rather than run over the whole
        vocabulary for every token (llamachat/grammar_sampler.py)."""
        chain = super()._init_sampler(*args, **kwargs)
        return chain if grammar is None else GrammarCheckedSampler(chain, self._model, grammar)

    def sample(self, *args: Any, **kwargs: Any) -> int:
        token = super().sample(*args, **kwargs)
        idx = kwargs.get("idx")  # generate() passes it by name
        if self.drafter is not None and idx is not None and idx + 1 < self.n_tokens:
            # A drafted position: generate() keeps the draft's next token only if it is the one sampled here. Sampling
            # exactly as without a draft is the speculative rule for a draft of one certain token (docs/speculative.md).
            accepted = token == int(self.input_ids[idx + 1])
            self.accepted_tokens += accepted
            self.drafter.checked(accepted)
        # The end-of-generation token ends the reply without being part of it (as in llama-cpp-python's usage).
        if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
            self.generated_tokens += 1
            if self.top_logprobs is not None:
                index = idx - self.n_tokens if idx is not None else -1  # as Llama.sample finds the logits
                self.token_logprobs.append(logprobs_entry(self, self.ctx, index, token, self.top_logprobs))
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
        max_draft: int = 0,
    ) -> None:
        """max_draft: the most tokens drafted from the conversation for one pass (speculative decoding,
        prompt_lookup.py); 0 = none, the module's setting CPAI_MODULE_LLAMA_DRAFT_TOKENS gives it."""
        options: dict[str, Any] = dict(
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_gpu_layers=n_gpu_layers,
            verbose=verbose,
            **ENGINE_OPTIONS,
        )
        tried: list[str] = []
        self.fallback_reason: str | None = None

        llm = self._load_file(os.path.join(model_dir, filename), options, tried) if filename else None
        if llm is None and repo_id and small_model_chosen(Path(model_dir)):
            tried.append(
                f"'{filename}' is not in {model_dir}, and the install chose the small model (--small), so it is not "
                "downloaded now; install again without --small to get it"
            )
        elif llm is None and repo_id:
            try:
                # local_dir (not cache_dir) puts the file at model_dir/<name>, so the next start loads it directly.
                downloaded = _CountingLlama.from_pretrained(
                    repo_id=repo_id, filename=fileglob, local_dir=model_dir, **options
                )
                llm = cast(_CountingLlama, downloaded)  # from_pretrained builds its own class (typed as Llama)
            except Exception as ex:
                tried.append(f"downloading '{fileglob}' from Hugging Face repo '{repo_id}': {_reason(ex)}")
        if llm is None:
            llm = self._load_file(os.path.join(model_dir, SMALL_MODEL_FILENAME), options, tried)
            if llm is not None:
                self.fallback_reason = "; ".join(tried)
        if llm is None:
            raise ModelLoadError(
                "Unable to load a model. Tried " + "; ".join(f"({i}) {attempt}" for i, attempt in enumerate(tried, 1))
            )
        self.llm = llm

        self.model_path = self.llm.model_path
        self.model_name = os.path.basename(self.model_path)
        self.n_ctx = self.llm.n_ctx()

        choice = choose_template(self.llm, chat_format or None)
        self.template = choice.template
        self.template_source = choice.source
        self.system_role = self.template.supports_system_role()
        self.renders_tools = self.template.renders_tools()
        self.llm.chat_handler = chat_formatter_to_chat_completion_handler(self.template)
        # Drafts only as long as this machine verifies them exactly (0: none); probed once, at load.
        self.max_draft = self.llm.invariant_draft(max_draft) if max_draft else 0
        self.llm.drafter = PromptLookup(self.max_draft) if self.max_draft else None
        self.llm.draft_model = self.llm.drafter

        # llama.cpp polls the abort callback between graph nodes, so a cancel also stops the evaluation of a long
        # prompt mid-batch. It asks whatever the current chat's should_abort says.
        self._should_abort: Callable[[], bool] = never
        self._abort_callback = llama_cpp.ggml_abort_callback(lambda _data: self._aborting())

    @classmethod
    def from_file(cls, path: str | os.PathLike, **options: Any) -> LlamaChat:
        """A LlamaChat on one local GGUF file, nothing downloaded; options as for __init__ (n_ctx, n_threads...)."""
        return cls(repo_id="", fileglob="", filename=os.path.basename(path), model_dir=os.path.dirname(path), **options)

    @staticmethod
    def _load_file(path: str, options: dict[str, Any], tried: list[str]) -> _CountingLlama | None:
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
        self,
        prompt: str,
        system_prompt: str | None = None,
        history: list[Message] | None = None,
        as_sent: bool = False,
        prefill: str | None = None,
    ) -> list[Message]:
        """The conversation as the template will see it (conversation() says how)."""
        return conversation(prompt, system_prompt, history, self.system_role, as_sent, prefill)

    def tokenize_messages(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """The prompt tokens create_chat_completion will evaluate for these messages (and tools, where the template
        renders them)."""
        prompt = self.template.render(messages, tools)
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def count_tokens(self, text: str) -> int:
        """The tokens of a message's text on its own, as the template's rendering tokenizes it."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    @property
    def token_logprobs(self) -> list[dict[str, Any]]:
        """With do_chat's top_logprobs: the logprobs of each token generated so far, in OpenAI's shape."""
        return self.llm.token_logprobs

    def grammar(self, gbnf: str) -> LlamaGrammar:
        """A grammar llama.cpp has parsed; ValueError for one it cannot (its log says where)."""
        probe = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, gbnf.encode("utf-8"), b"root")
        if not probe:
            raise ValueError("llama.cpp could not parse the grammar made from json_schema; simplify the schema")
        llama_cpp.llama_sampler_free(probe)
        return LlamaGrammar.from_string(gbnf)

    @property
    def generated_tokens(self) -> int:
        """Tokens generated by the current (or last) do_chat, the end-of-generation token not counted."""
        return self.llm.generated_tokens

    @property
    def drafted_tokens(self) -> int:
        """Tokens the current (or last) do_chat drafted from the conversation and evaluated (speculative decoding)."""
        return self.llm.drafted_tokens

    @property
    def accepted_tokens(self) -> int:
        """Of drafted_tokens, those the reply kept: each is a token generated without a pass of its own."""
        return self.llm.accepted_tokens

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
        as_sent: bool = False,
        prefill: str | None = None,
        top_logprobs: int | None = None,
        **kwargs: Any,
    ) -> CreateChatCompletionResponse | Iterator[CreateChatCompletionStreamResponse]:
        """Generates the reply to a prompt, after the earlier turns in history.

        params:
            prompt: the user's message; system_prompt: how the assistant should behave (None = default);
            history: earlier turns, [{"role": "user"|"assistant", "content": str}], oldest first;
            should_abort: polled by llama.cpp while it computes, True stops it (llama_decode then raises
                RuntimeError). Without stream it is asked throughout; with stream only until the first chunk, while
                the prompt is evaluated: after that the caller stops the stream between chunks;
            as_sent, prefill: as for messages();
            top_logprobs: not None: each generated token's logprobs, with this many alternatives, are appended to
                token_logprobs as it is sampled;
            **kwargs: passed to create_chat_completion (max_tokens, temperature, stream, stop, seed, grammar...).
        """
        self._watch(should_abort)
        self.llm.generated_tokens = self.llm.drafted_tokens = self.llm.accepted_tokens = 0
        if self.llm.drafter is not None:
            self.llm.drafter.reset()
        self.llm.top_logprobs, self.llm.token_logprobs = top_logprobs, []
        # Plain dicts, as llama-cpp-python's message TypedDicts describe them (list[Any] accepts both).
        messages: list[Any] = self.messages(prompt, system_prompt, history, as_sent, prefill)
        result = self.llm.create_chat_completion(messages=messages, **kwargs)
        if should_abort is not None and kwargs.get("stream"):
            return self._watch_until_first_chunk(cast(ChunkStream, result))  # stream=True: the generator of chunks
        return result

    def _aborting(self) -> bool:
        abort = self._should_abort()
        if abort:  # llama.cpp now logs stopping the computation as a warning and an error, which it is not
            LLAMA_LOG.aborting = True
        return abort

    def _watch(self, should_abort: Callable[[], bool] | None) -> None:
        """Lets should_abort stop llama.cpp in the middle of a computation; None stops asking."""
        LLAMA_LOG.aborting = False
        self._should_abort = should_abort or never
        llama_cpp.llama_set_abort_callback(self.llm.ctx, self._abort_callback if should_abort else _NO_CALLBACK, None)

    def _watch_until_first_chunk(self, stream: ChunkStream) -> ChunkStream:
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
