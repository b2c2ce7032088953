"""Reading a client's request body within bounds: its size (smaller on routes that take no files), the time it may
take to arrive, and, for JSON, how many items it holds, counted before it is parsed.

json.loads holds the GIL from start to end, so parsing in a worker thread would not free the event loop; what keeps
the loop free is that no body gets to be expensive: a body of millions of tiny items (`{"values": [{...}, ...]}`),
which becomes hundreds of MB of Python objects, is refused by a count of its commas and brackets that runs at C speed
(about 1 ms per MB), before any object is made.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web

# Other modules' routes carry images (the real server, Kestrel, accepts ~30 MB bodies); routes that take no file
# (the chat, its status and cancel, the OpenAI API) get far less: the module's `messages` cap is 2 MiB, which fits
# even urlencoded with every quote escaped.
MAX_FILE_BODY_BYTES = 50 * 1024 * 1024
MAX_TEXT_BODY_BYTES = 8 * 1024 * 1024
# A body may take this long to arrive once its headers have: a client that sends a few bytes a minute would
# otherwise hold a connection (and a file descriptor) for ever. 50 MB in 60 s needs under 1 MB/s.
BODY_SECONDS = 60.0
# At most this many JSON values (objects, arrays, strings, numbers) in one body or value: a request needs hundreds.
MAX_JSON_ITEMS = 200_000

T = TypeVar("T")


class JsonInputError(ValueError):
    """Text that cannot be read as JSON within bounds; the message says what is wrong, naming `what` it was."""


def json_item_bound(text: str) -> int:
    """An upper bound on the number of values in a JSON text: each value after the first in an array or object
    follows a comma, and each container opens with a bracket (those inside strings count too, which only raises it)."""
    return text.count(",") + text.count("[") + text.count("{")


def parse_json(text: str, what: str = "The JSON body") -> Any:
    """json.loads, refusing text of more than MAX_JSON_ITEMS values before parsing it; raises JsonInputError."""
    if json_item_bound(text) > MAX_JSON_ITEMS:
        raise JsonInputError(
            f"{what} holds more than {MAX_JSON_ITEMS:,} JSON items (commas and brackets, inside text too), "
            f"far more than a request needs"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as ex:
        raise JsonInputError(f"{what} is not valid JSON ({ex.msg} at character {ex.pos})") from None
    except RecursionError:
        raise JsonInputError(f"{what} is nested too deeply to read") from None
    except ValueError:  # an integer longer than Python converts
        raise JsonInputError(
            f"{what} holds a number of more than {sys.get_int_max_str_digits()} digits; send it as text"
        ) from None


def body_limit(request: web.Request, max_bytes: int) -> web.Request:
    """The request, reading at most `max_bytes` of body (more is a 413); call before its body is read."""
    return request.clone(client_max_size=max_bytes)


async def within_body_deadline(read: Awaitable[T]) -> T:
    """Awaits a read of the request body (request.post(), .text(), .read()); a 408 if it takes over BODY_SECONDS."""
    try:
        return await asyncio.wait_for(read, BODY_SECONDS)
    except asyncio.TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"The request body did not arrive within {BODY_SECONDS:g} s of its headers: send it at once"
        ) from None
