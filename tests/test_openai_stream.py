"""The OpenAI stream through the reply channel (llamachat/reply_channel.py → llamachat_server/reply_feed.py): the real
`openai` package against a real server with the real module on SmolLM2, with the channel and with --poll-replies (the
server follows chats by get_command_status polls alone, as it would a module that has no channel). What a stream
carries is checked against the module's own answer for the same chat; no test assumes a speed."""

import openai
import psutil
import pytest
import requests

from live_server import poll, running_server, server_log_path, server_status
from llama_chat_adapter import REPLY_CHANNEL_NOTICE
from llamachat_server.openai_api import COMMAND_ID_HEADER
from llamachat_server.settings import REPLY_CHANNEL_VARIABLE

STORY = "Write a very long story about a dragon who learns to bake bread. Describe every step in detail."
TOKENS = 160
# Tokens per content chunk a stream may average. The module appends the reply a token at a time (a piece now and then
# holds none, or two: a character split over tokens, text held back while it may start a stop string), and the channel
# carries each piece as a chunk of its own; polls five times a second batch ~20 tokens a chunk on a machine making 100
# tokens/s (issue 23), and still 2 at 10 tokens/s.
MAX_TOKENS_PER_CHUNK = 2


def module_final(base_url, command_id):
    def finished():
        answer = requests.post(
            f"{base_url}/v1/LlamaChat/get_command_status", data={"commandId": command_id}, timeout=40
        ).json()
        return answer if answer["commandStatus"] == "completed" else None

    return poll(finished, 120, f"the module's chat {command_id} to end", interval=0.02)


def stream_story(client, **options):
    """(the chunks of a streamed story, its chat's commandId)."""
    raw = client.chat.completions.with_raw_response.create(
        model="m",
        messages=[{"role": "user", "content": STORY}],
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **options,
    )
    return list(raw.parse()), raw.headers[COMMAND_ID_HEADER]


def contents(chunks, index=0):
    return [
        c.choices[0].delta.content
        for c in chunks
        if c.choices and c.choices[0].index == index and c.choices[0].delta.content
    ]


def check_stream(base_url, chunks, command_id):
    """The stream's text and usage are the module's reply and counts; returns its content chunks."""
    final = module_final(base_url, command_id)
    pieces = contents(chunks)
    assert "".join(pieces) == final["reply"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == final["completion_tokens"]
    assert chunks[-1].usage.prompt_tokens == final["prompt_tokens"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [{"completed": "stop", "length": "length"}[final["stop_reason"]]]
    return pieces, final


@pytest.fixture(scope="module")
def polling_server(smollm2):
    # A stray variable (here from --env; it could come from the server's own environment) must not reach the module:
    # fd 1 is its stdout, a pipe too.
    with running_server(smollm2, server_args=("--poll-replies",), **{REPLY_CHANNEL_VARIABLE: "1"}) as url:
        yield url


def module_environment(base_url):
    return psutil.Process(server_status(base_url)["pid"]).environ()


def client_of(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="any key", max_retries=0, timeout=120)


def test_a_long_stream_sends_a_chunk_for_about_every_token(smollm2_server, openai_client):
    chunks, command_id = stream_story(openai_client)
    pieces, final = check_stream(smollm2_server, chunks, command_id)
    assert final["completion_tokens"] >= 32  # a reply long enough for polls to have batched it
    assert final["completion_tokens"] <= MAX_TOKENS_PER_CHUNK * len(pieces)
    assert REPLY_CHANNEL_NOTICE in server_log_path(smollm2_server).read_text()
    assert int(module_environment(smollm2_server)[REPLY_CHANNEL_VARIABLE]) > 2  # a pipe of its own


def test_without_the_channel_the_server_polls_and_streams_the_same_reply(polling_server):
    chunks, command_id = stream_story(client_of(polling_server))
    check_stream(polling_server, chunks, command_id)
    assert REPLY_CHANNEL_NOTICE not in server_log_path(polling_server).read_text()
    assert REPLY_CHANNEL_VARIABLE not in module_environment(polling_server)


def test_a_chat_that_asks_for_logprobs_is_polled_and_keeps_them(smollm2_server, openai_client):
    chunks, command_id = stream_story(openai_client, logprobs=True)
    _, final = check_stream(smollm2_server, chunks, command_id)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == len(final["logprobs"]) == final["completion_tokens"]


def test_parallel_chats_stream_each_choice_a_chunk_for_about_every_token(smollm2):
    """n = 2 with parallel decoding: the batch decoder's thread writes both chats' pieces to the channel."""
    with running_server(smollm2, CPAI_MODULE_LLAMA_PARALLEL="2") as url:
        chunks, command_id = stream_story(client_of(url), n=2)
        final = module_final(url, command_id)
        assert "".join(contents(chunks, 0)) == final["reply"]
        used = chunks[-1].usage.completion_tokens
        assert used <= MAX_TOKENS_PER_CHUNK * (len(contents(chunks, 0)) + len(contents(chunks, 1)))
        assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1]
