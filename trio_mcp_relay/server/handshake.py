"""The WebSocket opening handshake: path, origin, authentication, admission, the 101.

A connection becomes a peer here. The order matters:

1. wsproto parses the upgrade request (a bad one is answered 400), the path picks the role
   (another path: 404), the ``Origin`` header is checked (403).
2. The token is authenticated and the per-agent caller limit checked, *before* anything is
   answered, so a valid token is never delayed nor refused because of other failures. A
   refused token still gets the reference server's answer: the 101, then a close frame 1008
   with the reason (every existing client expects exactly that), after the delay the
   failed-authentication policy gives (``_guard.py``), or HTTP 429 for an address that keeps
   failing.
3. The accepted connection is handed to the dispatcher, which registers it with the router
   and only then writes the 101: a frame routed to it right after its handshake is never
   refused.

:class:`PendingByAddress` caps the connections one address holds before they authenticate,
so silent sockets from one address cannot use up the relay's whole connection budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection
from wsproto.events import Request as WsRequest

from .._auth import Authenticator, AuthError, Endpoint, authenticate
from .._config import RelayConfig
from .._guard import FailureLimiter, Penalty
from .._http import HttpRequest, respond
from .._routing import Role
from .._transport import ConnectionClosed, ServerWebSocket
from .counts import ShellCounts, auth_reason
from .dispatch import CLOSE_TIMEOUT
from .routes import too_many_failures

__all__ = ["Opened", "PendingByAddress", "open_websocket"]

log = logging.getLogger("trio_mcp_relay.server")

CLOSE_POLICY_VIOLATION: Final = 1008  # bad token
CLOSE_TOO_MANY_CALLERS: Final = 4002  # max_callers_per_agent

PATHS: Final = {
    "/mcp_endpoint/mcp": Role.TOOL,
    "/mcp_endpoint/mcp/": Role.TOOL,
    "/mcp_endpoint/call": Role.CALLER,
    "/mcp_endpoint/call/": Role.CALLER,
}


class PendingByAddress:
    """How many connections each address holds that have not authenticated yet.

    Args:
        limit: connections per address at most; one more is refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        """Count a new connection from ``address``; False (and not counted) when over."""
        count = self._counts.get(address, 0)
        if count >= self.limit:
            return False
        self._counts[address] = count + 1
        return True

    def leave(self, address: str) -> None:
        """The connection authenticated, or ended."""
        count = self._counts[address] - 1
        if count:
            self._counts[address] = count
        else:
            del self._counts[address]

    def __len__(self) -> int:
        return sum(self._counts.values())


@attrs.define(slots=True)
class Opened:
    """An authenticated WebSocket, not yet answered: :meth:`accept` writes its 101."""

    ws: ServerWebSocket
    role: Role
    agent: str
    stream: trio.abc.Stream
    answer: bytes
    #: A tool connection's ``server_id`` (from its URL or its token), or None.
    server_id: str | None = None

    async def accept(self) -> None:
        """Write the handshake answer (once; nothing of it is kept afterwards)."""
        answer, self.answer = self.answer, b""
        await self.stream.send_all(answer)


