"""The module with CPAI_MODULE_LLAMA_PARALLEL=2 through llamachat_server: real HTTP, the real SDK, SmolLM2. Two
chats decode at once (a third waits in the queue), each keeps its own cancel and text, and greedy replies are the
ones the wrapper gives each chat alone. The batched engine itself is tested in tests/test_batch_decoder.py."""

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import requests
from llama_cpp import Llama

from json_schemas import SCHEMAS
from live_server import poll, running_server, server_status
from llama_chat import LlamaChat
from module_chat import LONG, cancel, follow, start_chat, status

CONTEXT_SIZE = 2048
GREEDY = {"temperature": "0", "max_tokens": "24"}
PROMPTS = ["What is the capital of France? Answer in one sentence.", "Tell me about Paris."]


@pytest.fixture(scope="module")
def base_url(smollm2):
    with running_server(smollm2, context_size=CONTEXT_SIZE, CPAI_MODULE_LLAMA_PARALLEL="2") as url:
        yield url


def test_two_chats_decode_at_once_and_a_third_waits(base_url):
    assert server_status(base_url)["statusData"]["parallelChats"] == 2
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


@pytest.fixture(scope="module")
def replies_alone(smollm2) -> dict[bool, list]:
    """The greedy reply the wrapper gives each prompt on its own: with the default system prompt, as text/chat sends
    it (False), and as sent (True), as the OpenAI API sends it."""
    chat = LlamaChat.from_file(smollm2, n_ctx=CONTEXT_SIZE, n_threads=1)
    try:
        return {
            as_sent: [
                chat.do_chat(p, as_sent=as_sent, temperature=0, max_tokens=24)["choices"][0]["message"]["content"]
                for p in PROMPTS
            ]
            for as_sent in (False, True)
        }
    finally:
        chat.close()


@pytest.fixture(scope="module")
def alone(replies_alone) -> list:
    return replies_alone[False]


def test_greedy_replies_decoded_together_are_the_ones_each_gets_alone(base_url, alone):
    ids = [start_chat(base_url, prompt=p, **GREEDY)["commandId"] for p in PROMPTS]
    finals = [follow(base_url, command_id) for command_id in ids]
    assert [f["reply"] for f in finals] == alone
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


def test_two_openai_streams_at_once_each_get_their_own_greedy_reply(base_url, replies_alone):
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
    assert [text for text, _ in results] == replies_alone[True]
    assert all(finish in ("stop", "length") for _, finish in results)


def test_structured_output_logprobs_and_logit_bias_hold_in_the_batch_decoder(base_url, replies_alone, smollm2):
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
    entries = greedy.choices[0].logprobs.content
    assert greedy.choices[0].message.content == replies_alone[True][0]
    assert len(entries) == greedy.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == replies_alone[True][0]
    vocab = Llama(model_path=str(smollm2), vocab_only=True, verbose=False)
    runner_up = entries[0].top_logprobs[1].token
    [token_id] = vocab.tokenize(runner_up.encode(), add_bos=False, special=False)
    forced = client.chat.completions.create(
        model="m", messages=messages, max_tokens=3, logit_bias={str(token_id): 100}, logprobs=True
    )
    assert [e.token for e in forced.choices[0].logprobs.content] == [runner_up] * 3
