"""Open WebUI and Home Assistant's Extended OpenAI Conversation, as docs/integrations.md sets them up: the requests
those programs send (read from their source: Open WebUI's backend/open_webui/routers/openai.py at 671f577,
jekalmin/extended_openai_conversation at 423799e), sent the way they send them, against a live server with the real
module on SmolLM2 and the flags the page gives. The programs themselves are not installed: what reaches our server
is their HTTP, which is what these tests reproduce."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import aiohttp
import httpx
import jsonschema
import openai
import pytest

from live_server import running_server

API_KEY = "integration-test-key"
DOCKER_HOST = "host.docker.internal"


@pytest.fixture(scope="module")
def docker_facing_server(smollm2):
    """The server as the page starts it for a bridged container: the Docker host name allowed and a key required
    (it listens on loopback here; the Host header is what a container's requests change)."""
    with running_server(smollm2, server_args=("--allow-host", DOCKER_HOST, "--api-key", API_KEY)) as url:
        yield url


def _sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


async def _open_webui(base_url: str, key: str, host: str | None) -> dict:
    """Open WebUI's requests to an OpenAI connection (OPENAI_API_BASE_URL=<base>/v1): the model list, a streamed chat
    as its chat page sends it, and a background task (the chat's title), non-streamed, with max_completion_tokens
    turned into max_tokens as it does for servers other than OpenAI's."""
    url = f"{base_url}/v1"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    if host:
        headers["Host"] = host
    seen: dict = {}
    async with aiohttp.ClientSession(trust_env=False) as session:  # Open WebUI's client is aiohttp too
        async with session.get(f"{url}/models", headers=headers) as r:
            seen["models"] = (r.status, await r.json())
        if seen["models"][0] != 200:
            return seen
        model = seen["models"][1]["data"][0]["id"]
        chat = {
            "stream": True,
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Name a planet."},
            ],
            "stream_options": {"include_usage": True},
        }
        async with session.request("POST", f"{url}/chat/completions", data=json.dumps(chat), headers=headers) as r:
            seen["chat"] = (r.status, r.headers.get("Content-Type", ""), await r.text())
        title = {
            "model": model,
            "messages": [{"role": "user", "content": "Give this chat a title of 3 to 5 words: 'Name a planet.'"}],
            "stream": False,
            "max_tokens": 1000,
        }
        async with session.request("POST", f"{url}/chat/completions", data=json.dumps(title), headers=headers) as r:
            seen["title"] = (r.status, await r.json())
    return seen


def test_open_webui_in_a_bridged_container_with_the_pages_flags(docker_facing_server):
    port = urlsplit(docker_facing_server).port
    seen = asyncio.run(_open_webui(docker_facing_server, API_KEY, f"{DOCKER_HOST}:{port}"))

    status, models = seen["models"]
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"]

    status, content_type, body = seen["chat"]
    assert status == 200 and content_type.startswith("text/event-stream")
    events = _sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert any(choice.get("finish_reason") in ("stop", "length") for chunk in chunks for choice in chunk["choices"])
    usage = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    assert len(usage) == 1 and usage[0]["prompt_tokens"] > 0
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert usage[0]["completion_tokens"] > 0 and isinstance(streamed, str)

    status, title = seen["title"]
    assert status == 200 and isinstance(title["choices"][0]["message"]["content"], str)
    assert title["choices"][0]["finish_reason"] in ("stop", "length") and title["usage"]["completion_tokens"] <= 1000


def test_open_webui_without_the_key_gets_an_error_it_can_show(docker_facing_server):
    port = urlsplit(docker_facing_server).port
    status, answer = asyncio.run(_open_webui(docker_facing_server, "wrong", f"{DOCKER_HOST}:{port}"))["models"]
    assert status == 401
    assert answer["error"]["message"]  # what Open WebUI shows: response['error']['message']


def test_open_webui_with_host_networking_and_no_key_needs_no_flag(smollm2_server):
    # Host networking: loopback, its own Host header; an empty key field still sends "Authorization: Bearer ".
    seen = asyncio.run(_open_webui(smollm2_server, "", None))
    assert seen["models"][0] == 200 and seen["chat"][0] == 200 and seen["title"][0] == 200


