"""One node of a cluster: its leases, its view of the cluster, the bus, and its links.

Theory of operation
-------------------
Each node runs the routing core for the connections it accepted, exactly as alone. What
makes several nodes one endpoint:

* **Leases.** A server that becomes ready on a node is *claimed* in Redis: a key holding
  its record (identity, ``initialize`` result, every list), with a fresh version. A
  heartbeat every ``min(1, lease/3)`` s renews it with the node's own lease; a node that
  dies stops renewing, and its keys lapse after ``--cluster-lease`` seconds. A newer claim
  of the same identity (a tool that reconnected elsewhere) replaces the older, which its
  node closes ``4001``, as one node does for two connections of one identity.
* **The directory.** Every node mirrors every record: from the ``events`` channel as they
  change, and from a full read every ``max(2, lease/2)`` s that catches what an event
  missed. A node polls the node leases every ``min(0.5, lease/4)`` s; the servers of a node
  whose lease lapsed leave its directory at once.
* **Links.** When a caller of an agent arrives, the agent's servers on other nodes join its
  session here first, each as a :class:`~.links.ServerLink` (answered ``initialize`` and
  lists from its record: no frame leaves the node for ``tools/list``). Frames for a server
  elsewhere go over the bus to a :class:`~.links.CallerLink` there, created on the first
  frame of each tunnel. A server that leaves the directory closes its links: their requests
  in flight are answered ``-32003`` and callers get ``list_changed``.
* **The bus.** Every node subscribes to its own channel. One task publishes every frame the
  node sends, in order, pipelined in batches, so frames between two connections keep their
  order. A frame published to a channel nobody reads (PUBLISH answers 0) is a failed
  forward: ``-32002``.
* **Redis unreachable.** Any failed command marks the bus down: requests in flight over it
  are answered ``-32002`` naming the cause, new cross-node requests too, and tunnels on
  this node are closed (their requests cancelled at the tools). Local traffic never waits
  on Redis. When a heartbeat succeeds again the node claims its servers again, reads the
  directory, and the bus is up: nothing to restart.
* **Drain.** After a graceful shutdown's in-flight requests are done, the node releases its
  leases at once (no wait for expiry) before closing its connections.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import coredis
import coredis.exceptions
import orjson
import trio
from coredis.retry import (
    CompositeRetryPolicy,
    ConstantRetryPolicy,
    ExponentialBackoffRetryPolicy,
)

from ..._config import RelayConfig, redact_url
from ..._frames import CONNECTION_ERROR
from ..._routing import CLOSE_REPLACED, Role, Router
from ..dispatch import Dispatcher
from .links import CallerLink, ServerLink
from .records import (
    CLOSE_FROM_CALLERS,
    CLOSE_FROM_SERVER,
    TO_CALLERS,
    TO_SERVER,
    BusMessage,
    Change,
    Directory,
    Keys,
    NodeRecord,
    ServerRecord,
    decode_batch,
    encode_batch,
)
from .store import Store

__all__ = ["ClusterNode"]

log = logging.getLogger("trio_mcp_relay.cluster")

#: Frames waiting to be published at most; a link's writer waits beyond.
OUTGOING_SIZE: Final = 4096
#: Frames published in one pipeline at most.
BATCH: Final = 256
#: Seconds between attempts while Redis is unreachable.
RETRY: Final = 0.5
CLOSE_NODE_GONE: Final = 1001
CLOSE_BUS_LOST: Final = 1011

#: What a Redis command raises when Redis cannot be reached.
REDIS_ERRORS: Final = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)
Outgoing = tuple[str, BusMessage, Callable[[str], None] | None]


class ClusterNode:
    """This relay as one node of the cluster ``config.cluster`` names.

    Args:
        config: the relay's settings (``cluster``, ``cluster_lease``, ``cluster_node``).
        dispatcher: the relay's dispatcher (links are connections it runs).
        address: where this node listens (for the status page).
        http_sessions: how many HTTP sessions are open here (for the cluster's counts).
        embedded: whether a tool connection is an embedded tool (``serve --tools``): every
            node runs its own, so those are never claimed in Redis nor replaced from it.
    """

    def __init__(
        self,
        config: RelayConfig,
        dispatcher: Dispatcher,
        address: str,
        http_sessions: Callable[[], int] = lambda: 0,
        embedded: Callable[[int], bool] = lambda conn: False,
    ) -> None:
        self.url = config.cluster
        self.lease = config.cluster_lease
        port = address.rpartition(":")[2]
        #: The name operators gave (or host and port), and this process's own id in the
        #: cluster: a node restarted under the same name is another node, so nothing meant
        #: for the old process (tunnel numbers, answers) reaches the new one.
        self.name = config.cluster_node or f"{socket.gethostname()}-{port}"
        self.node = f"{self.name}~{secrets.token_hex(4)}"
        self.address = address
        self.dispatcher = dispatcher
        self.router: Router = dispatcher.router
        self.keys = Keys()
        self.directory = Directory()
        self.started = time.time()
        self.heartbeat_interval = min(1.0, self.lease / 3)
        self.poll_interval = min(0.5, self.lease / 4)
        self.resync_interval = max(2.0, self.lease / 2)
        self._http_sessions = http_sessions
        self._embedded = embedded
        #: Control messages that found the outgoing queue full: sent first, never dropped.
        self._urgent: list[Outgoing] = []
        #: Servers of this node claimed in Redis, by (agent, identity).
        self.local: dict[tuple[str, str], ServerRecord] = {}
        #: The connection each claim is for, and its version.
        self._versions: dict[tuple[str, str], tuple[int, int]] = {}
        #: Tell the others that frames sent to this node may have been lost (it re-subscribed
        #: or came back): they answer what they await from it.
        self._reset_pending = False
        self._was_up = False
        self.server_links: dict[int, ServerLink] = {}  # by tunnel
        self.links_by_key: dict[tuple[str, str], ServerLink] = {}
        self.caller_links: dict[tuple[str, int], CallerLink] = {}  # by (node, tunnel)
        self._tunnels = itertools.count(1)
        self._up = False
        self._down_reason = "not connected to Redis yet"
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_event = trio.Event()
        self._out_send, self._out = trio.open_memory_channel[Outgoing](OUTGOING_SIZE)
        self._store: Store | None = None
        self._nursery: trio.Nursery | None = None
        self._subscribed = trio.Event()
        self._listening = trio.CancelScope()
        self._resync = trio.Event()
        self._settle_until = 0.0
        self._idle_agents: set[str] = set()
        #: Tunnels from other nodes ended while the bus was down, whose other ends do not
        #: know yet: (node, tunnel, agent, identity).
        self._untold: set[tuple[str, int, str, str]] = set()
        self.draining = False
        self.frames_sent = 0
        self.frames_received = 0
        router = self.router
        router.watch = self._watch
        router.elsewhere = lambda agent: self.directory.tool_requests_elsewhere(agent, self.node)
        dispatcher.before_caller = self.before_caller

    # ---------------------------------------------------------------- the Bus of the links

    @property
    def up(self) -> bool:
        return self._up

    @property
    def down_reason(self) -> str:
        return self._down_reason

    async def send(
        self, to: str, message: BusMessage, failed: Callable[[str], None] | None = None
    ) -> None:
        await self._out_send.send((to, message, failed))

    def _send_nowait(self, to: str, message: BusMessage) -> None:
        try:
            self._out_send.send_nowait((to, message, None))
        except trio.WouldBlock:
            self._urgent.append((to, message, None))  # the sender is busy: it comes back

    # ---------------------------------------------------------------- counts and limits

    def caller_count(self, agent: str) -> int:
        """Callers of ``agent`` on every node (this one's live, the others' as of their
        last heartbeat)."""
        return self.router.caller_count(agent) + self.directory.callers_elsewhere(agent, self.node)

    def node_record(self) -> NodeRecord:
        stats = self.router.stats()
        return NodeRecord(
            self.node,
            self.address,
            self.started,
            self.draining,
            stats["robot_connections_by_agent"],
            self.router.tool_requests_by_agent(),
            stats["tool_connections"],
            self._http_sessions(),
            self.name,
        )

    def status(self) -> dict[str, Any]:
        """The health check's ``cluster`` section."""
        nodes = dict(self.directory.nodes)
        nodes[self.node] = self.node_record()
        return {
            "node": self.node,
            "name": self.name,
            "redis": redact_url(self.url),
            "bus": "up" if self._up else "down",
            **({} if self._up else {"down_reason": self._down_reason}),
            "lease_seconds": self.lease,
            "nodes": {
                name: {
                    "name": n.name,
                    "address": n.address,
                    "draining": n.draining,
                    "tool_connections": n.tools,
                    "robot_connections": sum(n.callers.values()),
                    "http_sessions": n.http_sessions,
                }
                for name, n in sorted(nodes.items())
            },
            "servers_elsewhere": len(self.directory.records),
            "tunnels": {
                "to_servers": len(self.server_links),
                "from_callers": len(self.caller_links),
            },
        }

    def metrics(self) -> dict[str, int]:
        """What ``/metrics`` shows of cluster mode."""
        return {
            "bus_up": int(self._up),
            "nodes": len(set(self.directory.nodes) | {self.node}),
            "servers_elsewhere": len(self.directory.records),
            "to_servers": len(self.server_links),
            "from_callers": len(self.caller_links),
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
        }

    def totals(self) -> dict[str, Any]:
        """The reference's health counts over the whole cluster."""
        nodes = dict(self.directory.nodes)
        nodes[self.node] = self.node_record()
        by_agent: dict[str, int] = {}
        for n in nodes.values():
            for agent, count in n.callers.items():
                by_agent[agent] = by_agent.get(agent, 0) + count
        tools = sum(n.tools for n in nodes.values())
        callers = sum(by_agent.values())
        return {
            "tool_connections": tools,
            "robot_connections": callers,
            "total_connections": tools + callers,
            "robot_connections_by_agent": by_agent,
        }

    # ---------------------------------------------------------------- running

    async def run(self, nursery: trio.Nursery) -> None:
        """Run until cancelled; links run in ``nursery`` (the relay's connections')."""
        self._nursery = nursery
        log.info("cluster node %s on %s (lease %g s)", self.node, redact_url(self.url), self.lease)
        try:
            client: coredis.Redis[bytes] = coredis.Redis.from_url(
                self.url,
                decode_responses=False,
                connect_timeout=min(1.0, self.heartbeat_interval),
                stream_timeout=max(1.0, self.heartbeat_interval * 2),
            )
        except Exception as exc:  # a URL coredis cannot use: alone, and say why
            self._set_down(f"cannot use {redact_url(self.url)}: {_describe(exc)}")
            log.error("cluster node %s: %s", self.node, self._down_reason)
            await trio.sleep_forever()
        while True:
            try:
                async with client:
                    self._store = Store(client, self.keys, self.lease)
                    async with trio.open_nursery() as tasks:
                        tasks.start_soon(self._subscriber, client)
                        tasks.start_soon(self._sender)
                        tasks.start_soon(self._registrar)
                        tasks.start_soon(self._poller)
                        await self._heartbeat()
            except REDIS_ERRORS as exc:
                self._set_down(_describe(exc))
                await trio.sleep(RETRY)
            except trio.Cancelled:
                raise
            except BaseException as exc:
                if trio.current_effective_deadline() == -math.inf:
                    # Being cancelled: coredis's teardown can raise on its closed streams.
                    await trio.lowlevel.checkpoint()  # raises Cancelled
                if not isinstance(exc, Exception):
                    raise
                redis, rest = (
                    exc.split(REDIS_ERRORS) if isinstance(exc, ExceptionGroup) else (None, exc)
                )
                if rest is None and redis is not None:  # Redis failed, in a task of ours
                    self._set_down(_describe(_leaf(redis)))
                else:
                    # A fault of the cluster layer never takes the relay down: local traffic
                    # goes on, and the node joins again.
                    log.exception("cluster node %s: failed; joining again", self.node)
                    self._set_down(f"internal error: {_describe(exc)}")
                await trio.sleep(RETRY)

    async def _heartbeat(self) -> None:
        store = self._store
        assert store is not None
        while True:
            records = list(self.local.values())
            try:
                with trio.fail_after(self.heartbeat_interval * 2):
                    results = await store.heartbeat(self.node_record(), records)
                    (listening,) = await store.publish([(self.node, b"")])
                    if self._reset_pending and listening:
                        await store.reset(self.node)
                        self._reset_pending = False
            except REDIS_ERRORS as exc:
                self._set_down(_describe(exc))
            else:
                if not listening:
                    # Redis is up but this node's subscription is not: nothing sent to it
                    # arrives. Subscribe again, and count as down until then.
                    self._set_down("this node is not subscribed to its channel")
                    if self._subscribed.is_set():
                        self._subscribed = trio.Event()
                        self._listening.cancel()
                for record, result in zip(records, results, strict=True):
                    if result == 0 and self.local.get(_key(record)) is record:
                        self._mark(record.agent, record.identity)  # lapsed: claim it again
                if not self._up and self._subscribed.is_set():
                    self._come_up()
            await trio.sleep(self.heartbeat_interval)

    def _come_up(self) -> None:
        self._up = True
        log.info("cluster node %s: connected to Redis; the bus is up", self.node)
        # Others may still be claiming theirs again: judge node leases after a while.
        self._settle_until = trio.current_time() + 2 * self.heartbeat_interval
        for agent, identity in self._ready_local_servers():
            self._mark(agent, identity)
        if self._was_up:  # back after a loss: frames sent to it meanwhile may be lost
            self._reset_pending = True
        self._was_up = True
        untold, self._untold = self._untold, set()
        for node, tunnel, agent, identity in sorted(untold):
            self._tell_closed(node, tunnel, agent, identity, "the cluster bus was lost")
        self._resync.set()

    def _set_down(self, reason: str) -> None:
        self._down_reason = (
            f"the cluster bus is unreachable (Redis at {redact_url(self.url)}: {reason})"
        )
        if not self._up:
            return
        self._up = False
        log.warning("cluster node %s: %s", self.node, self._down_reason)
        self._drop_tunnels(self._down_reason)

    def _drop_tunnels(self, why: str, tell: bool = False) -> None:
        """Answer every request in flight over the bus here, and end every tunnel from other
        nodes (their requests are cancelled at the tools). The other ends are told now
        (``tell``), or once the bus is up again."""
        for server in list(self.server_links.values()):
            server.fail_inflight(why)
        for link in list(self.caller_links.values()):
            if tell:
                self._tell_closed(link.node, link.tunnel, link.agent, link.identity, why)
            else:
                self._untold.add((link.node, link.tunnel, link.agent, link.identity))
            link.end(CLOSE_BUS_LOST, "cluster bus lost")

    def _tell_closed(self, node: str, tunnel: int, agent: str, identity: str, why: str) -> None:
        """The other end of a tunnel from ``node``: what it awaits will not come (it answers
        ``-32003``)."""
        message = BusMessage(CLOSE_FROM_SERVER, self.node, tunnel, agent, identity, why.encode())
        self._send_nowait(node, message)

    def lost(self, link: CallerLink) -> None:
        """``link`` could not send while the bus was down: end it, and tell its other end
        once the bus is up, so that nothing waits there for an answer that was dropped."""
        self._untold.add((link.node, link.tunnel, link.agent, link.identity))
        link.end(CLOSE_BUS_LOST, "cluster bus lost")

    async def _subscriber(self, client: coredis.Redis[bytes]) -> None:
        """Read this node's channels; started again whenever the heartbeat finds nobody
        listening on them (coredis re-subscribes by itself after a lost connection too)."""
        while True:
            with trio.CancelScope() as self._listening:
                await self._subscribe(client)

    async def _subscribe(self, client: coredis.Redis[bytes]) -> None:
        bus, events = self.keys.bus(self.node), self.keys.events
        subscriptions = 0
        # Re-subscribe soon after Redis returns (coredis's default backs off up to 16 s).
        retry = CompositeRetryPolicy(
            ExponentialBackoffRetryPolicy(
                (coredis.exceptions.ConnectionError,),
                retries=None,
                base_delay=0.1,
                max_delay=RETRY,
                jitter=False,
            ),
            ConstantRetryPolicy((TimeoutError,), retries=2, delay=0.1),
        )
        async with client.pubsub(channels=[bus, events], retry_policy=retry) as pubsub:
            async for message in pubsub:
                kind = message["type"]
                if kind == "subscribe":
                    if message["channel"] == bus:
                        subscriptions += 1
                        if subscriptions > 1:
                            # Re-subscribed after a lost connection: frames meanwhile are lost.
                            why = "the node's connection to Redis was lost; frames may be lost"
                            log.warning("cluster node %s: %s", self.node, why)
                            self._drop_tunnels(f"cross-node request failed: {why}", tell=True)
                            self._reset_pending = True
                            self._resync.set()
                        self._subscribed.set()
                    continue
                if kind != "message":
                    continue
                data = message["data"]
                assert isinstance(data, bytes)
                if not data:
                    continue  # the heartbeat's probe
                try:
                    if message["channel"] == events:
                        self._on_event(data)
                    else:
                        for one in decode_batch(data):
                            self._on_bus(one)
                except ValueError as exc:
                    log.debug("cluster node %s: ignored a message: %s", self.node, exc)

    async def _sender(self) -> None:
        """Publish what the links send, in order: what queued meanwhile goes as one
        message per node (one PUBLISH each, pipelined)."""
        store = self._store
        assert store is not None
        while True:
            batch = [] if self._urgent else [await self._out.receive()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._out.receive_nowait())
                except trio.WouldBlock:
                    break
            if self._urgent:
                batch += self._urgent
                self._urgent = []
            if not self._up:
                # Requests queued before the bus went down were answered -32002 then: they
                # must not run at their tool now.
                for _, _, failed in batch:
                    if failed is not None:
                        failed(self._down_reason)
                batch = [item for item in batch if item[2] is None]
                if not batch:
                    continue
            by_node: dict[str, list[Outgoing]] = {}
            for item in batch:
                by_node.setdefault(item[0], []).append(item)
            groups = list(by_node.items())
            payloads = [(to, encode_batch(m for _, m, _ in items)) for to, items in groups]
            try:
                with trio.fail_after(self.heartbeat_interval * 2):
                    reached = await store.publish(payloads)
            except REDIS_ERRORS as exc:
                self._set_down(_describe(exc))
                for _, _, failed in batch:
                    if failed is not None:
                        failed(self._down_reason)
                continue
            self.frames_sent += len(batch)
            for (to, items), count in zip(groups, reached, strict=True):
                if count == 0:
                    for _, _, failed in items:
                        if failed is not None:
                            failed(f"node {to} is not listening on the cluster bus")

    # ---------------------------------------------------------------- this node's servers

    def _watch(self, agent: str, identity: str) -> None:
        self._mark(agent, identity)

    def _mark(self, agent: str, identity: str) -> None:
        self._dirty.add((agent, identity))
        self._dirty_event.set()

    def _local_server(self, agent: str, identity: str) -> Any:
        session = self.router.session(agent)
        server = session.by_identity.get(identity) if session is not None else None
        if server is None or server.remote or not server.ready or self._embedded(server.conn):
            return None
        return server

    def _ready_local_servers(self) -> list[tuple[str, str]]:
        out = []
        for agent, rows in self.router.servers().items():
            for row in rows:
                identity = row["identity"]
                if identity is not None and self._local_server(agent, identity) is not None:
                    out.append((agent, identity))
        return out

    async def _registrar(self) -> None:
        store = self._store
        assert store is not None
        while True:
            await self._dirty_event.wait()
            self._dirty_event = trio.Event()
            if not self._up:
                continue  # all claimed again when the bus comes up
            dirty, self._dirty = self._dirty, set()
            for agent, identity in sorted(dirty):
                try:
                    await self._publish_server(store, agent, identity)
                except REDIS_ERRORS as exc:
                    self._dirty.add((agent, identity))
                    self._set_down(_describe(exc))

    async def _publish_server(self, store: Store, agent: str, identity: str) -> None:
        key = (agent, identity)
        server = self._local_server(agent, identity)
        old = self.local.get(key)
        if server is None or self.draining:
            session = self.router.session(agent)
            coming = session.by_identity.get(identity) if session is not None else None
            if coming is not None and not coming.remote and not self.draining:
                return  # reconnecting here: the claim stays until the new one is ready
            if old is not None:
                del self.local[key]
                self._versions.pop(key, None)
                await store.release(old)
            return
        session = self.router.session(agent)
        assert session is not None
        view = session.catalog.server(identity)
        if view is None:
            return
        revision = await store.next_version()
        if self._local_server(agent, identity) is not server:
            self._mark(agent, identity)  # it changed meanwhile: once more
            return
        # The version names the connection (drawn once for it: what decides which of two
        # connections of one identity is newer); the revision its latest lists.
        conn, version = self._versions.get(key, (None, 0))
        if conn != server.conn:
            version = revision
            self._versions[key] = (server.conn, version)
        record = ServerRecord.of(agent, view, server.server_id, self.node, version, revision)
        self.local[key] = record
        holder = await store.claim(record)
        if holder is not None:
            # A newer connection of this identity holds it elsewhere: ours is replaced.
            if self.local.get(key) is record:
                del self.local[key]
                self._versions.pop(key, None)
            self._close_local(agent, identity, holder)

    def _close_local(self, agent: str, identity: str, node: str) -> None:
        server = self._local_server(agent, identity)
        peer = self.dispatcher.peers.get(server.conn) if server is not None else None
        if peer is not None:
            reason = f"replaced by a newer connection of server {identity} on node {node}"
            self.dispatcher.close_peer(peer, CLOSE_REPLACED, reason[:120])

    async def leave(self) -> None:
        """Release this node's leases now (a graceful shutdown, once in-flight requests are
        done): the other nodes drop its servers without waiting for them to lapse."""
        self.draining = True
        store = self._store
        if store is None or not self._up:
            return
        try:
            for record in list(self.local.values()):
                await store.release(record)
            self.local.clear()
            await store.leave(self.node)
            log.info("cluster node %s: leases released", self.node)
        except REDIS_ERRORS as exc:
            log.warning("cluster node %s: leases not released: %s", self.node, _describe(exc))

    # ---------------------------------------------------------------- the directory

    def _on_event(self, data: bytes) -> None:
        kind, body = data[:1], data[1:]
        if kind == b"u":
            record = ServerRecord.decode(body)
            if record.node != self.node:
                self._react(self.directory.up(record))
        elif kind == b"r":
            node = body.decode(errors="replace")
            if node != self.node:
                self._node_reset(node)
        elif kind == b"d":
            agent, identity, node, version = orjson.loads(body)
            if node != self.node:
                self._react(self.directory.down(str(agent), str(identity), int(version)))

    def _node_reset(self, node: str) -> None:
        """``node`` may have lost frames sent to it: what this node awaits from it over the
        bus is answered here (``-32003``), and later frames open new tunnels."""
        for link in list(self.server_links.values()):
            if link.node == node:
                link.fail_inflight(
                    f"node {node} lost its connection to Redis; retry", CONNECTION_ERROR
                )
                # Whatever it still holds of the old tunnel, it lets go.
                old = BusMessage(
                    CLOSE_FROM_CALLERS, self.node, link.tunnel, link.agent, link.identity
                )
                self._send_nowait(node, old)
                del self.server_links[link.tunnel]
                link.tunnel = next(self._tunnels)
                link.settled = False
                self.server_links[link.tunnel] = link

    async def _poller(self) -> None:
        store = self._store
        assert store is not None
        last = -float("inf")
        while True:
            if not self._up:
                await trio.sleep(self.poll_interval)  # the heartbeat brings it up
                continue
            with trio.move_on_after(self.poll_interval):
                await self._resync.wait()
            try:
                with trio.fail_after(self.heartbeat_interval * 2):
                    since = self.directory.generation
                    nodes = await store.live_nodes()
                    now = trio.current_time()
                    if self._resync.is_set() or now - last >= self.resync_interval:
                        self._resync = trio.Event()
                        last = now
                        records = [r for r in await store.servers() if r.node != self.node]
                        if now >= self._settle_until:
                            self._react(self.directory.replace(records, since))
                        else:
                            self._react([c for r in records for c in self.directory.up(r)])
            except REDIS_ERRORS as exc:
                self._set_down(_describe(exc))
                continue
            nodes.pop(self.node, None)
            if trio.current_time() >= self._settle_until:
                self._react(self.directory.nodes_alive(nodes, since))
                for (node, _), link in list(self.caller_links.items()):
                    if node not in nodes:
                        link.end(CLOSE_NODE_GONE, f"node {node} left the cluster")
            else:
                self.directory.nodes.update(nodes)
            self._sweep()
            self._mend_links()

    def _mend_links(self) -> None:
        """Every agent with a caller here has a link to each of its servers elsewhere (one
        that ended for a reason of its own is made again)."""
        if self._nursery is None:
            return
        for agent in self.router.stats()["robot_connections_by_agent"]:
            for record in self.directory.of_agent(agent):
                key = (agent, record.identity)
                if key not in self.links_by_key and not self.router.has_server(*key):
                    self._nursery.start_soon(self._run_server_link, self._new_link(record))

    def _sweep(self) -> None:
        """Close the links of agents with no caller here for two polls in a row."""
        active = {agent for agent, _ in self.links_by_key}
        idle = {agent for agent in active if self.router.caller_count(agent) == 0}
        for agent in idle & self._idle_agents:
            for key, link in list(self.links_by_key.items()):
                if key[0] == agent:
                    self._close_link(link, 1000, "no caller of the agent on this node")
        self._idle_agents = idle

    def _react(self, changes: list[Change]) -> None:
        for change in changes:
            key = (change.agent, change.identity)
            record = change.now
            link = self.links_by_key.get(key)
            if record is None:
                if (
                    link is not None
                    and change.before is not None
                    and link.node == change.before.node
                ):
                    self._close_link(link, CLOSE_NODE_GONE, f"server left node {link.node}")
                continue
            mine = self.local.get(key)
            if mine is not None:
                if mine.version > record.version:
                    continue  # ours is newer: theirs is being replaced
                del self.local[key]
                self._versions.pop(key, None)
                self._close_local(change.agent, change.identity, record.node)
            if link is not None:
                if link.node == record.node:
                    link.update(record)
                    continue
                self._close_link(link, CLOSE_REPLACED, f"server moved to node {record.node}")
            if self.router.has_server(change.agent, change.identity):
                continue  # a connection of that identity here, still initializing: newer
            if self.router.caller_count(change.agent) and self._nursery is not None:
                self._nursery.start_soon(self._run_server_link, self._new_link(record))

    # ---------------------------------------------------------------- links

    async def before_caller(self, agent: str) -> None:
        """Let the agent's servers on other nodes join its session here (no network)."""
        if self._nursery is None:
            return
        self._idle_agents.discard(agent)  # the sweep must not take its links meanwhile
        for record in self.directory.of_agent(agent):
            key = (agent, record.identity)
            if key in self.links_by_key or self._local_server(agent, record.identity):
                continue
            if self.router.has_server(agent, record.identity):
                continue  # a local connection of that identity, still initializing
            await self._nursery.start(self._run_server_link, self._new_link(record))

    def _new_link(self, record: ServerRecord) -> ServerLink:
        link = ServerLink(self, record, next(self._tunnels))
        self.server_links[link.tunnel] = link
        self.links_by_key[_key(record)] = link
        return link

    def _forget(self, link: ServerLink) -> None:
        if self.server_links.get(link.tunnel) is link:
            del self.server_links[link.tunnel]
        key = (link.agent, link.identity)
        if self.links_by_key.get(key) is link:
            del self.links_by_key[key]

    async def _run_server_link(
        self, link: ServerLink, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        link.on_end = lambda: self._forget(link)
        try:
            await self.dispatcher.run_peer(
                link,
                Role.TOOL,
                link.agent,
                server_id=link.record.server_id,
                remote=f"cluster node {link.node}",
                remote_server=True,
                task_status=task_status,
            )
        except Exception:
            # One tunnel's failure ends that tunnel, never the relay.
            log.exception("cluster node %s: link to %s failed", self.node, link.identity)
        finally:
            self._forget(link)
            if not link.settled:  # it ended without telling: the other end lets go too
                link.settled = True
                message = BusMessage(
                    CLOSE_FROM_CALLERS, self.node, link.tunnel, link.agent, link.identity
                )
                self._send_nowait(link.node, message)

    def _close_link(self, link: ServerLink, code: int, reason: str) -> None:
        self._forget(link)
        for peer in self.dispatcher.peers.values():
            if peer.ws is link:
                self.dispatcher.close_peer(peer, code, reason)
                return
        link.end(code, reason)

    async def _run_caller_link(self, link: CallerLink) -> None:
        key = (link.node, link.tunnel)

        def forget() -> None:
            if self.caller_links.get(key) is link:
                del self.caller_links[key]

        link.on_end = forget
        try:
            await self.dispatcher.run_peer(
                link,
                Role.CALLER,
                link.agent,
                target=link.identity,
                remote=f"cluster node {link.node}",
            )
        except Exception:
            log.exception("cluster node %s: tunnel from %s failed", self.node, link.node)
        finally:
            forget()
            if not link.settled:  # it ended without telling: what the other end awaits
                link.settled = True  # will not come, and it must hear so
                tunnel = (link.node, link.tunnel, link.agent, link.identity)
                if self._up:
                    self._tell_closed(*tunnel, "the tunnel ended")
                else:
                    self._untold.add(tunnel)

    def _on_bus(self, message: BusMessage) -> None:
        self.frames_received += 1
        kind = message.kind
        if kind == TO_SERVER:
            key = (message.node, message.tunnel)
            caller: CallerLink | None = self.caller_links.get(key)
            if caller is not None and (caller.agent, caller.identity) != (
                message.agent,
                message.identity,
            ):
                caller.end(1000, "tunnel reused")  # never another agent's frames
                caller = None
            if caller is None:
                if self._nursery is None or not self._up:
                    # Its answers could not be sent: the other end hears so when we are up.
                    tunnel = (message.node, message.tunnel, message.agent, message.identity)
                    self._untold.add(tunnel)
                    return
                caller = CallerLink(
                    self, message.node, message.tunnel, message.agent, message.identity
                )
                self.caller_links[key] = caller
                self._nursery.start_soon(self._run_caller_link, caller)
            caller.deliver(message.frame)
        elif kind == TO_CALLERS:
            link = self.server_links.get(message.tunnel)
            if link is None or link.node != message.node or link.agent != message.agent:
                # A tunnel this node no longer has: the other end lets go of it.
                self._send_nowait(
                    message.node,
                    BusMessage(
                        CLOSE_FROM_CALLERS,
                        self.node,
                        message.tunnel,
                        message.agent,
                        message.identity,
                    ),
                )
                return
            link.deliver(message.frame)
        elif kind == CLOSE_FROM_CALLERS:
            gone = self.caller_links.pop((message.node, message.tunnel), None)
            if gone is not None:
                gone.settled = True
                gone.end(1000, f"node {message.node} closed the tunnel")
        elif kind == CLOSE_FROM_SERVER:
            link = self.server_links.get(message.tunnel)
            if link is not None and link.node == message.node:
                link.settled = False  # the next frame opens a new tunnel: not yet told
                why = message.frame.decode(errors="replace") or "closed"
                link.fail_inflight(
                    f"node {message.node} closed the tunnel: {why}", CONNECTION_ERROR
                )
                # Later frames open a new tunnel there.
                del self.server_links[link.tunnel]
                link.tunnel = next(self._tunnels)
                self.server_links[link.tunnel] = link


def _key(record: ServerRecord) -> tuple[str, str]:
    return (record.agent, record.identity)


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "Redis did not answer in time"
    return str(exc) or type(exc).__name__
