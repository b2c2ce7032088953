"""OpenAI's chat API in the module's terms: a `/v1/chat/completions` request → the chat route's input values, and the
module's answers → `chat.completion` objects, `chat.completion.chunk` deltas and OpenAI's error shape.

Pure translation, no I/O: openai_api.py does the talking. Fields that would change the reply in a way the module
cannot honour (n > 1, tools, structured output, images, penalties) are refused with a 400 rather than ignored;
fields that change nothing here (user, store, metadata...) are accepted and ignored, as llama-server does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

# Module inputs that take an OpenAI field's value as it is (llama.cpp's servers accept the last three too).
NUMBER_FIELDS = ("temperature", "top_p", "seed", "top_k", "min_p", "repeat_penalty")
# The module's stop_reason → OpenAI's finish_reason (a chat cancelled by someone else ended like a stop string).
FINISH_REASONS = {"completed": "stop", "length": "length", "cancelled": "stop"}
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


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _unsupported(body: dict) -> tuple[str, str] | None:
    """(field, why) for the first field that asks for something the module cannot do; None if there is none."""
    n = body.get("n")
    if n is not None and n != 1:
        return "n", f"n must be 1: the model answers one chat at a time, so it gives one choice, not {n!r}"
    for name in ("tools", "functions"):
        if body.get(name):
            return name, f"{name} (function calling) is not supported: send the conversation as text"
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        return "response_format", 'response_format must be {"type": "text"}: JSON and schema output are not supported'
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            return name, f"{name} is not supported (only 0); use repeat_penalty (1 = none) to discourage repetition"
    if body.get("logit_bias"):
        return "logit_bias", "logit_bias is not supported"
    if body.get("logprobs") or body.get("top_logprobs"):
        return "logprobs", "logprobs are not supported"
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


def _conversation(messages: Any) -> tuple[str, str, list[dict]]:
    """(prompt, system prompt, earlier turns) from OpenAI messages: system and developer messages make the system
    prompt, the last message (a user's) is the prompt, the user and assistant turns before it the history."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIRequestError('messages must be a non-empty list of {"role", "content"} objects', "messages")
    system, turns = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in SYSTEM_ROLES + ("user", "assistant"):
            raise OpenAIRequestError(
                f"{where}.role must be 'system', 'developer', 'user' or 'assistant', not {role!r} "
                f"(tool messages are not supported)",
                "messages",
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise OpenAIRequestError(f"{where}: tool calls are not supported", "messages")
        text = _text_of(message.get("content"), where)
        if role in SYSTEM_ROLES:
            system.append(text)
        else:
            turns.append({"role": role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise OpenAIRequestError("the last message (after any system messages) must be the user's", "messages")
    return turns[-1]["content"], "\n\n".join(system), turns[:-1]


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
    if isinstance(stop, str):
        return stop
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return json.dumps(stop)
    raise OpenAIRequestError("stop must be a string or a list of strings", "stop")


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """The chat route's inputs for an OpenAI chat request; OpenAIRequestError for one the module cannot run. Ranges
    (temperature 0-2, at most 4 stop strings...) are the module's to check: it answers with what to fix."""
    if not isinstance(body, dict):
        raise OpenAIRequestError("The body must be a JSON object with 'messages'")
    refused = _unsupported(body)
    if refused:
        raise OpenAIRequestError(refused[1], refused[0])
    prompt, system_prompt, history = _conversation(body.get("messages"))
    values = [("prompt", prompt)]
    if system_prompt:
        values.append(("system_prompt", system_prompt))
    if history:
        values.append(("messages", json.dumps(history)))
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
    return ChatCompletionRequest(values, stream, bool(options.get("include_usage")), max_tokens)


def usage(status: dict) -> dict:
    """OpenAI's usage from the module's token counts."""
    prompt, completion = int(status.get("prompt_tokens") or 0), int(status.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(completion_id: str, created: int, model: str, reply: str, finish_reason: str, status: dict) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(status),
    }


def chunk(
    completion_id: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None, **extra: Any
) -> dict:
    """One `chat.completion.chunk`; delta None gives no choice (the usage chunk), extra fields go at the top level."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }
