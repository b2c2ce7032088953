"""Turns a client's request into the RequestPayload the module receives (docs/protocol.md §1.2, §2.2):
`{command, values: [{key, value: [..]}], files: [{name, filename, contentType, data(base64)}], urlSegments}`.

Accepted bodies: a multipart or urlencoded form, a JSON body in RequestPayload shape, or none. Unlike
the real server, query-string parameters are never dropped: they come first in `values` whatever the
body (the real server loses them for JSON and body-less requests).

Text that is not UTF-8, malformed forms, and JSON nested deeper than MAX_JSON_DEPTH (in the body, or in a
value such as `messages`, which a module parses as JSON and could not) are refused with what to fix.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .errors import not_utf8_message
from .request_body import JsonInputError, parse_json, within_body_deadline
from .settings import lookup

# Far deeper than any real value (`messages` is 2 levels), far below what Python's parser survives (~1000).
MAX_JSON_DEPTH = 100
# Fields (values and files) in one request, for any body: aiohttp's own cap on a form.
MAX_FIELDS = 1000
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_SHAPE_HINT = (
    '{"values": [{"key": "prompt", "value": ["Hello"]}]} (the RequestPayload shape), or send the fields as a form'
)


class PayloadError(Exception):
    """The client's request body cannot be turned into a payload; the message says what to send instead."""


def group_values(pairs: Iterable[tuple[str, str]]) -> list[dict]:
    """[(k, v), ...] → [{"key": k, "value": [v, ...]}], one entry per key in first-seen order, as
    ASP.NET's form and query collections serialise."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return [{"key": key, "value": values} for key, values in grouped.items()]


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a plain value: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_json_depth(key: str, text: str) -> None:
    """Refuses a value that is JSON nested deeper than MAX_JSON_DEPTH. Cheap for ordinary values: only text that
    starts like JSON and holds more brackets than the limit is parsed."""
    if text.lstrip()[:1] not in ("[", "{") or text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    try:
        too_deep = json_depth(json.loads(text)) > MAX_JSON_DEPTH
    except RecursionError:
        too_deep = True
    except ValueError:  # not JSON after all (or a number too long to read): the module judges it as text
        return
    if too_deep:
        raise PayloadError(
            f"'{key}' holds JSON nested more than {MAX_JSON_DEPTH} levels deep, far more than any "
            f"request needs: send it flatter"
        )


async def _form_parts(request: web.Request) -> tuple[list[dict], list[dict]]:
    try:
        form = await within_body_deadline(request.post())
    except UnicodeDecodeError as ex:
        raise PayloadError(not_utf8_message(ex, "The form")) from None
    except ValueError as ex:  # aiohttp's parser on a broken multipart body
        raise PayloadError(
            f"The form body is malformed ({ex}): send a complete multipart/form-data or "
            f"application/x-www-form-urlencoded body"
        ) from None
    fields: list[tuple[str, str]] = []
    files: list[dict] = []
    for key, value in form.items():
        if isinstance(value, web.FileField):
            files.append(
                {
                    "name": key,
                    "filename": value.filename,
                    "contentType": value.content_type,
                    "data": base64.b64encode(value.file.read()).decode("ascii"),
                }
            )
        else:
            fields.append((key, str(value)))  # aiohttp decodes a form's text fields to str
    return group_values(fields), files


def _checked_values(values: Any) -> list[dict]:
    if not isinstance(values, list):
        raise PayloadError(f"'values' must be a list, like {JSON_SHAPE_HINT}")
    checked = []
    for index, item in enumerate(values):
        key, value = lookup(item, "key"), lookup(item, "value", default=[])
        if not isinstance(key, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PayloadError(
                f'values[{index}] must be {{"key": <text>, "value": [<text>, ...]}}, like {JSON_SHAPE_HINT}'
            )
        checked.append({"key": key, "value": value})
    return checked


def _checked_files(files: Any) -> list[dict]:
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(lookup(f, "data"), str) for f in files
    ):
        raise PayloadError('\'files\' must be a list of {"name", "filename", "contentType", "data": <base64 text>}')
    return files


def _json_parts(body: Any) -> tuple[list[dict], list[dict]]:
    if not isinstance(body, dict):
        raise PayloadError(f"A JSON body must be an object: {JSON_SHAPE_HINT}")
    payload_keys = {"values", "files", "command", "urlsegments", "queue"}
    unknown = [key for key in body if key.lower() not in payload_keys]
    if unknown:
        raise PayloadError(
            f"A JSON body must be in RequestPayload shape, not a plain object "
            f"(found {', '.join(repr(k) for k in unknown)}): send {JSON_SHAPE_HINT}"
        )
    values, files = lookup(body, "values", default=[]), lookup(body, "files", default=[])
    if isinstance(values, list) and isinstance(files, list):
        _check_field_count(len(values) + len(files))  # at least this many: refused before each entry is checked
    return _checked_values(values), _checked_files(files)


def _check_field_count(fields: int) -> None:
    """Refuses more fields than a form may have (aiohttp's cap, which a JSON body would otherwise escape)."""
    if fields > MAX_FIELDS:
        raise PayloadError(
            f"The request holds {fields} fields (values and files); at most {MAX_FIELDS} are accepted: send fewer"
        )


async def build_payload(request: web.Request, command: str, url_segments: list[str]) -> dict:
    query_values = group_values(request.query.items())
    if request.content_type in FORM_CONTENT_TYPES:
        values, files = await _form_parts(request)
    elif request.content_type == "application/json" and request.can_read_body:
        try:
            text = await within_body_deadline(request.text())
        except UnicodeDecodeError as ex:
            raise PayloadError(not_utf8_message(ex, "The JSON body")) from None
        try:
            body = parse_json(text) if text.strip() else {}
        except JsonInputError as ex:
            raise PayloadError(f"{ex}: send {JSON_SHAPE_HINT}") from None
        values, files = _json_parts(body)
    elif not request.can_read_body or not await within_body_deadline(request.read()):
        values, files = [], []
    else:
        raise PayloadError(
            f"Unsupported Content-Type '{request.content_type}': send multipart/form-data, "
            "application/x-www-form-urlencoded or a JSON RequestPayload"
        )
    values = query_values + values
    _check_field_count(sum(max(1, len(item["value"])) for item in values) + len(files))
    for item in values:
        for text in item["value"]:
            _check_json_depth(item["key"], text)
    return {"command": command, "values": values, "files": files, "urlSegments": url_segments}
