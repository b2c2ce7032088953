"""A chat request read from the queued RequestData and checked against the route's inputs in modulesettings.json.

The route's Inputs (DefaultValue, MinValue, MaxValue) are the one place defaults and ranges are written down, so the
API docs, the Explorer page and this validation cannot drift apart. They are read as the server reads them (// comments
and per-OS layers included), by the same reader as the module's settings (llamachat_server/settings.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codeproject_ai_sdk import RequestData

from llamachat.json_grammar import SchemaError, json_grammar
from llamachat_server.settings import load_module_settings

CHAT_ROUTE = "text/chat"
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 200  # each stop string is looked for in the reply after every token
# Caps on the earlier turns a client may send: the JSON is parsed on the SDK's request loop, before the chat starts,
# where 2 MiB take ~30 ms (bench/fit_time.py). Both are far beyond what a model's context holds (2 MiB of text is
# ~500k tokens), so they refuse only abuse.
MAX_HISTORY_BYTES = 2 * 1024 * 1024
MAX_HISTORY_MESSAGES = 10_000
# Inputs passed straight to create_chat_completion under the same name.
SAMPLING_INPUTS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")
CONVERSATION_ROLES = ("system", "user", "assistant")
MAX_LOGIT_BIASES = 300  # OpenAI's own cap
# A JSON schema or a tools list is turned into a grammar or rendered on the SDK's request loop: far beyond any real
# schema (OpenAI allows ~15,000 characters of enum values), this refuses only abuse.
MAX_SCHEMA_BYTES = 256 * 1024
# What a ChatError's code says to a client (the OpenAI API answers both with a 400 and this code).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INVALID_JSON_SCHEMA = "invalid_json_schema"


class ChatError(ValueError):
    """A chat that cannot run; the message tells the client what to change, `param` names the input at fault and
    `code` says what kind of problem it is, where a client may act on it (CONTEXT_LENGTH_EXCEEDED...)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code

    def answer(self) -> dict[str, Any]:
        """The module's answer for a chat refused or ended with this error."""
        return {"success": False, "error": str(self), "error_param": self.param, "error_code": self.code}


@dataclass
class ChatRequest:
    prompt: str
    system_prompt: str | None
    history: list[dict[str, str]]
    max_tokens: int
    # Keyword arguments for create_chat_completion: sampling settings, seed and stop strings.
    sampling: dict[str, Any] = field(default_factory=dict)
    # From `conversation`: the messages exactly as sent, so no default system prompt; history may hold system
    # messages where the client put them, and `prefill` is an assistant's text the reply continues.
    as_sent: bool = False
    prefill: str | None = None
    trim_history: bool = True  # False: a conversation that does not fit is an error, nothing is left out
    json_schema: str | None = None  # the GBNF grammar the reply is constrained to (from the json_schema input)
    logprobs: bool = False  # report each generated token's log probability
    tools: list[dict[str, Any]] | None = None  # OpenAI-style tools, for a chat template that renders them
    top_logprobs: int = 0  # with logprobs: the most likely alternatives reported at each position


