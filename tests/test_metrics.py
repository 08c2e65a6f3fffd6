"""``/metrics``: parsed with prometheus_client's own parser, after runs over real sockets."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, WebSocketConnection

from trio_mcp_relay import __version__
from trio_mcp_relay._config import RelayConfig
from trio_mcp_relay.core.tally import OTHER, Tally
from trio_mcp_relay.server import serve_relay

from .helpers import (
    KEY,
    RunningRelay,
    complete_initialization,
    http_get,
    peer,
    request,
    result,
    start_relay,
    tool_peer,
)
from .memnet import MemoryNet, PeerClosed

TIMEOUT = 30
TOKEN = "metrics-token-for-prometheus"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a ``/metrics`` answer: (name, labels) -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the relay has not reported it)."""
    return samples.get((f"trio_mcp_relay_{name}", frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        v for (n, ls), v in samples.items() if n == f"trio_mcp_relay_{name}" and wanted <= ls
    )


async def scrape(relay: RunningRelay, key: str = KEY) -> Samples:
    response = await http_get(relay.port, f"/metrics?key={key}")
    assert response.status == 200, response.body
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.body.decode())


class Wire:
    """What the script sent and received over its sockets, per role, in frames and bytes."""

    def __init__(self) -> None:
        self.frames: Counter[tuple[str, str]] = Counter()  # (direction at the relay, role)
        self.bytes: Counter[tuple[str, str]] = Counter()

    async def send(self, ws: WebSocketConnection, role: str, frame: Any) -> None:
        text = json.dumps(frame, ensure_ascii=False)
        self.frames["in", role] += 1
        self.bytes["in", role] += len(text.encode())
        await ws.send_message(text)

    async def recv(self, ws: WebSocketConnection, role: str) -> Any:
        text = await ws.get_message()
        assert isinstance(text, str)
        self.frames["out", role] += 1
        self.bytes["out", role] += len(text.encode())
        return json.loads(text)


async def serve_tool(ws: WebSocketConnection, wire: Wire, name: str, tools: list[str]) -> None:
    """A tool server: initialized by the relay, then answering every call with its name."""
    await complete_initialization(
        lambda frame: wire.send(ws, "tool", frame),
        lambda: wire.recv(ws, "tool"),
        name=name,
        tools=tools,
    )
    while True:
        call = await wire.recv(ws, "tool")
        text = {"type": "text", "text": f"{name} ran {call['params']['name']}"}
        await wire.send(ws, "tool", result(call["id"], {"content": [text]}))


