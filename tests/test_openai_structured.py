"""Structured output, logprobs and logit_bias on our /v1/chat/completions, driven by the real `openai` package and
`langchain-openai` against a real server with the real module and SmolLM2. The tiny model is never judged: every
structured reply must validate (jsonschema) against its schema, whatever it says; logprobs are compared token for
token with raw llama-cpp-python's for the same greedy reply in the same run; a bias of +100 must make its token the
only one sampled."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from llama_cpp import Llama
from pydantic import BaseModel, Field

from json_schemas import SCHEMAS
from llama_chat import plain_llama
from llamachat.model_file import SMALL_MODEL_FILENAME
from module_chat import follow, start_chat

MODEL = SMALL_MODEL_FILENAME
ROOM = 300  # tokens: far more than any of the bounded schemas' replies can take


def structured(openai_client, name: str, schema: dict, **fields):
    return openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Reply with JSON describing a {name.replace('_', ' ')}."}],
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
        max_tokens=ROOM,
        **fields,
    )


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_structured_reply_validates_against_its_schema(openai_client, name):
    answer = structured(openai_client, name, SCHEMAS[name])
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMAS[name])


def test_a_streamed_structured_reply_validates_too(openai_client):
    schema = SCHEMAS["order_lines"]
    chunks = list(structured(openai_client, "order", schema, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_is_any_object_and_llama_cpp_pythons_schema_form_is_honoured(openai_client):
    messages = [{"role": "user", "content": "Describe a cat as JSON."}]
    answer = openai_client.chat.completions.create(
        model=MODEL, messages=messages, response_format={"type": "json_object"}, max_tokens=ROOM, temperature=0
    )
    if answer.choices[0].finish_reason == "stop":  # an object's strings are unbounded: a reply may run to max_tokens
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    schema = SCHEMAS["person"]
    answer = openai_client.chat.completions.create(
        model=MODEL, messages=messages, response_format={"type": "json_object", "schema": schema}, max_tokens=ROOM
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


@pytest.mark.parametrize(
    "schema, says",
    [
        ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}}}, "uses 'multipleOf'"),
        ({"type": "number", "exclusiveMinimum": 0}, "inclusive whole numbers"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "teapot"}, "Unrecognized schema"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_problem(openai_client, schema, says):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            structured(openai_client, "thing", schema, stream=stream)
        assert says in caught.value.message
        assert caught.value.code == "invalid_json_schema"
        assert caught.value.param == "response_format"


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)
    toys: list[Annotated[str, Field(max_length=12)]] = Field(max_length=3)


def test_the_openai_package_parses_a_pydantic_model(openai_client):
    completion = openai_client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a pet."}],
        response_format=Pet,
        max_tokens=ROOM,
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert 0 <= pet.age <= 30


def test_langchain_with_structured_output_returns_the_model(smollm2_server):
    chat = ChatOpenAI(base_url=f"{smollm2_server}/v1", api_key="any key", model=MODEL, max_retries=0, max_tokens=ROOM)
    pet = chat.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
    assert isinstance(pet, Pet)
    assert pet.species in ("cat", "dog", "bird")


def test_the_native_api_takes_a_json_schema(smollm2_server):
    schema = SCHEMAS["refs"]
    started = start_chat(
        smollm2_server, prompt="Two points, as JSON.", json_schema=json.dumps(schema), max_tokens=str(ROOM)
    )
    done = follow(smollm2_server, started["commandId"])
    assert done["stop_reason"] == "completed"
    jsonschema.validate(json.loads(done["reply"]), schema)


SAY_HI = [{"role": "user", "content": "Say hello to the world in a long sentence."}]


def test_logprobs_are_raw_llama_cpp_pythons_token_for_token(openai_client, smollm2):
    answer = openai_client.chat.completions.create(
        model=MODEL, messages=SAY_HI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    ours = answer.choices[0].logprobs.content
    raw = plain_llama(smollm2, 2048, 1, logits_all=True)
    expected = raw.create_chat_completion(messages=SAY_HI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)[
        "choices"
    ][0]["logprobs"]["content"]
    raw.close()
    assert [t.token for t in ours] == [t["token"] for t in expected]
    assert len(ours) == answer.usage.completion_tokens
    for mine, theirs in zip(ours, expected):
        assert mine.logprob == pytest.approx(theirs["logprob"], abs=0.02)
        top = {alternative["token"]: alternative["logprob"] for alternative in theirs["top_logprobs"]}
        assert len(mine.top_logprobs) == 5
        assert mine.top_logprobs[0].logprob >= mine.top_logprobs[-1].logprob
        for alternative in mine.top_logprobs:
            if alternative.token in top:  # (llama-cpp-python keys them by text, so two tokens of one text merge)
                assert alternative.logprob == pytest.approx(top[alternative.token], abs=0.02)
        assert bytes(mine.bytes).decode("utf-8", errors="ignore") == mine.token


def test_streamed_logprobs_come_with_their_text(openai_client):
    chunks = list(
        openai_client.chat.completions.create(
            model=MODEL,
            messages=SAY_HI,
            max_tokens=16,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    entries = [entry for c in with_text for entry in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in entries)
    text = "".join(c.choices[0].delta.content for c in with_text)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text


@pytest.fixture(scope="module")
def vocab(smollm2):
    """Raw llama-cpp-python's tokenizer of the same model, for token ids."""
    return Llama(model_path=str(smollm2), vocab_only=True, verbose=False)


def test_logit_bias_plus_100_makes_its_token_the_only_one_and_minus_100_bans_it(openai_client, vocab):
    first = openai_client.chat.completions.create(
        model=MODEL, messages=SAY_HI, max_tokens=1, temperature=0, logprobs=True, top_logprobs=2
    )
    greedy, runner_up = first.choices[0].logprobs.content[0], first.choices[0].logprobs.content[0].top_logprobs[1]
    token_id = _token_id(vocab, runner_up.token)
    forced = openai_client.chat.completions.create(
        model=MODEL, messages=SAY_HI, max_tokens=4, logit_bias={str(token_id): 100}, logprobs=True
    )
    assert [e.token for e in forced.choices[0].logprobs.content] == [runner_up.token] * 4
    banned = openai_client.chat.completions.create(
        model=MODEL,
        messages=SAY_HI,
        max_tokens=1,
        temperature=0,
        logit_bias={str(_token_id(vocab, greedy.token)): -100},
        logprobs=True,
    )
    assert banned.choices[0].logprobs.content[0].token != greedy.token


def _token_id(vocab: Llama, text: str) -> int:
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_presence_and_frequency_penalties_are_taken(openai_client):
    answer = openai_client.chat.completions.create(
        model=MODEL, messages=SAY_HI, max_tokens=4, presence_penalty=1.5, frequency_penalty=-1.5
    )
    assert answer.usage.completion_tokens > 0