class ChatInputs:
    """Parses and validates the inputs of the chat route."""

    def __init__(self, module_dir: Path) -> None:
        routes = load_module_settings(module_dir).route_maps
        route = next(r for r in routes if r["Route"] == CHAT_ROUTE)
        self.specs = {spec["Name"]: spec for spec in route["Inputs"]}

    def parse(self, data: RequestData) -> ChatRequest:
        sampling = {name: self._number(data, name) for name in SAMPLING_INPUTS}
        seed = self._number(data, "seed")
        if seed != -1:
            sampling["seed"] = seed
        stop = self._stop(data.get_value("stop"))
        if stop:
            sampling["stop"] = stop
        logit_bias = _logit_bias(data.get_value("logit_bias"))
        if logit_bias:
            sampling["logit_bias"] = logit_bias
        options = dict(
            max_tokens=self._number(data, "max_tokens"),
            sampling=sampling,
            trim_history=self._switch(data, "trim_history"),
            json_schema=_grammar(data.get_value("json_schema")),
            logprobs=self._switch(data, "logprobs"),
            tools=_tools(data.get_value("tools")),
            top_logprobs=self._number(data, "top_logprobs"),
        )
        conversation = data.get_value("conversation")
        if conversation is not None and conversation.strip():
            if any(data.get_value(name) for name in ("prompt", "system_prompt", "messages")):
                raise ChatError(
                    "send either conversation or prompt (with system_prompt and messages), not both", "conversation"
                )
            return ChatRequest(**_conversation(conversation), **options)
        prompt = _text(data.get_value("prompt"))
        if prompt is None or not prompt.strip():
            raise ChatError("prompt is missing or blank: send the text to answer in the 'prompt' field", "prompt")
        return ChatRequest(
            prompt=prompt,
            system_prompt=(_text(data.get_value("system_prompt")) or "").strip() or None,
            history=self._history(data.get_value("messages")),
            **options,
        )

    def _switch(self, data: RequestData, name: str) -> bool:
        raw = data.get_value(name)
        text = self.specs[name]["DefaultValue"] if raw is None or str(raw).strip() == "" else str(raw).strip()
        if text.lower() not in ("true", "false"):
            raise ChatError(f"{name} must be true or false, not {text[:40]!r}", name)
        return text.lower() == "true"

    def _number(self, data: RequestData, name: str):
        spec = self.specs[name]
        whole = spec["Type"] == "Integer"
        parse = int if whole else float
        low, high = parse(spec["MinValue"]), parse(spec["MaxValue"])
        kind = "a whole number" if whole else "a number"
        raw = data.get_value(name)
        if raw is None or str(raw).strip() == "":
            return parse(spec["DefaultValue"])
        try:
            value = parse(str(raw).strip())
        except ValueError:
            raise ChatError(f"{name} must be {kind} from {low} to {high}, not {str(raw)[:40]!r}", name) from None
        if (not whole and not math.isfinite(value)) or not low <= value <= high:
            raise ChatError(f"{name} must be {kind} from {low} to {high}, not {value}", name)
        return value

    @staticmethod
    def _stop(raw: str | None) -> list[str]:
        if raw is None or raw == "":
            return []
        stops = _json_array(raw) if raw.lstrip().startswith("[") else None
        # Anything that is not a JSON array of strings, "[/INST]" for one, is a single stop string.
        if stops is None or not all(isinstance(s, str) for s in stops):
            stops = [raw]
        if not 1 <= len(stops) <= MAX_STOP_STRINGS or not all(stops):
            raise ChatError(
                f"stop must be one string or a JSON array of 1 to {MAX_STOP_STRINGS} non-empty strings, "
                'e.g. ["\\n\\n", "User:"]',
                "stop",
            )
        longest = max(len(s) for s in stops)
        if longest > MAX_STOP_CHARS:
            raise ChatError(f"stop strings may be at most {MAX_STOP_CHARS} characters long, not {longest}", "stop")
        return stops

    @staticmethod
    def _history(raw: str | None) -> list[dict[str, str]]:
        if raw is None or not raw.strip():
            return []
        how = (
            "messages must be a JSON array of earlier turns, oldest first, like "
            '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]'
        )
        history = _messages(raw, "messages", how, "'user' or 'assistant' (put the system prompt in 'system_prompt')")
        if history and history[0]["role"] != "user":
            raise ChatError("messages must start with a 'user' turn", "messages")
        return history


def _messages(raw: str, name: str, how: str, roles: str) -> list[dict[str, str]]:
    """The {role, content} messages of a JSON array input; `roles` says which roles it takes, as the error names
    them ('system' is taken only if it appears there)."""
    size = len(raw.encode("utf-8"))
    if size > MAX_HISTORY_BYTES:
        raise ChatError(
            f"{name} may hold at most {MAX_HISTORY_BYTES} bytes of JSON (MAX_HISTORY_BYTES), "
            f"not {size}: send only the turns the model needs",
            name,
        )
    try:
        turns = json.loads(raw)
    except json.JSONDecodeError as ex:
        raise ChatError(f"{how}; it is not valid JSON ({ex.msg} at character {ex.pos})", name) from None
    except RecursionError:
        raise ChatError(f"{how}; it is nested too deeply", name) from None
    except ValueError:  # an integer of more digits than Python converts
        raise ChatError(f"{how}; it holds a number too long to read", name) from None
    if not isinstance(turns, list):
        raise ChatError(how, name)
    if len(turns) > MAX_HISTORY_MESSAGES:
        raise ChatError(
            f"{name} may hold at most {MAX_HISTORY_MESSAGES} turns (MAX_HISTORY_MESSAGES), "
            f"not {len(turns)}: send only the turns the model needs",
            name,
        )
    allowed = [role for role in CONVERSATION_ROLES if f"'{role}'" in roles]
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise ChatError(f"{how}; item {i} has no text 'content'", name)
        if turn.get("role") not in allowed:
            raise ChatError(f"{name}[{i}].role must be {roles}, not {turn.get('role')!r}", name)
        messages.append({"role": turn["role"], "content": _text(turn["content"])})
    return messages


