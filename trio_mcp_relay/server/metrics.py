"""``/metrics``: the relay's state and counters in the Prometheus text format.

Nothing is measured on the hot path with ``prometheus_client``: the routing core counts
outcomes in its :class:`~trio_mcp_relay.core.tally.Tally`, the shell counts traffic and
closes in :class:`~.counts.ShellCounts`, and :class:`RelayCollector` turns those, and the
router's and dispatcher's state (connections, servers, catalogs, queues), into metric
families when ``/metrics`` is scraped. The gauges are therefore exact at the moment of the
scrape, and a scrape costs time proportional to the agents and connections.

Each relay has its own :class:`~prometheus_client.CollectorRegistry` (never the global
one), so several relays in one process, and tests, do not mix.

Per-agent labels: the agents named in ``metrics_agents``, and the ``metrics_top_agents``
with the most connections at the scrape; every other agent is summed into ``other``
(see :mod:`trio_mcp_relay.core.tally` for how the counters stay monotonic meanwhile).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__
from .._auth import key_matches
from .._http import HttpRequest, respond
from .._routing import Role, Router
from ..core.tally import LATENCY_BUCKETS, OTHER
from .counts import CALLER, TOOL
from .dispatch import Dispatcher
from .routes import HttpRoutes, credential

__all__ = ["CONTENT_TYPE", "PATHS", "PREFIX", "MetricsRoute", "RelayCollector", "relay_registry"]

#: Where the metrics are served (the second for proxies that pass only /mcp_endpoint/).
PATHS: Final = ("/metrics", "/mcp_endpoint/metrics")

#: Every metric's name starts with it.
PREFIX: Final = "trio_mcp_relay_"
#: The Prometheus text format's media type.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: What each close code the relay sends means (the ``why`` label).
CLOSE_REASONS: Final = {
    1001: "shutdown",
    1008: "auth_refused",
    1011: "ping_timeout",
    1013: "slow_caller",
    4001: "replaced",
    4002: "too_many_callers",
    4003: "init_failed",
}
_ROLES: Final = ((TOOL, "tool"), (CALLER, "caller"))
_LE: Final = [*(f"{b:g}" for b in LATENCY_BUCKETS), "+Inf"]


class RelayCollector(Collector):
    """Collects one relay's metrics at scrape time.

    Args:
        router: the routing core (connections, catalogs, the tally).
        dispatcher: the peers (queues) and the shell's counters.
        uptime: seconds since the relay started.
        http_sessions: open HTTP sessions by transport (``streamable``, ``sse``), if any.
        cluster: this node's cluster figures (see ``ClusterNode.metrics``), None when alone.
    """

    def __init__(
        self,
        router: Router,
        dispatcher: Dispatcher,
        uptime: Callable[[], float],
        http_sessions: Callable[[], dict[str, int]] | None = None,
        cluster: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        self.router = router
        self.dispatcher = dispatcher
        self.uptime = uptime
        self.http_sessions = http_sessions
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        router, tally = self.router, self.router.tally
        counts = self.dispatcher.counts

        info = GaugeMetricFamily(PREFIX + "info", "The relay's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            PREFIX + "uptime_seconds", "Seconds since the relay started.", value=self.uptime()
        )

        # Connections, per agent: labelled agents on their own, the rest as "other".
        stats = router.stats()
        servers = router.servers()
        callers_by_agent: dict[str, int] = stats["robot_connections_by_agent"]
        agents = set(callers_by_agent) | set(servers)
        size = {a: callers_by_agent.get(a, 0) + len(servers.get(a, ())) for a in agents}
        top = heapq.nlargest(tally.slots, agents - tally.named, key=lambda a: (size[a], a))
        tally.relabel(top)
        labelled = tally.named | tally.dynamic

        def label(agent: str) -> str:
            return agent if agent in labelled else OTHER

        connections = GaugeMetricFamily(
            PREFIX + "connections",
            "Open connections, by role (callers include HTTP sessions).",
            labels=["role"],
        )
        connections.add_metric(["tool"], stats["tool_connections"])
        connections.add_metric(["caller"], stats["robot_connections"])
        yield connections
        if self.http_sessions is not None:
            sessions = GaugeMetricFamily(
                PREFIX + "http_sessions",
                "Open MCP HTTP sessions (callers), by transport.",
                labels=["transport"],
            )
            for transport, open_sessions in sorted(self.http_sessions().items()):
                sessions.add_metric([transport], open_sessions)
            yield sessions
        view = self.cluster() if self.cluster is not None else None
        if view is not None:
            yield from _cluster_metrics(view)
        yield GaugeMetricFamily(
            PREFIX + "agents", "Agents with at least one connection.", value=len(agents)
        )
        by_agent = GaugeMetricFamily(
            PREFIX + "agent_connections",
            "Open connections per agent and role (agents not labelled: other).",
            labels=["agent", "role"],
        )
        agent_servers = GaugeMetricFamily(
            PREFIX + "agent_servers",
            "Tool servers connected per agent (ready or initializing).",
            labels=["agent", "ready"],
        )
        agent_tools = GaugeMetricFamily(
            PREFIX + "agent_tools", "Tools in each agent's merged catalog.", labels=["agent"]
        )
        rows: dict[str, list[int]] = {}  # label -> callers, tools conns, ready, not ready, tools
        for agent in agents:
            row = rows.setdefault(label(agent), [0, 0, 0, 0, 0])
            row[0] += callers_by_agent.get(agent, 0)
            for server in servers.get(agent, ()):
                row[1] += 1
                row[2 if server["ready"] else 3] += 1
                row[4] += server["tools"]
        for name in sorted(rows):
            callers, tools, ready, unready, tool_count = rows[name]
            by_agent.add_metric([name, "caller"], callers)
            by_agent.add_metric([name, "tool"], tools)
            agent_servers.add_metric([name, "true"], ready)
            agent_servers.add_metric([name, "false"], unready)
            agent_tools.add_metric([name], tool_count)
        yield by_agent
        yield agent_servers
        yield agent_tools

        # Requests, as the routing core counted them.
        yield GaugeMetricFamily(
            PREFIX + "requests_in_flight",
            "Requests in flight in either direction (caller to tool, tool to caller, parked).",
            value=router.pending_count(),
        )
        requests = CounterMetricFamily(
            PREFIX + "requests",
            "Caller requests that ended, by agent, method and outcome (result, error: from the "
            "server; a relay error code; cancelled).",
            labels=["agent", "method", "outcome"],
        )
        for (agent, method, outcome), value in sorted(tally.requests.items()):
            requests.add_metric([agent, method, outcome], value)
        yield requests
        latency = HistogramMetricFamily(
            PREFIX + "request_duration_seconds",
            "Seconds from a caller request's arrival at the relay to its answer leaving it.",
            labels=["method"],
        )
        for method, buckets in sorted(tally.latency.items()):
            cumulative, total = [], 0.0
            for le, count in zip(_LE, buckets, strict=False):
                total += count
                cumulative.append((le, total))
            latency.add_metric([method], cumulative, sum_value=buckets[-1])
        yield latency
        tool_requests = CounterMetricFamily(
            PREFIX + "tool_requests",
            "Requests tool servers sent to the caller side, by method and outcome (routed, "
            "-32005 no caller, -32007 over the limit).",
            labels=["method", "outcome"],
        )
        for (method, outcome), value in sorted(tally.tool_requests.items()):
            tool_requests.add_metric([method, outcome], value)
        yield tool_requests
        timeouts = CounterMetricFamily(
            PREFIX + "tool_request_timeouts",
            "Requests of tool servers that no caller answered in time.",
            labels=["method"],
        )
        for method, value in sorted(tally.tool_request_timeouts.items()):
            timeouts.add_metric([method], value)
        yield timeouts

        # Traffic and queues, as the shell counted them.
        frames = CounterMetricFamily(
            PREFIX + "frames",
            "WebSocket messages, by direction and peer role.",
            labels=["direction", "role"],
        )
        payload = CounterMetricFamily(
            PREFIX + "payload_bytes",
            "Payload bytes of those messages (UTF-8, no frame headers).",
            labels=["direction", "role"],
        )
        for index, role in _ROLES:
            frames.add_metric(["in", role], counts.frames_in[index])
            frames.add_metric(["out", role], counts.frames_out[index])
            payload.add_metric(["in", role], counts.bytes_in[index])
            payload.add_metric(["out", role], counts.bytes_out[index])
        yield frames
        yield payload
        queued = [[0, 0], [0, 0]]  # role -> frames, bytes
        for peer in self.dispatcher.peers.values():
            row = queued[TOOL if peer.role is Role.TOOL else CALLER]
            row[0] += len(peer.outbox)
            row[1] += peer.outbox.nbytes
        queued_frames = GaugeMetricFamily(
            PREFIX + "queued_frames", "Frames waiting in outboxes, by role.", labels=["role"]
        )
        queued_bytes = GaugeMetricFamily(
            PREFIX + "queued_bytes",
            "Bytes waiting in outboxes (or being written), by role.",
            labels=["role"],
        )
        for index, role in _ROLES:
            queued_frames.add_metric([role], queued[index][0])
            queued_bytes.add_metric([role], queued[index][1])
        yield queued_frames
        yield queued_bytes
        budget = self.dispatcher.budget
        yield GaugeMetricFamily(
            PREFIX + "queued_bytes_limit",
            "max_queued_bytes: bytes all outboxes together may hold.",
            value=budget.limit,
        )

        closes = CounterMetricFamily(
            PREFIX + "closes",
            "Connections the relay closed or refused, by close code (1011 ping timeout, 1013 "
            "slow caller, 4001 replaced, 4003 initialization failed, ...).",
            labels=["code", "why"],
        )
        for code, value in sorted(counts.closes.items()):
            closes.add_metric([str(code), CLOSE_REASONS.get(code, OTHER)], value)
        yield closes
        auth = CounterMetricFamily(
            PREFIX + "auth_failures",
            "Failed authentications (tokens, and keys of the HTTP endpoints), by reason.",
            labels=["reason"],
        )
        for reason, value in sorted(counts.auth_failures.items()):
            auth.add_metric([reason], value)
        yield auth


def relay_registry(collector: RelayCollector) -> CollectorRegistry:
    """A registry of the relay's own, holding ``collector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the text format."""
    return generate_latest(registry)


