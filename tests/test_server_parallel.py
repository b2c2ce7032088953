"""The module with CPAI_MODULE_LLAMA_PARALLEL=2 through llamachat_server: real HTTP, the real SDK, SmolLM2. Two
chats decode at once (a third waits in the queue), each keeps its own cancel and text, and each greedy reply is a
greedy reply to its own prompt as raw llama-cpp-python judges it (tests/raw_reference.py: up to the near-ties where
a chat decoded beside another may take the other branch). The batched engine itself is tested in
tests/test_batch_decoder.py."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from live_server import poll, running_server, server_status
from llama_chat import conversation
from test_server_queue import LONG, cancel, follow, start_chat, status

CONTEXT_SIZE = 2048
GREEDY = {"temperature": "0", "max_tokens": "24"}
PROMPTS = ["Explain how a bicycle works, step by step.", "List five fruits, one per line, each with its colour."]


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(smollm2, context_size=CONTEXT_SIZE, CPAI_MODULE_LLAMA_PARALLEL="2") as url:
        yield url


def test_two_chats_decode_at_once_and_a_third_waits(base_url):
    assert server_status(base_url)["statusData"]["parallelChats"] == 2
    first, second = (start_chat(base_url, **LONG)["commandId"] for _ in range(2))
    third = start_chat(base_url, prompt=PROMPTS[0], max_tokens="8")
    try:
        assert third["commandStatus"] == "queued" and third["queue_position"] == 1, third

        # Both replies grow while both run: neither waits for the other.
        def both_generating():
            answers = [status(base_url, command_id) for command_id in (first, second)]
            assert all(a["commandStatus"] == "running" for a in answers), answers  # LONG cannot end this soon
            return all(a["completion_tokens"] > 0 and a["reply"] for a in answers) and answers

        poll(both_generating, 60, "both chats to be generating")
        poll(lambda: server_status(base_url)["statusData"]["chatsRunning"] == 2, 10, "the status to count both")

        # Stopping one keeps its text and leaves the other running; the waiting chat takes the free place.
        stopped = cancel(base_url, first)
        assert stopped["success"] is True and stopped["commandStatus"] == "cancelled"
        final = follow(base_url, first)
        assert final["stop_reason"] == "cancelled" and final["reply"].strip() and final["completion_tokens"] > 0
        assert status(base_url, second)["commandStatus"] == "running"
        waited = follow(base_url, third["commandId"])
        assert waited["success"] is True and waited["stop_reason"] in ("completed", "length") and waited["reply"]
    finally:
        for command_id in (first, second, third["commandId"]):
            cancel(base_url, command_id)
    assert follow(base_url, second)["stop_reason"] == "cancelled"


def assert_own_greedy_replies(raw, replies: list[tuple[str, bool]]) -> None:
    """replies[i] = (text, ended by the model) for PROMPTS[i]: each a greedy reply to its own prompt, not another's."""
    tokens = [raw.chat_tokens(conversation(p, None, None, system_role=True)) for p in PROMPTS]
    for i, (text, ended) in enumerate(replies):
        why = raw.greedy_departure(tokens[i], text, ended=ended)
        assert why is None, f"the reply to {PROMPTS[i]!r} is not a greedy reply to it: {why}"
        other = tokens[1 - i]
        assert raw.greedy_departure(other, text, ended=ended), "a reply that passes for the other prompt's"


def test_greedy_replies_decoded_together_are_each_their_own(base_url, raw_smollm2):
    ids = [start_chat(base_url, prompt=p, **GREEDY)["commandId"] for p in PROMPTS]
    finals = [follow(base_url, command_id) for command_id in ids]
    assert_own_greedy_replies(raw_smollm2, [(f["reply"], f["stop_reason"] == "completed") for f in finals])
    for final in finals:
        assert final["success"] is True and final["completion_tokens"] <= 24 and final["tokens_per_second"] > 0
        assert final["time_to_first_token_ms"] > 0 and final["prompt_tokens"] > 0


def test_bad_input_is_still_refused_before_it_is_queued(base_url):
    answer = requests.post(f"{base_url}/v1/text/chat", data={"prompt": " "}, timeout=30).json()
    assert answer["success"] is False and "prompt is missing or blank" in answer["error"]


def test_two_openai_streams_at_once_each_get_their_own_greedy_reply(base_url, raw_smollm2):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="any", max_retries=0)

    def stream(prompt: str) -> tuple:
        pieces = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=24, stream=True
        )
        text, finish = "", None
        for piece in pieces:
            if piece.choices:
                text += piece.choices[0].delta.content or ""
                finish = piece.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        results = list(pool.map(stream, PROMPTS))
    assert all(finish in ("stop", "length") for _, finish in results)
    assert_own_greedy_replies(raw_smollm2, [(text, finish == "stop") for text, finish in results])
