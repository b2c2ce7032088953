"""The batched engine on the real SmolLM2: chats decoded together give each the reply it gets alone (the wrapper's
create_chat_completion), and each keeps its own cancel, stop strings, max_tokens and counts."""

from __future__ import annotations

import threading

import pytest

from llama_chat import LlamaChat
from llamachat.batch_decoder import BatchChat, BatchDecoder

GREEDY = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
# Prompts whose greedy reply has no near-tie on SmolLM2: llama.cpp's kernels are not batch-invariant (the logits
# differ in their last bits with the batch's make-up), so at a near-tie a batched chat may take the other branch,
# as it may in llama-server. bench.concurrency counts how often that happens on its prompts.
PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "What is the capital of France? Answer in one sentence.",
    "Tell me about Paris.",
    "List five fruits, one per line, each with its colour.",
]
# SmolLM2 answers in Japanese characters split across byte tokens: partial UTF-8 characters at every step.
MULTIBYTE_PROMPT = "Translate 'thank you very much' into Japanese, French and Greek."
TIMEOUT_S = 120


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


@pytest.fixture(scope="module")
def alone(chat):
    """alone(prompt, max_tokens, **sampling): the reply today's single-chat path gives (each computed once)."""
    replies = {}

    def reply(prompt: str, max_tokens: int, **sampling) -> str:
        key = (prompt, max_tokens, *sorted(sampling.items()))
        if key not in replies:
            response = chat.do_chat(prompt, max_tokens=max_tokens, **{**GREEDY, **sampling})
            replies[key] = response["choices"][0]["message"]["content"]
        return replies[key]

    return reply


def batch_chat(chat: LlamaChat, prompt: str, max_tokens: int, stop=(), **options) -> BatchChat:
    sampling = {**GREEDY, **options.pop("sampling", {}), "stop": [*stop, *chat.template.stops]}
    return BatchChat(chat.tokenize_messages(chat.messages(prompt)), max_tokens, sampling, **options)


def finished(*chats: BatchChat) -> None:
    for c in chats:
        assert c.wait(TIMEOUT_S), "the chat did not finish"


@pytest.mark.parametrize("count", [2, 4])
def test_chats_decoded_together_get_the_replies_they_get_alone(chat, decoder, alone, count):
    expected = [alone(p, 24) for p in PROMPTS[:count]]
    streamed = [[] for _ in range(count)]
    counts = [[] for _ in range(count)]

    def collector(i):
        return lambda text, tokens: (streamed[i].append(text), counts[i].append(tokens))

    chats = [decoder.submit(batch_chat(chat, p, 24, on_text=collector(i))) for i, p in enumerate(PROMPTS[:count])]
    finished(*chats)
    assert [c.reply for c in chats] == expected
    for i, c in enumerate(chats):
        assert c.stop_reason in ("completed", "length") and c.error is None
        assert "".join(streamed[i]) == c.reply  # the streamed pieces are the reply, nothing held back or doubled
        assert counts[i] == sorted(counts[i]) and counts[i][-1] == c.completion_tokens <= 24
        assert c.first_token_at is not None and c.first_token_at <= c.finished_at


def test_a_newcomer_joins_chats_already_generating(chat, decoder, alone):
    expected = [alone(p, 24) for p in PROMPTS[:3]]
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
    assert [c.reply for c in (*first, late)] == expected


def test_characters_split_across_tokens_come_out_whole_as_alone(chat, decoder, alone):
    expected = alone(MULTIBYTE_PROMPT, 40)
    assert any(ord(ch) > 0x3000 for ch in expected)  # the reply does hold multi-byte characters
    streamed = []
    solo = decoder.submit(batch_chat(chat, MULTIBYTE_PROMPT, 40, on_text=lambda text, _n: streamed.append(text)))
    finished(solo)
    # Equal to the wrapper's even where max_tokens falls inside a character: both finish that character first.
    assert solo.reply == expected == "".join(streamed)
    assert "\ufffd" not in solo.reply and solo.completion_tokens >= 40


def test_a_seeded_chat_samples_as_it_does_alone(chat, decoder, alone):
    sampling = {"temperature": 0.9, "seed": 1234}
    expected = alone(PROMPTS[0], 32, **sampling)
    chats = [decoder.submit(batch_chat(chat, PROMPTS[0], 32, sampling=sampling)) for _ in range(2)]
    chats.append(decoder.submit(batch_chat(chat, PROMPTS[1], 32)))
    finished(*chats)
    assert chats[0].reply == chats[1].reply == expected


