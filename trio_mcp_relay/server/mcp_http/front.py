"""The HTTP front of the caller endpoint: MCP Streamable HTTP, and the older HTTP+SSE.

Standard MCP clients reach an agent here, as callers of it, at the same URL a WebSocket
caller uses (``/mcp_endpoint/call/?token=T``):

``POST``
    one JSON-RPC message. A request is answered on an SSE stream when the client accepts
    ``text/event-stream`` (its progress and the tool's requests meanwhile, then the response),
    else with ``application/json``; a notification or a response gets 202. The first request
    of a session is ``initialize``, answered with a fresh ``Mcp-Session-Id`` that every later
    request must carry (400 without it, 404 for an unknown or ended one).
``GET``
    the session's standalone SSE stream, for what the relay sends on its own
    (``list_changed``, tool notifications, requests a tool makes). With ``Last-Event-ID``, it
    resumes the stream that id belongs to (standalone or a POST's) after that event.
``DELETE``
    ends the session.

The legacy transport (MCP 2024-11-05) is at ``/mcp_endpoint/sse/?token=T``: a ``GET`` opens
an event stream whose first event (``endpoint``) names where to ``POST`` messages
(``/mcp_endpoint/messages/?session_id=...``, answered 202); everything the relay sends comes
on that stream. Its session ends with the stream.

Every session is a caller of its agent (:mod:`.session`), run by the dispatcher like a
WebSocket caller, in the relay's connections nursery. It ends on ``DELETE``, after
``session_idle_timeout`` seconds with no request and no open stream, when its client stops
reading (its bounds overflow), or at shutdown; its requests still in flight are then
cancelled at the tool.

Checks, in order, each with the status and the JSON-RPC error the spec gives: ``Origin``
(403), the token (``?token=`` or ``Authorization: Bearer``; 401, 403 for a tool token, 429
for an address that keeps failing), the body size (413), ``Content-Type`` (415), ``Accept``
(406), the JSON (400 with ``-32700``; a batch or a malformed message 400 with ``-32600``),
the session (400, 404), ``MCP-Protocol-Version`` (400 with ``-32022``). Headers are never
forwarded to a tool: only the JSON-RPC message travels.

Designed for the next revision (stateless requests, ``server/discover``, no session): a
request would run as a one-request session (:meth:`McpHttpFront.run_session` for the length
of one ``POST``), the rest stays. Today a sessionless request that names that revision gets
``-32022`` listing the revisions served, so its clients fall back to ``initialize``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Protocol

import trio

from ..._auth import (
    REASON_MISSING,
    REASON_REFERENCE_REFUSED,
    REASON_TOOL_ON_CALLER,
    Authenticator,
    AuthError,
    Endpoint,
    authenticate,
)
from ..._config import RelayConfig
from ..._frames import (
    AUTHENTICATION_ERROR,
    CONNECTION_ERROR,
    INVALID_REQUEST,
    LIMIT_EXCEEDED,
    MISSING,
    PARSE_ERROR,
    FrameError,
    Notification,
    Request,
    error_frame,
    parse_frame,
)
from ..._guard import FailureLimiter
from ..._http import HttpRequest
from ..._routing import Role, Router
from ...core.catalog import SUPPORTED_PROTOCOL_VERSIONS
from ..counts import ShellCounts, auth_reason
from ..dispatch import Dispatcher
from . import conn as http
from .events import Stream, event_id, parse_event_id
from .session import HttpSession, SessionGone
from .store import SessionStore, mint_session_id

__all__ = ["PATHS", "UNSUPPORTED_PROTOCOL_VERSION", "McpHttpFront"]

log = logging.getLogger("trio_mcp_relay.server")

CALL_PATHS: Final = frozenset({"/mcp_endpoint/call", "/mcp_endpoint/call/"})
SSE_PATHS: Final = frozenset({"/mcp_endpoint/sse", "/mcp_endpoint/sse/"})
MESSAGE_PATHS: Final = frozenset({"/mcp_endpoint/messages", "/mcp_endpoint/messages/"})
#: The paths this front answers (a WebSocket upgrade on the call path is not for it).
PATHS: Final = CALL_PATHS | SSE_PATHS | MESSAGE_PATHS
MESSAGES_ENDPOINT: Final = "/mcp_endpoint/messages/"

#: The JSON-RPC error for an ``MCP-Protocol-Version`` the relay does not serve (MCP 2026-07-28
#: names it; earlier revisions only say 400).
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022
#: Seconds a kept-alive connection may wait for its next request.
KEEPALIVE_IDLE: Final = 60.0
#: Seconds between SSE comments on a stream with nothing to say (proxies and dead peers).
SSE_KEEPALIVE: Final = 15.0
#: Seconds a stream's head may wait to leave with its first event.
HEAD_WAIT: Final = 0.05
#: The revision that introduced priming events (an id and no data at a stream's start).
_PRIMING_SINCE: Final = "2025-11-25"
CLOSE_DELETED: Final = 1000
CLOSE_EXPIRED: Final = 1001

_CORS_HEADERS: Final = (
    "content-type, authorization, accept, mcp-session-id, mcp-protocol-version, last-event-id"
)


class RelayState(Protocol):
    """What the front reads of the relay (live: a reload may replace any of it)."""

    config: RelayConfig
    authenticator: Authenticator
    router: Router
    dispatcher: Dispatcher
    limiter: FailureLimiter


class _Refused(Exception):
    """A request answered with an error; ``close``: and the connection ends."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        data: Any = MISSING,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_frame(None, code, message, data)
        self.headers = headers
        self.close = close


