"""The module with CPAI_MODULE_LLAMA_PARALLEL=2 through llamachat_server: real HTTP, the real SDK, SmolLM2. Two
chats decode at once (a third waits in the queue), each keeps its own cancel and text, and each greedy reply is a
greedy reply to its own prompt as raw llama-cpp-python judges it (tests/raw_reference.py: up to the near-ties where
a chat decoded beside another may take the other branch). The batched engine itself is tested in
tests/test_batch_decoder.py."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import requests
from llama_cpp import Llama

from json_schemas import SCHEMAS
from live_server import poll, reported_status_data, running_server, server_status
from llama_chat import conversation
from module_chat import LONG, cancel, follow, start_chat, status

CONTEXT_SIZE = 2048
GREEDY = {"temperature": "0", "max_tokens": "24"}
PROMPTS = ["Explain how a bicycle works, step by step.", "List five fruits, one per line, each with its colour."]


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(smollm2, context_size=CONTEXT_SIZE, CPAI_MODULE_LLAMA_PARALLEL="2") as url:
        yield url


def test_two_chats_decode_at_once_and_a_third_waits(base_url):
    status_data = reported_status_data(base_url)
    assert status_data["parallelChats"] == 2
    first, second = (start_chat(base_url, **LONG)["commandId"] for _ in range(2))
    third = start_chat(base_url, prompt=PROMPTS[0], max_tokens="8")
    try:
        assert third["commandStatus"] == "queued", third
        assert third["queue_position"] == 1, third

        # Both replies grow while both run: neither waits for the other.
        def both_generating():
            answers = [status(base_url, command_id) for command_id in (first, second)]
            assert all(a["commandStatus"] == "running" for a in answers), answers  # LONG cannot end this soon
            return all(a["completion_tokens"] > 0 and a["reply"] for a in answers) and answers

        poll(both_generating, 60, "both chats to be generating")
        poll(lambda: server_status(base_url)["statusData"]["chatsRunning"] == 2, 10, "the status to count both")

        # Stopping one keeps its text and leaves the other running; the waiting chat takes the free place.
        stopped = cancel(base_url, first)
        assert stopped["success"] is True
        assert stopped["commandStatus"] == "cancelled"
        final = follow(base_url, first)
        assert final["stop_reason"] == "cancelled"
        assert final["reply"].strip()
        assert final["completion_tokens"] > 0
        assert status(base_url, second)["commandStatus"] == "running"
        waited = follow(base_url, third["commandId"])
        assert waited["success"] is True
        assert waited["stop_reason"] in ("completed", "length")
        assert waited["reply"]
    finally:
        for command_id in (first, second, third["commandId"]):
            cancel(base_url, command_id)
    assert follow(base_url, second)["stop_reason"] == "cancelled"


def assert_own_greedy_replies(raw, replies: list[tuple[str, bool]], as_sent: bool = False) -> None:
    """replies[i] = (text, ended by the model) for PROMPTS[i]: each a greedy reply to its own prompt, not another's.
    as_sent: the prompt went without the module's default system prompt, as the OpenAI API sends it."""
    tokens = [raw.chat_tokens(conversation(p, None, None, system_role=True, as_sent=as_sent)) for p in PROMPTS]
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
        assert final["success"] is True
        assert final["completion_tokens"] <= 24
        assert final["tokens_per_second"] > 0
        assert final["time_to_first_token_ms"] > 0
        assert final["prompt_tokens"] > 0


def test_bad_input_is_still_refused_before_it_is_queued(base_url):
    answer = requests.post(f"{base_url}/v1/text/chat", data={"prompt": " "}, timeout=30).json()
    assert answer["success"] is False
    assert "prompt is missing or blank" in answer["error"]


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
    assert_own_greedy_replies(raw_smollm2, [(text, finish == "stop") for text, finish in results], as_sent=True)


def test_structured_output_logprobs_and_logit_bias_hold_in_the_batch_decoder(base_url, raw_smollm2, smollm2):
    """The batched path honours a schema's grammar, reports each token's logprobs and applies logit_bias, with two
    chats decoded at once."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="any", max_retries=0)
    names = ["refs", "order_lines"]

    def structured(name: str):
        answer = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": f"JSON for {name}."}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}},
            max_tokens=300,
        )
        return json.loads(answer.choices[0].message.content)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, reply in zip(names, pool.map(structured, names)):
            jsonschema.validate(reply, SCHEMAS[name])
    messages = [{"role": "user", "content": PROMPTS[0]}]
    greedy = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=24, logprobs=True, top_logprobs=3
    )
    text, entries = greedy.choices[0].message.content, greedy.choices[0].logprobs.content
    ended = greedy.choices[0].finish_reason == "stop"
    assert raw_smollm2.greedy_departure(raw_smollm2.chat_tokens(messages), text, ended=ended) is None
    assert len(entries) == greedy.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text  # the logprobs are the reply's own tokens
    vocab = Llama(model_path=str(smollm2), vocab_only=True, verbose=False)
    runner_up = entries[0].top_logprobs[1].token
    [token_id] = vocab.tokenize(runner_up.encode(), add_bos=False, special=False)
    forced = client.chat.completions.create(
        model="m", messages=messages, max_tokens=3, logit_bias={str(token_id): 100}, logprobs=True
    )
    assert [e.token for e in forced.choices[0].logprobs.content] == [runner_up] * 3