def test_cancelling_one_chat_keeps_its_text_and_leaves_the_others_running(chat, decoder, alone):
    expected = [alone(p, 32) for p in PROMPTS[:3]]
    cancel = threading.Event()

    def cancel_after_five(_text, tokens):
        if tokens >= 5:
            cancel.set()

    victim = batch_chat(chat, PROMPTS[0], 32, on_text=cancel_after_five, should_abort=cancel.is_set)
    chats = [decoder.submit(victim)] + [decoder.submit(batch_chat(chat, p, 32)) for p in PROMPTS[1:3]]
    finished(*chats)
    assert victim.stop_reason == "cancelled" and victim.error is None
    assert 5 <= victim.completion_tokens < 32
    assert victim.reply and expected[0].startswith(victim.reply)  # the text so far, kept
    assert [c.reply for c in chats[1:]] == expected[1:]


def test_a_chat_cancelled_before_it_starts_ends_empty(chat, decoder):
    waiting = decoder.submit(batch_chat(chat, PROMPTS[1], 16, should_abort=lambda: True))
    finished(waiting)
    assert (waiting.stop_reason, waiting.reply, waiting.completion_tokens) == ("cancelled", "", 0)


def test_stop_strings_and_max_tokens_hold_per_chat(chat, decoder, alone):
    story = alone(PROMPTS[0], 32)
    stop = story.split()[3]  # a word well inside the reply
    short = alone(PROMPTS[3], 5)
    chats = [
        decoder.submit(batch_chat(chat, PROMPTS[0], 32, stop=[stop])),
        decoder.submit(batch_chat(chat, PROMPTS[3], 5)),
        decoder.submit(batch_chat(chat, PROMPTS[1], 24)),
    ]
    finished(*chats)
    stopped, limited, free = chats
    assert stopped.reply == story[: story.index(stop)] and stopped.stop_reason == "completed"
    assert (limited.reply, limited.completion_tokens, limited.stop_reason) == (short, 5, "length")
    assert free.reply == alone(PROMPTS[1], 24)


def test_a_conversation_reuses_its_cached_prefix(chat, decoder):
    first = decoder.submit(batch_chat(chat, PROMPTS[1], 16))
    finished(first)
    assert first.cached_tokens == 0
    again = decoder.submit(batch_chat(chat, PROMPTS[1], 16))
    finished(again)
    # All but the last prompt token come from the cache (that one is evaluated again, for fresh logits).
    assert again.cached_tokens == len(again.prompt_tokens) - 1
    assert again.reply == first.reply


def test_a_prompt_longer_than_the_context_ends_with_an_error(chat, decoder):
    too_long = BatchChat([chat.llm.token_bos()] * 1100, 8, GREEDY)
    finished(decoder.submit(too_long))
    assert too_long.stop_reason == "error" and "1100 tokens" in too_long.error and "1024" in too_long.error
    with pytest.raises(ValueError, match="at least one prompt token"):
        BatchChat([], 8, GREEDY)


def test_bad_sampling_settings_end_that_chat_only(chat, decoder, alone):
    bad = decoder.submit(batch_chat(chat, PROMPTS[1], 8, sampling={"temprature": 0.5}))
    good = decoder.submit(batch_chat(chat, PROMPTS[1], 8))
    finished(bad, good)
    assert bad.stop_reason == "error" and "temprature" in bad.error
    assert good.reply == alone(PROMPTS[1], 8)


def test_closing_cancels_what_runs_and_refuses_more(chat):
    decoder = BatchDecoder(chat.llm, 2, n_ctx=1024)
    streamed = []
    # max_tokens 0: until the model stops or the context is full, so it is most likely still running when closed.
    running = decoder.submit(batch_chat(chat, PROMPTS[0], 0, on_text=lambda text, _n: streamed.append(text)))
    decoder.close()
    assert running.done and running.stop_reason in ("cancelled", "completed", "length")
    assert "".join(streamed) == running.reply  # a cancelled chat keeps what it had shown
    with pytest.raises(RuntimeError, match="closed"):
        decoder.submit(batch_chat(chat, PROMPTS[1], 8))
