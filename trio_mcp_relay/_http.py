"""Plain HTTP on the WebSocket port: read a request head, answer simple GETs.

Every connection starts here. :func:`read_request_head` reads bytes until h11 has parsed a
whole request head, keeping the raw bytes so that a WebSocket upgrade can be replayed into
wsproto. Requests that are not upgrades are answered by :func:`respond` and the connection is
closed (no keep-alive: the endpoints are probes, not an API).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from ._frames import dumps

__all__ = ["HttpRequest", "Target", "read_request_head", "respond"]

MAX_HEAD_SIZE: Final = 16384


class BadRequest(Exception):
    """The peer did not send a usable HTTP request head."""


class Target:
    """What a request's target says: its path and its query (for classes with ``target``)."""

    target: str

    @property
    def path(self) -> str:
        """The target's path, without query."""
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        """The query parameters (first value of each)."""
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}


@attrs.frozen
class HttpRequest(Target):
    """The head of one HTTP request."""

    method: str
    target: str
    headers: dict[str, str]
    raw: bytes  # every byte read so far, the head and anything after it

    @property
    def is_websocket(self) -> bool:
        """Whether this asks to upgrade to a WebSocket."""
        return (
            "upgrade" in self.headers.get("connection", "").lower()
            and self.headers.get("upgrade", "").lower() == "websocket"
        )


async def read_request_head(stream: trio.abc.ReceiveStream) -> HttpRequest:
    """Read until a complete request head has arrived.

    Raises:
        BadRequest: the bytes are not an HTTP/1.1 request, the head is too big, or the peer
            closed before finishing it.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc)) from None
        if isinstance(event, h11.Request):
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in event.headers
            }
            return HttpRequest(
                method=event.method.decode("ascii", "replace"),
                target=event.target.decode("latin-1"),
                headers=headers,
                raw=bytes(raw),
            )
        if event is not h11.NEED_DATA:
            raise BadRequest("unexpected HTTP event")
        try:
            data = await stream.receive_some(MAX_HEAD_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            raise BadRequest("connection closed before the request head was complete")
        raw += data
        conn.receive_data(bytes(data))


def _status_reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


async def respond(
    stream: trio.abc.SendStream,
    status: int,
    body: Any = None,
    *,
    headers: Iterable[tuple[str, str]] = (),
    head_only: bool = False,
    content_type: str = "application/json",
) -> None:
    """Send one HTTP/1.1 response and end it: ``body`` is sent as JSON, or as it is when it
    is ``bytes`` (then say what it is with ``content_type``); None sends no body.

    The caller closes the stream afterwards.
    """
    conn = h11.Connection(h11.SERVER)
    # h11 must see a request before it lets us respond: feed it a minimal one.
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    payload = b"" if body is None else body if isinstance(body, bytes) else dumps(body)
    all_headers = [
        ("content-length", str(len(payload))),
        ("connection", "close"),
        ("server", "trio-mcp-relay"),
        *headers,
    ]
    if body is not None:
        all_headers.append(("content-type", content_type))
    response = h11.Response(status_code=status, headers=all_headers, reason=_status_reason(status))
    data = conn.send(response)
    assert data is not None
    if payload and not head_only:
        more = conn.send(h11.Data(data=payload))
        assert more is not None
        data += more
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
