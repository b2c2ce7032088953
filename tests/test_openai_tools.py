"""Function calling on our /v1/chat/completions, driven by the real `openai` package and `langchain-openai` against a
real server with the real module and SmolLM2. Which function the tiny model calls, or whether it calls one under
tool_choice auto, is not judged: every call must name a function it may call and its arguments must validate
(jsonschema) against that function's parameters; streamed calls must arrive as OpenAI sends them; a call and its
result must go back into the conversation for the next turn."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI

from llamachat.model_file import SMALL_MODEL_FILENAME

MODEL = SMALL_MODEL_FILENAME
ROOM = 200  # tokens: more than any call with these bounded arguments takes
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {
                "zone": {"enum": ["UTC", "CET", "PST"]},
                "hours_ahead": {"type": "integer", "minimum": 0, "maximum": 24},
            },
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it in UTC?"}]


def assert_valid_calls(calls, allowed=PARAMETERS) -> None:
    assert calls
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


def ask(openai_client, **fields):
    return openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=ROOM, **fields)


@pytest.mark.parametrize("attempt", range(8))
def test_required_tool_calls_name_a_tool_and_their_arguments_validate(openai_client, attempt):
    answer = ask(openai_client, tool_choice="required", temperature=1.0, seed=attempt)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)


def test_a_named_tool_is_the_one_called_and_parallel_calls_off_means_one(openai_client):
    answer = ask(
        openai_client, tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False
    )
    calls = answer.choices[0].message.tool_calls
    assert len(calls) == 1
    assert calls[0].function.name == "get_time"
    assert_valid_calls(calls)


def test_auto_gives_text_or_valid_calls_and_none_gives_text(openai_client):
    choice = ask(openai_client, tool_choice="auto").choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message.tool_calls)
    else:
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
    plain = ask(openai_client, tool_choice="none", max_completion_tokens=8).choices[0]
    assert plain.message.tool_calls is None
    assert isinstance(plain.message.content, str)


def test_streamed_tool_calls_arrive_as_openai_sends_them(openai_client):
    chunks = list(ask(openai_client, tool_choice="required", stream=True))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                assert call["id"] is None
                assert delta.function.name  # the id and name come first, once
                call["id"], call["name"] = delta.id, delta.function.name
            call["arguments"] += delta.function.arguments or ""
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert sorted(calls) == list(range(len(calls)))
    assert calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


def test_a_two_step_round_trip_takes_the_calls_and_their_results(openai_client):
    first = ask(openai_client, tool_choice="required").choices[0].message
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"answer": 21})} for call in first.tool_calls
    ]
    messages = [*ASK, first.model_dump(exclude_none=True), *results]
    second = openai_client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=ROOM)
    choice = second.choices[0]
    if choice.message.tool_calls:
        assert_valid_calls(choice.message.tool_calls)
    else:
        assert isinstance(choice.message.content, str)
    alone = ask(openai_client, tool_choice="auto", max_completion_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens  # the calls and results were read


def test_a_tool_result_must_answer_an_earlier_call(openai_client):
    with pytest.raises(openai.BadRequestError, match="tool_call_id must name a tool call") as caught:
        openai_client.chat.completions.create(
            model=MODEL, messages=[*ASK, {"role": "tool", "tool_call_id": "nope", "content": "1"}], tools=TOOLS
        )
    assert caught.value.param == "messages"


@pytest.mark.parametrize(
    "fields, param, says",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "must name one of"),
        ({"tool_choice": "sometimes"}, "tool_choice", "'none', 'auto', 'required'"),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be"),
        ({"response_format": {"type": "json_object"}}, "tools", "cannot be combined"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(openai_client, fields, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=MODEL, messages=ASK, **{"tools": TOOLS, **fields})
    assert caught.value.param == param
    assert says in caught.value.message


def test_a_tool_whose_parameters_cannot_be_enforced_is_a_400_on_tools(openai_client):
    odd = {"type": "function", "function": {"name": "odd", "parameters": {"type": "object", "not": {}}}}
    with pytest.raises(openai.BadRequestError, match="uses 'not'") as caught:
        openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=[odd], tool_choice="required")
    assert caught.value.param == "tools"


def test_langchain_bind_tools_round_trip(smollm2_server):
    chat = ChatOpenAI(base_url=f"{smollm2_server}/v1", api_key="any key", model=MODEL, max_retries=0, max_tokens=ROOM)
    with_tools = chat.bind_tools(TOOLS, tool_choice="required")
    question = HumanMessage(ASK[0]["content"])
    called = with_tools.invoke([question])
    assert called.tool_calls
    for call in called.tool_calls:
        jsonschema.validate(call["args"], PARAMETERS[call["name"]])
    results = [ToolMessage(content="21", tool_call_id=call["id"]) for call in called.tool_calls]
    answer = chat.bind_tools(TOOLS).invoke([question, called, *results])
    assert isinstance(answer.content, str)
    for call in answer.tool_calls:
        jsonschema.validate(call["args"], PARAMETERS[call["name"]])
