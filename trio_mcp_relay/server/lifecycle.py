"""What runs beside the connections: the deadline timer, keepalive, embedded tools, shutdown.

* The **timer** sleeps until the router's next deadline (tool requests waiting for a caller,
  the optional relay-side request timeout) and carries out what expired.
* **Keepalive** pings every open peer each ``ping_interval`` seconds. The ping goes ahead of
  whatever is queued for the peer, whatever its bounds, so a ping is owed even to a peer
  whose outbox is full; a peer that has not answered within ``ping_timeout`` is dropped
  (1011): what was queued for it is answered ``-32002``, what it had received ``-32003``.
* **Embedded tools** are served over an in-process WebSocket and restarted when they end.
* **Shutdown** stops accepting, lets in-flight requests finish for a grace period, then
  closes every peer with 1001.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, TypeAlias

import trio

from .._routing import CLOSE_REPLACED, Role
from .._transport import WebSocket, memory_websocket_pair
from .dispatch import CLOSE_INTERNAL_ERROR, CLOSE_TIMEOUT, Dispatcher
from .peer import Peer, PeerState

__all__ = ["EMBEDDED_RESTART_DELAY", "EmbeddedTool", "Lifecycle"]

log = logging.getLogger("trio_mcp_relay.server")

#: Seconds before an embedded tool that ended is started again.
EMBEDDED_RESTART_DELAY = 1.0
#: How often an embedded connection is asked for its identity until it has one.
EMBEDDED_IDENTITY_POLL = 0.05
CLOSE_GOING_AWAY: Final = 1001  # the relay is shutting down

#: Serves the tool side of one agent in-process: MCP requests arrive on the WebSocket given.
EmbeddedTool: TypeAlias = Callable[[WebSocket], Awaitable[None]]


class Lifecycle:
    """The background tasks of one relay.

    Args:
        dispatcher: the peers and the router.
        accept_scope: cancelled to stop accepting connections.
    """

    def __init__(self, dispatcher: Dispatcher, accept_scope: trio.CancelScope) -> None:
        self.dispatcher = dispatcher
        self.config = dispatcher.config
        self.router = dispatcher.router
        self.accept_scope = accept_scope
        self._timer_wake = trio.Event()
        self.closing_peers: list[Peer] = []
        #: Awaited once in-flight requests are done, before peers are closed (cluster mode:
        #: this node's leases are released, so no other node waits for them to lapse).
        self.before_close: Callable[[], Awaitable[None]] | None = None
        #: The connections of embedded tools (each node of a cluster runs its own).
        self.embedded_conns: set[int] = set()

    def wake_timer(self) -> None:
        """The router's next deadline may have moved earlier."""
        self._timer_wake.set()

    async def timer(self) -> NoReturn:
        """Carry out the router's deadlines as they pass."""
        while True:
            deadline = self.router.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._timer_wake.wait()
            self._timer_wake = trio.Event()
            try:
                self.dispatcher.dispatch(self.router.expire(trio.current_time()))
            except Exception:  # a bug here must not take every connection down
                log.exception("deadline handling failed")

    async def keepalive(self) -> None:
        """Ping every open peer each ``ping_interval``; drop those silent for ``ping_timeout``."""
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        if not interval:
            return
        tick = min(interval, timeout) / 4
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for peer in list(self.dispatcher.peers.values()):
                try:
                    self.keepalive_peer(peer, now, interval, timeout)
                except Exception:  # one peer's trouble must not stop keepalive for all
                    log.exception("keepalive failed for connection %d", peer.conn)

    def keepalive_peer(self, peer: Peer, now: float, interval: float, timeout: float) -> None:
        """One peer's keepalive step at ``now``."""
        if peer.state is not PeerState.OPEN:
            return
        if peer.ping_sent is not None:
            pong = peer.ws.last_pong
            if pong is not None and pong >= peer.ping_sent:
                peer.ping_sent = None
            elif now - peer.ping_sent >= timeout:
                log.info("agent %s: connection %d did not answer a ping", peer.agent, peer.conn)
                self.dispatcher.close_peer(
                    peer, CLOSE_INTERNAL_ERROR, f"no pong within {timeout:g} s", abandon=True
                )
                return
            else:
                return
        if now - peer.last_ping >= interval:
            peer.last_ping = now
            peer.ping_nowait()
            peer.ping_sent = now

    # ---------------------------------------------------------------- embedded tools

    async def embedded_tool(
        self,
        agent: str,
        serve: EmbeddedTool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect an in-process tool for ``agent`` over a memory WebSocket: a server of the
        agent like any other, named by the ``serverInfo`` it reports.

        If it ends, it is started again after ``EMBEDDED_RESTART_DELAY`` seconds; if it ended
        because a network server of the same identity replaced it, once no server of that
        identity is connected (checked every ``EMBEDDED_RESTART_DELAY`` seconds).
        """
        while True:
            relay_end, tool_end = memory_websocket_pair(
                self.config.outbox_size, names=(f"embedded:{agent}", "relay")
            )
            log.info("agent %s: embedded tool started", agent)
            identity: list[str] = []
            async with trio.open_nursery() as nursery:
                conn = await nursery.start(self._run_embedded_peer, relay_end, agent)
                self.embedded_conns.add(conn)
                nursery.start_soon(self._learn_identity, conn, identity)
                task_status.started()  # the first time only: the relay may start accepting
                task_status = trio.TASK_STATUS_IGNORED
                try:
                    await serve(tool_end)
                except Exception:
                    log.exception("agent %s: embedded tool failed", agent)
                finally:
                    self.embedded_conns.discard(conn)
                    with trio.CancelScope(shield=True):
                        await tool_end.close(1000, "embedded tool ended")
                    nursery.cancel_scope.cancel()
            if self.accept_scope.cancel_called:
                return  # the relay is shutting down
            log.warning("agent %s: embedded tool ended", agent)
            await trio.sleep(EMBEDDED_RESTART_DELAY)
            if tool_end.close_code == CLOSE_REPLACED and identity:
                # Replaced by a server connected over the network: stand by until it is gone.
                while self.router.has_server(agent, identity[0]):  # noqa: ASYNC110 (coarse)
                    await trio.sleep(EMBEDDED_RESTART_DELAY)

    async def _learn_identity(self, conn: int, identity: list[str]) -> None:
        """Note the identity the embedded connection ``conn`` gets once initialized."""
        while self.router.role(conn) is not None:
            found = self.router.identity_of(conn)
            if found is not None:
                identity.append(found)
                return
            await trio.sleep(EMBEDDED_IDENTITY_POLL)

    async def _run_embedded_peer(
        self,
        ws: WebSocket,
        agent: str,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The relay side of an embedded tool; a failure ends this connection only."""
        try:
            await self.dispatcher.run_peer(ws, Role.TOOL, agent, task_status=task_status)
        except Exception:
            log.exception("agent %s: embedded tool connection failed", agent)

    # ---------------------------------------------------------------- shutdown

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let in-flight requests finish for ``grace`` s, close everyone (1001)."""
        self.accept_scope.cancel()
        self.router.draining = True
        with trio.move_on_after(grace):
            # Polled: the pending table has no "became empty" event, and this runs once.
            while self.router.pending_count():  # noqa: ASYNC110
                await trio.sleep(0.05)
        if self.before_close is not None:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self.before_close()
        self.close_all()
        await self.wait_closed()

    def close_all(self) -> None:
        """Close every peer with 1001: tools first, so callers get their -32003 answers."""
        self.accept_scope.cancel()
        self.closing_peers = self.dispatcher.close_all(CLOSE_GOING_AWAY, "relay is shutting down")

    async def wait_closed(self) -> None:
        """Give the peers being closed ``CLOSE_TIMEOUT`` seconds to finish."""
        with trio.move_on_after(CLOSE_TIMEOUT):
            for peer in list(self.closing_peers):
                await peer.wait_done()
