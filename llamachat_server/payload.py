"""Turns a client's request into the RequestPayload the module receives (docs/protocol.md §1.2, §2.2):
`{command, values: [{key, value: [..]}], files: [{name, filename, contentType, data(base64)}], urlSegments}`.

Accepted bodies: a multipart or urlencoded form, a JSON body in RequestPayload shape, or none. Unlike
the real server, query-string parameters are never dropped: they come first in `values` whatever the
body (the real server loses them for JSON and body-less requests).
"""
from __future__ import annotations

import base64
import json
from typing import Any, Iterable

from aiohttp import web

from .settings import lookup

FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_SHAPE_HINT = ('{"values": [{"key": "prompt", "value": ["Hello"]}]} '
                   "(the RequestPayload shape), or send the fields as a form")


class PayloadError(Exception):
    """The client's request body cannot be turned into a payload; the message says what to send instead."""


def group_values(pairs: Iterable[tuple[str, str]]) -> list[dict]:
    """[(k, v), ...] → [{"key": k, "value": [v, ...]}], one entry per key in first-seen order, as
    ASP.NET's form and query collections serialise."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return [{"key": key, "value": values} for key, values in grouped.items()]


async def _form_parts(request: web.Request) -> tuple[list[dict], list[dict]]:
    form = await request.post()
    fields, files = [], []
    for key, value in form.items():
        if isinstance(value, web.FileField):
            files.append({
                "name": key,
                "filename": value.filename,
                "contentType": value.content_type,
                "data": base64.b64encode(value.file.read()).decode("ascii"),
            })
        else:
            fields.append((key, value))
    return group_values(fields), files


def _checked_values(values: Any) -> list[dict]:
    if not isinstance(values, list):
        raise PayloadError(f"'values' must be a list, like {JSON_SHAPE_HINT}")
    checked = []
    for index, item in enumerate(values):
        key, value = lookup(item, "key"), lookup(item, "value", default=[])
        if not isinstance(key, str) or not isinstance(value, list) \
                or not all(isinstance(v, str) for v in value):
            raise PayloadError(f"values[{index}] must be {{\"key\": <text>, \"value\": [<text>, ...]}}, "
                               f"like {JSON_SHAPE_HINT}")
        checked.append({"key": key, "value": value})
    return checked


def _checked_files(files: Any) -> list[dict]:
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(lookup(f, "data"), str)
                                              for f in files):
        raise PayloadError("'files' must be a list of {\"name\", \"filename\", \"contentType\", "
                           "\"data\": <base64 text>}")
    return files


def _json_parts(body: Any) -> tuple[list[dict], list[dict]]:
    if not isinstance(body, dict):
        raise PayloadError(f"A JSON body must be an object: {JSON_SHAPE_HINT}")
    payload_keys = {"values", "files", "command", "urlsegments", "queue"}
    unknown = [key for key in body if key.lower() not in payload_keys]
    if unknown:
        raise PayloadError(f"A JSON body must be in RequestPayload shape, not a plain object "
                           f"(found {', '.join(repr(k) for k in unknown)}): send {JSON_SHAPE_HINT}")
    return _checked_values(lookup(body, "values", default=[])), _checked_files(lookup(body, "files", default=[]))


async def build_payload(request: web.Request, command: str, url_segments: list[str]) -> dict:
    query_values = group_values(request.query.items())
    if request.content_type in FORM_CONTENT_TYPES:
        values, files = await _form_parts(request)
    elif request.content_type == "application/json" and request.can_read_body:
        text = await request.text()
        try:
            body = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as ex:
            raise PayloadError(f"The JSON body is not valid JSON ({ex.msg} at character {ex.pos}): "
                               f"send {JSON_SHAPE_HINT}") from ex
        values, files = _json_parts(body)
    elif not request.can_read_body or not await request.read():
        values, files = [], []
    else:
        raise PayloadError(f"Unsupported Content-Type '{request.content_type}': send multipart/form-data, "
                           "application/x-www-form-urlencoded or a JSON RequestPayload")
    return {"command": command, "values": query_values + values, "files": files, "urlSegments": url_segments}
