"""OpenAI's chat API in the module's terms: a `/v1/chat/completions` request → the chat route's input values, and the
module's answers → `chat.completion` objects, `chat.completion.chunk` deltas and OpenAI's error shape.

Pure translation, no I/O: openai_api.py does the talking. The messages go to the module as the `conversation`
input, as the client sent them (no default system prompt, system messages where they are, a last assistant message
continued) and with `trim_history` off, so a conversation too long for the context is an error, as OpenAI's;
a client that wants the oldest turns left out instead sends `"trim_history": true` (not an OpenAI field).
Fields that would change the reply in a way the module cannot honour (images, audio) are refused with a 400
rather than ignored; fields that change nothing here (user, store, metadata...) are accepted and ignored, as
llama-server does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .openai_tools import ToolCalling, ToolsError, calls_message, result_message, tool_calling

# Module inputs that take an OpenAI field's value as it is (llama.cpp's servers accept top_k, min_p and
# repeat_penalty too).
NUMBER_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
    "top_k",
    "min_p",
    "repeat_penalty",
)
ANY_OBJECT = {"type": "object"}  # the schema of response_format json_object: any JSON object
# Choices one request may ask for: each is a chat of its own in the module's queue, whose size bounds them anyway.
MAX_CHOICES = 8
MAX_SEED = 2**31 - 1  # the chat route's seed input's MaxValue (modulesettings.json)
# The module's inputs that OpenAI names differently, for the param of an error the module reports.
OPENAI_PARAMS = {"conversation": "messages", "json_schema": "response_format"}
# The module's stop_reason → OpenAI's finish_reason (a chat cancelled by someone else ended like a stop string).
FINISH_REASON_OF_STOP_REASON = {"completed": "stop", "length": "length", "cancelled": "stop"}
SYSTEM_ROLES = ("system", "developer")


class OpenAIRequestError(ValueError):
    """A request the module cannot run as asked; the message says what to change, `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ChatCompletionRequest:
    values: list[tuple[str, str]]  # the chat route's inputs, as form fields
    stream: bool
    include_usage: bool
    max_tokens: int | None  # the client's, if it gave one (the module's default applies otherwise)
    logprobs: bool = False
    tools: ToolCalling | None = None  # with tools the reply is calls or text, sent once it is complete
    n: int = 1  # choices: one chat each

    def choice_values(self) -> list[list[tuple[str, str]]]:
        """The inputs of each choice's chat: a fixed seed counts up (within the module's range), so that sampled
        choices differ; a random one (-1), or one the module will refuse, goes to every choice as it is."""
        if self.n == 1:
            return [self.values]
        given = next((value for name, value in self.values if name == "seed"), None)
        seed = int(given) if given is not None and given.isdigit() else None
        if seed is None:
            return [self.values] * self.n
        others = [(name, value) for name, value in self.values if name != "seed"]
        return [others + [("seed", str((seed + i) % (MAX_SEED + 1)))] for i in range(self.n)]


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _unsupported(body: dict) -> tuple[str, str] | None:
    """(field, why) for the first field that asks for something the module cannot do; None if there is none."""
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        return "n", f"n must be a whole number from 1 to {MAX_CHOICES}, not {n!r}"
    if body.get("functions"):
        return "functions", "functions (the old form of function calling) is not supported: use tools"
    if body.get("audio") or body.get("modalities") not in (None, ["text"]):
        return "modalities", "only text output is supported"
    return None


def _text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined (images and audio are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                shown = f"'{kind}' parts" if isinstance(kind, str) else 'parts that are not {"type": "text"}'
                raise OpenAIRequestError(
                    f"{where}.content[{i}]: only text is supported, not {shown} (this model reads no images or audio)",
                    "messages",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise OpenAIRequestError(f"{where}.content must be a string or a list of text parts", "messages")


def _conversation(messages: Any, tools: ToolCalling | None) -> str:
    """The module's `conversation` input: OpenAI's messages as JSON, in order, developer messages as system ones,
    tool calls and results as openai_tools.py writes them, and the tools' description first where there are any."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIRequestError('messages must be a non-empty list of {"role", "content"} objects', "messages")
    turns = [{"role": "system", "content": tools.prompt}] if tools else []
    calls_seen: dict[str, str] = {}
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in SYSTEM_ROLES + ("user", "assistant", "tool"):
            raise OpenAIRequestError(
                f"{where}.role must be 'system', 'developer', 'user', 'assistant' or 'tool', not {role!r}", "messages"
            )
        if message.get("function_call"):
            raise OpenAIRequestError(f"{where}: function_call is not supported: use tool_calls", "messages")
        if role == "assistant" and message.get("tool_calls"):
            turns.append(calls_message(message, where, calls_seen))
            continue
        text = _text_of(message.get("content"), where)
        if role == "tool":
            turns.append(result_message(message, text, where, calls_seen))
        else:
            turns.append({"role": "system" if role in SYSTEM_ROLES else role, "content": text})
    return json.dumps(turns)


def _json_schema(response_format: Any) -> dict | bool | None:
    """The JSON schema a response_format asks for: OpenAI's json_schema, json_object (any object, or the schema
    llama-cpp-python's servers take beside it), None for text."""
    how = (
        'response_format must be {"type": "text"}, {"type": "json_object"} or '
        '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}'
    )
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema", ANY_OBJECT)
    elif kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        schema = response_format["json_schema"].get("schema", ANY_OBJECT)
    else:
        raise OpenAIRequestError(how, "response_format")
    if not isinstance(schema, (dict, bool)):
        raise OpenAIRequestError("response_format's schema must be a JSON Schema object", "response_format")
    return schema


def _logprobs(body: dict) -> bool:
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise OpenAIRequestError("logprobs must be true or false", "logprobs")
    if top is not None and not logprobs:
        raise OpenAIRequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return bool(logprobs)


def _whole_number(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OpenAIRequestError(f"{name} must be a whole number of at least 1, not {value!r}", name)
    return value


def _number_text(name: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OpenAIRequestError(f"{name} must be a number, not {value!r}", name)
    return str(value)


def _stop_text(stop: Any) -> str | None:
    if stop is None or stop == []:
        return None
    if isinstance(stop, str):  # one stop string, even one that reads as a JSON list (the module's other form)
        return json.dumps([stop])
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return json.dumps(stop)
    raise OpenAIRequestError("stop must be a string or a list of strings", "stop")


def parse_chat_request(body: Any, template_renders_tools: bool = False) -> ChatCompletionRequest:
    """The chat route's inputs for an OpenAI chat request; OpenAIRequestError for one the module cannot run. Ranges
    (temperature 0-2, at most 4 stop strings...) are the module's to check: it answers with what to fix."""
    if not isinstance(body, dict):
        raise OpenAIRequestError("The body must be a JSON object with 'messages'")
    refused = _unsupported(body)
    if refused:
        raise OpenAIRequestError(refused[1], refused[0])
    trim = body.get("trim_history", False)
    if not isinstance(trim, bool):
        raise OpenAIRequestError("trim_history must be true or false", "trim_history")
    try:
        tools = tool_calling(body, template_renders_tools)
        conversation = _conversation(body.get("messages"), tools)
    except ToolsError as ex:
        raise OpenAIRequestError(str(ex), ex.param) from None
    values = [("conversation", conversation), ("trim_history", json.dumps(trim))]
    schema = _json_schema(body.get("response_format"))
    if schema is not None and tools:
        raise OpenAIRequestError("response_format and tools cannot be combined: the reply is one or the other", "tools")
    if schema is not None or tools:
        values.append(("json_schema", json.dumps(tools.schema if tools else schema)))
    if tools and tools.template_tools:
        values.append(("tools", json.dumps(tools.template_tools)))
    logprobs = _logprobs(body)
    if logprobs:
        values.append(("logprobs", "true"))
    logit_bias = body.get("logit_bias")
    if logit_bias:
        if not isinstance(logit_bias, dict):
            raise OpenAIRequestError("logit_bias must be an object of token ids and biases", "logit_bias")
        values.append(("logit_bias", json.dumps(logit_bias)))
    max_tokens = _whole_number(body, "max_completion_tokens") or _whole_number(body, "max_tokens")
    if max_tokens is not None:
        values.append(("max_tokens", str(max_tokens)))
    values += [(name, _number_text(name, body[name])) for name in NUMBER_FIELDS if body.get(name) is not None]
    stop = _stop_text(body.get("stop"))
    if stop is not None:
        values.append(("stop", stop))
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise OpenAIRequestError("stream must be true or false and stream_options an object", "stream")
    n = body.get("n", 1)
    return ChatCompletionRequest(values, stream, bool(options.get("include_usage")), max_tokens, logprobs, tools, n)


def usage(statuses: list[dict]) -> dict:
    """OpenAI's usage from the module's token counts of each choice's chat: the prompt once, the replies summed."""
    prompt = int(statuses[0].get("prompt_tokens") or 0) if statuses else 0
    completion = sum(int(status.get("completion_tokens") or 0) for status in statuses)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_of(entries: list | None) -> dict | None:
    """A choice's logprobs from the module's entries (already in OpenAI's shape); None when not asked for."""
    return None if entries is None else {"content": entries, "refusal": None}


def choice(index: int, message: dict, finish_reason: str, logprobs: list | None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs_of(logprobs), "finish_reason": finish_reason}


def completion(
    completion_id: str, created: int, model: str, choices: list[dict], finals: list[dict], fingerprint: str
) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage(finals),
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    fingerprint: str,
    delta: dict | None,
    finish_reason: str | None = None,
    logprobs: list | None = None,
    index: int = 0,
    **extra: Any,
) -> dict:
    """One `chat.completion.chunk` of choice `index`; delta None gives no choice (the usage chunk), extra fields go at
    the top level."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs_of(logprobs), "finish_reason": finish_reason}
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [] if delta is None else [choice],
        **extra,
    }