async def test_counters_equal_what_a_scripted_run_did(nursery: trio.Nursery) -> None:
    """3 agents, 2 servers each, 1,000 calls: 5 before any server (-32001), 5 of a tool
    nobody has (-32602), 990 answered. Every counter says exactly that."""
    relay = await start_relay(nursery, ping_interval=0)
    agents = ["alpha", "beta", "gamma"]
    wire = Wire()
    calls: Counter[tuple[str, str]] = Counter()  # (agent, outcome)
    with trio.fail_after(TIMEOUT):
        async with (
            peer(relay.caller_url("alpha")) as c0,
            peer(relay.caller_url("beta")) as c1,
            peer(relay.caller_url("gamma")) as c2,
        ):
            callers = dict(zip(agents, (c0, c1, c2), strict=True))
            rid = 0

            async def call(agent: str, tool: str) -> dict[str, Any]:
                nonlocal rid
                rid += 1
                params = {"name": tool, "arguments": {"n": rid, "note": "héllo ✓"}}
                await wire.send(callers[agent], "caller", request(rid, params=params))
                answer: dict[str, Any] = await wire.recv(callers[agent], "caller")
                assert answer["id"] == rid
                outcome = "result" if "result" in answer else str(answer["error"]["code"])
                calls[agent, outcome] += 1
                return answer

            for _ in range(5):  # no server yet
                assert (await call("alpha", "add"))["error"]["code"] == -32001

            async with trio.open_nursery() as tools:
                for agent in agents:
                    for server in ("one", "two"):
                        names = [f"{server}_add", f"{server}_mul"]
                        ws = await nursery.start(_open, relay.tool_url(agent))
                        tools.start_soon(serve_tool, ws, wire, f"{agent}-{server}", names)
                while True:  # until the relay has initialized all six
                    if total(await scrape(relay), "agent_servers", ready="true") == 6:
                        break
                    await trio.sleep(0.01)

                for n in range(995):
                    agent = agents[n % 3]
                    if n % 199 == 0:  # 5 of them
                        assert (await call(agent, "nope"))["error"]["code"] == -32602
                    else:
                        tool = ("one_add", "one_mul", "two_add", "two_mul")[n % 4]
                        assert "result" in await call(agent, tool)

                samples = await scrape(relay)
                tools.cancel_scope.cancel()

    assert sum(calls.values()) == 1000
    assert calls["alpha", "-32001"] == 5
    assert sum(v for (_, o), v in calls.items() if o == "-32602") == 5
    for (agent, outcome), count in calls.items():
        got = value(samples, "requests_total", agent=agent, method="tools/call", outcome=outcome)
        assert got == count, (agent, outcome)
    assert total(samples, "requests_total") == 1000
    assert value(samples, "request_duration_seconds_count", method="tools/call") == 1000
    assert value(samples, "request_duration_seconds_bucket", method="tools/call", le="+Inf") == 1000
    assert value(samples, "request_duration_seconds_sum", method="tools/call") > 0

    for (direction, role), frames in wire.frames.items():
        assert value(samples, "frames_total", direction=direction, role=role) == frames
        sent = value(samples, "payload_bytes_total", direction=direction, role=role)
        assert sent == wire.bytes[direction, role], (direction, role)

    assert value(samples, "connections", role="tool") == 6
    assert value(samples, "connections", role="caller") == 3
    assert value(samples, "agents") == 3
    for agent in agents:
        assert value(samples, "agent_connections", agent=agent, role="tool") == 2
        assert value(samples, "agent_connections", agent=agent, role="caller") == 1
        assert value(samples, "agent_servers", agent=agent, ready="true") == 2
        assert value(samples, "agent_tools", agent=agent) == 4
    assert total(samples, "closes_total") == 0
    assert total(samples, "auth_failures_total") == 0
    assert value(samples, "requests_in_flight") == 0


