"""Restored KV states on the real SmolLM2: a conversation resumed from the RAM tier, from the disk tier and after a
restart gets exactly the greedy reply it gets when nothing displaced it, and a damaged entry is evaluated instead.

Why the references are what they are: llama.cpp's kernels are not batch-invariant, so a prefix evaluated in one
batch and the same prefix evaluated as a prompt plus a reply generated token by token differ in their last bits,
and a tiny model's greedy reply can flip at a near-tie. Restoring copies the KV bytes exactly, so the exact
comparison is with a run that evaluated the same tokens in the same batches: the same conversation left alone in
the live context (what the module did before this cache, for the same user continuing), or, for arbitrary prefix
lengths, the prefix evaluated first and the rest after it. A damaged entry must give the cold reply: the whole
prompt evaluated at once, as a fresh model does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest

from live_server import poll, running_server, server_status
from llama_chat import DEFAULT_SYSTEM_PROMPT, LlamaChat
from llamachat.batch_decoder import BatchChat, BatchDecoder
from llamachat.conversation_cache import BLOCK, ConversationCache
from llamachat.kv_state import fingerprint
from module_harness import load_adapter, run_chat

CONTEXT_SIZE = 2048
MAX_TOKENS = 24
GREEDY = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
USERS = {
    "a": ["Tell me about the planet Mars.", "How long is a day there?", "Could people live there?", "Why red?"],
    "b": ["What is bread made of?", "How long does dough rise?", "What does yeast do?", "Which flour is best?"],
}
LONG_PROMPT = "Summarise this conversation about the sea, the ships on it and the ports they sail between."
HISTORY = [
    {"role": "user", "content": "Tell me about the sea and its ships, in detail, with the names of ports."},
    {
        "role": "assistant",
        "content": "The sea carries ships between ports such as Rotterdam, Singapore and Shanghai. " * 10,
    },
    {"role": "user", "content": "And which ships carry the most containers today, and how large are they?"},
    {"role": "assistant", "content": "The largest container ships carry more than twenty thousand boxes each. " * 9},
]


def reply_of(response) -> str:
    return response["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def chat(smollm2):
    chat = LlamaChat.from_file(smollm2, n_ctx=CONTEXT_SIZE, n_threads=1)
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def alone(chat) -> dict[str, list[str]]:
    """Each user's turns with nobody in between: every turn continues from the live context of the one before."""
    replies = {}
    for user, prompts in USERS.items():
        chat.llm.reset()
        history, replies[user] = [], []
        for prompt in prompts:
            reply = reply_of(chat.do_chat(prompt, None, history, max_tokens=MAX_TOKENS, **GREEDY))
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            replies[user].append(reply)
    return replies


def history_of(user: str, replies: list[str], turns: int) -> str:
    messages = []
    for prompt, reply in zip(USERS[user][:turns], replies[:turns]):
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return json.dumps(messages)


def test_a_restored_prefix_continues_exactly_as_that_prefix_evaluated_first(chat, tmp_path):
    tokens = chat.tokenize_messages(chat.messages(LONG_PROMPT, None, HISTORY))
    assert len(tokens) > 300
    valid_for = fingerprint(chat.model_path, chat.llm, chat.n_ctx, 1)
    for k in (BLOCK + 8, 257, len(tokens) - 1):  # inside blocks and on none of their edges
        chat.llm.reset()
        chat.llm.eval(tokens[:k])
        saved = chat.capture_state()
        assert saved[0] == tokens[:k]
        expected = reply_of(chat.do_chat(LONG_PROMPT, None, HISTORY, max_tokens=MAX_TOKENS, **GREEDY))

        cache = ConversationCache(valid_for, 10**8, 10**9, tmp_path / str(k))
        cache.save(*saved)
        assert cache.flush(60)
        restarted = ConversationCache(valid_for, 10**8, 10**9, tmp_path / str(k))
        for source, tiers in (("ram", cache), ("disk", restarted)):
            chat.do_chat("Something else entirely.", max_tokens=4, **GREEDY)  # another chat takes the context
            hit = tiers.find(tokens, 0)
            assert (hit.source, hit.prefix) == (source, k)
            assert chat.restore_state(hit.tokens, hit.state)
            assert chat.cached_prefix(tokens) == k
            assert reply_of(chat.do_chat(LONG_PROMPT, None, HISTORY, max_tokens=MAX_TOKENS, **GREEDY)) == expected
        cache.close()
        restarted.close()


def adapter_for(smollm2, cache_dir: Path, ram_mb: str = "64"):
    monkeypatch = pytest.MonkeyPatch()
    try:
        return load_adapter(
            monkeypatch,
            smollm2,
            CPAI_MODULE_LLAMA_CONTEXT_SIZE=str(CONTEXT_SIZE),
            CPAI_MODULE_LLAMA_CACHE_RAM_MB=ram_mb,
            CPAI_MODULE_LLAMA_CACHE_DISK_GB="1",
            CPAI_MODULE_LLAMA_CACHE_DIR=str(cache_dir),
        )
    finally:
        monkeypatch.undo()  # initialise() has read the settings


def user_turn(adapter, user: str, replies: list[str], turn: int) -> dict:
    return run_chat(
        adapter,
        prompt=USERS[user][turn],
        messages=history_of(user, replies, turn),
        max_tokens=MAX_TOKENS,
        temperature=0,
    )


