"""The HTTP+SSE transport of MCP 2024-11-05, for older clients.

``GET /mcp_endpoint/sse/?token=T`` opens a session and its one event stream, whose first event
(``endpoint``) names where the client POSTs its messages:
``/mcp_endpoint/messages/?session_id=ID`` (answered 202). Everything the relay sends comes as
``message`` events on the stream, without ids (this revision cannot resume). The session is
the stream: it ends when the stream does, and its requests in flight are cancelled at the
tool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..._frames import INVALID_REQUEST
from .checks import Refusal, accepts, parse_message
from .conn import HttpConnection
from .conn import Request as HttpRequest
from .sessions import CLOSE_DELETED, Sessions
from .sse import sse_event, write_stream

__all__ = ["MESSAGES_ENDPOINT", "LegacySse"]

MESSAGES_ENDPOINT: Final = "/mcp_endpoint/messages/"

_Headers = list[tuple[str, str]]


class LegacySse:
    """The HTTP+SSE handlers.

    Args:
        sessions: the relay's HTTP sessions.
    """

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    async def open(
        self,
        connection: HttpConnection,
        request: HttpRequest,
        cors: _Headers,
        agent: str,
        remote: str,
    ) -> bool:
        if not accepts(request)[1]:
            raise Refusal(
                406, INVALID_REQUEST, "Not Acceptable: this endpoint is text/event-stream"
            )
        session = await self.sessions.open(agent, remote, legacy=True)
        try:
            with session.exchange():
                connection.open_stream(cors)
                endpoint = f"{MESSAGES_ENDPOINT}?session_id={session.id}".encode()
                await connection.send(sse_event(endpoint, event="endpoint"))
                await write_stream(connection, session, session.events.get_stream, 0, prime=False)
        finally:
            self.sessions.end(session, CLOSE_DELETED, "the SSE stream closed")
        return False

    async def post(
        self,
        connection: HttpConnection,
        request: HttpRequest,
        cors: _Headers,
        authenticated: Callable[[], None],
    ) -> bool:
        """A message for a legacy session: its id (from the stream's ``endpoint`` event, a
        secret only that client has seen) is the credential."""
        session = self.sessions.get(request.query.get("session_id", ""))
        if session is None or not session.legacy:
            raise Refusal(
                404, INVALID_REQUEST, "no such session (it ended): open /mcp_endpoint/sse/ again"
            )
        authenticated()
        parse_message(request)
        await self.sessions.deliver(session, request.body)
        await connection.respond(202, b"Accepted", cors, content_type="text/plain")
        return True
