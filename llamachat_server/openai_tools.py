"""Function calling on OpenAI's API, in the module's terms: the tools are described to the model by its own chat
template where that renders tools (the module's tools input), else in a system message; either way its reply is
constrained (the module's json_schema input, a llama.cpp grammar) to one JSON object, either
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` with each function's arguments following its own parameters
schema, or, where the model may choose (tool_choice auto), `{"content": "..."}`. So every call parses and its
arguments validate. Earlier calls and their results go back into the conversation in the same form: an assistant's
tool calls as that JSON, a tool's result as a user message naming the call it answers.

Pure translation, no I/O, as openai_chat.py.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

# The most calls one reply may make when parallel_tool_calls is on (OpenAI sets no number; a small model needs one).
MAX_PARALLEL_CALLS = 4
TOOLS_PROMPT = (
    "You can call functions. To call one, reply with JSON only: "
    '{{"tool_calls": [{{"name": "<function name>", "arguments": {{<arguments>}}}}]}}{more}.{otherwise}'
)
FUNCTIONS_PROMPT = " The functions, with the JSON Schema of their arguments:\n{functions}"
OTHERWISE = ' To answer without calling one, reply with {"content": "<your answer>"}.'
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolsError(ValueError):
    """tools, tool_choice or a message about tool calls that cannot be used; the message says what to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolCalling:
    """What a request's tools make of its conversation and its reply."""

    prompt: str  # the system message that says how to call, and describes the functions unless the template does
    schema: dict  # what the reply must be (the module's json_schema)
    may_answer: bool  # tool_choice auto: the reply may be text instead of calls
    template_tools: list[dict] | None  # the tools for the model's own template to describe (the module's tools)

    def message(self, reply: str, complete: bool) -> dict:
        """The assistant message for the model's reply: its tool calls, or its text. An incomplete reply (cut by
        max_tokens) that does not parse is returned as text, as it is."""
        try:
            answer = json.loads(reply)
        except json.JSONDecodeError:
            if complete:
                raise ValueError(f"the reply is not the JSON its grammar allows: {reply[:200]!r}") from None
            return {"role": "assistant", "content": reply}
        if "tool_calls" not in answer:
            return {"role": "assistant", "content": answer.get("content", "")}
        calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
            }
            for call in answer["tool_calls"]
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}


def tool_calling(body: dict, template_renders_tools: bool = False) -> ToolCalling | None:
    """The tool calling a request asks for; None without tools, or with tool_choice none. Where the model's chat
    template renders tools, it describes them (in the form the model was trained on) and the system message only says
    how to call them."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if not tools:
        if body.get("tool_choice") not in (None, "none"):
            raise ToolsError("tool_choice needs tools", "tool_choice")
        return None
    functions = _functions(tools)
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in functions:
            raise ToolsError(
                f"tool_choice must name one of the tools ({', '.join(functions)}), as "
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        callable_ = {name: functions[name]}
    elif choice in ("auto", "required"):
        callable_ = functions
    else:
        raise ToolsError("tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolsError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    calls = {
        "type": "array",
        "items": {"anyOf": [_call_schema(name, parameters) for name, parameters in callable_.items()]},
        "minItems": 1,
        "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
    }
    envelope = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
    may_answer = choice == "auto"
    schema: dict[str, Any] = envelope
    if may_answer:
        text = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"]}
        schema = {"anyOf": [envelope, text]}
    more = f", with up to {MAX_PARALLEL_CALLS} calls in the list" if parallel else ""
    prompt = TOOLS_PROMPT.format(more=more, otherwise=OTHERWISE if may_answer else "")
    if template_renders_tools:
        return ToolCalling(prompt, schema, may_answer, [t for t in tools if t["function"]["name"] in callable_])
    described = "\n".join(
        json.dumps({"name": name, "description": _description(tools, name), "parameters": parameters})
        for name, parameters in callable_.items()
    )
    return ToolCalling(prompt + FUNCTIONS_PROMPT.format(functions=described), schema, may_answer, None)


def _functions(tools: Any) -> dict[str, dict]:
    """{name: parameters schema} of the tools, checked."""
    if not isinstance(tools, list):
        raise ToolsError('tools must be a list of {"type": "function", "function": {"name", "parameters"}}', "tools")
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(function, dict) or not isinstance(name, str) or not name:
            raise ToolsError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}', "tools")
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise ToolsError(f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
        functions[name] = parameters
    return functions


def _description(tools: list, name: str) -> str:
    return next(t["function"].get("description") or "" for t in tools if t["function"]["name"] == name)


def _call_schema(name: str, parameters: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


def calls_message(message: dict, where: str, calls_seen: dict[str, str]) -> dict:
    """An assistant message's tool calls as the message the model would have replied with; calls_seen gets each
    call's id and function name, for the results that follow."""
    calls = []
    for i, call in enumerate(message["tool_calls"]):
        function: Any = call.get("function") if isinstance(call, dict) else None
        try:
            calls.append({"name": function["name"], "arguments": json.loads(function["arguments"])})
        except (TypeError, KeyError, json.JSONDecodeError):
            raise ToolsError(
                f"{where}.tool_calls[{i}] must be {{'id', 'type': 'function', 'function': {{'name', "
                "'arguments': <JSON text>}}}}",
                "messages",
            ) from None
        calls_seen[str(call.get("id"))] = function["name"]
    return {"role": "assistant", "content": json.dumps({"tool_calls": calls})}


def result_message(message: dict, text: str, where: str, calls_seen: dict[str, str]) -> dict:
    """A tool's result as a user message naming the call it answers (templates know no tool role)."""
    call_id = str(message.get("tool_call_id"))
    if call_id not in calls_seen:
        raise ToolsError(f"{where}.tool_call_id must name a tool call of an earlier assistant message", "messages")
    return {"role": "user", "content": f"Result of {calls_seen[call_id]} (call {call_id}): {text}"}


def message_deltas(message: dict) -> list[dict]:
    """A complete message as stream deltas, as OpenAI sends them: a call's id and name first, then its arguments."""
    if not message.get("tool_calls"):
        return [{"content": message["content"]}] if message["content"] else []
    deltas = []
    for i, call in enumerate(message["tool_calls"]):
        head = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
        deltas.append({"tool_calls": [{"index": i, **head}]})
        deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]})
    return deltas
