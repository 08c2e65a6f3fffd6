"""The dispatcher: carries out the routing core's actions on peers, and owns their lives.

It is the only part of the shell that talks to the :class:`~trio_mcp_relay._routing.Router`
and to :class:`~.peer.Peer` objects. Nothing here ever waits on another peer: a frame is
written at once, queued, or refused, so a connection's reader always goes on reading (its
pongs and close frames included) whatever the peers it talks to are doing.

What a full or stalled outbox means, by role:

* **to a tool**: a frame that does not fit (``outbox_size`` frames, ``outbox_bytes`` bytes, or
  the relay's ``max_queued_bytes`` budget) is refused: a request is answered ``-32002`` with
  its own id at once, a notification is dropped (and logged). A request that stays queued for
  ``forward_timeout`` seconds is taken out of the queue and answered ``-32002``. A tool that
  stops reading altogether is found by keepalive (a ping is owed even when its outbox is
  full) and closed 1011; what was queued for it is answered ``-32002``, what it had received
  ``-32003``.
* **to a caller**: a frame that does not fit, or a queue whose oldest frame has waited
  ``slow_caller_grace`` seconds, closes the caller 1013. What is queued for it is dropped
  first, so the close frame is the next thing it reads; its requests are cancelled at the tool.

Every peer is registered (``tool_connected`` / ``caller_connected``) before its handshake
answer is written, so a frame routed to it right after its 101 is never refused.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .._config import RelayConfig
from .._routing import Action, Close, Role, Router, Send
from .._transport import ConnectionClosed, ServerWebSocket, WebSocket, encode_text_frame
from .access import log_access
from .counts import CALLER, TOOL, ShellCounts
from .outbox import ByteBudget, Outbox
from .peer import Peer, PeerState
from .recent import RecentErrors

__all__ = ["CLOSE_TIMEOUT", "Dispatcher"]

log = logging.getLogger("trio_mcp_relay.server")

#: How long a closing connection gets to answer our close frame before it is dropped.
CLOSE_TIMEOUT: Final = 2.0
CLOSE_INTERNAL_ERROR: Final = 1011  # no pong in time
CLOSE_TRY_AGAIN_LATER: Final = 1013  # a caller that stopped reading
#: How many ``slow_caller_grace`` periods a peer dropped for not reading is given to read its
#: close frame (it holds at most the rest of the one frame it was receiving meanwhile).
ABANDONED_HOLD_GRACES: Final = 3


class Dispatcher:
    """Peers by connection id, the router, and what to do with each action.

    Args:
        config: limits and timeouts.
        router: the routing core.
        wake_timer: called when the router's next deadline may have moved earlier.
    """

    def __init__(self, config: RelayConfig, router: Router, wake_timer: Callable[[], None]) -> None:
        self.config = config
        self.router = router
        self.peers: dict[int, Peer] = {}
        self.budget = ByteBudget(config.max_queued_bytes)
        #: Traffic and closes, for the metrics.
        self.counts = ShellCounts()
        self._ids = itertools.count(1)
        self._wake_timer = wake_timer
        self._nursery: trio.Nursery | None = None
        #: Recent closes and relay error frames, for the status page.
        self.recent = RecentErrors()
        #: Awaited before a caller of an agent is registered (cluster mode: the agent's
        #: servers on other nodes join first).
        self.before_caller: Callable[[str], Awaitable[None]] | None = None
        #: While one read's messages are routed: the frames held back per peer, to leave in
        #: one write each when they are all routed (None: write each at once).
        self._corked: dict[Peer, list[Send]] | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        """The nursery that runs closing handshakes (it outlives any one connection)."""
        self._nursery = nursery

    # ---------------------------------------------------------------- actions

    def dispatch(self, actions: list[Action]) -> None:
        """Carry out the router's actions, never waiting (and wake the timer if the router
        set an earlier deadline meanwhile)."""
        if self.router.take_deadline_change():
            self._wake_timer()
        peers = self.peers
        corked = self._corked
        for action in actions:
            if type(action) is not Send:
                assert isinstance(action, Close)
                peer = peers.get(action.conn)
                if peer is not None:
                    if corked and peer in corked:
                        self._uncork({peer: corked.pop(peer)})  # what it was sent goes first
                    self.close_peer(peer, action.code, action.reason)
                continue
            peer = peers.get(action.conn)
            if peer is None:
                continue
            self.recent.sent(peer.agent, peer.role.value, action.data)
            if corked is not None:
                held = corked.get(peer)
                if held is not None or peer.may_write_now():
                    # Held back, written with the others for this peer after the read.
                    if held is None:
                        held = corked[peer] = []
                    held.append(action)
                    continue
            self._send(peer, action)

    def _send(self, peer: Peer, action: Send) -> None:
        if peer.role is Role.TOOL:
            self._to_tool(peer, action)
        else:
            self._to_caller(peer, action.data)

    def _uncork(self, corked: dict[Peer, list[Send]]) -> None:
        """Write the frames held back for each peer while a read's messages were routed:
        one write per peer, as far as its socket takes them; what it does not take goes
        the ordinary way (queued, within the outbox's bounds), in order, after them."""
        left: list[tuple[Peer, list[Send]]] = []
        for peer, held in corked.items():
            if len(held) == 1:  # nothing to join: the ordinary way is the same write
                left.append((peer, held))
                continue
            begun = peer.write_now_many([encode_text_frame(a.data) for a in held])
            side = TOOL if peer.role is Role.TOOL else CALLER
            counts = self.counts
            counts.frames_out[side] += begun
            counts.bytes_out[side] += sum(len(a.data) for a in held[:begun])
            if begun < len(held):
                left.append((peer, held[begun:]))
        for peer, rest in left:
            for action in rest:
                if self.peers.get(peer.conn) is peer:
                    self._send(peer, action)

    def _to_tool(self, peer: Peer, action: Send) -> None:
        try:
            peer.send_nowait(action.data, action.request)
            counts = self.counts
            counts.frames_out[TOOL] += 1
            counts.bytes_out[TOOL] += len(action.data)
        except trio.WouldBlock:
            outbox = peer.outbox
            why = f"the tool is not keeping up ({len(outbox)} frames, {outbox.nbytes} bytes queued)"
            if action.request is not None:
                log.warning("agent %s: %s; request refused", peer.agent, why)
                now = trio.current_time()
                self.dispatch(self.router.forward_failed(peer.conn, action.request, why, now))
            else:
                log.warning("agent %s: %s; a notification was dropped", peer.agent, why)
        except trio.ClosedResourceError:
            pass

    def _to_caller(self, peer: Peer, data: bytes) -> None:
        try:
            peer.send_nowait(data)
            counts = self.counts
            counts.frames_out[CALLER] += 1
            counts.bytes_out[CALLER] += len(data)
        except trio.WouldBlock:
            outbox = peer.outbox
            log.warning(
                "agent %s: caller %d is not reading (%d frames, %d bytes queued); closing it",
                peer.agent,
                peer.conn,
                len(outbox),
                outbox.nbytes,
            )
            self.close_peer(
                peer, CLOSE_TRY_AGAIN_LATER, "caller is not reading (outbox full)", abandon=True
            )
        except trio.ClosedResourceError:
            pass

    # ---------------------------------------------------------------- watchdog

    async def _watch(self, peer: Peer) -> None:
        """Act on frames queued too long: requests to a tool after ``forward_timeout``
        (answered ``-32002``), anything to a caller after ``slow_caller_grace`` (closed 1013).
        Runs while frames are queued: the peer starts it with its writer, and it returns
        when nothing is queued."""
        tool = peer.role is Role.TOOL
        limit = self.config.forward_timeout if tool else self.config.slow_caller_grace
        outbox = peer.outbox
        while peer.state is PeerState.OPEN or peer.state is PeerState.HANDSHAKE:
            oldest = outbox.oldest()
            if oldest is None:
                return
            if trio.current_time() < oldest + limit:
                await trio.sleep_until(oldest + limit)
                continue
            if tool:
                why = f"not delivered to the tool within {limit:g} s"
                queued = len(outbox)
                tags = outbox.expire(trio.current_time() - limit)
                log.warning(
                    "agent %s: %d frames %s (%d requests answered -32002)",
                    peer.agent,
                    queued - len(outbox),
                    why,
                    len(tags),
                )
                now = trio.current_time()
                for tag in tags:
                    self.dispatch(self.router.forward_failed(peer.conn, tag, why, now))
            else:
                log.warning(
                    "agent %s: caller %d did not read for %g s; closing it",
                    peer.agent,
                    peer.conn,
                    limit,
                )
                self.close_peer(
                    peer,
                    CLOSE_TRY_AGAIN_LATER,
                    f"caller did not read for {limit:g} s",
                    abandon=True,
                )

    # ---------------------------------------------------------------- closing

    def close_peer(self, peer: Peer, code: int, reason: str, *, abandon: bool = False) -> None:
        """Unregister ``peer`` at once (its requests are answered or cancelled), then close it.

        With ``abandon`` (a peer that stopped reading) what is queued for it is dropped (a
        tool's queued requests answered ``-32002``) and the close frame goes next, after the
        rest of the frame it was receiving; it gets ``ABANDONED_HOLD_GRACES`` times
        ``slow_caller_grace`` seconds to read that far. Otherwise it gets what is queued,
        then the close frame, and ``CLOSE_TIMEOUT`` seconds to answer.
        """
        if peer.state is PeerState.CLOSING or peer.state is PeerState.CLOSED:
            return
        self.counts.closed(code)
        dropped = peer.close(code, reason, abandon=abandon)
        self.recent.closed(peer.agent, peer.role.value, code, reason)
        if dropped and peer.role is Role.TOOL:
            why = f"the tool connection was closed ({reason}) before this request left"
            now = trio.current_time()
            for tag in dropped:
                self.dispatch(self.router.forward_failed(peer.conn, tag, why, now))
        self.unregister(peer)
        grace = self.config.slow_caller_grace
        write_timeout = max(CLOSE_TIMEOUT, ABANDONED_HOLD_GRACES * grace) if abandon else 0.0
        assert self._nursery is not None
        self._nursery.start_soon(self._await_close, peer, write_timeout)

    async def _await_close(self, peer: Peer, write_timeout: float) -> None:
        if write_timeout and peer.close_sent is not None:
            with trio.move_on_after(write_timeout):
                await peer.close_sent.wait()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await peer.wait_done()
        peer.nursery.cancel_scope.cancel()

    def unregister(self, peer: Peer) -> None:
        """Tell the router the peer is gone (once), and carry out what follows."""
        if self.peers.get(peer.conn) is not peer:
            return
        del self.peers[peer.conn]
        if peer.role is Role.TOOL:
            self.dispatch(self.router.tool_disconnected(peer.conn, trio.current_time()))
        else:
            self.dispatch(self.router.caller_disconnected(peer.conn))

    def close_all(self, code: int, reason: str) -> list[Peer]:
        """Close every peer, tools first (so callers get their ``-32003`` answers first)."""
        peers = sorted(self.peers.values(), key=lambda p: p.role is not Role.TOOL)
        for peer in peers:
            self.close_peer(peer, code, reason)
        return peers

    # ---------------------------------------------------------------- a connection

    async def run_peer(
        self,
        ws: WebSocket,
        role: Role,
        agent: str,
        *,
        accept: Callable[[], Awaitable[None]] | None = None,
        server_id: str | None = None,
        remote: str = "memory",
        target: str | None = None,
        remote_server: bool = False,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register the connection, send its handshake answer, then read until it ends.

        Args:
            ws: the connection.
            role: tool or caller.
            agent: its agent.
            accept: writes the handshake answer (the 101); the peer is known to the router
                before it is called.
            server_id: a tool connection's ``server_id``, if it has one.
            remote: the client's address, for the access log line written when it ends.
            target: a caller standing for another node's callers of this server (cluster
                mode; see :attr:`~trio_mcp_relay.core.session.Caller.target`).
            remote_server: a tool connection standing for a server on another node.
            task_status: ``started(conn)`` with its connection number, once the router knows
                the connection and it is open.
        """
        if role is Role.CALLER and target is None and self.before_caller is not None:
            # Cluster mode: the agent's servers on other nodes join first, so this caller's
            # first request already sees them (nothing here waits on the network).
            await self.before_caller(agent)
        conn = next(self._ids)
        config = self.config
        outbox = Outbox(config.outbox_size, config.outbox_bytes, self.budget)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            peer = Peer(conn, role, agent, ws, outbox, nursery, started)
            peer.watchdog = self._watch
            self.peers[conn] = peer
            try:
                if role is Role.TOOL:
                    now = trio.current_time()
                    self.dispatch(
                        self.router.tool_connected(
                            conn, agent, server_id, now, remote=remote_server
                        )
                    )
                else:
                    self.dispatch(self.router.caller_connected(conn, agent, target))
                if accept is not None:
                    await accept()
                    accept = None  # an open connection keeps nothing of its handshake
                peer.opened()
                task_status.started(conn)
                # The read loop, here rather than in a method of its own: each coroutine
                # level is memory that every open connection holds while it waits.
                side = TOOL if peer.role is Role.TOOL else CALLER
                # Messages read together are routed together (see below): a socket's.
                together = ws if type(ws) is ServerWebSocket else None
                while True:
                    try:
                        message = await ws.receive()
                    except ConnectionClosed as exc:
                        log.debug("connection %d closed: %d %s", conn, exc.code, exc.reason)
                        peer.received_close = exc.code
                        return
                    following = together.ready_message() if together is not None else None
                    if following is None:
                        self._received(peer, side, message)
                        del message  # not held while the next read waits
                        continue
                    # Several messages came in one read: route them all, then write what
                    # they made for each peer in one write (one system call, one wake-up).
                    assert together is not None  # only it has messages ready
                    corked: dict[Peer, list[Send]] = {}
                    self._corked = corked
                    try:
                        self._received(peer, side, message)
                        del message
                        while following is not None:
                            self._received(peer, side, following)
                            following = together.ready_message()
                    finally:
                        self._corked = None
                        self._uncork(corked)
                    del corked
            finally:
                identity = self.router.identity_of(conn) or server_id
                self.unregister(peer)
                outbox.close()
                outbox.clear()  # give back its bytes to the relay's budget
                peer.ended()
                nursery.cancel_scope.cancel()
                log_access(peer, remote, identity, trio.current_time() - started)

    def _received(self, peer: Peer, side: int, message: str | bytes) -> None:
        """Count one message from ``peer`` and carry out what the router makes of it."""
        peer.frames_in += 1
        counts = self.counts
        counts.frames_in[side] += 1
        # A str is counted in UTF-8 bytes; isascii() is O(1) on a str, encode() is not.
        if type(message) is bytes or message.isascii():
            counts.bytes_in[side] += len(message)
        else:
            assert isinstance(message, str)
            counts.bytes_in[side] += len(message.encode())
        router = self.router
        actions = router.received(peer.conn, message, trio.current_time())
        if actions:
            self.dispatch(actions)
        elif router.take_deadline_change():
            self._wake_timer()
