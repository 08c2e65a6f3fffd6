"""The Trio server: sockets, tasks, outboxes and timeouts around the routing core.

Structure (every task has an owner)::

    serve_relay                       waits for cancellation or the shutdown trigger
    └── connections nursery           (shielded: closing peers politely outlives a cancel)
        ├── timer                     wakes at the router's next deadline
        ├── keepalive                 one task pings every peer and closes the silent ones
        ├── closer tasks              one per connection being closed, bounded by a timeout
        ├── accept loop (serve_listeners, in its own cancel scope: shutdown stops it first)
        └── one task per TCP connection: HTTP head -> plain answer, or WebSocket
            └── connection nursery
                ├── reader (the connection task itself): receive -> router -> dispatch
                ├── writer, started on first need: outbox -> batched send_all
                └── overflow drainer, only while a caller's outbox is full

The fast path: a frame routed to a connection whose outbox is empty and whose writer holds no
batch is written to its socket at once by the routing task (see ``_outbox.py``); whatever
the socket does not take it keeps and writes ahead of anything else, and the writer is asked
for a write to flush it.

Bounded outboxes and what happens when they are full:

* a **tool's outbox** (``outbox_size`` frames): callers block on it (backpressure on the
  callers of that agent only) for at most ``forward_timeout``; then the request is answered
  ``-32002`` (Forward failed). Frames from timers or from teardown never block: if the outbox
  is full they are counted as failed the same way.
* a **caller's outbox** (``outbox_size`` frames): never blocks the sender (a tool must not stall
  because one of its callers stopped reading). When full, frames wait in an overflow queue
  (at most ``outbox_size`` more) while a drainer task gives the caller ``slow_caller_grace``
  seconds to catch up; if it does not, or the overflow fills too, the caller is closed with
  1013 and its requests are cancelled at the tool. Nothing queued is reordered or dropped
  while the caller is still connected.

Closing a peer: it is unregistered from the router at once (so its pending requests are
answered or cancelled right away), its outbox is closed, the writer sends what is queued and
then the close frame, and the peer gets ``CLOSE_TIMEOUT`` seconds to answer before the socket
is dropped.

Shutdown (the ``shutdown`` event): stop accepting, refuse new requests, give in-flight
requests ``shutdown_grace`` seconds, then close tools and callers with 1001 (what is still in
flight is answered ``-32003`` first). Cancelling ``serve_relay`` does the same without the
grace period.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, TypeAlias

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData
from wsproto.events import Request as WsRequest

from . import __version__
from . import _wsframes as wsframes
from ._auth import (
    Authenticator,
    AuthError,
    Endpoint,
    TokenAuthenticator,
    authenticate,
    key_matches,
    redact,
)
from ._config import RelayConfig
from ._frames import AUTHENTICATION_ERROR
from ._guard import FailureLimiter, Penalty
from ._http import BadRequest, HttpRequest, read_request_head, respond
from ._outbox import PING, Encoded, Outbox
from ._proxies import TrustedProxies
from ._routing import Action, Close, Role, Router, Send
from ._transport import (
    ConnectionClosed,
    ServerWebSocket,
    WebSocket,
    encode_text_frame,
    memory_websocket_pair,
)

__all__ = ["serve_relay"]

log = logging.getLogger("trio_mcp_relay.server")

#: How long a closing connection gets to answer our close frame before it is dropped.
CLOSE_TIMEOUT = 2.0
#: Close codes.
CLOSE_GOING_AWAY = 1001  # the relay is shutting down
CLOSE_POLICY_VIOLATION = 1008  # bad token
CLOSE_INTERNAL_ERROR = 1011  # no pong in time
CLOSE_TRY_AGAIN_LATER = 1013  # a caller that stopped reading
CLOSE_TOO_MANY_CALLERS = 4002  # max_callers_per_agent
_MAX_BATCH = 256
#: How long a refused connection is read from after its answer (see ``_linger``).
_LINGER = 1.0
#: Seconds before an embedded tool that ended is started again.
EMBEDDED_RESTART_DELAY = 1.0

#: Serves the tool side of one agent in-process: MCP requests arrive on the WebSocket given.
EmbeddedTool: TypeAlias = Callable[[WebSocket], Awaitable[None]]

_PATHS = {
    "/mcp_endpoint/mcp": Role.TOOL,
    "/mcp_endpoint/mcp/": Role.TOOL,
    "/mcp_endpoint/call": Role.CALLER,
    "/mcp_endpoint/call/": Role.CALLER,
}


@attrs.define(eq=False)
class _Peer:
    conn: int
    role: Role
    agent: str
    ws: WebSocket
    outbox: Outbox
    nursery: trio.Nursery
    last_ping: float
    done: trio.Event = attrs.Factory(trio.Event)
    closing: bool = False
    close_with: tuple[int, str] | None = None
    overflow: deque[bytes] | None = None
    ping_sent: float | None = None
    writer_started: bool = False


class _Relay:
    def __init__(
        self,
        config: RelayConfig,
        authenticator: Authenticator | None,
        embedded_tools: Mapping[str, EmbeddedTool] | None = None,
    ) -> None:
        self.embedded_tools = dict(embedded_tools or {})
        if authenticator is None:
            if not config.key:
                raise ValueError("RelayConfig.key is required when no authenticator is given")
            authenticator = TokenAuthenticator(
                config.keys, accept_reference=config.reference_tokens
            )
        self.config = config
        self.authenticator = authenticator
        self.router = Router(
            tool_request_timeout=config.tool_request_timeout,
            request_timeout=config.request_timeout,
            max_inflight_per_caller=config.max_inflight_per_caller,
            max_tool_requests=config.max_tool_requests,
        )
        self._peers: dict[int, _Peer] = {}
        self._ids = itertools.count(1)
        self._timer_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._accept_scope = trio.CancelScope()
        self._open_streams = 0
        self._closing_peers: list[_Peer] = []
        # --- authentication policy (rules in _guard.py, _proxies.py, _auth.py) ---
        self.limiter = FailureLimiter(
            config.auth_failures,
            config.auth_window,
            config.auth_ban,
            delay=config.auth_delay,
            concurrency=config.auth_concurrency,
        )
        self.proxies = TrustedProxies.parse(config.trusted_proxies)
        self.admin_key = config.admin_key or config.key or ""
        self.health_keys = (config.admin_key,) if config.admin_key else config.keys
        # --- end of authentication policy ---

    # ---------------------------------------------------------------- dispatch

    async def _dispatch(self, actions: list[Action]) -> None:
        """Carry out the router's actions; frames to a tool may wait for room (backpressure)."""
        for action in actions:
            peer = self._peers.get(action.conn)
            if type(action) is Send and peer is not None and peer.role is Role.TOOL:
                await self._send_to_tool(peer, action)
            else:
                self._dispatch_one_nowait(action)

    def _dispatch_nowait(self, actions: list[Action]) -> None:
        """Carry out actions without waiting (teardown, timers): a full tool outbox fails the
        frame (a request is answered -32002)."""
        for action in actions:
            self._dispatch_one_nowait(action)

    def _dispatch_one_nowait(self, action: Action) -> None:
        if type(action) is not Send:
            assert isinstance(action, Close)
            self._close(action.conn, action.code, action.reason)
            return
        peer = self._peers.get(action.conn)
        if peer is None:
            return
        if peer.role is Role.CALLER:
            self._send_to_caller(peer, action.data)
            return
        try:
            self._put_nowait(peer, action.data)
        except trio.WouldBlock:
            self._tool_send_failed(peer, action)
        except trio.ClosedResourceError:
            pass

    def _put_nowait(self, peer: _Peer, data: bytes) -> None:
        """Queue a frame for ``peer``, or write it at once when that keeps the order.

        The fast path: with nothing queued and the writer idle, the frame goes straight to
        the socket from this task (no writer wake-up); what the socket does not take it
        keeps, to write ahead of anything else, and an empty write is queued to flush it.

        Raises:
            trio.WouldBlock: the outbox is full.
            trio.ClosedResourceError: the peer is closing.
        """
        self._queue_nowait(peer, data, encode_text_frame)

    def _queue_nowait(self, peer: _Peer, item: bytes, encode: Callable[[bytes], bytes]) -> None:
        outbox = peer.outbox
        if outbox.idle and type(peer.ws) is ServerWebSocket:
            rest = peer.ws.send_now(encode(item))
            if rest == b"":
                return
            if rest is not None:
                item = Encoded(b"")  # the socket keeps the rest: the writer's next write sends it
        outbox.put_nowait(item)
        self._start_writer(peer)

    def _start_writer(self, peer: _Peer) -> None:
        """The writer task runs from the first frame the socket could not take at once: an
        idle connection (most of them) costs no task for it."""
        if not peer.writer_started:
            peer.writer_started = True
            peer.nursery.start_soon(self._writer, peer)

    async def _send_to_tool(self, peer: _Peer, action: Send) -> None:
        try:
            self._put_nowait(peer, action.data)
            return
        except trio.WouldBlock:
            pass
        except trio.ClosedResourceError:
            return
        with trio.move_on_after(self.config.forward_timeout):
            with contextlib.suppress(trio.ClosedResourceError):
                await peer.outbox.put(action.data)
                self._start_writer(peer)
            return
        self._tool_send_failed(peer, action)

    def _tool_send_failed(self, peer: _Peer, action: Send) -> None:
        if action.request is not None:
            log.warning("agent %s: tool is not reading; request failed", peer.agent)
            self._dispatch_nowait(self.router.forward_failed(peer.conn, action.request))
        else:
            log.warning("agent %s: tool is not reading; a notification was dropped", peer.agent)

    def _send_to_caller(self, peer: _Peer, data: bytes) -> None:
        if peer.overflow is not None:
            if len(peer.overflow) >= self.config.outbox_size:
                log.warning("agent %s: caller %d is not reading; closing it", peer.agent, peer.conn)
                self._close(peer.conn, CLOSE_TRY_AGAIN_LATER, "caller is not reading (outbox full)")
            else:
                peer.overflow.append(data)
            return
        try:
            self._put_nowait(peer, data)
        except trio.WouldBlock:
            peer.overflow = deque([data])
            peer.nursery.start_soon(self._drain_overflow, peer)
        except trio.ClosedResourceError:
            pass

    async def _drain_overflow(self, peer: _Peer) -> None:
        overflow = peer.overflow
        assert overflow is not None
        with trio.move_on_after(self.config.slow_caller_grace):
            try:
                while overflow:
                    await peer.outbox.put(overflow[0])
                    overflow.popleft()
                    self._start_writer(peer)
            except trio.ClosedResourceError:
                return
            peer.overflow = None
            return
        grace = self.config.slow_caller_grace
        log.warning(
            "agent %s: caller %d did not read for %g s; closing it", peer.agent, peer.conn, grace
        )
        self._close(peer.conn, CLOSE_TRY_AGAIN_LATER, f"caller did not read for {grace:g} s")

    def _close(self, conn: int, code: int, reason: str) -> None:
        peer = self._peers.get(conn)
        if peer is not None:
            self._close_peer(peer, code, reason)

    def _close_peer(self, peer: _Peer, code: int, reason: str) -> None:
        """Unregister at once so nothing more is routed to it, then close politely."""
        if peer.closing:
            return
        peer.closing = True
        peer.close_with = (code, reason)
        self._unregister(peer)
        peer.overflow = None
        peer.outbox.close()  # the writer sends what is queued, then the close frame
        self._start_writer(peer)
        assert self._nursery is not None
        self._nursery.start_soon(self._await_close, peer)

    async def _await_close(self, peer: _Peer) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await peer.done.wait()
        peer.nursery.cancel_scope.cancel()

    def _unregister(self, peer: _Peer) -> None:
        if self._peers.get(peer.conn) is not peer:
            return
        del self._peers[peer.conn]
        if peer.role is Role.TOOL:
            actions = self.router.tool_disconnected(peer.conn)
        else:
            actions = self.router.caller_disconnected(peer.conn)
        self._dispatch_nowait(actions)

    async def _timer(self) -> NoReturn:
        while True:
            deadline = self.router.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._timer_wake.wait()
            self._timer_wake = trio.Event()
            try:
                self._dispatch_nowait(self.router.expire(trio.current_time()))
            except Exception:  # a bug here must not take every connection down
                log.exception("deadline handling failed")

    async def _keepalive(self) -> None:
        """Ping every peer each ``ping_interval``; close those silent for ``ping_timeout``."""
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        if not interval:
            return
        tick = min(interval, timeout) / 4
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for peer in list(self._peers.values()):
                if peer.ping_sent is not None:
                    pong = peer.ws.last_pong
                    if pong is not None and pong >= peer.ping_sent:
                        peer.ping_sent = None
                    elif now - peer.ping_sent >= timeout:
                        log.info(
                            "agent %s: connection %d did not answer a ping", peer.agent, peer.conn
                        )
                        self._close_peer(
                            peer, CLOSE_INTERNAL_ERROR, f"no pong within {timeout:g} s"
                        )
                        continue
                    else:
                        continue
                if now - peer.last_ping >= interval:
                    peer.last_ping = now
                    try:
                        self._queue_nowait(peer, PING, _ping_frame)
                    except (trio.WouldBlock, trio.ClosedResourceError):
                        # Its outbox is full: the slow-reader policies deal with it, and a
                        # ping that never left cannot be missing its pong.
                        continue
                    peer.ping_sent = now

    # ---------------------------------------------------------------- shutdown

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish for ``grace`` s, close everyone (1001)."""
        self._accept_scope.cancel()
        self.router.draining = True
        with trio.move_on_after(grace):
            # Polled: the pending table has no "became empty" event, and this runs once.
            while self.router.pending_count():  # noqa: ASYNC110
                await trio.sleep(0.05)
        self.close_all()
        with trio.move_on_after(CLOSE_TIMEOUT):
            for peer in list(self._closing_peers):
                await peer.done.wait()

    def close_all(self) -> None:
        """Close every peer with 1001: tools first, so callers get their -32003 answers."""
        self._accept_scope.cancel()
        peers = sorted(self._peers.values(), key=lambda p: p.role is not Role.TOOL)
        self._closing_peers = peers
        for peer in peers:
            self._close_peer(peer, CLOSE_GOING_AWAY, "relay is shutting down")

    # ---------------------------------------------------------------- connections

    async def run_connections(
        self,
        listeners: list[trio.SocketListener],
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The connections nursery, inside ``scope`` (shielded from outer cancellation)."""
        with scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer)
                nursery.start_soon(self._keepalive)
                for agent, serve in self.embedded_tools.items():
                    await nursery.start(self._embedded_tool, agent, serve)
                nursery.start_soon(self._accept, listeners, nursery)
                task_status.started()

    async def _embedded_tool(
        self,
        agent: str,
        serve: EmbeddedTool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect an in-process tool for ``agent`` over a memory WebSocket.

        If it ends (a crash, or a network tool for the agent replaced it), it is started again
        once the agent has no tool, checked every ``EMBEDDED_RESTART_DELAY`` seconds.
        """
        while True:
            relay_end, tool_end = memory_websocket_pair(
                self.config.outbox_size, names=(f"embedded:{agent}", "relay")
            )
            log.info("agent %s: embedded tool started", agent)
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_embedded_peer, relay_end, agent)
                task_status.started()  # the first time only: the relay may start accepting
                task_status = trio.TASK_STATUS_IGNORED
                try:
                    await serve(tool_end)
                except Exception:
                    log.exception("agent %s: embedded tool failed", agent)
                finally:
                    with trio.CancelScope(shield=True):
                        await tool_end.close(1000, "embedded tool ended")
            if self._accept_scope.cancel_called:
                return  # the relay is shutting down
            log.warning("agent %s: embedded tool ended", agent)
            await trio.sleep(EMBEDDED_RESTART_DELAY)
            # Replaced by a tool connected over the network: stand by until it is gone.
            while self.router.tool_of(agent) is not None:  # noqa: ASYNC110 (rare, coarse)
                await trio.sleep(EMBEDDED_RESTART_DELAY)

    async def _run_embedded_peer(
        self,
        ws: WebSocket,
        agent: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The relay side of an embedded tool; a failure ends this connection only."""
        try:
            await self._run_peer(ws, Role.TOOL, agent, task_status=task_status)
        except Exception:
            log.exception("agent %s: embedded tool connection failed", agent)

    async def _accept(self, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
        with self._accept_scope:
            await trio.serve_listeners(self.handle_stream, listeners, handler_nursery=nursery)

    async def handle_stream(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            remote = f"{host}:{port}"
        except OSError:
            host, remote = "?", "?"
        self._open_streams += 1
        try:
            if self._open_streams > self.config.max_connections:
                log.warning("%s: refused: %d connections open", remote, self._open_streams - 1)
                limit = self.config.max_connections
                await respond(stream, 503, {"error": f"too many connections (limit {limit})"})
                await _linger(stream, min(_LINGER, self.config.handshake_timeout))
                return
            with trio.move_on_after(self.config.handshake_timeout) as scope:
                request = await read_request_head(stream)
            if scope.cancelled_caught:
                log.debug("%s: no request head within the handshake timeout", remote)
                return
            # --- client address: from a trusted proxy's header, else the peer (_proxies.py) ---
            client = self.proxies.client_address(host, request.headers)
            if client != host:
                host, remote = client, f"{client} (via {remote})"
            # --- end of client address ---
            if request.is_websocket:
                opened = await self._open_websocket(stream, request, remote, host)
                del request  # an idle connection keeps neither its head nor the handshake state
                if opened is not None:
                    ws, role, agent = opened
                    await self._serve_websocket(ws, role, agent, remote)
            else:
                await self._http(stream, request, host)
        except BadRequest as exc:
            # Only the kind of error: h11 quotes the offending line, which may hold a token.
            log.debug("%s: bad request: %s", remote, str(exc).split(":", 1)[0])
            await respond(stream, 400, {"error": "bad request"})
        except Exception:
            log.exception("%s: connection failed", remote)
        finally:
            self._open_streams -= 1
            await trio.aclose_forcefully(stream)

    def _cors_headers(self, request: HttpRequest) -> list[tuple[str, str]]:
        if not self.config.enable_cors:
            return []
        origin = request.headers.get("origin")
        allowed = self.config.allowed_origins
        if "*" in allowed:
            value = "*"
        elif origin is not None and origin in allowed:
            value = origin
        else:
            return []
        return [
            ("access-control-allow-origin", value),
            ("access-control-allow-methods", "GET, OPTIONS"),
            ("access-control-allow-headers", "*"),
            ("vary", "Origin"),
        ]

    async def _http(self, stream: trio.SocketStream, request: HttpRequest, host: str) -> None:
        cors = self._cors_headers(request)
        path = request.path
        if request.method == "OPTIONS":
            await respond(stream, 204, headers=cors)
            return
        if request.method not in ("GET", "HEAD"):
            await respond(stream, 405, {"error": "method not allowed"}, headers=cors)
            return
        head_only = request.method == "HEAD"
        if path == "/":
            await respond(stream, 307, headers=[("location", "/mcp_endpoint/"), *cors])
        elif path in ("/mcp_endpoint", "/mcp_endpoint/"):
            body: dict[str, Any] = {
                "jsonrpc": "2.0",
                "result": {
                    "message": "MCP Endpoint Server",
                    "version": __version__,
                    "status": "running",
                },
                "id": None,
            }
            await respond(stream, 200, body, headers=cors, head_only=head_only)
        elif path in ("/mcp_endpoint/health", "/mcp_endpoint/health/"):
            key = request.query.get("key", "")
            if key_matches(key, self.health_keys):
                body = {
                    "jsonrpc": "2.0",
                    "result": {"status": "success", "connections": self.router.stats()},
                    "id": None,
                }
                await respond(stream, 200, body, headers=cors, head_only=head_only)
            else:
                body = {
                    "jsonrpc": "2.0",
                    "error": {
                        "code": AUTHENTICATION_ERROR,
                        "message": "Authentication error",
                        "data": {"details": "the key is missing or wrong"},
                    },
                    "id": None,
                }
                # --- failed authentication: delay, or 429 (_guard.py) ---
                penalty = self.limiter.penalize(host, trio.current_time())
                if penalty.retry_after is not None:
                    await self._too_many_failures(stream, host, penalty.retry_after)
                    return
                try:
                    await trio.sleep(penalty.delay)
                    await respond(stream, 403, body, headers=cors, head_only=head_only)
                finally:
                    self.limiter.release(host)
                # --- end of failed authentication ---
        else:
            await respond(stream, 404, {"error": "not found", "path": path}, headers=cors)

    async def _open_websocket(
        self, stream: trio.SocketStream, request: HttpRequest, remote: str, host: str
    ) -> tuple[ServerWebSocket, Role, str] | None:
        """The opening handshake and authentication: the open WebSocket, its role and agent,
        or None when the connection was refused (and answered)."""
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
        role = _PATHS.get(request.path)
        if role is None:
            await self._reject(stream, ws_conn, 404, "no WebSocket endpoint at this path")
            return None
        origin = request.headers.get("origin")
        allowed = self.config.allowed_origins
        if origin is not None and "*" not in allowed and origin not in allowed:
            log.info("%s: refused handshake from origin %s", remote, origin)
            await self._reject(stream, ws_conn, 403, "origin not allowed")
            return None
        subprotocol = "mcp" if "mcp" in ws_request.subprotocols else None
        endpoint = Endpoint.TOOL if role is Role.TOOL else Endpoint.CALLER
        # --- authentication first: a valid token is never delayed nor refused (_guard.py) ---
        token = request.query.get("token", "")
        refused: AuthError | None = None
        penalty = Penalty()
        try:
            agent = (await authenticate(self.authenticator, token, endpoint)).agent
        except AuthError as exc:
            log.info("%s: %s connection refused: %s", remote, endpoint.value, exc.reason)
            refused = exc
            penalty = self.limiter.penalize(host, trio.current_time())
            if penalty.retry_after is not None:
                await self._too_many_failures(stream, host, penalty.retry_after)
                return None

        async def accept() -> ServerWebSocket:
            await stream.send_all(ws_conn.send(AcceptConnection(subprotocol=subprotocol)))
            return ServerWebSocket(
                stream,
                remote=remote,
                max_message_size=self.config.max_message_size,
                initial=leftover,
            )

        if refused is not None:
            try:  # accepted first, so the client reads the reason, not a handshake timeout
                refused_ws = await accept()
                await trio.sleep(penalty.delay)
                await self._refuse(refused_ws, CLOSE_POLICY_VIOLATION, refused.reason)
            finally:
                self.limiter.release(host)  # however this ends: the slot must come back
            return None
        # --- end of authentication ---
        ws = await accept()
        limit = self.config.max_callers_per_agent
        if role is Role.CALLER and self.router.caller_count(agent) >= limit:
            log.warning("%s: agent %s already has %d callers", remote, agent, limit)
            reason = f"too many callers for this agent (limit {limit})"
            await self._refuse(ws, CLOSE_TOO_MANY_CALLERS, reason)
            return None
        return ws, role, agent

    async def _serve_websocket(
        self, ws: ServerWebSocket, role: Role, agent: str, remote: str
    ) -> None:
        log.info("%s: %s connected for agent %s", remote, role.value, agent)
        try:
            await self._run_peer(ws, role, agent)
        finally:
            log.info("%s: %s for agent %s disconnected", remote, role.value, agent)

    async def _reject(
        self, stream: trio.SocketStream, ws_conn: WSConnection, status: int, why: str
    ) -> None:
        from ._frames import dumps

        body = dumps({"error": why})
        data = ws_conn.send(
            RejectConnection(
                status_code=status,
                headers=[(b"content-type", b"application/json"), (b"connection", b"close")],
                has_body=True,
            )
        )
        data += ws_conn.send(RejectData(data=body))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)

    async def _too_many_failures(self, stream: trio.SocketStream, host: str, retry: float) -> None:
        """HTTP 429 for an address that keeps failing to authenticate (never for a request
        with a valid credential: see ``_guard.py``)."""
        log.info("%s: refused: too many failed authentications", host)
        seconds = math.ceil(retry)
        await respond(
            stream,
            429,
            {"error": "too many failed authentications", "retry_after": seconds},
            headers=[("retry-after", str(seconds))],
        )

    async def _refuse(self, ws: ServerWebSocket, code: int, reason: str) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await ws.close(code, reason)
                while True:
                    await ws.receive()
            except ConnectionClosed:
                pass

    async def _run_peer(
        self,
        ws: WebSocket,
        role: Role,
        agent: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register the connection, then run its reader and writer until it ends.

        ``task_status.started()`` is called once the router knows the connection.
        """
        conn = next(self._ids)
        outbox = Outbox(self.config.outbox_size)
        async with trio.open_nursery() as nursery:
            peer = _Peer(conn, role, agent, ws, outbox, nursery, trio.current_time())
            self._peers[conn] = peer
            try:
                if role is Role.TOOL:
                    self._dispatch_nowait(self.router.tool_connected(conn, agent))
                else:
                    self._dispatch_nowait(self.router.caller_connected(conn, agent))
                task_status.started()
                await self._reader(peer)
            finally:
                self._unregister(peer)
                peer.done.set()
                nursery.cancel_scope.cancel()

    async def _reader(self, peer: _Peer) -> None:
        router = self.router
        while True:
            try:
                message = await peer.ws.receive()
            except ConnectionClosed as exc:
                log.debug("connection %d closed: %d %s", peer.conn, exc.code, exc.reason)
                return
            actions = router.received(peer.conn, message, trio.current_time())
            if router.take_deadline_change():
                self._timer_wake.set()
            if actions:
                await self._dispatch(actions)

    async def _writer(self, peer: _Peer) -> None:
        """Write what the outbox holds, in batches; after it is closed, the close frame."""
        ws, outbox = peer.ws, peer.outbox
        try:
            while (batch := await outbox.take(_MAX_BATCH)) is not None:
                try:
                    await _write_batch(ws, batch)
                finally:
                    outbox.written()
            # The outbox was closed: everything queued is sent; now the close frame.
            if peer.close_with is not None:
                await ws.close(*peer.close_with)
        except ConnectionClosed:
            peer.nursery.cancel_scope.cancel()


_PING_FRAME = wsframes.frame(wsframes.OP_PING)


def _ping_frame(_: bytes) -> bytes:
    return _PING_FRAME


async def _write_batch(ws: WebSocket, batch: list[bytes]) -> None:
    """Send a batch of outbox items in order: one write on a socket WebSocket."""
    if type(ws) is ServerWebSocket:
        parts = [
            item if type(item) is Encoded else encode_text_frame(item) if item else _PING_FRAME
            for item in batch
        ]
        await ws.send_encoded(parts[0] if len(parts) == 1 else b"".join(parts))
        return
    frames: list[bytes] = []
    for item in batch:
        if item is not PING and item:
            frames.append(item)
            continue
        if frames:
            await ws.send_many(frames)
            frames = []
        await ws.ping()
    if frames:
        await ws.send_many(frames)


async def _linger(stream: trio.SocketStream, seconds: float) -> None:
    """Half-close, then discard what the client still sends, until it closes or ``seconds``.

    For an answer sent before the request was read: closing a socket with unread bytes
    resets the connection, and the reset destroys the answer before the client reads it.
    """
    with trio.move_on_after(seconds):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass


async def serve_relay(
    config: RelayConfig,
    *,
    authenticator: Authenticator | None = None,
    shutdown: trio.Event | None = None,
    embedded_tools: Mapping[str, EmbeddedTool] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the relay until cancelled, or until ``shutdown`` is set.

    Start it with ``port = await nursery.start(serve_relay, config)``: it reports the bound
    port (useful with ``config.port == 0``) once it is accepting connections.

    Args:
        config: listening address, key and limits.
        authenticator: maps ``(token, endpoint)`` to an agent id (a ``str``, or a
            :class:`~trio_mcp_relay.Grant` carrying it), or raises
            :class:`~trio_mcp_relay.AuthError`; may be a coroutine function. Replaces the
            default :class:`~trio_mcp_relay.TokenAuthenticator` (scoped and reference tokens
            made with ``config.keys``).
        embedded_tools: agent id -> a coroutine function serving that agent's tool side
            in-process (for example ``PluginHost([...]).serve``), with no socket hop. It is
            connected as the agent's tool when the relay starts. A tool connecting over the
            network for that agent replaces it; it comes back when the agent has no tool.
        shutdown: set it to shut down gracefully: stop accepting, refuse new requests, give
            in-flight requests ``config.shutdown_grace`` seconds, close every peer with 1001
            (requests still in flight are answered ``-32003`` first), then return.
        task_status: for ``nursery.start``.

    Resource handling:
        Every connection runs in its own nursery inside the server's; every socket is closed
        before ``serve_relay`` returns or raises. Each connection's outbox is bounded
        (``config.outbox_size`` frames; the module docstring says what happens when full).
        Cancelling ``serve_relay`` also closes every peer
        with 1001 and answers what is in flight, without the grace period; this takes at most
        a couple of seconds (the peers' chance to answer the close frame).

    Error handling:
        A peer's misbehaviour ends that peer's connection (a JSON-RPC error or a close code)
        and is logged; an unexpected exception in one connection is logged and closes only
        that connection. Failing to bind the port raises ``OSError``.
    """
    relay = _Relay(config, authenticator, embedded_tools)
    listeners = await trio.open_tcp_listeners(config.port, host=config.host or None)
    port = int(listeners[0].socket.getsockname()[1])
    connections_scope = trio.CancelScope(shield=True)
    async with trio.open_nursery() as outer:
        await outer.start(relay.run_connections, listeners, connections_scope)
        log.info("listening on %s:%d", config.host, port)
        log.info("health check at /mcp_endpoint/health?key=%s", redact(relay.admin_key))
        task_status.started(port)
        try:
            if shutdown is None:
                await trio.sleep_forever()
            await shutdown.wait()
            log.info("shutting down: in-flight requests get %g s", config.shutdown_grace)
            await relay.shutdown(config.shutdown_grace)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                relay.close_all()
                with trio.move_on_after(CLOSE_TIMEOUT):
                    for peer in relay._closing_peers:
                        await peer.done.wait()
            raise
        finally:
            connections_scope.cancel()