async def open_websocket(
    stream: trio.abc.Stream,
    request: HttpRequest,
    remote: str,
    client: str,
    *,
    config: RelayConfig,
    authenticator: Authenticator,
    caller_count: Callable[[str], int],
    make_room: Callable[[str], bool] | None = None,
    limiter: FailureLimiter,
    counts: ShellCounts | None = None,
) -> Opened | None:
    """Check an upgrade request and authenticate it; ``client`` is the host for limits.

    Failed authentications and refusals are counted in ``counts``, if given. A caller over
    the per-agent limit is let in when ``make_room(agent)`` ended an idle HTTP session of the
    agent for it (see ``Sessions.make_room``).

    Returns:
        The connection to hand to the dispatcher, or None when it was refused (and
        answered: 400, 404, 403, or the 101 and a close frame).
    """
    # wsproto does the opening handshake; frames that came with it go to our parser.
    head_end = request.raw.index(b"\r\n\r\n") + 4
    leftover = request.raw[head_end:]
    ws_conn = WSConnection(ConnectionType.SERVER)
    ws_conn.receive_data(request.raw[:head_end])
    events = list(ws_conn.events())
    if not events or not isinstance(events[0], WsRequest):
        await respond(stream, 400, {"error": "bad WebSocket handshake"})
        return None
    ws_request = events[0]
    role = PATHS.get(request.path)
    if role is None:
        await respond(stream, 404, {"error": "no WebSocket endpoint at this path"})
        return None
    origin = request.headers.get("origin")
    if not config.origin_allowed(origin):
        log.info("%s: refused handshake from origin %s", remote, origin)
        await respond(stream, 403, {"error": "origin not allowed"})
        return None
    subprotocol = "mcp" if "mcp" in ws_request.subprotocols else None
    answer = ws_conn.send(AcceptConnection(subprotocol=subprotocol))
    ws = ServerWebSocket(
        stream, remote=remote, max_message_size=config.max_message_size, initial=leftover
    )
    endpoint = Endpoint.TOOL if role is Role.TOOL else Endpoint.CALLER
    refusal: tuple[int, str] | None = None
    penalty: Penalty | None = None
    agent = ""
    server_id: str | None = None
    try:
        grant = await authenticate(authenticator, request.query.get("token", ""), endpoint)
        agent = grant.agent
    except AuthError as exc:
        log.info("%s: %s connection refused: %s", remote, endpoint.value, exc.reason)
        if counts is not None:
            counts.auth_failed(auth_reason(exc.reason))
        penalty = limiter.penalize(client, trio.current_time())
        if penalty.retry_after is not None:
            await too_many_failures(stream, client, penalty.retry_after)
            return None
        refusal = (CLOSE_POLICY_VIOLATION, exc.reason)
    else:
        limit = config.max_callers_per_agent
        if role is Role.TOOL:
            try:
                server_id = _server_id(request.query.get("server_id", ""), grant.server_id)
            except ValueError as exc:
                log.info("%s: tool connection refused: %s", remote, exc)
                refusal = (CLOSE_POLICY_VIOLATION, str(exc))
                if counts is not None:
                    counts.auth_failed("bad_server_id")
        elif caller_count(agent) >= limit and not (make_room is not None and make_room(agent)):
            log.warning("%s: agent %s already has %d callers", remote, agent, limit)
            refusal = (CLOSE_TOO_MANY_CALLERS, f"too many callers for this agent (limit {limit})")
    if refusal is not None:
        if counts is not None:
            counts.closed(refusal[0])
        try:  # accepted first, so the client reads the reason, not a handshake timeout
            try:
                await stream.send_all(answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if penalty is not None:
                await trio.sleep(penalty.delay)
            await _refuse(ws, *refusal)
        finally:
            if penalty is not None:
                limiter.release(client)  # however this ends: the slot must come back
        return None
    return Opened(ws, role, agent, stream, answer, server_id)


#: The longest ``server_id`` accepted (it becomes part of derived tool names).
MAX_SERVER_ID: Final = 64


def _server_id(given: str, bound: str | None) -> str | None:
    """The ``server_id`` of a tool connection: the URL's, which must agree with the one its
    token is bound to (if any); empty means none.

    Raises:
        ValueError: a bad ``server_id``, or not the one the token is for (the message is a
            close reason).
    """
    if given and (len(given) > MAX_SERVER_ID or not given.isprintable()):
        raise ValueError(f"server_id must be 1 to {MAX_SERVER_ID} printable characters")
    if bound is not None:
        if given and given != bound:
            raise ValueError("this token is for another server_id")
        return bound
    return given or None


async def _refuse(ws: ServerWebSocket, code: int, reason: str) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await ws.close(code, reason)
            while True:
                await ws.receive()
        except ConnectionClosed:
            pass