async def _open(url: str, *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
    async with peer(url) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def test_agent_labels_are_bounded(nursery: trio.Nursery) -> None:
    """With one agent named and one top slot: the named agent, the agent with the most
    connections, and ``other`` for the rest, in the gauges and the counters."""
    relay = await start_relay(
        nursery, ping_interval=0, metrics_agents=("quiet",), metrics_top_agents=1
    )
    with trio.fail_after(TIMEOUT):
        async with (
            peer(relay.caller_url("busy")) as b1,
            peer(relay.caller_url("busy")) as b2,
            peer(relay.caller_url("quiet")) as q,
            peer(relay.caller_url("small1")) as s1,
            peer(relay.caller_url("small2")) as s2,
        ):
            for ws in (b1, b2, q, s1, s2):
                await ws.send_message(json.dumps(request(1)))
                assert json.loads(await ws.get_message())["error"]["code"] == -32001
            samples = await scrape(relay)
            # Scraping gave the top slot to "busy": its next requests count under its name.
            for ws in (b1, s1):
                await ws.send_message(json.dumps(request(2)))
                await ws.get_message()
            again = await scrape(relay)
    labels = {dict(ls)["agent"] for (n, ls) in samples if n.endswith("agent_connections")}
    assert labels == {"busy", "quiet", OTHER}
    assert value(samples, "agent_connections", agent="busy", role="caller") == 2
    assert value(samples, "agent_connections", agent=OTHER, role="caller") == 2
    seen = {dict(ls)["agent"] for (n, ls) in again if n.endswith("requests_total")}
    assert seen <= {"busy", "quiet", OTHER}
    assert total(again, "requests_total") == 7
    assert value(again, "requests_total", agent="quiet", method="tools/call", outcome="-32001") == 1


def test_a_tally_keeps_every_series_monotonic_when_labels_move() -> None:
    tally = Tally(named=["n"], slots=1)
    tally.answered("a", "tools/call", "result", 0.01)  # takes the free slot
    tally.answered("b", "tools/call", "result", 0.01)  # no slot left
    tally.answered("n", "x/custom", "result", None)  # named; method not known: other
    assert tally.requests == {
        ("a", "tools/call", "result"): 1,
        (OTHER, "tools/call", "result"): 1,
        ("n", OTHER, "result"): 1,
    }
    tally.relabel(["b", "a"])  # b is now on top: a's count moves to other
    assert tally.requests == {(OTHER, "tools/call", "result"): 2, ("n", OTHER, "result"): 1}
    tally.answered("b", "tools/call", "result", 100.0)
    assert tally.requests[("b", "tools/call", "result")] == 1
    buckets = tally.latency["tools/call"]
    assert buckets[-2] == 1  # 100 s: only the +Inf bucket
    assert buckets[-1] == pytest.approx(100.02)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/metrics", {}),
        ("/metrics?key=", {}),
        ("/metrics?key=wrong", {}),
        ("/metrics", {"Authorization": "Bearer wrong"}),
        ("/metrics", {"Authorization": f"Basic {KEY}"}),
    ],
)
async def test_metrics_without_a_good_key_are_refused(
    nursery: trio.Nursery, target: str, headers: dict[str, str]
) -> None:
    relay = await start_relay(nursery, metrics_token=TOKEN)
    with trio.fail_after(TIMEOUT):
        response = await http_get(relay.port, target, headers)
        assert response.status == 403
        assert response.json()["error"]["code"] == -32004
        assert b"trio_mcp_relay_" not in response.body
        samples = await scrape(relay)
    assert value(samples, "auth_failures_total", reason="admin_key") == 1


async def test_the_admin_key_and_the_metrics_token_open_metrics(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, admin_key="admin-key-1", metrics_token=TOKEN)
    with trio.fail_after(TIMEOUT):
        for target, headers in [
            ("/metrics?key=admin-key-1", {}),
            ("/metrics", {"Authorization": "Bearer admin-key-1"}),
            (f"/metrics?key={TOKEN}", {}),
            ("/mcp_endpoint/metrics", {"authorization": f"bearer {TOKEN}"}),
        ]:
            response = await http_get(relay.port, target, headers)
            assert response.status == 200, target
            assert b"trio_mcp_relay_info" in response.body
            for secret in (b"admin-key-1", TOKEN.encode(), KEY.encode()):
                assert secret not in response.body
        # With an admin key, the server key opens neither; the token opens only /metrics.
        assert (await http_get(relay.port, f"/metrics?key={KEY}")).status == 403
        health = await http_get(relay.port, f"/mcp_endpoint/health?key={TOKEN}")
        assert health.status == 403


async def test_wrong_keys_are_penalized_like_the_health_endpoints(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, auth_failures=2, auth_window=60, auth_ban=60)
    with trio.fail_after(TIMEOUT):
        assert (await http_get(relay.port, "/metrics?key=wrong")).status == 403
        assert (await http_get(relay.port, "/metrics?key=wrong")).status == 403
        banned = await http_get(relay.port, "/metrics?key=wrong")
        assert banned.status == 429
        assert int(banned.headers["retry-after"]) > 0
        # A valid credential is never refused for the failures of its address.
        samples = await scrape(relay)
    assert value(samples, "auth_failures_total", reason="admin_key") == 3


async def test_refused_tokens_are_counted_by_reason(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, auth_failures=100)
    with trio.fail_after(TIMEOUT):
        for token in ("", "not%20base64%21", "QUJD"):
            url = f"{relay.base}/mcp_endpoint/call/?token={token}"
            async with peer(url) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1008
        samples = await scrape(relay)
    assert value(samples, "auth_failures_total", reason="missing_token") == 1
    assert value(samples, "auth_failures_total", reason="malformed_token") == 1
    assert value(samples, "auth_failures_total", reason="wrong_key") == 1
    assert value(samples, "closes_total", code="1008", why="auth_refused") == 3


