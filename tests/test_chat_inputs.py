"""ChatInputs without a model: the chat route's inputs read from real SDK RequestData objects (built from the queue's
JSON, as a module receives them) and checked against modulesettings.json's ranges, every refusal saying what to fix."""

from __future__ import annotations

import json
import re

import pytest

from live_server import ROOT
from llamachat.chat_request import (
    MAX_HISTORY_BYTES,
    MAX_HISTORY_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    SAMPLING_INPUTS,
    ChatError,
    ChatInputs,
)
from module_harness import request

ROUTE_INPUTS = {
    spec["Name"]: spec
    for spec in json.loads((ROOT / "modulesettings.json").read_text())["Modules"]["LlamaChat"]["RouteMaps"][0]["Inputs"]
}
NUMBER_INPUTS = [name for name, spec in ROUTE_INPUTS.items() if spec["Type"] in ("Integer", "Float")]
INPUTS = ChatInputs(str(ROOT))


def parse(**values: str):
    return INPUTS.parse(request("prompt", **values))


def refusal(**values: str) -> str:
    with pytest.raises(ChatError) as raised:
        parse(**values)
    return str(raised.value)


def number_parser(name: str):
    return int if ROUTE_INPUTS[name]["Type"] == "Integer" else float


def parsed_number(chat, name: str):
    if name in ("max_tokens", "top_logprobs"):
        return getattr(chat, name)
    return chat.sampling.get(name)


def test_every_number_input_of_the_route_is_validated():
    # A number input added to modulesettings.json without being read would be silently ignored.
    assert set(NUMBER_INPUTS) == {"max_tokens", "seed", "top_logprobs", *SAMPLING_INPUTS}


def test_a_prompt_alone_gets_every_default_from_modulesettings():
    chat = parse(prompt="Hi")
    assert chat.prompt == "Hi"
    assert chat.system_prompt is None
    assert chat.history == []
    for name in NUMBER_INPUTS:
        if name != "seed":
            default = number_parser(name)(ROUTE_INPUTS[name]["DefaultValue"])
            value = parsed_number(chat, name)
            assert value == default, name
            assert type(value) is type(default), name
    assert ROUTE_INPUTS["seed"]["DefaultValue"] == "-1"
    assert "seed" not in chat.sampling
    assert "stop" not in chat.sampling  # -1: a new random seed each time


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_numbers_get_their_default(blank):
    chat = parse(prompt="Hi", temperature=blank, max_tokens=blank)
    assert chat.sampling["temperature"] == float(ROUTE_INPUTS["temperature"]["DefaultValue"])
    assert chat.max_tokens == int(ROUTE_INPUTS["max_tokens"]["DefaultValue"])


@pytest.mark.parametrize("name", NUMBER_INPUTS)
def test_each_number_accepts_its_range_ends_and_refuses_just_beyond_them(name):
    spec, number = ROUTE_INPUTS[name], number_parser(name)
    low, high = number(spec["MinValue"]), number(spec["MaxValue"])
    step = 1 if number is int else 0.01
    for end in (low, high):
        value = parsed_number(parse(prompt="Hi", **{name: f" {end} "}), name)
        assert value == end or (name == "seed" and end == -1 and value is None), (name, end)
    for outside in (low - step, high + step):
        error = refusal(prompt="Hi", **{name: str(outside)})
        kind = "a whole number" if number is int else "a number"
        assert error == f"{name} must be {kind} from {low} to {high}, not {number(outside)}"


@pytest.mark.parametrize(
    "name, raw, hint",
    [
        ("max_tokens", "many", "max_tokens must be a whole number from 0 to 32768, not 'many'"),
        ("max_tokens", "2.5", "max_tokens must be a whole number from 0 to 32768, not '2.5'"),
        ("top_k", "1e3", "top_k must be a whole number from 0 to 1000, not '1e3'"),
        ("temperature", "hot", "temperature must be a number from 0.0 to 2.0, not 'hot'"),
        ("temperature", "nan", "temperature must be a number from 0.0 to 2.0, not nan"),
        ("top_p", "inf", "top_p must be a number from 0.0 to 1.0, not inf"),
        ("min_p", "-inf", "min_p must be a number from 0.0 to 1.0, not -inf"),
        ("seed", "x" * 1000, f"seed must be a whole number from -1 to 2147483647, not {'x' * 40!r}"),
    ],
)
def test_a_bad_number_is_refused_naming_the_input_its_range_and_the_value(name, raw, hint):
    assert refusal(prompt="Hi", **{name: raw}) == hint  # a long value is quoted cut to 40 characters


def test_a_seed_other_than_minus_one_is_passed_on():
    assert parse(prompt="Hi", seed="42").sampling["seed"] == 42


