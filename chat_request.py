"""A chat request read from the queued RequestData and checked against the route's inputs in modulesettings.json.

The route's Inputs (DefaultValue, MinValue, MaxValue) are the one place defaults and ranges are written down, so the
API docs, the Explorer page and this validation cannot drift apart.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from codeproject_ai_sdk import RequestData

CHAT_ROUTE = "text/chat"
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 200  # each stop string is looked for in the reply after every token
# Caps on the earlier turns a client may send: the JSON is parsed on the SDK's request loop, before the chat starts,
# where 2 MiB take ~30 ms (bench/fit_time.py). Both are far beyond what a model's context holds (2 MiB of text is
# ~500k tokens), so they refuse only abuse.
MAX_HISTORY_BYTES = 2 * 1024 * 1024
MAX_HISTORY_MESSAGES = 10_000
# Inputs passed straight to create_chat_completion under the same name.
SAMPLING_INPUTS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


class ChatError(ValueError):
    """A chat that cannot run; the message tells the client what to change."""


@dataclass
class ChatRequest:
    prompt: str
    system_prompt: str | None
    history: list[dict[str, str]]
    max_tokens: int
    # Keyword arguments for create_chat_completion: sampling settings, seed and stop strings.
    sampling: dict[str, Any] = field(default_factory=dict)


class ChatInputs:
    """Parses and validates the inputs of the chat route."""

    def __init__(self, module_path: str) -> None:
        with open(os.path.join(module_path, "modulesettings.json"), encoding="utf-8") as f:
            modules = json.load(f)["Modules"]
        routes = [route for module in modules.values() for route in module.get("RouteMaps", [])]
        route = next(r for r in routes if r["Route"] == CHAT_ROUTE)
        self.specs = {spec["Name"]: spec for spec in route["Inputs"]}

    def parse(self, data: RequestData) -> ChatRequest:
        prompt = _text(data.get_value("prompt"))
        if prompt is None or not prompt.strip():
            raise ChatError("prompt is missing or blank: send the text to answer in the 'prompt' field")
        sampling = {name: self._number(data, name) for name in SAMPLING_INPUTS}
        seed = self._number(data, "seed")
        if seed != -1:
            sampling["seed"] = seed
        stop = self._stop(data.get_value("stop"))
        if stop:
            sampling["stop"] = stop
        return ChatRequest(
            prompt=prompt,
            system_prompt=(_text(data.get_value("system_prompt")) or "").strip() or None,
            history=self._history(data.get_value("messages")),
            max_tokens=self._number(data, "max_tokens"),
            sampling=sampling,
        )

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
            raise ChatError(f"{name} must be {kind} from {low} to {high}, not {str(raw)[:40]!r}") from None
        if (not whole and not math.isfinite(value)) or not low <= value <= high:
            raise ChatError(f"{name} must be {kind} from {low} to {high}, not {value}")
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
                'e.g. ["\\n\\n", "User:"]'
            )
        longest = max(len(s) for s in stops)
        if longest > MAX_STOP_CHARS:
            raise ChatError(f"stop strings may be at most {MAX_STOP_CHARS} characters long, not {longest}")
        return stops

    @staticmethod
    def _history(raw: str | None) -> list[dict[str, str]]:
        if raw is None or not raw.strip():
            return []
        how = (
            "messages must be a JSON array of earlier turns, oldest first, like "
            '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]'
        )
        size = len(raw.encode("utf-8"))
        if size > MAX_HISTORY_BYTES:
            raise ChatError(
                f"messages may hold at most {MAX_HISTORY_BYTES} bytes of JSON (MAX_HISTORY_BYTES), "
                f"not {size}: send only the turns the model needs"
            )
        try:
            turns = json.loads(raw)
        except json.JSONDecodeError as ex:
            raise ChatError(f"{how}; it is not valid JSON ({ex.msg} at character {ex.pos})") from None
        except RecursionError:
            raise ChatError(f"{how}; it is nested too deeply") from None
        except ValueError:  # an integer of more digits than Python converts
            raise ChatError(f"{how}; it holds a number too long to read") from None
        if not isinstance(turns, list):
            raise ChatError(how)
        if len(turns) > MAX_HISTORY_MESSAGES:
            raise ChatError(
                f"messages may hold at most {MAX_HISTORY_MESSAGES} turns (MAX_HISTORY_MESSAGES), "
                f"not {len(turns)}: send only the turns the model needs"
            )
        history = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                raise ChatError(f"{how}; item {i} has no text 'content'")
            if turn.get("role") not in ("user", "assistant"):
                raise ChatError(
                    f"messages[{i}].role must be 'user' or 'assistant' (put the system prompt in "
                    f"'system_prompt'), not {turn.get('role')!r}"
                )
            history.append({"role": turn["role"], "content": _text(turn["content"])})
        if history and history[0]["role"] != "user":
            raise ChatError("messages must start with a 'user' turn")
        return history


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
