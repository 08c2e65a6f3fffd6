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
WebSocket caller, in the relay's connections nursery (:mod:`.sessions`). It ends on
``DELETE``, after ``session_idle_timeout`` seconds with no request and no open stream, when its
client stops reading (its bounds overflow), or at shutdown; its requests still in flight are
then cancelled at the tool.

This module reads requests off a kept-alive connection and checks what every request must
pass (path, method, ``Origin``, the token); :mod:`.streamable` and :mod:`.legacy` handle the
rest, :mod:`.checks` names the refusals.

Checks, in order, each with the status and the JSON-RPC error the spec gives: the body size
(413, while it is read), ``Origin`` (403), the token (``?token=`` or ``Authorization:
Bearer``; 401, 403 for a tool token, 429 for an address that keeps failing),
``Content-Type`` (415), the JSON (400 with ``-32700``; a batch or a malformed message 400 with
``-32600``), ``Accept`` (406), the session (400, 404), ``MCP-Protocol-Version`` (400 with
``-32022``). Headers are never
forwarded to a tool: only the JSON-RPC message travels.

Designed for the next revision (stateless requests, ``server/discover``, no session): a
request would run as a one-request session (:meth:`.Sessions.run` for the length of one
``POST``), the rest stays. Today a sessionless request that names that revision gets
``-32022`` listing the revisions served, so its clients fall back to ``initialize``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Final

import trio

from ..._auth import (
    REASON_MISSING,
    REASON_REFERENCE_REFUSED,
    REASON_TOOL_ON_CALLER,
    AuthError,
    Endpoint,
    authenticate,
)
from ..._frames import AUTHENTICATION_ERROR, INVALID_REQUEST
from ..._http import HttpRequest
from ..counts import ShellCounts, auth_reason
from . import conn as http
from .checks import Refusal
from .legacy import LegacySse
from .sessions import RelayState, Sessions
from .streamable import StreamableHttp

__all__ = ["PATHS", "McpHttpFront"]

log = logging.getLogger("trio_mcp_relay.server")

CALL_PATHS: Final = frozenset({"/mcp_endpoint/call", "/mcp_endpoint/call/"})
SSE_PATHS: Final = frozenset({"/mcp_endpoint/sse", "/mcp_endpoint/sse/"})
MESSAGE_PATHS: Final = frozenset({"/mcp_endpoint/messages", "/mcp_endpoint/messages/"})
#: The paths this front answers (a WebSocket upgrade on the call path is not for it).
PATHS: Final = CALL_PATHS | SSE_PATHS | MESSAGE_PATHS
#: Seconds a kept-alive connection may wait for its next request.
KEEPALIVE_IDLE: Final = 60.0
#: Seconds a connection refused 413 is still read from (see ``HttpConnection.linger``).
LINGER: Final = 1.0

_CORS_HEADERS: Final = (
    "content-type, authorization, accept, mcp-session-id, mcp-protocol-version, last-event-id"
)