def _accepts(request: http.Request) -> tuple[bool, bool]:
    """Whether the client accepts (JSON, SSE)."""
    accept = request.headers.get("accept", "").lower()
    if not accept or "*/*" in accept:
        return True, True
    return "application/json" in accept, "text/event-stream" in accept


def sse_event(data: bytes, *, event: str = "message", eid: str | None = None) -> bytes:
    """One SSE event (a message's lines each behind ``data:``)."""
    head = f"id: {eid}\nevent: {event}\n" if eid is not None else f"event: {event}\n"
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return head.encode() + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


class McpHttpFront:
    """Answers the MCP HTTP transports for a relay.

    Args:
        relay: the relay's live state (config, authenticator, router, dispatcher, limiter).
        counts: where failed authentications are counted.
    """

    def __init__(self, relay: RelayState, counts: ShellCounts | None = None) -> None:
        self.relay = relay
        self.counts = counts
        self.sessions = SessionStore()
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        """The nursery sessions run in (the relay's connections nursery)."""
        self._nursery = nursery

    # ------------------------------------------------------------------ connections

    async def serve(
        self,
        stream: trio.abc.Stream,
        first: HttpRequest,
        client: str,
        remote: str,
        authenticated: Callable[[], None],
    ) -> None:
        """Answer requests on one connection until it closes or idles out.

        ``first`` is its first request head (already read); ``authenticated`` is called once
        a request of it has authenticated.
        """
        config = self.relay.config
        connection = http.HttpConnection(stream, first.raw, config.max_message_size)
        timeout = config.handshake_timeout
        while True:
            request: http.Request | None = None
            with trio.move_on_after(timeout):
                try:
                    request = await connection.next_request()
                except http.BodyTooLarge as exc:
                    limit = self.relay.config.max_message_size
                    refusal = _Refused(
                        413,
                        INVALID_REQUEST,
                        f"the body is over the limit ({limit} bytes)",
                        close=True,
                    )
                    await self._refuse(connection, exc.args[0], refusal)
                    return
                except http.HttpClosed as exc:
                    log.debug("%s: HTTP connection ended: %s", remote, exc)
                    return
            if request is None:
                return
            try:
                keep = await self._handle(connection, request, client, remote, authenticated)
            except _Refused as refusal:
                await self._refuse(connection, request, refusal)
                keep = not refusal.close
            except http.HttpClosed:
                return
            if not keep or not connection.next_cycle():
                return
            timeout = KEEPALIVE_IDLE

    async def _refuse(
        self, connection: http.HttpConnection, request: http.Request, refusal: _Refused
    ) -> None:
        with contextlib.suppress(http.HttpClosed):
            await connection.respond(
                refusal.status,
                refusal.body,
                [*refusal.headers, *self._cors(request)],
                close=refusal.close,
            )

    async def _handle(
        self,
        connection: http.HttpConnection,
        request: http.Request,
        client: str,
        remote: str,
        authenticated: Callable[[], None],
    ) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        path, method = request.path, request.method
        if path not in PATHS:
            raise _Refused(404, INVALID_REQUEST, f"no MCP endpoint at {path}", close=True)
        origin = request.headers.get("origin")
        allowed = self.relay.config.allowed_origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            log.info("%s: refused HTTP request from origin %s", remote, origin)
            raise _Refused(403, INVALID_REQUEST, f"origin {origin} is not allowed", close=True)
        if method == "OPTIONS":
            await connection.respond(204, headers=self._cors(request, preflight=True))
            return True
        allow = (
            "GET, POST, DELETE" if path in CALL_PATHS else "GET" if path in SSE_PATHS else "POST"
        )
        if method not in allow.split(", "):
            raise _Refused(
                405,
                INVALID_REQUEST,
                f"{method} is not served at {path}",
                headers=(("allow", allow),),
            )
        if path in MESSAGE_PATHS:
            return await self._legacy_post(connection, request)
        agent = await self._authenticate(request, client, remote)
        authenticated()
        if path in SSE_PATHS:
            return await self._legacy_open(connection, request, agent, remote)
        if method == "POST":
            return await self._post(connection, request, agent, remote)
        session = self._session(request, agent)
        if method == "DELETE":
            self._end(session, CLOSE_DELETED, "session ended by the client (DELETE)")
            await connection.respond(204, headers=self._cors(request))
            return True
        return await self._get(connection, request, session)

    def _cors(self, request: http.Request, *, preflight: bool = False) -> list[tuple[str, str]]:
        config = self.relay.config
        origin = request.headers.get("origin")
        if not config.enable_cors or origin is None:
            return []
        allowed = config.allowed_origins
        if "*" not in allowed and origin not in allowed:
            return []
        headers = [
            ("access-control-allow-origin", "*" if "*" in allowed else origin),
            ("access-control-expose-headers", "mcp-session-id, mcp-protocol-version"),
            ("vary", "Origin"),
        ]
        if preflight:
            headers += [
                ("access-control-allow-methods", "GET, POST, DELETE, OPTIONS"),
                ("access-control-allow-headers", _CORS_HEADERS),
                ("access-control-max-age", "600"),
            ]
        return headers

    # ------------------------------------------------------------------ authentication

    async def _authenticate(self, request: http.Request, client: str, remote: str) -> str:
        """The agent of the request's token; a refused token is answered here (delayed as the
        failed-authentication policy says) by raising :class:`_Refused`."""
        token = request.query.get("token", "")
        if not token:
            scheme, _, value = request.headers.get("authorization", "").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else ""
        try:
            grant = await authenticate(self.relay.authenticator, token, Endpoint.CALLER)
        except AuthError as exc:
            log.info("%s: HTTP caller refused: %s", remote, exc.reason)
            if self.counts is not None:
                self.counts.auth_failed(auth_reason(exc.reason))
            limiter = self.relay.limiter
            penalty = limiter.penalize(client, trio.current_time())
            if penalty.retry_after is not None:
                seconds = math.ceil(penalty.retry_after)
                raise _Refused(
                    429,
                    AUTHENTICATION_ERROR,
                    "too many failed authentications",
                    {"retry_after": seconds},
                    headers=(("retry-after", str(seconds)),),
                    close=True,
                ) from None
            try:
                await trio.sleep(penalty.delay)
            finally:
                limiter.release(client)
            forbidden = exc.reason in (REASON_TOOL_ON_CALLER, REASON_REFERENCE_REFUSED)
            challenge = () if forbidden else (("www-authenticate", 'Bearer realm="mcp_endpoint"'),)
            details = (
                "pass the token as ?token= or Authorization: Bearer"
                if exc.reason == REASON_MISSING
                else exc.reason
            )
            raise _Refused(
                403 if forbidden else 401,
                AUTHENTICATION_ERROR,
                "Authentication error",
                {"details": details},
                headers=challenge,
                close=True,
            ) from None
        return grant.agent

    # ------------------------------------------------------------------ Streamable HTTP

    def _session(self, request: http.Request, agent: str) -> HttpSession:
        """The request's session, or :class:`_Refused` (400 without an id, 404 unknown)."""
        session_id = request.headers.get("mcp-session-id")
        if session_id is None:
            raise _Refused(
                400,
                INVALID_REQUEST,
                "Bad Request: the Mcp-Session-Id header is missing (send initialize first)",
            )
        session = self.sessions.get(session_id)
        if session is None or session.agent != agent or session.legacy:
            raise _Refused(
                404,
                INVALID_REQUEST,
                "Not Found: no such session (it ended or expired): send initialize again",
            )
        version = request.headers.get("mcp-protocol-version")
        if version is not None and version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise _unsupported(version)
        return session

    async def _post(
        self, connection: http.HttpConnection, request: http.Request, agent: str, remote: str
    ) -> bool:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise _Refused(
                415,
                INVALID_REQUEST,
                "Unsupported Media Type: Content-Type must be application/json",
            )
        json_ok, sse_ok = _accepts(request)
        if not (json_ok or sse_ok):
            raise _Refused(
                406, INVALID_REQUEST, "Not Acceptable: accept application/json or text/event-stream"
            )
        try:
            frame = parse_frame(request.body)
        except FrameError as exc:
            raise _Refused(
                400,
                exc.code,
                "Parse error" if exc.code == PARSE_ERROR else "Invalid Request",
                {"details": exc.reason},
            ) from None
        if "mcp-session-id" not in request.headers:
            if isinstance(frame, Request) and frame.method == "initialize":
                session = await self._open_session(agent, remote, legacy=False)
                session.expect_initialize(frame.id)
                return await self._request(connection, request, session, frame, sse_ok, first=True)
            version = request.headers.get("mcp-protocol-version")
            if version is not None and version not in SUPPORTED_PROTOCOL_VERSIONS:
                raise _unsupported(version)
        session = self._session(request, agent)
        if isinstance(frame, Request) and frame.method == "initialize":
            raise _Refused(
                400,
                INVALID_REQUEST,
                "this session is initialized already: "
                "send initialize without Mcp-Session-Id for a new one",
            )
        if not isinstance(frame, Request):
            with session.exchange():
                if isinstance(frame, Notification) and frame.method == "notifications/cancelled":
                    params = frame.params
                    if isinstance(params, dict) and "requestId" in params:
                        session.cancelled(params["requestId"])
                await self._deliver(session, request.body)
                await connection.respond(202, headers=self._cors(request))
            return True
        return await self._request(connection, request, session, frame, sse_ok)

    async def _request(
        self,
        connection: http.HttpConnection,
        request: http.Request,
        session: HttpSession,
        frame: Request,
        sse_ok: bool,
        *,
        first: bool = False,
    ) -> bool:
        """Hand a request to the relay and stream (or send) its answer back."""
        with session.exchange():
            if session.in_flight(frame.id):
                raise _Refused(
                    400,
                    INVALID_REQUEST,
                    f"request id {frame.id!r} is in flight already in this session",
                )
            stream = session.open_stream(frame.id, frame.params, sse=sse_ok)
            await self._deliver(session, request.body)
            headers = self._cors(request)
            if first:
                headers.append(("mcp-session-id", session.id))
            if stream.sse:
                connection.open_stream(headers)
                prime = not first and (session.version or "") >= _PRIMING_SINCE
                return await self._stream(connection, session, stream, 0, prime=prime)
            writer = object()
            session.attach(stream, writer)
            try:
                events = await session.wait_events(stream, 0, writer)
            finally:
                session.detach(stream, writer)
            if not events:
                body = error_frame(
                    frame.id, CONNECTION_ERROR, "the session ended before the answer"
                )
            else:
                body = events[-1][1]
                session.wrote(stream, events[-1][0])
            await connection.respond(200, body, headers)
            return True

    async def _get(
        self, connection: http.HttpConnection, request: http.Request, session: HttpSession
    ) -> bool:
        if not _accepts(request)[1]:
            raise _Refused(
                406, INVALID_REQUEST, "Not Acceptable: the GET stream is text/event-stream"
            )
        last = request.headers.get("last-event-id")
        stream = session.events.get_stream
        after = stream.written  # a new GET stream: what was never written, then what comes
        if last is not None:
            position = parse_event_id(last)
            if position is None or not session.events.known(position[0]):
                raise _Refused(400, INVALID_REQUEST, "Last-Event-ID names no event of this session")
            number, after = position
            found = session.events.streams.get(number)
            if found is None:
                # A request stream already forgotten: nothing is left to replay on it.
                with session.exchange():
                    connection.open_stream(self._cors(request))
                    await connection.end_stream()
                return True
            stream = found
        with session.exchange():
            connection.open_stream(self._cors(request))
            prime = last is None and (session.version or "") >= _PRIMING_SINCE
            return await self._stream(connection, session, stream, after, prime=prime)

    async def _stream(
        self,
        connection: http.HttpConnection,
        session: HttpSession,
        stream: Stream,
        after: int,
        *,
        prime: bool,
        event: str = "message",
    ) -> bool:
        """Write ``stream``'s events after ``after`` as SSE until it is done, the session
        ends, another GET takes it over, or the client goes; True when the answer ended
        normally (the connection can be reused)."""
        writer = object()
        session.attach(stream, writer)
        number = stream.number
        gone = False
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal gone
                    await connection.until_closed()
                    gone = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                if prime:
                    await connection.send(f"id: {event_id(number, after)}\ndata: \n\n".encode())
                # The head waits for the first event (one write for both) unless it is slow.
                held = not prime
                while True:
                    with trio.move_on_after(HEAD_WAIT if held else SSE_KEEPALIVE) as quiet:
                        events = await session.wait_events(stream, after, writer)
                    if quiet.cancelled_caught:
                        if held:
                            await connection.flush()
                        else:
                            await connection.send(b": keepalive\n\n")
                        held = False
                        continue
                    held = False
                    if not events:
                        break
                    legacy = session.legacy
                    await connection.send(
                        b"".join(
                            sse_event(
                                data, event=event, eid=None if legacy else event_id(number, seq)
                            )
                            for seq, data in events
                        )
                    )
                    after = events[-1][0]
                    session.wrote(stream, after)
                nursery.cancel_scope.cancel()
        finally:
            session.detach(stream, writer)
        if gone:
            return False
        await connection.end_stream()
        return True

    # ------------------------------------------------------------------ HTTP+SSE (2024-11-05)

    async def _legacy_open(
        self, connection: http.HttpConnection, request: http.Request, agent: str, remote: str
    ) -> bool:
        if not _accepts(request)[1]:
            raise _Refused(
                406, INVALID_REQUEST, "Not Acceptable: this endpoint is text/event-stream"
            )
        session = await self._open_session(agent, remote, legacy=True)
        try:
            with session.exchange():
                connection.open_stream(self._cors(request))
                endpoint = f"{MESSAGES_ENDPOINT}?session_id={session.id}".encode()
                await connection.send(sse_event(endpoint, event="endpoint"))
                await self._stream(connection, session, session.events.get_stream, 0, prime=False)
        finally:
            # The stream is the session: it ends when the stream does.
            self._end(session, CLOSE_DELETED, "the SSE stream closed")
        return False

    async def _legacy_post(self, connection: http.HttpConnection, request: http.Request) -> bool:
        session = self.sessions.get(request.query.get("session_id", ""))
        if session is None or not session.legacy:
            raise _Refused(
                404, INVALID_REQUEST, "no such session (it ended): open /mcp_endpoint/sse/ again"
            )
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise _Refused(
                415,
                INVALID_REQUEST,
                "Unsupported Media Type: Content-Type must be application/json",
            )
        try:
            parse_frame(request.body)
        except FrameError as exc:
            raise _Refused(
                400,
                exc.code,
                "Parse error" if exc.code == PARSE_ERROR else "Invalid Request",
                {"details": exc.reason},
            ) from None
        await self._deliver(session, request.body)
        await connection.respond(202, b"Accepted", self._cors(request), content_type="text/plain")
        return True

    # ------------------------------------------------------------------ sessions

    async def _deliver(self, session: HttpSession, body: bytes) -> None:
        try:
            await session.deliver(body)
        except SessionGone:
            raise _Refused(
                404, INVALID_REQUEST, "Not Found: the session has ended: send initialize again"
            ) from None

    async def _open_session(self, agent: str, remote: str, *, legacy: bool) -> HttpSession:
        relay = self.relay
        config = relay.config
        if relay.router.draining:
            raise _Refused(
                503, CONNECTION_ERROR, "the relay is shutting down", headers=(("retry-after", "1"),)
            )
        limit = config.max_callers_per_agent
        if relay.router.caller_count(agent) >= limit:
            log.warning("%s: agent %s already has %d callers", remote, agent, limit)
            raise _Refused(429, LIMIT_EXCEEDED, f"too many callers for this agent (limit {limit})")
        if len(self.sessions) >= config.max_connections:
            raise _Refused(
                503,
                LIMIT_EXCEEDED,
                f"too many HTTP sessions (limit {config.max_connections})",
                headers=(("retry-after", "1"),),
            )
        session = HttpSession(
            mint_session_id(),
            agent,
            remote,
            legacy=legacy,
            max_events=config.outbox_size,
            max_bytes=config.outbox_bytes,
        )
        self.sessions.add(session)
        assert self._nursery is not None
        await self._nursery.start(self.run_session, session)
        return session

    async def run_session(
        self, session: HttpSession, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``session`` as a caller of its agent until it ends (then forget it)."""
        try:
            async with trio.open_nursery() as nursery:
                run = partial(self._run_peer, session, nursery.cancel_scope)
                session.conn = await nursery.start(run)
                log.info("%s: HTTP session for agent %s opened", session.remote, session.agent)
                task_status.started()
                await self._expire(session)
        finally:
            session.end(*(session.closed or (CLOSE_DELETED, "")))
            self.sessions.remove(session)
            log.info(
                "%s: HTTP session for agent %s ended: %s",
                session.remote,
                session.agent,
                session.closed[1] if session.closed else "",
            )

    async def _run_peer(
        self, session: HttpSession, scope: trio.CancelScope, *, task_status: trio.TaskStatus[int]
    ) -> None:
        try:
            await self.relay.dispatcher.run_peer(
                session, Role.CALLER, session.agent, remote=session.remote, task_status=task_status
            )
        finally:
            scope.cancel()

    async def _expire(self, session: HttpSession) -> None:
        """End ``session`` after ``session_idle_timeout`` seconds without use."""
        while True:
            if session.busy:
                await session.wait_activity()
                continue
            idle = self.relay.config.session_idle_timeout
            deadline = session.last_active + idle
            if trio.current_time() >= deadline:
                self._end(session, CLOSE_EXPIRED, f"session expired after {idle:g} s idle")
                await trio.sleep_forever()  # until the peer has ended (it cancels this)
            with trio.move_on_at(deadline):
                await session.wait_activity()

    def _end(self, session: HttpSession, code: int, reason: str) -> None:
        """Close the session's caller (its requests are cancelled at the tool)."""
        peer = self.relay.dispatcher.peers.get(session.conn) if session.conn is not None else None
        if peer is not None:
            self.relay.dispatcher.close_peer(peer, code, reason)
        else:
            session.end(code, reason)


def _unsupported(version: str) -> _Refused:
    return _Refused(
        400,
        UNSUPPORTED_PROTOCOL_VERSION,
        f"Bad Request: unsupported MCP-Protocol-Version {version}",
        {"supported": list(SUPPORTED_PROTOCOL_VERSIONS), "requested": version},
    )
