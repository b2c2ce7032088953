"""The batched engine on the real SmolLM2: each chat decoded beside others gets a greedy reply to its own prompt (no
cross-talk), a seeded chat is reproducible in the same batch, and each keeps its own cancel, stop strings,
max_tokens and counts.

llama.cpp does not promise that a sequence decoded beside others gets bit-identical logits: its kernels are not
batch-invariant, so at a near-tie a batched greedy chat may take the other branch than it does alone (as in
llama-server). Replies are therefore checked against raw llama-cpp-python token by token, up to near-ties
(tests/raw_reference.py), never expected to be particular words.
"""

from __future__ import annotations

import threading

import pytest

from llama_chat import LlamaChat
from llamachat.batch_decoder import BatchChat, BatchDecoder

GREEDY = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how a bicycle works, step by step.",
    "Describe a busy city market in the morning.",
    "List five fruits, one per line, each with its colour.",
]
# Prompts asking for characters that SmolLM2's tokenizer splits across byte tokens (partial UTF-8 at every step).
MULTIBYTE_PROMPTS = [
    "Translate 'thank you very much' into Japanese, French and Greek.",
    "Write 'good morning' in Japanese, Chinese and Korean.",
    "Repeat after me: ありがとうございます、こんにちは、さようなら。",
]
TIMEOUT_S = 300  # a hang, not a speed: the chats share a 2-core machine with everything else


@pytest.fixture(scope="module")
def chat(smollm2):
    chat = LlamaChat.from_file(smollm2, n_ctx=1024, n_threads=2)
    yield chat
    chat.close()


@pytest.fixture
def decoder(chat):
    # Small prompt chunks: every prompt takes several steps, interleaved with the other chats' generation.
    decoder = BatchDecoder(chat.llm, 4, n_ctx=1024, prompt_chunk=16)
    yield decoder
    decoder.close()


def batch_chat(chat: LlamaChat, prompt: str, max_tokens: int, stop=(), **options) -> BatchChat:
    sampling = {**GREEDY, **options.pop("sampling", {}), "stop": [*stop, *chat.template.stops]}
    return BatchChat(chat.tokenize_messages(chat.messages(prompt)), max_tokens, sampling, **options)


def finished(*chats: BatchChat) -> None:
    for c in chats:
        assert c.wait(TIMEOUT_S), "the chat did not finish"


def departure(raw, chat: LlamaChat, prompt: str, reply: str, **how) -> str | None:
    """Where reply departs from greedy decoding of prompt (None: it does not), judged by raw llama-cpp-python."""
    return raw.greedy_departure(raw.chat_tokens(chat.messages(prompt)), reply, **how)


def assert_greedy(raw, chat: LlamaChat, prompt: str, c: BatchChat) -> None:
    why = departure(raw, chat, prompt, c.reply, ended=c.stop_reason == "completed")
    assert why is None, f"the reply to {prompt!r} is not a greedy reply to it: {why}"


@pytest.mark.parametrize("count", [2, 4])
def test_chats_decoded_together_each_get_a_greedy_reply_to_their_own_prompt(chat, decoder, raw_smollm2, count):
    prompts = PROMPTS[:count]
    streamed = [[] for _ in range(count)]
    counts = [[] for _ in range(count)]

    def collector(i):
        return lambda text, tokens: (streamed[i].append(text), counts[i].append(tokens))

    chats = [decoder.submit(batch_chat(chat, p, 24, on_text=collector(i))) for i, p in enumerate(prompts)]
    finished(*chats)
    for i, (p, c) in enumerate(zip(prompts, chats)):
        assert c.prompt_tokens == raw_smollm2.chat_tokens(chat.messages(p))  # what raw llama-cpp-python evaluates
        assert c.stop_reason in ("completed", "length")
        assert c.error is None
        assert c.reply
        assert_greedy(raw_smollm2, chat, p, c)
        assert "".join(streamed[i]) == c.reply  # the streamed pieces are the reply, nothing held back or doubled
        assert counts[i] == sorted(counts[i])
        assert counts[i][-1] == c.completion_tokens <= 24
        assert c.first_token_at is not None
        assert c.first_token_at <= c.finished_at
    # No cross-talk, and a check that can see it: no chat's reply passes as a greedy reply to another chat's prompt.
    for i, p in enumerate(prompts):
        for j, c in enumerate(chats):
            if i != j:
                assert departure(raw_smollm2, chat, p, c.reply, ended=c.stop_reason == "completed"), (p, c.reply)