def test_users_taking_turns_resume_from_ram_then_from_disk_after_a_restart(smollm2, alone, tmp_path):
    cache_dir = tmp_path / "conversations"
    adapter = adapter_for(smollm2, cache_dir)
    try:
        previous = {}
        for turn in range(3):
            for user in USERS:
                result = user_turn(adapter, user, alone[user], turn)
                assert result["reply"] == alone[user][turn], (user, turn)
                if turn == 0:  # the second user's first turn shares the system prompt with the first's, in context
                    assert result["prefix_source"] == ("none" if user == "a" else "context")
                else:  # the other user's turn came in between: the earlier turns come back from RAM
                    assert result["prefix_source"] == "ram", result
                    # Only the new turn is evaluated: the earlier turns and most of the reply come back.
                    assert result["restore_ms"] is not None
                    assert result["cached_tokens"] >= previous[user]["prompt_tokens"]
                    assert result["prompt_tokens"] - result["cached_tokens"] < 40
                previous[user] = result
        stats = adapter.module_status()["conversationCache"]
        assert stats["ramEntries"] == 2
        assert stats["diskEntries"] == 2  # one entry per conversation, not per turn
        assert stats["prefixSources"] == {"context": 1, "ram": 4, "disk": 0, "none": 1}
        assert stats["hitRate"] == round(4 / 6, 3)
    finally:
        adapter.cleanup()  # writes what is queued for the disk

    restarted = adapter_for(smollm2, cache_dir)
    try:
        for user in USERS:
            result = user_turn(restarted, user, alone[user], 3)
            assert result["prefix_source"] == "disk", result
            assert result["prompt_tokens"] - result["cached_tokens"] < 40, result
            assert result["reply"] == alone[user][3], user
    finally:
        restarted.cleanup()


def test_a_damaged_entry_is_dropped_and_the_chat_evaluated_cold(smollm2, chat, alone, tmp_path):
    cache_dir = tmp_path / "conversations"
    adapter = adapter_for(smollm2, cache_dir)
    try:
        first = user_turn(adapter, "a", alone["a"], 0)
        assert first["reply"] == alone["a"][0]
    finally:
        adapter.cleanup()
    (kv_file,) = [p for p in cache_dir.rglob("*.val")]
    data = bytearray(kv_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    kv_file.write_bytes(bytes(data))

    chat.llm.reset()  # cold: the whole prompt evaluated at once, as the restarted module must do
    cold = reply_of(
        chat.do_chat(USERS["a"][1], None, json.loads(history_of("a", alone["a"], 1)), max_tokens=MAX_TOKENS, **GREEDY)
    )
    restarted = adapter_for(smollm2, cache_dir)
    try:
        result = user_turn(restarted, "a", alone["a"], 1)
        assert result["prefix_source"] == "none"
        assert result["cached_tokens"] == 0
        assert result["reply"] == cold
        assert restarted.module_status()["conversationCache"]["droppedCorrupt"] == 1
    finally:
        restarted.cleanup()
    assert os.stat(cache_dir).st_mode & 0o777 == 0o700


def test_the_batch_decoder_resumes_a_displaced_conversation_from_the_cache(chat):
    sampling = {**GREEDY, "stop": chat.template.stops}

    def turn(decoder: BatchDecoder, prompt: str, history: list | None = None) -> BatchChat:
        tokens = chat.tokenize_messages(chat.messages(prompt, None, history))
        done = decoder.submit(BatchChat(tokens, MAX_TOKENS, sampling))
        assert done.wait(120)
        assert done.error is None
        return done

    a1, a2 = USERS["a"][:2]
    # The reference: user a's two turns one after the other in one sequence, nothing in between.
    reference = BatchDecoder(chat.llm, 2, n_ctx=CONTEXT_SIZE, prompt_chunk=64)
    try:
        first = turn(reference, a1).reply
        history = [{"role": "user", "content": a1}, {"role": "assistant", "content": first}]
        second = turn(reference, a2, history)
        assert second.prefix_source == "context"
    finally:
        reference.close()

    valid_for = fingerprint(chat.model_path, chat.llm, CONTEXT_SIZE, 2)
    cache = ConversationCache(valid_for, 10**8, 0, None)
    decoder = BatchDecoder(chat.llm, 2, n_ctx=CONTEXT_SIZE, prompt_chunk=64, cache=cache)
    try:
        assert turn(decoder, a1).reply == first
        # Two other users take both sequences (the first takes a's: it shares the system prompt).
        turn(decoder, USERS["b"][0])
        turn(decoder, "Name three rivers.")
        resumed = turn(decoder, a2, history)
        assert resumed.prefix_source == "ram"
        assert resumed.restore_ms is not None
        assert resumed.cached_tokens == second.cached_tokens
        assert resumed.reply == second.reply
    finally:
        decoder.close()


def test_openai_clients_taking_turns_resume_from_the_cache(smollm2, alone):
    with running_server(smollm2, context_size=CONTEXT_SIZE) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="any", max_retries=0)
        for turn in range(2):
            for user in USERS:
                # OpenAI clients' messages go to the template as sent: the system prompt `alone` had is sent too.
                messages = [
                    {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                    *json.loads(history_of(user, alone[user], turn)),
                    {"role": "user", "content": USERS[user][turn]},
                ]
                answer = client.chat.completions.create(
                    model="m", messages=messages, temperature=0, max_tokens=MAX_TOKENS
                )
                assert answer.choices[0].message.content == alone[user][turn], (user, turn)
        chats = 2 * len(USERS)

        def counted_all() -> dict | None:  # the module reports its status to the server every few seconds
            cache = server_status(base_url)["statusData"]["conversationCache"]
            return cache if sum(cache["prefixSources"].values()) == chats else None

        cache = poll(counted_all, 60, "the module's status to count every chat")
    assert cache["prefixSources"]["ram"] == 2, json.dumps(cache)  # each user's second turn
