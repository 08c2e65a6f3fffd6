"""This node's claims: the servers connected here, published in Redis as leases.

A server that becomes ready here (the routing core's watcher says which server changed) is
claimed: its record goes to Redis under a version drawn for its connection, with a revision
for each time it lists again. A claim refused because a newer connection of that identity
holds it elsewhere closes ours (``4001``), as one node does. A server that leaves releases
its claim, except while a new connection of that identity is initializing here. Embedded
tools are never claimed: every node runs its own.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from ..._routing import CLOSE_REPLACED, Router
from ..dispatch import Dispatcher
from .records import ServerRecord
from .store import REDIS_ERRORS, Store, describe

if TYPE_CHECKING:
    from .node import ClusterNode


__all__ = ["Claims"]

log = logging.getLogger("trio_mcp_relay.cluster")


class Claims:
    """The servers of this node claimed in Redis.

    Args:
        cluster: the node (its id, its bus state, its store).
        dispatcher: to close a server another node's claim replaced.
        embedded: whether a tool connection is an embedded tool.
    """

    def __init__(self, cluster: ClusterNode, dispatcher: Dispatcher, embedded: Any) -> None:
        self.cluster = cluster
        self.dispatcher = dispatcher
        self.router: Router = dispatcher.router
        self._embedded = embedded
        #: Claims held, by (agent, identity).
        self.local: dict[tuple[str, str], ServerRecord] = {}
        #: The connection each claim is for, and its version.
        self.versions: dict[tuple[str, str], tuple[int, int]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_event = trio.Event()
        #: A graceful shutdown: servers are released, none claimed any more.
        self.draining = False

    def watch(self, agent: str, identity: str) -> None:
        """The routing core's watcher: a server changed. A connection seen ready for the
        first time gets its version now, from this machine's clock, so that of two
        connections of one identity the one that came later wins even when its claim
        reaches Redis first (this node's bus was down, say)."""
        server = self.local_server(agent, identity)
        key = (agent, identity)
        if server is not None and self.versions.get(key, (None, 0))[0] != server.conn:
            self.versions[key] = (server.conn, time.time_ns() // 1000)
        self.mark(agent, identity)

    def mark(self, agent: str, identity: str) -> None:
        self._dirty.add((agent, identity))
        self._dirty_event.set()

    def local_server(self, agent: str, identity: str) -> Any:
        session = self.router.session(agent)
        server = session.by_identity.get(identity) if session is not None else None
        if server is None or server.remote or not server.ready or self._embedded(server.conn):
            return None
        return server

    def ready(self) -> list[tuple[str, str]]:
        out = []
        for agent, rows in self.router.servers().items():
            for row in rows:
                identity = row["identity"]
                if identity is not None and self.local_server(agent, identity) is not None:
                    out.append((agent, identity))
        return out

    async def run(self) -> None:
        store = self.cluster._store
        assert store is not None
        while True:
            await self._dirty_event.wait()
            self._dirty_event = trio.Event()
            if not self.cluster.up:
                continue  # all claimed again when the bus comes up
            dirty, self._dirty = self._dirty, set()
            for agent, identity in sorted(dirty):
                try:
                    await self._publish(store, agent, identity)
                except REDIS_ERRORS as exc:
                    self._dirty.add((agent, identity))
                    self.cluster._set_down(describe(exc))

    async def _publish(self, store: Store, agent: str, identity: str) -> None:
        key = (agent, identity)
        server = self.local_server(agent, identity)
        old = self.local.get(key)
        if server is None or self.draining:
            session = self.router.session(agent)
            coming = session.by_identity.get(identity) if session is not None else None
            if coming is not None and not coming.remote and not self.draining:
                return  # reconnecting here: the claim stays until the new one is ready
            if old is not None:
                del self.local[key]
                self.versions.pop(key, None)
                await store.release(old)
            return
        session = self.router.session(agent)
        assert session is not None
        view = session.catalog.server(identity)
        if view is None:
            return
        revision = await store.next_version()
        if self.local_server(agent, identity) is not server:
            self.mark(agent, identity)  # it changed meanwhile: once more
            return
        # The version names the connection (given once, when it was first ready: what
        # decides which of two connections of one identity is newer); the revision (Redis's
        # clock) its latest lists.
        conn, version = self.versions.get(key, (None, 0))
        if conn != server.conn:
            version = time.time_ns() // 1000
            self.versions[key] = (server.conn, version)
        record = ServerRecord.of(
            agent, view, server.server_id, self.cluster.node, version, revision
        )
        self.local[key] = record
        holder = await store.claim(record)
        if holder is not None:
            # A newer connection of this identity holds it elsewhere: ours is replaced.
            if self.local.get(key) is record:
                del self.local[key]
                self.versions.pop(key, None)
            self.close_local(agent, identity, holder)

    def close_local(self, agent: str, identity: str, node: str) -> None:
        server = self.local_server(agent, identity)
        peer = self.dispatcher.peers.get(server.conn) if server is not None else None
        if peer is not None:
            reason = f"replaced by a newer connection of server {identity} on node {node}"
            self.dispatcher.close_peer(peer, CLOSE_REPLACED, reason[:120])

    async def leave(self) -> None:
        """Release this node's leases now (a graceful shutdown, once in-flight requests are
        done): the other nodes drop its servers without waiting for them to lapse."""
        self.draining = True
        store = self.cluster._store
        if store is None or not self.cluster.up:
            return
        try:
            for record in list(self.local.values()):
                await store.release(record)
            self.local.clear()
            await store.leave(self.cluster.node)
            log.info("cluster node %s: leases released", self.cluster.node)
        except REDIS_ERRORS as exc:
            log.warning(
                "cluster node %s: leases not released: %s", self.cluster.node, describe(exc)
            )
