"""The OpenAI request → chat route inputs translation (llamachat_server/openai_chat.py), model-free: which fields
reach the module as what, and which are refused with what to change. The live path is in test_openai_api.py."""

import json

import pytest

from llamachat_server.openai_chat import OpenAIRequestError, chunk, parse_chat_request, usage


def inputs(**body):
    return dict(parse_chat_request(body).values)


def refusal(**body):
    with pytest.raises(OpenAIRequestError) as caught:
        parse_chat_request(body)
    return caught.value


def conversation(**body):
    return json.loads(inputs(**body)["conversation"])


def test_messages_reach_the_module_as_sent_in_their_order():
    """No message is moved or merged: a later system message stays where it is; developer is OpenAI's newer name for
    system; text parts are joined; a last assistant message is kept, for the reply to continue."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]},
        {"role": "developer", "content": "No emojis."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        {"role": "assistant", "content": "The colour is"},
    ]
    assert conversation(messages=messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "system", "content": "No emojis."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "The colour is"},
    ]


def test_a_single_user_message_sends_only_the_conversation_untrimmed():
    assert inputs(messages=[{"role": "user", "content": "Hi"}], model="anything") == {
        "conversation": '[{"role": "user", "content": "Hi"}]',
        "trim_history": "false",  # OpenAI never leaves messages out: a conversation too long is an error
    }
    assert inputs(messages=[{"role": "user", "content": "Hi"}], trim_history=True)["trim_history"] == "true"


def test_sampling_fields_stop_and_token_limit_pass_through():
    values = inputs(
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=50,
        max_completion_tokens=20,  # the newer name wins, as in OpenAI's API
        temperature=0,
        top_p=0.5,
        seed=7,
        top_k=10,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100},
        logprobs=True,
        top_logprobs=3,
        stop=["\n", "User:"],
        n=1,
        response_format={"type": "text"},
        user="ignored",
    )
    del values["conversation"], values["trim_history"]
    assert values == {
        "max_tokens": "20",
        "temperature": "0",
        "top_p": "0.5",
        "seed": "7",
        "top_k": "10",
        "presence_penalty": "0.5",
        "frequency_penalty": "-0.5",
        "logit_bias": '{"42": -100}',
        "logprobs": "true",
        "top_logprobs": "3",
        "stop": '["\\n", "User:"]',
    }


def test_a_stop_string_is_one_stop_string_even_when_it_reads_as_a_json_list():
    assert json.loads(inputs(messages=[{"role": "user", "content": "Hi"}], stop="END")["stop"]) == ["END"]
    assert json.loads(inputs(messages=[{"role": "user", "content": "Hi"}], stop='["4"]')["stop"]) == ['["4"]']


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    "response_format, schema",
    [
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_object", "schema": SCHEMA}, SCHEMA),  # llama-cpp-python's servers' form
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}, SCHEMA),
    ],
)
def test_response_formats_become_the_json_schema_input(response_format, schema):
    values = inputs(messages=[{"role": "user", "content": "Hi"}], response_format=response_format)
    assert json.loads(values["json_schema"]) == schema
    assert "json_schema" not in inputs(messages=[{"role": "user", "content": "Hi"}], response_format={"type": "text"})


def test_stream_flags():
    streamed = parse_chat_request(
        {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "stream_options": {"include_usage": True}}
    )
    assert (streamed.stream, streamed.include_usage) == (True, True)
    plain = parse_chat_request({"messages": [{"role": "user", "content": "Hi"}]})
    assert (plain.stream, plain.include_usage) == (False, False)


def test_the_token_limit_is_kept_for_the_servers_poll_schedule():
    hi = [{"role": "user", "content": "Hi"}]
    assert parse_chat_request({"messages": hi, "max_tokens": 50, "max_completion_tokens": 20}).max_tokens == 20
    assert parse_chat_request({"messages": hi}).max_tokens is None  # the module's default applies


@pytest.mark.parametrize(
    "body, param, says",
    [
        ({"n": 0}, "n", "n must be a whole number from 1 to 8"),
        ({"n": 9}, "n", "n must be a whole number from 1 to 8"),
        ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be"),
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"response_format": {"type": "xml"}}, "response_format", '{"type": "json_object"}'),
        ({"response_format": {"type": "json_schema"}}, "response_format", '"json_schema": {"name"'),
        ({"response_format": {"type": "json_object", "schema": []}}, "response_format", "JSON Schema object"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
        ({"logprobs": "yes"}, "logprobs", "true or false"),
        ({"logit_bias": [1]}, "logit_bias", "object of token ids"),
        ({"trim_history": "yes"}, "trim_history", "true or false"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"max_tokens": "10"}, "max_tokens", "whole number"),
        ({"temperature": "hot"}, "temperature", "must be a number"),
        ({"stop": [1]}, "stop", "list of strings"),
        ({"stream": "yes"}, "stream", "true or false"),
    ],
)
def test_fields_that_would_change_the_reply_unseen_are_refused(body, param, says):
    error = refusal(messages=[{"role": "user", "content": "Hi"}], **body)
    assert error.param == param
    assert says in str(error)


@pytest.mark.parametrize(
    "messages, says",
    [
        (None, "non-empty list"),
        ([], "non-empty list"),
        ([{"role": "tool", "content": "42", "tool_call_id": "x"}], "must name a tool call of an earlier"),
        ([{"role": "robot", "content": "42"}], "'assistant' or 'tool', not 'robot'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url' parts"),
        ([{"role": "user", "content": 5}], "string or a list of text parts"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "tool_calls[0] must be"),
    ],
)
def test_messages_the_module_cannot_read_are_refused(messages, says):
    error = refusal(messages=messages)
    assert error.param == "messages"
    assert says in str(error)


def test_a_body_that_is_not_an_object_is_refused():
    assert "JSON object" in str(pytest.raises(OpenAIRequestError, parse_chat_request, ["Hi"]).value)


def test_n_choices_count_their_seeds_up_so_that_they_differ():
    hi = [{"role": "user", "content": "Hi"}]
    seeds = [dict(v).get("seed") for v in parse_chat_request({"messages": hi, "n": 3, "seed": 7}).choice_values()]
    assert seeds == ["7", "8", "9"]
    unseeded = parse_chat_request({"messages": hi, "n": 2}).choice_values()
    assert len(unseeded) == 2
    assert all("seed" not in dict(v) for v in unseeded)
    last = parse_chat_request({"messages": hi, "n": 2, "seed": 2**31 - 1}).choice_values()
    assert [dict(v)["seed"] for v in last] == [str(2**31 - 1), "0"]  # within the module's range, not past it
    for seed, sent in ((-1, "-1"), (1.5, "1.5")):  # random for every choice; refused by the module, with its range
        choices = parse_chat_request({"messages": hi, "n": 2, "seed": seed}).choice_values()
        assert [dict(v)["seed"] for v in choices] == [sent, sent]


def test_usage_from_the_modules_counts_and_the_usage_chunk_has_no_choice():
    counted = usage([{"prompt_tokens": 21, "completion_tokens": 5}])
    assert counted == {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}
    # n > 1: the prompt once, every choice's reply
    both = usage([{"prompt_tokens": 21, "completion_tokens": 5}, {"prompt_tokens": 21, "completion_tokens": 7}])
    assert both == {"prompt_tokens": 21, "completion_tokens": 12, "total_tokens": 33}
    assert chunk("id", 1, "m", "fp", None, usage=counted)["choices"] == []


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather now.", "parameters": {"type": "object"}},
}


@pytest.mark.parametrize("renders_tools", [False, True])
def test_tools_are_described_by_the_template_where_it_can_else_in_the_system_message(renders_tools):
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "tool_choice": "required"}
    values = dict(parse_chat_request(body, template_renders_tools=renders_tools).values)
    system = json.loads(values["conversation"])[0]
    assert system["role"] == "system"
    assert '{"tool_calls": [{"name": "<function name>"' in system["content"]
    schema = json.loads(values["json_schema"])
    assert schema["properties"]["tool_calls"]["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}
    if renders_tools:  # the template describes the tools, in the form its model knows
        assert json.loads(values["tools"]) == [WEATHER]
        assert "Weather now." not in system["content"]
    else:
        assert "tools" not in values
        assert "Weather now." in system["content"]
