"""LiveWriter: sends a streamed chat's new text to its client from the reply channel's reader itself, as the pipe
delivers it, so that a token costs the server one wake-up and the write of one chunk (no task woken through an event,
no queue, no generators in between: bench/results/openai_stream.md).

Only for what can be sent on the spot: a single choice's plain text, once everything before it has gone through the
handler's ordinary writes, over HTTP/1.1 chunked encoding, while the connection's writes are not paused. Whatever it
cannot write now (`write` answers False) takes the ordinary way through the handler's task, which aiohttp holds back
for a slow client and which finds a gone one. (aiohttp does not count these chunks in the response's body_length.)
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web


class LiveWriter:
    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._request, self._response = request, response
        self._event: Callable[[str], dict] | None = None  # the chunk for a piece of text, once started

    def start(self, event: Callable[[str], dict]) -> None:
        """From now on pieces may be written here: the handler has sent everything before them. `event` makes the
        chunk of a piece."""
        self._event = event

    def write(self, text: str) -> bool:
        """Sends `text`, the reply's next piece, as a chunk now; False when it cannot (not started, the connection
        closing, or its writes paused while the client catches up): the piece then goes the ordinary way."""
        transport = self._request.transport
        if self._event is None or not self._response.chunked or transport is None or transport.is_closing():
            return False
        if self._request.protocol.writing_paused:
            return False
        data = f"data: {json.dumps(self._event(text))}\n\n".encode()
        # HTTP/1.1 chunked framing, as aiohttp writes each chunk of the response (enable_chunked_encoding).
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True