def test_a_newcomer_joins_chats_already_generating(chat, decoder, raw_smollm2):
    late = batch_chat(chat, PROMPTS[2], 24)
    joined = threading.Event()

    def submit_late(_text, tokens):
        if tokens == 3 and not joined.is_set():  # the first chats are generating: the newcomer's prompt joins them
            joined.set()
            decoder.submit(late)

    first = [decoder.submit(batch_chat(chat, p, 24, on_text=submit_late)) for p in PROMPTS[:2]]
    finished(*first)
    assert joined.is_set()
    finished(late)
    for p, c in zip(PROMPTS[:3], (*first, late)):
        assert_greedy(raw_smollm2, chat, p, c)


@pytest.fixture(scope="module")
def multibyte_prompt(chat, raw_smollm2) -> str:
    """The first prompt whose greedy reply (raw llama-cpp-python, this run) holds characters of several tokens."""
    for prompt in MULTIBYTE_PROMPTS:
        if any(ord(ch) > 0x7FF for ch in raw_smollm2.reply(chat.messages(prompt), max_tokens=40, **GREEDY)):
            return prompt
    pytest.fail("no prompt got SmolLM2 to write characters of 3 or more UTF-8 bytes")


def test_characters_split_across_tokens_come_out_whole(chat, decoder, raw_smollm2, multibyte_prompt):
    streamed = []
    solo = decoder.submit(batch_chat(chat, multibyte_prompt, 40, on_text=lambda text, _n: streamed.append(text)))
    finished(solo)
    assert solo.reply == "".join(streamed)
    assert "\ufffd" not in solo.reply
    # Byte for byte the model's tokens, even where max_tokens falls inside a character: it is finished first.
    assert_greedy(raw_smollm2, chat, multibyte_prompt, solo)
    if solo.stop_reason == "length":
        assert 40 <= solo.completion_tokens <= 43


def test_a_seeded_chat_is_reproducible_in_the_same_batch(chat, raw_smollm2):
    sampling = {"temperature": 0.9, "seed": 1234}

    def seeded_beside_a_greedy_chat() -> tuple[str, str]:
        # A fresh decoder each time, and the seeded chat joins when the greedy one has its first token: the same
        # steps, with the same batches, both times.
        decoder = BatchDecoder(chat.llm, 4, n_ctx=1024, prompt_chunk=16)
        try:
            started, joined = threading.Event(), threading.Event()

            def hold_first_token(_text, tokens):
                if tokens == 1:
                    started.set()
                    assert joined.wait(TIMEOUT_S)

            greedy = decoder.submit(batch_chat(chat, PROMPTS[1], 24, on_text=hold_first_token))
            assert started.wait(TIMEOUT_S)
            seeded = decoder.submit(batch_chat(chat, PROMPTS[0], 32, sampling=sampling))
            joined.set()
            finished(greedy, seeded)
            assert seeded.stop_reason in ("completed", "length")
            assert seeded.reply
            assert_greedy(raw_smollm2, chat, PROMPTS[1], greedy)
            return seeded.reply, greedy.reply
        finally:
            decoder.close()

    assert seeded_beside_a_greedy_chat() == seeded_beside_a_greedy_chat()


def test_cancelling_one_chat_keeps_its_text_and_leaves_the_others_running(chat, decoder, raw_smollm2):
    cancel = threading.Event()

    def cancel_after_five(_text, tokens):
        if tokens >= 5:
            cancel.set()

    victim = batch_chat(chat, PROMPTS[0], 32, on_text=cancel_after_five, should_abort=cancel.is_set)
    chats = [decoder.submit(victim)] + [decoder.submit(batch_chat(chat, p, 32)) for p in PROMPTS[1:3]]
    finished(*chats)
    assert victim.stop_reason == "cancelled"
    assert victim.error is None
    assert 5 <= victim.completion_tokens < 32
    assert victim.reply  # the text so far, kept: the model's own tokens, cut short
    assert_greedy(raw_smollm2, chat, PROMPTS[0], victim)
    for p, c in zip(PROMPTS[1:3], chats[1:]):
        assert c.stop_reason in ("completed", "length")
        assert_greedy(raw_smollm2, chat, p, c)


