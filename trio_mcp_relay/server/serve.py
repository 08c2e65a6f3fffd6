"""The relay's entry point: listeners, the accept loop, and one task per connection.

Structure (every task has an owner)::

    serve_relay                       waits for cancellation or the shutdown trigger
    └── connections nursery           (shielded: closing peers politely outlives a cancel)
        ├── timer, keepalive          (lifecycle.py)
        ├── closer tasks              one per connection being closed, bounded by a timeout
        ├── embedded tools            one per agent served in-process
        ├── accept loops, one per listener (in their own cancel scope: shutdown stops them first)
        ├── one task per accepted stream: HTTP head -> a plain answer (routes.py),
        │   MCP over HTTP (mcp_http/: requests on a kept-alive connection, SSE streams),
        │   or the WebSocket handshake (handshake.py), then the peer (dispatch.py, peer.py)
        │   └── connection nursery: reader (the connection task), writer and watchdog
        └── one task per HTTP session (mcp_http/front.py): the session as a caller peer,
            and its idle expiry

Any ``trio.abc.Listener`` can be served: TCP listeners (the default, from ``config.host``
and ``config.port``) or, for tests and embedding, in-memory ones.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from .._auth import Authenticator, TokenAuthenticator, encrypt_token, redact
from .._config import RelayConfig
from .._guard import FailureLimiter
from .._http import BadRequest, read_request_head, respond
from .._proxies import TrustedProxies
from .._routing import Router
from ..core.middleware import Middleware
from ..core.tally import Tally
from .dispatch import Dispatcher
from .handshake import PendingByAddress, open_websocket
from .lifecycle import EmbeddedTool, Lifecycle
from .mcp_http import PATHS as MCP_HTTP_PATHS
from .mcp_http import McpHttpFront
from .metrics import MetricsRoute, RelayCollector, relay_registry
from .reload import RelayHandle
from .routes import HttpRoutes
from .status import StatusPage

if TYPE_CHECKING:
    from .cluster import ClusterNode

__all__ = ["serve_relay"]

log = logging.getLogger("trio_mcp_relay.server")

#: How long a refused connection is read from after its answer (see ``_linger``).
_LINGER: Final = 1.0
#: accept() errors that mean the system is out of something (descriptors, memory) for now:
#: the accept loop logs them and tries again after ``_ACCEPT_RETRY`` seconds.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_RETRY: Final = 0.1


def peer_address(stream: trio.abc.Stream) -> tuple[str, str]:
    """The client's host (for limits) and ``host:port`` (for logs).

    A stream that is not a socket may say who it stands for with a ``remote_address``
    attribute, ``(host, port)``; otherwise it is ``memory``.
    """
    address: Any = getattr(stream, "remote_address", None)
    if address is None:
        socket = getattr(stream, "socket", None)
        if socket is None:
            return "memory", "memory"
        try:
            address = socket.getpeername()
        except OSError:
            return "?", "?"
    host, port = address[:2]
    return str(host), f"{host}:{port}"


class _Relay:
    """One relay's state: the dispatcher, the background tasks, admission and the routes."""

    def __init__(
        self,
        config: RelayConfig,
        authenticator: Authenticator | None,
        embedded_tools: Mapping[str, EmbeddedTool] | None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        derive_tokens = authenticator is None and config.reference_tokens
        #: Whether the authenticator is the relay's own (a reload then gives it the new keys).
        self.own_authenticator = authenticator is None
        if authenticator is None:
            if not config.key:
                raise ValueError("RelayConfig.key is required when no authenticator is given")
            authenticator = TokenAuthenticator(
                config.keys, accept_reference=config.reference_tokens
            )
        self.config = config
        self.authenticator = authenticator
        self.embedded_tools = dict(embedded_tools or {})
        router = Router(
            tool_request_timeout=config.tool_request_timeout,
            request_timeout=config.request_timeout,
            max_inflight_per_caller=config.max_inflight_per_caller,
            max_tool_requests=config.max_tool_requests,
            init_timeout=config.init_timeout,
            filters={a: f for a, f in config.tool_filters.items() if a != "*"},
            default_filters=config.tool_filters.get("*"),
            middleware=middleware,
            tally=Tally(config.metrics_agents, config.metrics_top_agents),
        )
        self.router = router
        self.accept_scope = trio.CancelScope()
        self.dispatcher = Dispatcher(config, router, self._wake_timer)
        self.lifecycle = Lifecycle(self.dispatcher, self.accept_scope)
        self.limiter = FailureLimiter(
            config.auth_failures,
            config.auth_window,
            config.auth_ban,
            delay=config.auth_delay,
            concurrency=config.auth_concurrency,
        )
        self.proxies = TrustedProxies.parse(config.trusted_proxies)
        self.pending = PendingByAddress(config.max_pending_per_address)
        self.admin_key = config.admin_key or config.key or ""
        self.status = StatusPage(
            router,
            self.dispatcher.recent,
            self._reference_token if derive_tokens else None,
            f"{config.host}:{config.port}",
        )
        counts = self.dispatcher.counts
        self.routes = HttpRoutes(
            config,
            config.admin_keys,
            self._connections,
            self.limiter,
            status=self.status,
            counts=counts,
        )
        started = trio.current_time()
        collector = RelayCollector(
            router,
            self.dispatcher,
            lambda: trio.current_time() - started,
            self._http_sessions,
            lambda: None if self.cluster is None else self.cluster.metrics(),
        )
        #: This relay's own Prometheus registry (never the global one).
        self.metrics_registry = relay_registry(collector)
        self.metrics = MetricsRoute(self.routes, config.metrics_keys, self.metrics_registry)
        self._open_streams = 0
        #: Streamable HTTP and HTTP+SSE callers (``server/mcp_http``).
        self.http = McpHttpFront(self, counts)
        #: This relay as a node of a cluster (``config.cluster``), once it listens.
        self.cluster: ClusterNode | None = None

    def join_cluster(self, address: str) -> None:
        """Cluster mode: become a node of ``config.cluster`` (before accepting anything)."""
        try:
            from .cluster import ClusterNode
        except ImportError as exc:
            raise RuntimeError(
                f"cluster mode needs the cluster extra ({exc.name} is missing): "
                "pip install 'trio-mcp-relay[cluster]'"
            ) from None
        self.cluster = ClusterNode(
            self.config,
            self.dispatcher,
            address,
            lambda: len(self.http.sessions),
            self.lifecycle.embedded_conns.__contains__,
        )
        self.lifecycle.before_close = self.cluster.leave

    def caller_count(self, agent: str) -> int:
        """Callers of ``agent`` (on every node, in cluster mode), for the per-agent limit."""
        if self.cluster is not None:
            return self.cluster.caller_count(agent)
        return self.router.caller_count(agent)

    def _http_sessions(self) -> dict[str, int]:
        """Open HTTP sessions by transport, for the metrics."""
        counts = {"streamable": 0, "sse": 0}
        for session in self.http.sessions:
            counts["sse" if session.legacy else "streamable"] += 1
        return counts

    def _reference_token(self, agent: str) -> str:
        """The agent's reference token under the current signing key (a reload may change it)."""
        return encrypt_token(self.config.key or "", agent)

    def _connections(self) -> dict[str, Any]:
        """The health check's ``connections``: the reference's counts, plus each agent's
        servers (identity, ready, tool count, connected since, as UTC ISO 8601)."""
        stats = self.router.stats() if self.cluster is None else self.cluster.totals()
        stats["http_sessions"] = len(self.http.sessions)
        if self.cluster is not None:
            stats["cluster"] = self.cluster.status()
        offset = time.time() - trio.current_time()
        stats["servers_by_agent"] = {
            agent: [
                {
                    "server": row["identity"],
                    "ready": row["ready"],
                    "tools": row["tools"],
                    "connected_since": datetime.datetime.fromtimestamp(
                        row["connected_at"] + offset, datetime.UTC
                    ).isoformat(timespec="seconds"),
                }
                for row in rows
            ]
            for agent, rows in self.router.servers().items()
        }
        return stats

    def _wake_timer(self) -> None:
        self.lifecycle.wake_timer()

    async def run_connections(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The connections nursery, inside ``scope`` (shielded from outer cancellation)."""
        with scope:
            async with trio.open_nursery() as nursery:
                self.dispatcher.bind(nursery)
                self.http.bind(nursery)
                nursery.start_soon(self.lifecycle.timer)
                nursery.start_soon(self.lifecycle.keepalive)
                if self.cluster is not None:
                    nursery.start_soon(self.cluster.run, nursery)
                for agent, serve in self.embedded_tools.items():
                    await nursery.start(self.lifecycle.embedded_tool, agent, serve)
                nursery.start_soon(self._accept, listeners, nursery)
                task_status.started()

    async def _accept(
        self, listeners: Sequence[trio.abc.Listener[Any]], nursery: trio.Nursery
    ) -> None:
        with self.accept_scope:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_from, listener, nursery)

    async def _accept_from(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        """Accept connections from ``listener``, each served by a task in ``nursery``.

        What ``trio.serve_listeners`` does, less what an open connection holds: it wraps
        each handler in a coroutine of its own and names each task with a new string, about
        400 bytes per connection for as long as it is open (:meth:`handle_stream` closes its
        stream itself, and every connection task shares one name).
        """
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error(
                        "accept failed: %s; retrying in %g s", os.strerror(exc.errno), _ACCEPT_RETRY
                    )
                    await trio.sleep(_ACCEPT_RETRY)
                    continue
                nursery.start_soon(self.handle_stream, stream, name="trio_mcp_relay.connection")
                del stream

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """One accepted connection, from its first byte to its close."""
        host, remote = peer_address(stream)
        if not self.pending.enter(host):
            limit = self.config.max_pending_per_address
            log.warning("%s: refused: %d unauthenticated connections from %s", remote, limit, host)
            why = f"too many connections awaiting authentication from {host} (limit {limit})"
            try:
                with contextlib.suppress(Exception):
                    await respond(stream, 503, {"error": why}, headers=[("retry-after", "1")])
                    await _linger(stream, min(_LINGER, self.config.handshake_timeout))
            finally:  # a cancellation too: this task is the only one that closes it
                await trio.aclose_forcefully(stream)
            return
        authenticating = True
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
            del scope  # not held for the connection's life
            # The client's address: from a trusted proxy's header, else the peer's.
            client = self.proxies.client_address(host, request.headers)
            if client != host:
                remote = f"{client} (via {remote})"
            if request.is_websocket:
                opened = await open_websocket(
                    stream,
                    request,
                    remote,
                    client,
                    config=self.config,
                    authenticator=self.authenticator,
                    caller_count=self.caller_count,
                    make_room=self.http.sessions.make_room,
                    limiter=self.limiter,
                    counts=self.dispatcher.counts,
                )
                del request  # an idle connection keeps neither its head nor the handshake state
                self.pending.leave(host)
                authenticating = False
                if opened is not None:
                    # Run here, not in a helper: each coroutine level is memory that every
                    # open connection holds while it waits.
                    role, agent = opened.role, opened.agent
                    log.info("%s: %s connected for agent %s", remote, role.value, agent)
                    try:
                        await self.dispatcher.run_peer(
                            opened.ws,
                            role,
                            agent,
                            accept=opened.accept,
                            server_id=opened.server_id,
                            remote=remote,
                        )
                    finally:
                        log.info("%s: %s for agent %s disconnected", remote, role.value, agent)
            elif request.path in MCP_HTTP_PATHS:

                def authenticated() -> None:
                    nonlocal authenticating
                    if authenticating:
                        self.pending.leave(host)
                        authenticating = False

                def client_of(headers: dict[str, str]) -> str:
                    return self.proxies.client_address(host, headers)

                await self.http.serve(stream, request, client_of, remote, authenticated)
            else:
                await self.routes.answer(stream, request, client)
        except BadRequest as exc:
            # Only the kind of error: h11 quotes the offending line, which may hold a token.
            log.debug("%s: bad request: %s", remote, str(exc).split(":", 1)[0])
            await respond(stream, 400, {"error": "bad request"})
        except Exception:
            log.exception("%s: connection failed", remote)
        finally:
            if authenticating:
                self.pending.leave(host)
            self._open_streams -= 1
            await trio.aclose_forcefully(stream)


async def _linger(stream: trio.abc.Stream, seconds: float) -> None:
    """Half-close, then discard what the client still sends, until it closes or ``seconds``.

    For an answer sent before the request was read: closing a socket with unread bytes
    resets the connection, and the reset destroys the answer before the client reads it.
    """
    with trio.move_on_after(seconds):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(65536):
                pass


async def serve_relay(
    config: RelayConfig,
    *,
    authenticator: Authenticator | None = None,
    shutdown: trio.Event | None = None,
    embedded_tools: Mapping[str, EmbeddedTool] | None = None,
    listeners: Sequence[trio.abc.Listener[Any]] | None = None,
    middleware: Sequence[Middleware] = (),
    handle: RelayHandle | None = None,
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
        shutdown: set it to shut down gracefully: stop accepting, refuse new requests, give
            in-flight requests ``config.shutdown_grace`` seconds, close every peer with 1001
            (requests still in flight are answered ``-32003`` first), then return.
        embedded_tools: agent id -> a coroutine function serving that agent's tool side
            in-process (for example ``PluginHost([...]).serve``), with no socket hop. It is
            connected as a server of the agent when the relay starts, initialized and named
            by its ``serverInfo`` like any other. Network servers of other identities join
            it; one of the same identity replaces it, and it comes back once that one is
            gone. If it ends otherwise (a crash), it is started again after a second.
        listeners: serve these (any ``trio.abc.Listener``, for example in-memory listeners
            in tests) instead of binding ``config.host``/``config.port``. The port reported
            is then that of the first socket listener, or 0.
        middleware: objects that see every caller request and its answer, with its agent,
            caller and server, and may pass, rewrite or refuse it (see
            :mod:`trio_mcp_relay.core.middleware`; :class:`~trio_mcp_relay.Middleware`).
        handle: a :class:`~trio_mcp_relay.RelayHandle` to reload this relay's configuration
            through while it runs (see :mod:`trio_mcp_relay.server.reload`).
        task_status: for ``nursery.start``.

    Resource handling:
        Every connection runs in its own nursery inside the server's; every stream is closed
        before ``serve_relay`` returns or raises. What is queued for each connection is
        bounded in frames (``outbox_size``) and bytes (``outbox_bytes``), and all queues
        together by ``max_queued_bytes``; ``server/dispatch.py`` says what happens when a
        bound is reached. Cancelling ``serve_relay`` also closes every peer with 1001 and
        answers what is in flight, without the grace period; this takes at most a couple of
        seconds (the peers' chance to answer the close frame).

    Error handling:
        A peer's misbehaviour ends that peer's connection (a JSON-RPC error or a close code)
        and is logged; an unexpected exception in one connection is logged and closes only
        that connection. Failing to bind the port raises ``OSError``.
    """
    relay = _Relay(config, authenticator, embedded_tools, middleware)
    if listeners is None:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host or None)
    port = 0
    for listener in listeners:
        socket = getattr(listener, "socket", None)
        if socket is not None:
            port = int(socket.getsockname()[1])
            break
    if config.cluster:
        relay.join_cluster(f"{config.host}:{port}")
    connections_scope = trio.CancelScope(shield=True)
    async with trio.open_nursery() as outer:
        await outer.start(relay.run_connections, listeners, connections_scope)
        log.info("listening on %s:%d", config.host, port)
        log.info("health check at /mcp_endpoint/health?key=%s", redact(relay.admin_key))
        log.info("status page at /mcp_endpoint/status?key=%s", redact(relay.admin_key))
        if handle is not None:
            handle._attach(relay)
        task_status.started(port)
        try:
            if shutdown is None:
                await trio.sleep_forever()
            await shutdown.wait()
            grace = relay.config.shutdown_grace  # a reload may have changed it
            log.info("shutting down: in-flight requests get %g s", grace)
            await relay.lifecycle.shutdown(grace)
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                if relay.cluster is not None:
                    with trio.move_on_after(1.0):
                        await relay.cluster.leave()
                relay.lifecycle.close_all()
                await relay.lifecycle.wait_closed()
            raise
        finally:
            if handle is not None:
                handle._detach()
            connections_scope.cancel()
