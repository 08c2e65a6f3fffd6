"""The tunnels of one node: its links to servers elsewhere and from callers elsewhere.

A :class:`~.links.ServerLink` joins an agent's session here for each of its servers on
another node, while the agent has a caller here (:meth:`Tunnels.before_caller` makes them
before a caller is registered; :meth:`Tunnels.mend` makes again one that ended; the sweep
closes them once the agent's last caller here has gone). A :class:`~.links.CallerLink` is
made for the first frame of each tunnel another node opens to a server here. Whichever end
goes, the other is told (a close message over the bus, at once or once the bus is up
again), so that nothing waits on either side for an answer that will not come: the routing
core answers what was in flight ``-32003``.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from ..._frames import CONNECTION_ERROR
from ..._routing import Role, Router
from ..dispatch import Dispatcher
from .links import CallerLink, ServerLink
from .records import (
    CLOSE_FROM_CALLERS,
    CLOSE_FROM_SERVER,
    TO_CALLERS,
    TO_SERVER,
    BusMessage,
    Directory,
    ServerRecord,
)

if TYPE_CHECKING:
    from .node import ClusterNode

__all__ = ["Tunnels"]

log = logging.getLogger("trio_mcp_relay.cluster")

CLOSE_NODE_GONE: Final = 1001
CLOSE_BUS_LOST: Final = 1011
#: Ended tunnels remembered per node (a late frame of an older one would open it again).
ENDED_KEPT: Final = 4096


class Tunnels:
    """The links of one node, and the frames of the bus for them.

    Args:
        cluster: the node (its id, its bus, its claims).
        dispatcher: runs each link as a connection.
        directory: the node's view of the cluster.
    """

    def __init__(self, cluster: ClusterNode, dispatcher: Dispatcher, directory: Directory) -> None:
        self.cluster = cluster
        self.node = cluster.node
        self.dispatcher = dispatcher
        self.router: Router = dispatcher.router
        self.directory = directory
        self.server_links: dict[int, ServerLink] = {}  # by tunnel
        self.links_by_key: dict[tuple[str, str], ServerLink] = {}
        self.caller_links: dict[tuple[str, int], CallerLink] = {}  # by (node, tunnel)
        self._tunnels = itertools.count(1)
        self._idle_agents: set[str] = set()
        self.frames_received = 0
        #: Per node, the tunnels from it that ended here (never opened again by a late
        #: frame); the most recent ENDED_KEPT of each.
        self._ended: dict[str, dict[tuple[str, int], None]] = {}
        #: Where links run (the relay's connections nursery), once the node runs.
        self.nursery: trio.Nursery | None = None

    def _ended_tunnel(self, node: str, tunnel: int) -> None:
        ended = self._ended.setdefault(node, {})
        ended[(node, tunnel)] = None
        if len(ended) > ENDED_KEPT:
            del ended[next(iter(ended))]

    def end_from(self, alive: set[str] | dict[str, Any]) -> None:
        """End the tunnels from nodes that left the cluster."""
        for (node, _), link in list(self.caller_links.items()):
            if node not in alive:
                link.end(CLOSE_NODE_GONE, f"node {node} left the cluster")
        for node in [n for n in self._ended if n not in alive]:
            del self._ended[node]

    def drop(self, why: str) -> None:
        """Answer every request in flight over the bus here, and end every tunnel from other
        nodes (their requests are cancelled at the tools; each tells its other end as it
        ends, see :meth:`run_caller_link`)."""
        for server in list(self.server_links.values()):
            server.fail_inflight(why)
        for link in list(self.caller_links.values()):
            link.end(CLOSE_BUS_LOST, "cluster bus lost")

    def tell_closed(self, node: str, tunnel: int, agent: str, identity: str, why: str) -> None:
        """The other end of a tunnel from ``node``: what it awaits will not come (it answers
        ``-32003``). Sent now, or when the bus is up again (the sender keeps the closes it
        could not publish)."""
        message = BusMessage(CLOSE_FROM_SERVER, self.node, tunnel, agent, identity, why.encode())
        self.cluster.send_nowait(node, message)

    def lost(self, link: CallerLink) -> None:
        """``link`` could not send while the bus was down: end it (its other end is told as
        it ends), so that nothing waits there for an answer that was dropped."""
        link.end(CLOSE_BUS_LOST, "cluster bus lost")

    def node_reset(self, node: str) -> None:
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
                self.cluster.send_nowait(node, old)
                del self.server_links[link.tunnel]
                link.tunnel = next(self._tunnels)
                link.settled = False
                self.server_links[link.tunnel] = link

    def mend(self) -> None:
        """Every agent with a caller here has a link to each of its servers elsewhere (one
        that ended for a reason of its own is made again)."""
        if self.nursery is None:
            return
        for agent in self.router.stats()["robot_connections_by_agent"]:
            for record in self.directory.of_agent(agent):
                key = (agent, record.identity)
                if key not in self.links_by_key and not self.router.has_server(*key):
                    self.nursery.start_soon(self.run_server_link, self.new_link(record))

    def sweep(self) -> None:
        """Close the links of agents with no caller here for two polls in a row."""
        active = {agent for agent, _ in self.links_by_key}
        idle = {agent for agent in active if self.router.caller_count(agent) == 0}
        for agent in idle & self._idle_agents:
            for key, link in list(self.links_by_key.items()):
                if key[0] == agent:
                    self.close_link(link, 1000, "no caller of the agent on this node")
        self._idle_agents = idle

    async def before_caller(self, agent: str) -> None:
        """Let the agent's servers on other nodes join its session here (no network)."""
        if self.nursery is None:
            return
        self._idle_agents.discard(agent)  # the sweep must not take its links meanwhile
        for record in self.directory.of_agent(agent):
            key = (agent, record.identity)
            if key in self.links_by_key or self.cluster.claims.local_server(agent, record.identity):
                continue
            if self.router.has_server(agent, record.identity):
                continue  # a local connection of that identity, still initializing
            await self.nursery.start(self.run_server_link, self.new_link(record))

    def new_link(self, record: ServerRecord) -> ServerLink:
        link = ServerLink(self.cluster, record, next(self._tunnels))
        self.server_links[link.tunnel] = link
        self.links_by_key[_key(record)] = link
        return link

    def forget(self, link: ServerLink) -> None:
        if self.server_links.get(link.tunnel) is link:
            del self.server_links[link.tunnel]
        key = (link.agent, link.identity)
        if self.links_by_key.get(key) is link:
            del self.links_by_key[key]

    async def run_server_link(
        self, link: ServerLink, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        link.on_end = lambda: self.forget(link)
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
            self.forget(link)
            if not link.settled:  # it ended without telling: the other end lets go too
                link.settled = True
                message = BusMessage(
                    CLOSE_FROM_CALLERS, self.node, link.tunnel, link.agent, link.identity
                )
                self.cluster.send_nowait(link.node, message)

    def close_link(self, link: ServerLink, code: int, reason: str) -> None:
        self.forget(link)
        for peer in self.dispatcher.peers.values():
            if peer.ws is link:
                self.dispatcher.close_peer(peer, code, reason)
                return
        link.end(code, reason)

    async def run_caller_link(self, link: CallerLink) -> None:
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
            self._ended_tunnel(link.node, link.tunnel)
            if not link.settled:  # it ended without telling: what the other end awaits
                link.settled = True  # will not come, and it must hear so
                self.tell_closed(link.node, link.tunnel, link.agent, link.identity, "ended")

    def on_bus(self, message: BusMessage) -> None:
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
            if caller is None and key in self._ended.get(message.node, ()):
                # A frame sent before the other end heard this tunnel had ended: it must
                # not open it again (its request was answered there already).
                self.tell_closed(*key, message.agent, message.identity, "the tunnel ended")
                return
            if caller is None:
                if self.nursery is None or not self.cluster.up:
                    # Its answers could not be sent: the other end hears so.
                    self.tell_closed(*key, message.agent, message.identity, "bus down")
                    return
                caller = CallerLink(
                    self.cluster, message.node, message.tunnel, message.agent, message.identity
                )
                self.caller_links[key] = caller
                self.nursery.start_soon(self.run_caller_link, caller)
            caller.deliver(message.frame)
        elif kind == TO_CALLERS:
            link = self.server_links.get(message.tunnel)
            if link is None or link.node != message.node or link.agent != message.agent:
                # A tunnel this node no longer has: the other end lets go of it.
                self.cluster.send_nowait(
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
            self._ended_tunnel(message.node, message.tunnel)
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