def test_serve_serves_metrics_to_the_token_from_the_environment(tmp_path: Path) -> None:
    """The console command, as a subprocess: METRICS_TOKEN opens /metrics by Bearer."""
    env = {**os.environ, "PORT": "0", "HOST": "127.0.0.1", "METRICS_TOKEN": TOKEN}
    for name in ("SERVER_KEY", "DATA_DIR", "ADMIN_KEY", "LOG_LEVEL"):
        env.pop(name, None)
    command = [sys.executable, "-m", "trio_mcp_relay", "serve", "--metrics-top-agents", "2"]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as relay:
        try:
            assert relay.stdout is not None
            health_url = [relay.stdout.readline().strip() for _ in range(2)][1].split()[-1]
            metrics_url = health_url.split("/mcp_endpoint/")[0] + "/metrics"
            ask = urllib.request.Request(metrics_url, headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(ask, timeout=5) as response:
                text = response.read().decode()
            samples = parse(text)
            assert value(samples, "info", version=__version__) == 1
            assert value(samples, "connections", role="tool") == 0
            denied = urllib.request.Request(metrics_url, headers={"Authorization": "Bearer no"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(denied, timeout=5)
            assert refused.value.code == 403
            refused.value.close()
        finally:
            relay.send_signal(signal.SIGTERM)
            stderr = relay.communicate(timeout=15)[1]
    assert TOKEN not in stderr


async def memory_scrape(net: MemoryNet) -> Samples:
    """``/metrics`` over the in-memory network."""
    stream = net.connect()
    await stream.send_all(f"GET /metrics?key={KEY} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return parse(body.decode())


async def test_closes_are_counted_by_code(autojump_clock: trio.testing.MockClock) -> None:
    """A ping timeout (1011), a replaced server (4001), a failed initialization (4003)."""
    config = RelayConfig(
        host="memory", port=0, key=KEY, ping_interval=20, ping_timeout=20, init_timeout=5
    )
    net = MemoryNet(KEY)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_relay, config, listeners=[net.listener]))
            async with net.raw_tool("mute") as mute:
                mute.pongs = False
                with pytest.raises(PeerClosed) as closed:
                    while True:
                        await mute.receive()
                assert closed.value.code == 1011
            async with net.raw_tool("twice") as first, net.raw_tool("twice"):
                with pytest.raises(PeerClosed) as closed:
                    while True:
                        await first.receive()
                assert closed.value.code == 4001
            async with net.raw("tool", "silent") as silent:
                with pytest.raises(PeerClosed) as closed:
                    while True:
                        await silent.receive()  # the relay's initialize, never answered
                assert closed.value.code == 4003
            samples = await memory_scrape(net)
            nursery.cancel_scope.cancel()
    assert value(samples, "closes_total", code="1011", why="ping_timeout") == 1
    assert value(samples, "closes_total", code="4001", why="replaced") == 1
    assert value(samples, "closes_total", code="4003", why="init_failed") == 1
    assert total(samples, "closes_total") == 3


async def test_http_sessions_are_counted_by_transport(nursery: trio.Nursery) -> None:
    """Streamable HTTP and HTTP+SSE sessions: a gauge by transport, and callers like others."""
    relay = await start_relay(nursery)
    with trio.fail_after(TIMEOUT):
        url = f"{relay.http}/mcp_endpoint/call/?token={relay.token('m')}"
        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}},
        }
        async with tool_peer(relay.tool_url("m"), tools=["t"]), httpx.AsyncClient() as client:
            for _ in range(2):
                answer = await client.post(url, json=init, headers={"accept": "application/json"})
                assert answer.status_code == 200, answer.text
            samples = await scrape(relay)
            assert total(samples, "http_sessions", transport="streamable") == 2
            assert total(samples, "http_sessions", transport="sse") == 0
            assert total(samples, "connections", role="caller") == 2