class MetricsRoute:
    """The ``/metrics`` route: the registry's metrics for a request with one of ``keys``
    (``?key=`` or ``Authorization: Bearer``); any other request is answered as the health
    endpoint answers a wrong key (403 after the failed-authentication delay, or 429).

    Args:
        routes: the relay's routes (for the wrong-key answer); the route is added to them.
        keys: the keys accepted (the admin keys, and the metrics token if one is set).
        registry: what to expose.
    """

    def __init__(
        self, routes: HttpRoutes, keys: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.routes = routes
        self.keys = tuple(keys)
        self.registry = registry
        for path in PATHS:
            routes.add_route(path, self.answer)

    async def answer(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        cors: list[tuple[str, str]],
        client: str,
    ) -> None:
        """Answer one request for the metrics."""
        if not key_matches(credential(request), self.keys):
            await self.routes.refuse_key(stream, request, cors, client)
            return
        await respond(
            stream,
            200,
            exposition(self.registry),
            headers=cors,
            head_only=request.method == "HEAD",
            content_type=CONTENT_TYPE,
        )


def _cluster_metrics(view: dict[str, int]) -> Iterator[Metric]:
    """Cluster mode: this node's bus, its view of the cluster, and its tunnels."""
    yield GaugeMetricFamily(
        PREFIX + "cluster_bus_up",
        "1 while this node reaches the cluster's Redis (0: cross-node requests get -32002).",
        value=view["bus_up"],
    )
    yield GaugeMetricFamily(
        PREFIX + "cluster_nodes", "Nodes holding a lease, this one included.", value=view["nodes"]
    )
    yield GaugeMetricFamily(
        PREFIX + "cluster_servers_elsewhere",
        "Servers on other nodes this node knows of (from Redis).",
        value=view["servers_elsewhere"],
    )
    tunnels = GaugeMetricFamily(
        PREFIX + "cluster_tunnels",
        "Open tunnels to servers on other nodes, and from callers on other nodes.",
        labels=["direction"],
    )
    tunnels.add_metric(["to_servers"], view["to_servers"])
    tunnels.add_metric(["from_callers"], view["from_callers"])
    yield tunnels
    frames = CounterMetricFamily(
        PREFIX + "cluster_bus_frames",
        "Frames this node sent to and received from other nodes over Redis.",
        labels=["direction"],
    )
    frames.add_metric(["sent"], view["frames_sent"])
    frames.add_metric(["received"], view["frames_received"])
    yield frames