@pytest.mark.parametrize("values", [{}, {"prompt": ""}, {"prompt": " \n\t "}])
def test_a_missing_or_blank_prompt_is_refused(values):
    assert refusal(**values).startswith("prompt is missing or blank: send the text to answer in the 'prompt' field")


@pytest.mark.parametrize(
    "stop, stops",
    [
        ("User:", ["User:"]),
        ("[/INST]", ["[/INST]"]),  # starts like JSON but is not: one stop string
        ("[1, 2]", ["[1, 2]"]),  # JSON, but not an array of strings
        ('["\\n\\n", "User:"]', ["\n\n", "User:"]),
        (json.dumps(["a", "b", "c", "d"]), ["a", "b", "c", "d"]),
        ("x" * MAX_STOP_CHARS, ["x" * MAX_STOP_CHARS]),
    ],
)
def test_stop_is_one_string_or_a_json_array_of_strings(stop, stops):
    assert parse(prompt="Hi", stop=stop).sampling["stop"] == stops


@pytest.mark.parametrize(
    "stop",
    [
        "[]",
        json.dumps(["a", ""]),
        json.dumps(["a", "b", "c", "d", "e"]),  # one more than MAX_STOP_STRINGS
    ],
)
def test_an_empty_or_overfull_stop_array_is_refused_with_an_example(stop):
    assert MAX_STOP_STRINGS == 4
    assert refusal(prompt="Hi", stop=stop) == (
        'stop must be one string or a JSON array of 1 to 4 non-empty strings, e.g. ["\\n\\n", "User:"]'
    )


@pytest.mark.parametrize("stop", ["x" * (MAX_STOP_CHARS + 1), json.dumps(["ok", "x" * (MAX_STOP_CHARS + 1)])])
def test_a_stop_string_over_the_length_cap_is_refused_naming_its_length(stop):
    assert refusal(prompt="Hi", stop=stop) == "stop strings may be at most 200 characters long, not 201"


def test_messages_become_the_history_with_only_role_and_content():
    turns = [
        {"role": "user", "content": "Hi", "name": "ignored"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And?"},
    ]
    assert parse(prompt="Go on", messages=json.dumps(turns)).history == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And?"},
    ]
    assert parse(prompt="Go on", messages=" \n").history == []


@pytest.mark.parametrize(
    "messages, error",
    [
        ("[{", "it is not valid JSON (Expecting property name enclosed in double quotes at character 2)"),
        ('{"role": "user", "content": "Hi"}', "messages must be a JSON array of earlier turns"),
        ("[1]", "item 0 has no text 'content'"),
        ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]', "item 1 has no text 'content'"),
        ('[{"role": "user"}]', "item 0 has no text 'content'"),
        ("[" * 100_000, "; it is nested too deeply"),
        ('[{"role": "user", "content": "a", "n": ' + "9" * 5000 + "}]", "; it holds a number too long to read"),
    ],
)
def test_messages_that_are_not_a_json_array_of_turns_are_refused_with_the_expected_shape(messages, error):
    message = refusal(prompt="Hi", messages=messages)
    assert message.startswith("messages must be a JSON array of earlier turns, oldest first, like [{")
    assert error in message


@pytest.mark.parametrize("role", ["system", "tool", None])
def test_a_turn_with_another_role_is_refused_pointing_at_system_prompt(role):
    turn = {"content": "x"} if role is None else {"role": role, "content": "x"}
    assert refusal(prompt="Hi", messages=json.dumps([{"role": "user", "content": "a"}, turn])) == (
        f"messages[1].role must be 'user' or 'assistant' (put the system prompt in 'system_prompt'), not {role!r}"
    )


def test_messages_must_start_with_a_user_turn():
    messages = json.dumps([{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}])
    assert refusal(prompt="Hi", messages=messages) == "messages must start with a 'user' turn"


def test_the_turn_count_cap_holds_exactly_and_its_error_names_the_cap():
    turn = {"role": "user", "content": "a"}
    assert len(parse(prompt="Hi", messages=json.dumps([turn] * MAX_HISTORY_MESSAGES)).history) == 10_000
    assert refusal(prompt="Hi", messages=json.dumps([turn] * (MAX_HISTORY_MESSAGES + 1))) == (
        "messages may hold at most 10000 turns (MAX_HISTORY_MESSAGES), not 10001: send only the turns the model needs"
    )