# Home Assistant's Extended OpenAI Conversation: its default function (execute_services) has this shape; the
# descriptions here are ours.
EXECUTE_SERVICES = {
    "name": "execute_services",
    "description": "Runs Home Assistant services on the devices listed in the prompt.",
    "parameters": {
        "type": "object",
        "properties": {
            "list": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "domain": {"type": "string", "description": "The service's domain, e.g. light"},
                        "service": {"type": "string", "description": "The service, e.g. turn_on"},
                        "service_data": {
                            "type": "object",
                            "description": "What the service acts on",
                            "properties": {"entity_id": {"type": "string", "description": "An entity_id above"}},
                            "required": ["entity_id"],
                        },
                    },
                    "required": ["domain", "service", "service_data"],
                },
            }
        },
    },
}
SYSTEM_PROMPT = """You manage a smart home with Home Assistant. Answer in one short sentence.

Current time: 2026-12-02 18:30

Devices:
```csv
entity_id,name,state,aliases
light.kitchen,Kitchen light,off,
light.living_room,Living room lamp,on,lamp
switch.coffee_maker,Coffee maker,off,
```

Use execute_services only to change a device's state, never to read it."""


async def _home_assistant_turn(client: openai.AsyncOpenAI, messages: list, tool_choice: str):
    """One request as the integration sends it for a sentence (its defaults: top_p 1, temperature 0.5, 150 tokens)."""
    return await client.chat.completions.create(
        model="llamachat",
        messages=messages,
        top_p=1,
        temperature=0.5,
        user="01JDCONVERSATIONID0000000000",
        max_tokens=150,
        tools=[{"type": "function", "function": EXECUTE_SERVICES}],
        tool_choice=tool_choice,
    )


async def _home_assistant(base_url: str) -> tuple:
    async with httpx.AsyncClient() as http_client:  # Home Assistant hands the openai package its own httpx client
        client = openai.AsyncOpenAI(
            api_key=API_KEY, base_url=f"{base_url}/v1", organization=None, http_client=http_client
        )
        models = [model.id async for model in await client.models.list(timeout=10)]  # the set-up's check
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "Turn on the kitchen light."},
        ]
        first = await _home_assistant_turn(client, messages, "auto")
        message = first.choices[0].message
        if message.tool_calls:
            calls = message.model_dump(exclude_none=True)
        else:  # the model answered in words: the round trip below still needs a call, shaped as the model's would be
            arguments = {
                "list": [{"domain": "light", "service": "turn_on", "service_data": {"entity_id": "light.kitchen"}}]
            }
            function = {"name": "execute_services", "arguments": json.dumps(arguments)}
            calls = {"role": "assistant", "tool_calls": [{"id": "call_0", "type": "function", "function": function}]}
        # As the integration continues: the assistant's calls, a tool message per call, tool_choice "none" (its
        # default of one function call per sentence is then used up).
        results = [
            {
                "tool_call_id": call["id"],
                "role": "tool",
                "name": call["function"]["name"],
                "content": "{'success': True}",
            }
            for call in calls["tool_calls"]
        ]
        second = await _home_assistant_turn(client, [*messages, calls, *results], "none")
        return models, first, second


def test_home_assistant_extended_openai_conversation_with_a_tool_round_trip(docker_facing_server):
    models, first, second = asyncio.run(_home_assistant(docker_facing_server))
    assert models
    choice = first.choices[0]
    assert choice.finish_reason in ("stop", "tool_calls", "length")
    for call in choice.message.tool_calls or []:
        assert call.type == "function" and call.function.name == "execute_services" and call.id
        jsonschema.validate(json.loads(call.function.arguments), EXECUTE_SERVICES["parameters"])
    reply = second.choices[0]
    assert reply.finish_reason in ("stop", "length") and not reply.message.tool_calls
    assert isinstance(reply.message.content, str)