def test_a_chat_cancelled_before_it_starts_ends_empty(chat, decoder):
    waiting = decoder.submit(batch_chat(chat, PROMPTS[1], 16, should_abort=lambda: True))
    finished(waiting)
    assert (waiting.stop_reason, waiting.reply, waiting.completion_tokens) == ("cancelled", "", 0)


def test_stop_strings_and_max_tokens_hold_per_chat(chat, decoder, raw_smollm2):
    # A stop string from the words raw llama-cpp-python's greedy reply goes on to, in this run.
    story = raw_smollm2.reply(chat.messages(PROMPTS[0]), max_tokens=32, **GREEDY)
    stop = story.split()[3]
    chats = [
        decoder.submit(batch_chat(chat, PROMPTS[0], 32, stop=[stop])),
        decoder.submit(batch_chat(chat, PROMPTS[3], 5)),
        decoder.submit(batch_chat(chat, PROMPTS[1], 24)),
    ]
    finished(*chats)
    stopped, limited, free = chats
    tokens = raw_smollm2.chat_tokens(chat.messages(PROMPTS[0]))
    assert raw_smollm2.stop_departure(tokens, stopped.reply, stopped.stop_reason, stop, story) is None
    assert (limited.completion_tokens, limited.stop_reason) == (5, "length")
    assert_greedy(raw_smollm2, chat, PROMPTS[3], limited)
    assert free.stop_reason in ("completed", "length")
    assert_greedy(raw_smollm2, chat, PROMPTS[1], free)


def test_a_conversation_reuses_its_cached_prefix(chat, decoder, raw_smollm2):
    first = decoder.submit(batch_chat(chat, PROMPTS[1], 16))
    finished(first)
    assert first.cached_tokens == 0
    again = decoder.submit(batch_chat(chat, PROMPTS[1], 16))
    finished(again)
    # All but the last prompt token come from the cache (that one is evaluated again, for fresh logits).
    assert again.cached_tokens == len(again.prompt_tokens) - 1
    for c in (first, again):  # a cached prompt's logits may differ in their low bits from a freshly evaluated one's
        assert_greedy(raw_smollm2, chat, PROMPTS[1], c)


def test_a_prompt_longer_than_the_context_ends_with_an_error(chat, decoder):
    too_long = BatchChat([chat.llm.token_bos()] * 1100, 8, GREEDY)
    finished(decoder.submit(too_long))
    assert too_long.stop_reason == "error"
    assert "1100 tokens" in too_long.error
    assert "1024" in too_long.error
    with pytest.raises(ValueError, match="at least one prompt token"):
        BatchChat([], 8, GREEDY)


def test_bad_sampling_settings_end_that_chat_only(chat, decoder, raw_smollm2):
    bad = decoder.submit(batch_chat(chat, PROMPTS[1], 8, sampling={"temprature": 0.5}))
    good = decoder.submit(batch_chat(chat, PROMPTS[1], 8))
    finished(bad, good)
    assert bad.stop_reason == "error"
    assert "temprature" in bad.error
    assert good.stop_reason in ("completed", "length")
    assert good.reply
    assert_greedy(raw_smollm2, chat, PROMPTS[1], good)


def test_closing_cancels_what_runs_and_refuses_more(chat):
    decoder = BatchDecoder(chat.llm, 2, n_ctx=1024)
    streamed = []
    # max_tokens 0: until the model stops or the context is full, so it is most likely still running when closed.
    running = decoder.submit(batch_chat(chat, PROMPTS[0], 0, on_text=lambda text, _n: streamed.append(text)))
    decoder.close()
    assert running.done
    assert running.stop_reason in ("cancelled", "completed", "length")
    assert "".join(streamed) == running.reply  # a cancelled chat keeps what it had shown
    with pytest.raises(RuntimeError, match="closed"):
        decoder.submit(batch_chat(chat, PROMPTS[1], 8))