class McpHttpFront:
    """Answers the MCP HTTP transports for a relay.

    Args:
        relay: the relay's live state (config, authenticator, router, dispatcher, limiter).
        counts: where failed authentications are counted.
    """

    def __init__(self, relay: RelayState, counts: ShellCounts | None = None) -> None:
        self.relay = relay
        self.counts = counts
        self.sessions = Sessions(relay)
        self.streamable = StreamableHttp(self.sessions)
        self.legacy = LegacySse(self.sessions)

    def bind(self, nursery: trio.Nursery) -> None:
        """The nursery sessions run in (the relay's connections nursery)."""
        self.sessions.bind(nursery)

    # ------------------------------------------------------------------ connections

    async def serve(
        self,
        stream: trio.abc.Stream,
        first: HttpRequest,
        client_of: Callable[[dict[str, str]], str],
        remote: str,
        authenticated: Callable[[], None],
    ) -> None:
        """Answer requests on one connection until it closes or idles out.

        ``first`` is its first request head (already read); ``client_of(headers)`` names the
        client of each request (a trusted proxy's kept-alive connection carries requests of
        many clients); ``authenticated`` is called once a request of it has authenticated.
        """
        config = self.relay.config
        connection = http.HttpConnection(
            stream, first.raw, config.max_message_size, write_timeout=config.slow_caller_grace
        )
        timeout = config.handshake_timeout
        while True:
            request: http.Request | None = None
            with trio.move_on_after(timeout):
                try:
                    request = await connection.next_request()
                except http.BodyTooLarge as exc:
                    limit = self.relay.config.max_message_size
                    refusal = Refusal(
                        413,
                        INVALID_REQUEST,
                        f"the body is over the limit ({limit} bytes)",
                        close=True,
                    )
                    await self._refuse(connection, exc.args[0], refusal)
                    await connection.linger(LINGER)
                    return
                except http.HttpClosed as exc:
                    log.debug("%s: HTTP connection ended: %s", remote, exc)
                    return
            if request is None:
                return
            client = client_of(request.headers)
            try:
                keep = await self._handle(connection, request, client, remote, authenticated)
            except Refusal as refusal:
                await self._refuse(connection, request, refusal)
                keep = not refusal.close
            except http.HttpClosed:
                return
            if not keep or not connection.next_cycle():
                return
            timeout = KEEPALIVE_IDLE

    async def _refuse(
        self, connection: http.HttpConnection, request: http.Request, refusal: Refusal
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
            raise Refusal(404, INVALID_REQUEST, f"no MCP endpoint at {path}", close=True)
        origin = request.headers.get("origin")
        if not self.relay.config.origin_allowed(origin):
            log.info("%s: refused HTTP request from origin %s", remote, origin)
            raise Refusal(403, INVALID_REQUEST, f"origin {origin} is not allowed", close=True)
        if method == "OPTIONS":
            await connection.respond(204, headers=self._cors(request, preflight=True))
            return True
        allow = (
            "GET, POST, DELETE" if path in CALL_PATHS else "GET" if path in SSE_PATHS else "POST"
        )
        if method not in allow.split(", "):
            raise Refusal(
                405,
                INVALID_REQUEST,
                f"{method} is not served at {path}",
                headers=(("allow", allow),),
            )
        cors = self._cors(request)
        if path in MESSAGE_PATHS:
            return await self.legacy.post(connection, request, cors, authenticated)
        agent = await self._authenticate(request, client, remote)
        authenticated()
        if path in SSE_PATHS:
            return await self.legacy.open(connection, request, cors, agent, remote)
        if method == "POST":
            return await self.streamable.post(connection, request, cors, agent, remote)
        if method == "DELETE":
            return await self.streamable.delete(connection, request, cors, agent)
        return await self.streamable.get(connection, request, cors, agent)

    def _cors(self, request: http.Request, *, preflight: bool = False) -> list[tuple[str, str]]:
        origin = request.headers.get("origin")
        value = self.relay.config.cors_origin(origin) if origin is not None else None
        if value is None:
            return []
        headers = [
            ("access-control-allow-origin", value),
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
                raise Refusal(
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
            challenge = () if forbidden else (("www-authenticate", _challenge(exc.reason)),)
            details = (
                "pass the token as ?token= or Authorization: Bearer"
                if exc.reason == REASON_MISSING
                else exc.reason
            )
            raise Refusal(
                403 if forbidden else 401,
                AUTHENTICATION_ERROR,
                "Authentication error",
                {"details": details},
                headers=challenge,
                close=True,
            ) from None
        return grant.agent


def _challenge(reason: str) -> str:
    """The ``WWW-Authenticate`` of a 401 (RFC 6750: ``invalid_token`` for a token given but
    refused, none for a missing one)."""
    if reason == REASON_MISSING:
        return 'Bearer realm="mcp_endpoint"'
    return 'Bearer realm="mcp_endpoint", error="invalid_token"'
