"""One node of a cluster: its leases, its view of the cluster, the bus, and its links.

Theory of operation
-------------------
Each node runs the routing core for the connections it accepted, exactly as alone. What
makes several nodes one endpoint:

* **Node ids.** A node is its name (``--cluster-node``) and a suffix of its process: a node
  restarted under one name is another node, so nothing meant for the old process reaches
  the new one.
* **Leases** (:mod:`.claims`). A server that becomes ready on a node is *claimed* in Redis:
  a key holding its record (identity, ``initialize`` result, every list), with a version
  drawn for its connection and a revision for each listing. A heartbeat every
  ``min(1, lease/3)`` s renews it with the node's own lease; a node that dies stops
  renewing, and its keys lapse after ``--cluster-lease`` seconds. A newer claim of the same
  identity (a tool that reconnected elsewhere) replaces the older, which its node closes
  ``4001``, as one node does for two connections of one identity.
* **The directory.** Every node mirrors every record: from the ``events`` channel as they
  change, and from a full read every ``max(2, lease/2)`` s that catches what an event
  missed. A node polls the node leases every ``min(0.5, lease/4)`` s; the servers of a node
  whose lease lapsed leave its directory at once.
* **Links** (:mod:`.tunnels`). When a caller of an agent arrives, the agent's servers on
  other nodes join its session here first, each as a :class:`~.links.ServerLink`
  (answered ``initialize`` and lists from its record: no frame leaves the node for
  ``tools/list``). Frames for a server
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
  directory, tells the ends of the tunnels it dropped, and tells every node that frames
  sent to it meanwhile may be lost (they answer what they await from it ``-32003``); the
  bus is up: nothing to restart. A re-subscription (a short loss of its connection) does
  the same.
* **Drain.** After a graceful shutdown's in-flight requests are done, the node releases its
  leases at once (no wait for expiry) before closing its connections.
"""

from __future__ import annotations

import logging
import math
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
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
from ..._routing import CLOSE_REPLACED, Router
from ...core.registry import reference_counts
from ..dispatch import Dispatcher
from .claims import Claims
from .links import CallerLink
from .records import (
    CLOSE_FROM_CALLERS,
    CLOSE_FROM_SERVER,
    BusMessage,
    Change,
    Directory,
    Keys,
    NodeRecord,
    ServerRecord,
    decode_batch,
    encode_batch,
)
from .store import REDIS_ERRORS, Store, describe
from .tunnels import Tunnels

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