def test_the_size_cap_counts_utf8_bytes_not_characters_and_its_error_names_the_cap():
    def messages(text: str) -> str:
        return json.dumps([{"role": "user", "content": text}], ensure_ascii=False)

    overhead = len(messages("").encode("utf-8"))
    assert parse(prompt="Hi", messages=messages("a" * (MAX_HISTORY_BYTES - overhead))).history
    # Half as many characters as bytes allowed, but each "é" is two bytes in UTF-8: one byte over the cap.
    over = messages("é" * ((MAX_HISTORY_BYTES - overhead) // 2) + "a" * ((MAX_HISTORY_BYTES - overhead) % 2 + 1))
    assert len(over) < MAX_HISTORY_BYTES < len(over.encode("utf-8"))
    assert refusal(prompt="Hi", messages=over) == (
        f"messages may hold at most 2097152 bytes of JSON (MAX_HISTORY_BYTES), not {MAX_HISTORY_BYTES + 1}: "
        "send only the turns the model needs"
    )


def test_browser_crlf_line_breaks_become_lf_in_prompt_system_prompt_and_history():
    chat = parse(
        prompt="one\r\ntwo",
        system_prompt="Be brief.\r\nBe kind.",
        messages=json.dumps([{"role": "user", "content": "a\r\nb"}, {"role": "assistant", "content": "c\r\n"}]),
    )
    assert chat.prompt == "one\ntwo"
    assert chat.system_prompt == "Be brief.\nBe kind."
    assert chat.history == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c\n"}]


@pytest.mark.parametrize("system_prompt, expected", [("", None), (" \r\n\t", None), ("  Be brief. \n", "Be brief.")])
def test_a_blank_system_prompt_means_the_default_and_others_are_trimmed(system_prompt, expected):
    assert parse(prompt="Hi", system_prompt=system_prompt).system_prompt == expected


def test_a_conversation_is_taken_as_sent_and_its_last_assistant_message_continued():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "In French."},
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": "Un,"},
    ]
    chat = INPUTS.parse(request("prompt", conversation=json.dumps(messages)))
    assert (chat.prompt, chat.system_prompt, chat.history) == ("Count.", None, messages[:4])
    assert chat.as_sent
    assert chat.prefill == "Un,"
    plain = INPUTS.parse(request("prompt", conversation=json.dumps(messages[:5])))
    assert plain.prefill is None
    assert plain.history == messages[:4]


@pytest.mark.parametrize(
    "messages, says",
    [
        ([{"role": "system", "content": "Be brief."}], "must end with a user message"),
        ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}], "must end with a user message"),
        ([{"role": "tool", "content": "42"}], "conversation[0].role must be 'system', 'user' or 'assistant'"),
    ],
)
def test_a_conversation_that_cannot_be_continued_is_refused(messages, says):
    with pytest.raises(ChatError, match=re.escape(says)) as caught:
        INPUTS.parse(request("prompt", conversation=json.dumps(messages)))
    assert caught.value.param == "conversation"


def test_a_conversation_with_a_prompt_is_refused():
    assert "not both" in refusal(prompt="Hi", conversation='[{"role": "user", "content": "Hi"}]')


def test_switches_default_from_modulesettings_and_refuse_other_words():
    chat = parse(prompt="Hi")
    assert chat.trim_history is True
    assert chat.logprobs is False
    assert parse(prompt="Hi", trim_history="false", logprobs="TRUE").logprobs is True
    assert "trim_history must be true or false" in refusal(prompt="Hi", trim_history="maybe")


def test_a_json_schema_becomes_a_grammar_and_one_that_cannot_be_enforced_is_refused_naming_why():
    chat = parse(prompt="Hi", json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}}')
    assert chat.json_schema.startswith("a ::=") or "root ::=" in chat.json_schema
    for schema, says in [
        ("{not json", "not valid JSON"),
        ('{"type": "object", "not": {"required": ["a"]}}', "uses 'not'"),
        ('{"type": "number", "minimum": 0.5}', "inclusive whole numbers"),
        ('{"type": "spaceship"}', "Unrecognized schema"),
    ]:
        with pytest.raises(ChatError, match=re.escape(says)) as caught:
            parse(prompt="Hi", json_schema=schema)
        assert (caught.value.param, caught.value.code) == ("json_schema", "invalid_json_schema")


def test_logit_bias_is_token_ids_and_bounded_biases():
    assert parse(prompt="Hi", logit_bias='{"42": -100, "7": 2.5}').sampling["logit_bias"] == {42: -100.0, 7: 2.5}
    for bad in ('{"a": 1}', '{"1": 101}', '{"1": true}', "[1]", "{"):
        assert "logit_bias must be a JSON object" in refusal(prompt="Hi", logit_bias=bad)


def test_tools_for_a_template_are_a_json_array_of_named_functions():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert parse(prompt="Hi", tools=json.dumps(tools)).tools == tools
    assert parse(prompt="Hi").tools is None
    for bad in ('{"name": "f"}', '[{"function": {}}]', "[1]", "["):
        assert "tools must be a JSON array" in refusal(prompt="Hi", tools=bad)


def test_a_schema_or_tools_beyond_the_size_cap_are_refused():
    huge = json.dumps({"enum": ["x" * 1000] * 300})
    assert "json_schema may hold at most" in refusal(prompt="Hi", json_schema=huge)
    assert "tools may hold at most" in refusal(prompt="Hi", tools=f"[{huge}]")