def _conversation(raw: str) -> dict[str, Any]:
    """ChatRequest's conversation fields from the `conversation` input: the last user message is the prompt, what
    comes before it the history (system messages included, where they are), an assistant message after it the text
    the reply continues."""
    how = (
        "conversation must be a JSON array of the whole conversation, oldest first, like "
        '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]'
    )
    messages = _messages(raw, "conversation", how, "'system', 'user' or 'assistant'")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    after = messages[last_user + 1 :] if last_user is not None else messages
    if last_user is None or len(after) > 1 or (after and after[0]["role"] != "assistant"):
        raise ChatError(
            "conversation must end with a user message, or with one assistant message after it whose text the "
            "reply continues",
            "conversation",
        )
    return dict(
        prompt=messages[last_user]["content"],
        system_prompt=None,
        history=messages[:last_user],
        as_sent=True,
        prefill=after[0]["content"] if after else None,
    )


def _grammar(raw: str | None) -> str | None:
    """The llama.cpp grammar (GBNF) for a JSON schema input; ChatError naming the problem for one that cannot be
    compiled, never a reply left unconstrained."""
    if raw is None or not raw.strip():
        return None
    _bounded(raw, "json_schema")
    try:
        schema = json.loads(raw)
    except (ValueError, RecursionError) as ex:  # not JSON, or a number too long to read
        raise ChatError(f"json_schema is not valid JSON: {ex}", "json_schema", INVALID_JSON_SCHEMA) from None
    try:
        return json_grammar(schema)
    except SchemaError as ex:
        raise ChatError(f"json_schema cannot be enforced: {ex}", "json_schema", INVALID_JSON_SCHEMA) from None


def _bounded(raw: str, name: str) -> None:
    size = len(raw.encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise ChatError(f"{name} may hold at most {MAX_SCHEMA_BYTES} bytes (MAX_SCHEMA_BYTES), not {size}", name)


def _tools(raw: str | None) -> list[dict[str, Any]] | None:
    """The tools a template that renders them is given: a JSON array of {"type": "function", "function": {...}}."""
    if raw is None or not raw.strip():
        return None
    how = 'tools must be a JSON array of {"type": "function", "function": {"name": ..., "parameters": {...}}}'
    _bounded(raw, "tools")
    try:
        tools = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or a number too long to read
        raise ChatError(how, "tools") from None
    named = isinstance(tools, list) and all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
        for t in tools
    )
    if not named:
        raise ChatError(how, "tools")
    return tools


def _logit_bias(raw: str | None) -> dict[int, float] | None:
    """{token id: bias from -100 to 100} from a JSON object, as OpenAI's logit_bias."""
    if raw is None or not raw.strip():
        return None
    how = 'logit_bias must be a JSON object of token ids and biases from -100 to 100, like {"1234": -100}'
    try:
        biases = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or a number too long to read
        raise ChatError(how, "logit_bias") from None
    if not isinstance(biases, dict) or len(biases) > MAX_LOGIT_BIASES:
        raise ChatError(f"{how}, with at most {MAX_LOGIT_BIASES} entries", "logit_bias")
    parsed = {}
    for token, bias in biases.items():
        ok_bias = isinstance(bias, (int, float)) and not isinstance(bias, bool) and -100 <= bias <= 100
        if not (token.isdigit() and ok_bias):
            raise ChatError(f"{how}; {token!r}: {bias!r} is not", "logit_bias")
        parsed[int(token)] = float(bias)
    return parsed


def _json_array(raw: str) -> list | None:
    """raw parsed as a JSON array, or None if it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or a number too long to read
        return None
    return value if isinstance(value, list) else None


def _text(value: str | None) -> str | None:
    # Browsers send form fields with CRLF line breaks; one form keeps a turn's tokens the same when it comes back
    # in the next request's history, so the KV cache still matches.
    return None if value is None else str(value).replace("\r\n", "\n")
