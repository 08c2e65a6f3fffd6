"""Streamable HTTP (MCP 2025-03-26 to 2025-11-25) on the caller path: POST, GET, DELETE.

``POST`` carries one JSON-RPC message: a request is answered on its own SSE stream (its
progress, the tool's requests meanwhile, then the response) when the client accepts
``text/event-stream``, else with ``application/json``; notifications and responses get 202.
``initialize`` without a session opens one (``Mcp-Session-Id`` on its answer); every other
message names its session (400 without, 404 unknown). ``GET`` opens the standalone stream,
or with ``Last-Event-ID`` resumes the stream that id names. ``DELETE`` ends the session.
"""

from __future__ import annotations

from ..._frames import CONNECTION_ERROR, INVALID_REQUEST, Notification, Request, error_frame
from .checks import Refusal, accepts, check_version, parse_message
from .conn import HttpConnection
from .conn import Request as HttpRequest
from .events import Stream, parse_event_id
from .session import HttpSession
from .sessions import CLOSE_DELETED, Sessions
from .sse import PRIMING_SINCE, answer_gone, primes, write_stream

__all__ = ["StreamableHttp"]

_Headers = list[tuple[str, str]]


class StreamableHttp:
    """The Streamable HTTP handlers.

    Args:
        sessions: the relay's HTTP sessions.
    """

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def session_of(self, request: HttpRequest, agent: str) -> HttpSession:
        """The request's session (400 without an id, 404 unknown or another agent's, 400 for
        an unsupported protocol version)."""
        session_id = request.headers.get("mcp-session-id")
        if session_id is None:
            raise Refusal(
                400,
                INVALID_REQUEST,
                "Bad Request: the Mcp-Session-Id header is missing (send initialize first)",
            )
        session = self.sessions.get(session_id)
        if session is None or session.agent != agent or session.legacy:
            raise Refusal(
                404,
                INVALID_REQUEST,
                "Not Found: no such session (it ended or expired): send initialize again",
            )
        check_version(request)
        return session

    async def delete(
        self, connection: HttpConnection, request: HttpRequest, cors: _Headers, agent: str
    ) -> bool:
        session = self.session_of(request, agent)
        self.sessions.end(session, CLOSE_DELETED, "session ended by the client (DELETE)")
        await connection.respond(204, headers=cors)
        return True

    async def post(
        self,
        connection: HttpConnection,
        request: HttpRequest,
        cors: _Headers,
        agent: str,
        remote: str,
    ) -> bool:
        frame = parse_message(request)
        json_ok, sse_ok = accepts(request)
        if not (json_ok or sse_ok):
            raise Refusal(
                406, INVALID_REQUEST, "Not Acceptable: accept application/json or text/event-stream"
            )
        if "mcp-session-id" not in request.headers:
            if isinstance(frame, Request) and frame.method == "initialize":
                session = await self.sessions.open(agent, remote, legacy=False)
                session.expect_initialize(frame.id)
                cors = [*cors, ("mcp-session-id", session.id)]
                # The session's revision is known once answered: prime by the one asked for.
                params = frame.params if isinstance(frame.params, dict) else {}
                asked = params.get("protocolVersion")
                prime = isinstance(asked, str) and asked >= PRIMING_SINCE
                try:
                    return await self._request(
                        connection, request, cors, session, frame, sse_ok, prime=prime
                    )
                finally:
                    if session.version is None:  # no InitializeResult, no session
                        self.sessions.end(session, CLOSE_DELETED, "initialize failed")
            check_version(request)  # a client of a sessionless revision learns ours
        session = self.session_of(request, agent)
        if isinstance(frame, Request) and frame.method == "initialize":
            raise Refusal(
                400,
                INVALID_REQUEST,
                "this session is initialized already: "
                "send initialize without Mcp-Session-Id for a new one",
            )
        if isinstance(frame, Request):
            prime = primes(session)
            return await self._request(
                connection, request, cors, session, frame, sse_ok, prime=prime
            )
        with session.exchange():
            if isinstance(frame, Notification) and frame.method == "notifications/cancelled":
                params = frame.params
                if isinstance(params, dict) and "requestId" in params:
                    session.cancelled(params["requestId"])
            await self.sessions.deliver(session, request.body)
            await connection.respond(202, headers=cors)
        return True

    async def _request(
        self,
        connection: HttpConnection,
        request: HttpRequest,
        headers: _Headers,
        session: HttpSession,
        frame: Request,
        sse_ok: bool,
        *,
        prime: bool,
    ) -> bool:
        """Hand a request to the relay and stream (or send) its answer back."""
        with session.exchange():
            if session.in_flight(frame.id):
                raise Refusal(
                    400,
                    INVALID_REQUEST,
                    f"request id {frame.id!r} is in flight already in this session",
                )
            stream = session.open_stream(frame.id, frame.params, sse=sse_ok)
            await self.sessions.deliver(session, request.body)
            if stream.sse:
                connection.open_stream(headers)
                return await write_stream(connection, session, stream, 0, prime=prime)
            return await self._json_answer(connection, headers, session, stream, frame)

    @staticmethod
    async def _json_answer(
        connection: HttpConnection,
        headers: _Headers,
        session: HttpSession,
        stream: Stream,
        frame: Request,
    ) -> bool:
        """Wait for the response and send it as ``application/json``; a client that leaves
        meanwhile cannot resume such an answer, so it is dropped when it comes (the request
        goes on: a dropped connection is not a cancellation)."""
        writer = object()
        session.attach(stream, writer)
        events: list[tuple[int, bytes]] = []
        try:
            async with connection.watched() as watch:
                events = await session.wait_events(stream, 0, writer)
        finally:
            session.detach(stream, writer)
        gone = watch.gone
        if gone:
            session.abandoned(frame.id)
            return False
        if events:
            body = events[-1][1]
            session.wrote(stream, events[-1][0])
        else:
            body = error_frame(frame.id, CONNECTION_ERROR, "the session ended before the answer")
        await connection.respond(200, body, headers)
        return True

    async def get(
        self, connection: HttpConnection, request: HttpRequest, cors: _Headers, agent: str
    ) -> bool:
        session = self.session_of(request, agent)
        if not accepts(request)[1]:
            raise Refusal(
                406, INVALID_REQUEST, "Not Acceptable: the GET stream is text/event-stream"
            )
        last = request.headers.get("last-event-id")
        stream = session.events.get_stream
        after = stream.written  # a new GET stream: what was never written, then what comes
        if last is not None:
            position = parse_event_id(last)
            if position is None or not session.events.known(position[0]):
                raise Refusal(400, INVALID_REQUEST, "Last-Event-ID names no event of this session")
            number, after = position
            found = session.events.streams.get(number)
            gone = found is None or (found.done and after < found.last and not found.after(after))
            if gone:
                # A request stream whose answer the relay no longer holds (written whole, or
                # dropped for room): its client is told, else it would resume for ever.
                request_id = (
                    session.events.forgotten.get(number) if found is None else found.request_id
                )
                with session.exchange():
                    connection.open_stream(cors)
                    if request_id is None:
                        await connection.end_stream()
                    else:
                        await answer_gone(connection, request_id)
                return True
            assert found is not None
            stream = found
            after = min(after, stream.last)  # an id from the future: resume from now
        with session.exchange():
            connection.open_stream(cors)
            prime = last is None and primes(session)
            return await write_stream(connection, session, stream, after, prime=prime)