@attrs.define(slots=True)
class Outgoing:
    """A message for another node, waiting to be published."""

    to: str
    message: BusMessage
    #: Told why, when it could not be delivered (a request is then answered here).
    failed: Callable[[str], None] | None = None
    #: Asked just before publishing: False drops it (its tunnel was renumbered, or its
    #: request answered meanwhile: it must not run at the tool any more).
    wanted: Callable[[], bool] | None = None
    #: Took one of the queue's places (a link's frame; control messages take none).
    counted: bool = False


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
        #: Close messages that could not be published: sent when the bus is up again.
        self._unsent: list[tuple[str, BusMessage]] = []
        #: Tell the others that frames sent to this node may have been lost (it re-subscribed
        #: or came back): they answer what they await from it.
        self._reset_pending = False
        self._was_up = False
        self._up = False
        self._down_reason = "not connected to Redis yet"
        # One queue in order; links' frames wait for room (at most OUTGOING_SIZE), control
        # messages never wait and are never dropped.
        self._out_send, self._out = trio.open_memory_channel[Outgoing](math.inf)
        self._room = trio.Semaphore(OUTGOING_SIZE)
        self._store: Store | None = None
        self._nursery: trio.Nursery | None = None
        self._subscribed = trio.Event()
        self._listening = trio.CancelScope()
        self._resync = trio.Event()
        self._settle_until = 0.0
        self.frames_sent = 0
        #: The servers of this node, claimed in Redis.
        self.claims = Claims(self, dispatcher, embedded)
        router = self.router
        router.watch = self.claims.watch
        router.elsewhere = lambda agent: self.directory.tool_requests_elsewhere(agent, self.node)
        #: The links to servers elsewhere and from callers elsewhere.
        self.tunnels = Tunnels(self, dispatcher, self.directory)
        dispatcher.before_caller = self.tunnels.before_caller

    # ---------------------------------------------------------------- the Bus of the links

    @property
    def up(self) -> bool:
        return self._up

    @property
    def down_reason(self) -> str:
        return self._down_reason

    async def send(
        self,
        to: str,
        message: BusMessage,
        failed: Callable[[str], None] | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> None:
        await self._room.acquire()
        self._out_send.send_nowait(Outgoing(to, message, failed, wanted, counted=True))

    def lost(self, link: CallerLink) -> None:
        self.tunnels.lost(link)

    def send_nowait(self, to: str, message: BusMessage) -> None:
        """A control message (a tunnel's close): queued in order, never waits."""
        self._out_send.send_nowait(Outgoing(to, message))

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
            self.claims.draining,
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
                "to_servers": len(self.tunnels.server_links),
                "from_callers": len(self.tunnels.caller_links),
            },
        }

    def metrics(self) -> dict[str, int]:
        """What ``/metrics`` shows of cluster mode."""
        return {
            "bus_up": int(self._up),
            "nodes": len(set(self.directory.nodes) | {self.node}),
            "servers_elsewhere": len(self.directory.records),
            "to_servers": len(self.tunnels.server_links),
            "from_callers": len(self.tunnels.caller_links),
            "frames_sent": self.frames_sent,
            "frames_received": self.tunnels.frames_received,
        }

    def totals(self) -> dict[str, Any]:
        """The reference's health counts over the whole cluster."""
        nodes = dict(self.directory.nodes)
        nodes[self.node] = self.node_record()
        by_agent: dict[str, int] = {}
        for n in nodes.values():
            for agent, count in n.callers.items():
                by_agent[agent] = by_agent.get(agent, 0) + count
        return reference_counts(sum(n.tools for n in nodes.values()), by_agent)

    # ---------------------------------------------------------------- running

    async def run(self, nursery: trio.Nursery) -> None:
        """Run until cancelled; links run in ``nursery`` (the relay's connections')."""
        self._nursery = nursery
        self.tunnels.nursery = nursery
        log.info("cluster node %s on %s (lease %g s)", self.node, redact_url(self.url), self.lease)
        try:
            client: coredis.Redis[bytes] = coredis.Redis.from_url(
                self.url,
                decode_responses=False,
                connect_timeout=min(1.0, self.heartbeat_interval),
                stream_timeout=max(1.0, self.heartbeat_interval * 2),
            )
        except Exception as exc:  # a URL coredis cannot use: alone, and say why
            self._set_down(f"cannot use {redact_url(self.url)}: {describe(exc)}")
            log.error("cluster node %s: %s", self.node, self._down_reason)
            await trio.sleep_forever()
        while True:
            try:
                async with client:
                    self._store = Store(client, self.keys, self.lease)
                    async with trio.open_nursery() as tasks:
                        tasks.start_soon(self._subscriber, client)
                        tasks.start_soon(self._sender)
                        tasks.start_soon(self.claims.run)
                        tasks.start_soon(self._poller)
                        await self._heartbeat()
            except REDIS_ERRORS as exc:
                self._set_down(describe(exc))
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
                    self._set_down(describe(_leaf(redis)))
                else:
                    # A fault of the cluster layer never takes the relay down: local traffic
                    # goes on, and the node joins again.
                    log.exception("cluster node %s: failed; joining again", self.node)
                    self._set_down(f"internal error: {describe(exc)}")
                await trio.sleep(RETRY)

    async def _heartbeat(self) -> None:
        store = self._store
        assert store is not None
        while True:
            records = list(self.claims.local.values())
            try:
                with trio.fail_after(self.heartbeat_interval * 2):
                    results = await store.heartbeat(self.node_record(), records)
                    (listening,) = await store.publish([(self.node, b"")])
                    if listening and not self._up and self._subscribed.is_set():
                        self._come_up()
                    if listening and self._reset_pending:  # at once: others send to us now
                        await store.reset(self.node)
                        self._reset_pending = False
            except REDIS_ERRORS as exc:
                self._set_down(describe(exc))
            else:
                if not listening:
                    # Redis is up but this node's subscription is not: nothing sent to it
                    # arrives. Subscribe again, and count as down until then.
                    self._set_down("this node is not subscribed to its channel")
                    if self._subscribed.is_set():
                        self._subscribed = trio.Event()
                        self._listening.cancel()
                for record, result in zip(records, results, strict=True):
                    if result == 0 and self.claims.local.get(_key(record)) is record:
                        self.claims.mark(record.agent, record.identity)  # lapsed: claim it again
            await trio.sleep(self.heartbeat_interval)

    def _come_up(self) -> None:
        self._up = True
        log.info("cluster node %s: connected to Redis; the bus is up", self.node)
        # Others may still be claiming theirs again: judge node leases after a while.
        self._settle_until = trio.current_time() + 2 * self.heartbeat_interval
        # Everything claimed or to claim: those that left meanwhile are released now.
        for agent, identity in {*self.claims.ready(), *self.claims.local}:
            self.claims.mark(agent, identity)
        if self._was_up:  # back after a loss: frames sent to it meanwhile may be lost
            self._reset_pending = True
        self._was_up = True
        unsent, self._unsent = self._unsent, []
        for to, message in unsent:
            self.send_nowait(to, message)
        self._resync.set()

    def _set_down(self, reason: str) -> None:
        self._down_reason = (
            f"the cluster bus is unreachable (Redis at {redact_url(self.url)}: {reason})"
        )
        if not self._up:
            return
        self._up = False
        log.warning("cluster node %s: %s", self.node, self._down_reason)
        self.tunnels.drop(self._down_reason)

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
                            self.tunnels.drop(f"cross-node request failed: {why}")
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
                            self.tunnels.on_bus(one)
                except (ValueError, TypeError, KeyError) as exc:
                    log.debug("cluster node %s: ignored a message: %s", self.node, exc)

    async def _sender(self) -> None:
        """Publish what the links send, in order: what queued meanwhile goes as one
        message per node (one PUBLISH each, pipelined)."""
        store = self._store
        assert store is not None
        while True:
            batch = [await self._out.receive()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._out.receive_nowait())
                except trio.WouldBlock:
                    break
            for item in batch:
                if item.counted:
                    self._room.release()
            batch = [item for item in batch if item.wanted is None or item.wanted()]
            if not self._up:
                # Requests queued before the bus went down were answered -32002 then: they
                # must not run at their tool now; closes wait for the bus.
                self._undelivered(batch, self._down_reason)
                continue
            if not batch:
                continue
            by_node: dict[str, list[Outgoing]] = {}
            for item in batch:
                by_node.setdefault(item.to, []).append(item)
            groups = list(by_node.items())
            payloads = [(to, encode_batch(i.message for i in items)) for to, items in groups]
            try:
                with trio.fail_after(self.heartbeat_interval * 2):
                    reached = await store.publish(payloads)
            except REDIS_ERRORS as exc:
                self._set_down(describe(exc))
                self._undelivered(batch, self._down_reason)
                continue
            self.frames_sent += len(batch)
            for (to, items), count in zip(groups, reached, strict=True):
                if count == 0:
                    for item in items:
                        if item.failed is not None:
                            item.failed(f"node {to} is not listening on the cluster bus")

    def _undelivered(self, items: list[Outgoing], why: str) -> None:
        """These could not be published: requests are answered, closes kept for later."""
        for item in items:
            if item.failed is not None:
                item.failed(why)
            elif item.message.kind in (CLOSE_FROM_CALLERS, CLOSE_FROM_SERVER):
                self._unsent.append((item.to, item.message))

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
                self.tunnels.node_reset(node)
        elif kind == b"d":
            agent, identity, node, version = orjson.loads(body)
            if node != self.node:
                self._react(self.directory.down(str(agent), str(identity), int(version)))

    async def leave(self) -> None:
        """Release this node's leases now (see :meth:`.claims.Claims.leave`)."""
        await self.claims.leave()

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
                        records = [
                            r
                            for r in await store.servers()
                            if r.node != self.node and r.node in nodes  # a dead node's last
                        ]
                        if now >= self._settle_until:
                            self._react(self.directory.replace(records, since))
                        else:
                            self._react([c for r in records for c in self.directory.up(r)])
            except REDIS_ERRORS as exc:
                self._set_down(describe(exc))
                continue
            nodes.pop(self.node, None)
            if trio.current_time() >= self._settle_until:
                self._react(self.directory.nodes_alive(nodes, since))
                self.tunnels.end_from(nodes)
            else:
                self.directory.nodes.update(nodes)
            self.tunnels.sweep()
            self.tunnels.mend()

    def _react(self, changes: list[Change]) -> None:
        for change in changes:
            key = (change.agent, change.identity)
            record = change.now
            link = self.tunnels.links_by_key.get(key)
            if record is None:
                if (
                    link is not None
                    and change.before is not None
                    and link.node == change.before.node
                ):
                    self.tunnels.close_link(link, CLOSE_NODE_GONE, f"server left node {link.node}")
                continue
            mine = self.claims.local.get(key)
            if mine is not None:
                if mine.version > record.version:
                    continue  # ours is newer: theirs is being replaced
                if mine.version == record.version and self.node > record.node:
                    self.claims.mark(change.agent, change.identity)  # a tie: ours, again
                    continue
                del self.claims.local[key]
                self.claims.versions.pop(key, None)
                self.claims.close_local(change.agent, change.identity, record.node)
            if link is not None:
                if link.node == record.node:
                    link.update(record)
                    continue
                self.tunnels.close_link(link, CLOSE_REPLACED, f"server moved to node {record.node}")
            if self.router.has_server(change.agent, change.identity):
                continue  # a connection of that identity here, still initializing: newer
            nursery = self.tunnels.nursery
            if self.router.caller_count(change.agent) and nursery is not None:
                nursery.start_soon(self.tunnels.run_server_link, self.tunnels.new_link(record))

    # ---------------------------------------------------------------- links


def _key(record: ServerRecord) -> tuple[str, str]:
    return (record.agent, record.identity)


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
