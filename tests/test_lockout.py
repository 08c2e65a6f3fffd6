"""Tokens with roles and a lockout that only locks out the attacker, against a live relay.

Real sockets on 127.0.0.1, port 0. The delays before refusing a bad credential are the
settings' own (seconds): tests that need them long enough to notice use a Trio clock that runs
faster than real time (``fast_clock``), so a 40 s scenario takes a few real seconds while every
timer, the relay's and the test's, keeps its real-world length.
"""

from __future__ import annotations

import contextlib
import logging
import time
from urllib.parse import quote, urlsplit

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Ping, RejectConnection, TextMessage
from wsproto.events import Request as WsRequest

from tests.helpers import (
    CUSTOM,
    KEY,
    RunningRelay,
    health,
    http_get,
    peer,
    recv,
    request,
    result,
    send,
    start_relay,
    tool_peer,
    wait_for_counts,
)
from trio_mcp_relay._auth import (
    REASON_CALLER_ON_TOOL,
    REASON_REFERENCE_REFUSED,
    REASON_TOOL_ON_CALLER,
    REASON_WRONG_KEY,
    TokenRole,
    encrypt_token,
    endpoint_url,
    scoped_token,
)
from trio_mcp_relay._auth import Endpoint as Ep
from trio_mcp_relay._guard import failure_delay
from trio_mcp_relay._scoped import REASON_EXPIRED, REASON_UNKNOWN_KEY

OLD_KEY = "fedcba9876543210fedcba9876543210"
STALE = quote(encrypt_token("a key this relay never had", "victim"), safe="")

#: How many times faster than real time ``fast_clock`` runs.
SPEED = 8


@pytest.fixture
def fast_clock() -> trio.testing.MockClock:
    """A Trio clock running ``SPEED`` times faster than real time (pytest-trio uses it for
    the test because it is a clock). Not autojumping: with real sockets a jump could fire a
    timeout while bytes are still on their way."""
    return trio.testing.MockClock(rate=SPEED)


async def attempt(
    url: str, headers: list[tuple[str, str]] | None = None, *, patience: float = 30.0
) -> tuple[str, int, str]:
    """Dial ``url`` and wait for the relay's verdict: ("rejected", HTTP status, "") for a
    refused handshake, ("closed", close code, reason) when it is accepted and then closed,
    ("open", 0, "") when it is still open after ``patience`` seconds, or when the relay
    begins to initialize it as a tool (the token was good).

    wsproto driven by hand, so that every outcome closes the socket (trio-websocket leaves
    it open when a handshake is refused).
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    target = f"{parts.path}?{parts.query}"
    async with await trio.open_tcp_stream(parts.hostname, parts.port) as stream:
        ws = WSConnection(ConnectionType.CLIENT)
        handshake = WsRequest(host=parts.netloc, target=target, extra_headers=headers or [])
        await stream.send_all(ws.send(handshake))
        with trio.move_on_after(patience):
            while data := await stream.receive_some(65536):
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, RejectConnection):
                        return "rejected", event.status_code, ""
                    if isinstance(event, CloseConnection):
                        with contextlib.suppress(trio.BrokenResourceError):
                            await stream.send_all(ws.send(event.response()))
                        return "closed", event.code, event.reason or ""
                    if isinstance(event, Ping):
                        await stream.send_all(ws.send(event.response()))
                    if isinstance(event, TextMessage) and '"initialize"' in event.data:
                        # The relay initializes only a tool it has let in.
                        return "open", 0, ""
            return "eof", 0, ""
        return "open", 0, ""


def tool(relay: RunningRelay, token: str) -> str:
    return endpoint_url(relay.base, Ep.TOOL, token)


def caller(relay: RunningRelay, token: str) -> str:
    return endpoint_url(relay.base, Ep.CALLER, token)


async def round_trip(
    tool_ws: WebSocketConnection,
    caller_ws: WebSocketConnection,
    rid: str,
) -> None:
    await send(caller_ws, request(rid, CUSTOM, params={"probe": rid}))
    frame = await recv(tool_ws)
    assert frame["params"] == {"probe": rid}
    await send(tool_ws, result(frame["id"], {"probe": rid}))
    assert await recv(caller_ws) == result(rid, {"probe": rid})


# ----------------------------------------------------------------------------- lockout


async def test_200_bad_tokens_then_a_valid_tool_and_caller_connect_at_once(
    nursery: trio.Nursery,
) -> None:
    relay = await start_relay(nursery)  # the default policy, with TEST_AUTH_DELAY delays
    good_tool = tool(relay, scoped_token(KEY, "flooded", TokenRole.TOOL))
    good_caller = caller(relay, scoped_token(KEY, "flooded", TokenRole.CALLER))
    bad = f"{relay.base}/mcp_endpoint/mcp/?token={STALE}"
    with trio.fail_after(30):
        outcomes = [await attempt(bad) for _ in range(200)]
        # Slowed down, then refused at once: the address keeps failing.
        assert outcomes[:10] == [("closed", 1008, REASON_WRONG_KEY)] * 10
        assert {outcome[:2] for outcome in outcomes[10:]} == {("rejected", 429)}
        # The valid ones, from the same address, are neither delayed nor refused.
        started = trio.current_time()
        async with tool_peer(good_tool) as tool_ws, peer(good_caller) as caller_ws:
            await wait_for_counts(relay, tools=1, callers=1)
            assert trio.current_time() - started < 1.0
            await round_trip(tool_ws, caller_ws, "after the flood")
            response = await http_get(relay.port, f"/mcp_endpoint/health?key={KEY}")
            assert response.status == 200
            assert response.json()["result"]["status"] == "success"
            # A reference token from that address is valid too.
            async with tool_peer(relay.tool_url("legacy")), peer(relay.caller_url("legacy")):
                await wait_for_counts(relay, tools=2, callers=2)
        # And bad ones are still refused.
        assert (await attempt(bad))[:2] == ("rejected", 429)


async def test_valid_credentials_pass_while_bad_ones_are_being_delayed(
    nursery: trio.Nursery,
) -> None:
    relay = await start_relay(nursery, auth_delay=3.0, auth_failures=1000)
    outcomes: list[tuple[str, int, str]] = []
    bad = f"{relay.base}/mcp_endpoint/call/?token={STALE}"
    with trio.fail_after(20):
        async with trio.open_nursery() as flood:
            for _ in range(50):  # a first failure, then delays of up to 3 s, 4 at a time
                flood.start_soon(_record, outcomes, bad)
                await trio.sleep(0.01)
            started = trio.current_time()
            async with (
                tool_peer(relay.tool_url("busy")) as tool_ws,
                peer(relay.caller_url("busy")) as caller_ws,
            ):
                await round_trip(tool_ws, caller_ws, "during the delays")
            assert (await http_get(relay.port, f"/mcp_endpoint/health?key={KEY}")).status == 200
            assert trio.current_time() - started < 1.0
    # The bad ones were delayed four at a time; the rest refused at once.
    assert sum(outcome[0] == "closed" for outcome in outcomes) >= 4
    assert sum(outcome[:2] == ("rejected", 429) for outcome in outcomes) >= 30


async def test_failures_are_answered_after_the_scheduled_delay_and_never_more_than_10_s(
    fast_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The default policy, measured on the relay's own clock: nothing for a first failure,
    then the doubling delays of ``failure_delay``, capped at 10 s."""
    relay = await start_relay(nursery, auth_delay=10.0, auth_failures=100, ping_interval=0)
    bad = f"{relay.base}/mcp_endpoint/mcp/?token={STALE}"
    took = []
    with trio.fail_after(60):
        for _ in range(9):
            started = trio.current_time()
            assert await attempt(bad) == ("closed", 1008, REASON_WRONG_KEY)
            took.append(trio.current_time() - started)
    for previous, seconds in enumerate(took):
        expected = failure_delay(previous, 10.0)
        assert expected <= seconds < expected + 1.0, (previous, seconds)
    assert took[0] < 1.0 and max(took) < 11.0
    assert took[-1] >= 10.0 > took[-3]


async def test_a_stale_client_every_half_second_for_40_s_does_not_keep_the_tool_out(
    fast_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """The relay runs with the default policy (10 s delays, 429 after 10 failures a minute).

    From 127.0.0.1, a stale client dials the tool endpoint every 0.5 s; the legitimate tool
    bridge of the same agent, from the same address, dials again every 4 s (its new
    connection replaces the previous one), retrying every 0.5 s when refused. A caller asks the
    tool every 0.1 s; a half-second slot counts as answered when any request in it was
    answered.
    """
    relay = await start_relay(nursery, auth_delay=10.0, ping_interval=0)
    tool_url = tool(relay, scoped_token(KEY, "victim", TokenRole.TOOL))
    stale_url = f"{relay.base}/mcp_endpoint/mcp/?token={STALE}"
    duration, slot = 40.0, 0.5
    answered: set[int] = set()
    refusals: list[tuple[str, int, str]] = []
    tool_refused: list[tuple[str, int, str]] = []

    async def stale_client() -> None:
        async with trio.open_nursery() as attempts:
            while True:
                attempts.start_soon(_record, refusals, stale_url)
                await trio.sleep(0.5)

    async def connection(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """One connection of the bridge: up once initialized, serving until cancelled."""
        up = False
        with trio.CancelScope() as scope:
            try:
                async with tool_peer(tool_url) as ws:
                    up = True
                    task_status.started(scope)
                    while True:
                        frame = await recv(ws)
                        if "id" in frame:
                            await send(ws, result(frame["id"], "pong"))
            except (ConnectionRejected, ConnectionClosed) as exc:
                if up and isinstance(exc, ConnectionClosed) and exc.reason.code == 4001:
                    return  # replaced by the bridge's next connection, as it should be
                tool_refused.append(("refused", 0, repr(exc)))
                if not up:
                    raise

    async def tool_bridge() -> None:
        # Every 4 s the bridge dials again and then drops its previous connection (the new
        # one, of the same identity, replaces it at the relay): each dial must get through.
        async with trio.open_nursery() as connections:
            previous: trio.CancelScope | None = None
            while True:
                try:
                    current = await connections.start(connection)
                except (ConnectionRejected, ConnectionClosed):
                    await trio.sleep(0.5)
                    continue
                if previous is not None:
                    previous.cancel()
                previous = current
                await trio.sleep(4.0)

    with trio.fail_after(duration + 20):
        async with trio.open_nursery() as scenario:
            scenario.start_soon(tool_bridge)
            await wait_for_counts(relay, tools=1, callers=0)
            scenario.start_soon(stale_client)
            start = next_request = trio.current_time()
            async with peer(caller(relay, scoped_token(KEY, "victim", TokenRole.CALLER))) as ws:
                rid = 0
                while (elapsed := trio.current_time() - start) < duration:
                    rid += 1
                    await send(ws, request(rid, CUSTOM))
                    with trio.move_on_after(0.1):
                        while (answer := await recv(ws))["id"] != rid:
                            pass  # a late answer to an earlier request
                        if answer.get("result") == "pong":
                            answered.add(int(elapsed // slot))
                    next_request += 0.1
                    await trio.sleep_until(next_request)
            scenario.cancel_scope.cancel()
    up = len(answered) * slot
    assert up >= 39.0, (up, tool_refused)
    assert not tool_refused
    # The stale client was slowed down and then refused at once; never let in.
    kinds = {outcome[:2] for outcome in refusals}
    assert kinds <= {("closed", 1008), ("rejected", 429)}
    assert ("rejected", 429) in kinds
    assert len(refusals) >= 60


async def _record(into: list[tuple[str, int, str]], url: str) -> None:
    into.append(await attempt(url))


# ----------------------------------------------------------------------------- proxies


async def test_clients_behind_a_trusted_proxy_are_limited_separately(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_mcp_relay")
    relay = await start_relay(nursery, trusted_proxies=("127.0.0.1",), auth_failures=3)
    wrong = "/mcp_endpoint/health?key=guess"
    right = f"/mcp_endpoint/health?key={KEY}"
    alice, bob = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
    with trio.fail_after(10):
        for _ in range(3):
            assert (await http_get(relay.port, wrong, alice)).status == 403
        assert (await http_get(relay.port, wrong, alice)).status == 429
        # Bob is another client behind the same proxy: his failures start from nothing.
        assert (await http_get(relay.port, wrong, bob)).status == 403
        assert (await http_get(relay.port, wrong, {"X-Real-IP": "198.51.100.3"})).status == 403
        assert (await http_get(relay.port, wrong, {"Forwarded": "for=198.51.100.4"})).status == 403
        # Alice with the right key, and a WebSocket through the proxy from her, get through.
        assert (await http_get(relay.port, right, alice)).status == 200
        from_alice = [("X-Forwarded-For", "198.51.100.1")]
        assert await attempt(relay.tool_url("alice"), from_alice, patience=0.5) == ("open", 0, "")
        refused = await attempt(
            f"{relay.base}/mcp_endpoint/mcp/?token={STALE}", [("X-Forwarded-For", "198.51.100.9")]
        )
        assert refused[:2] == ("closed", 1008)
        # The same headers from an untrusted address are ignored: 127.0.0.2 is one client.
        for n in range(3):
            spoofed = {"X-Forwarded-For": f"203.0.113.{n}"}
            assert (await http_get(relay.port, wrong, spoofed, source="127.0.0.2")).status == 403
        last = {"X-Forwarded-For": "203.0.113.99"}
        assert (await http_get(relay.port, wrong, last, source="127.0.0.2")).status == 429
    # Logs name the client the proxy vouched for.
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "198.51.100.9 (via 127.0.0.1:" in logged
    assert "203.0.113" not in logged


# ----------------------------------------------------------------------------- roles


async def test_tokens_open_only_the_endpoints_of_their_role(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery)
    tool_token = scoped_token(KEY, "scoped", TokenRole.TOOL)
    caller_token = scoped_token(KEY, "scoped", TokenRole.CALLER)
    both_token = scoped_token(KEY, "scoped-both", TokenRole.BOTH)
    with trio.fail_after(10):
        assert await attempt(tool(relay, caller_token)) == (
            "closed",
            1008,
            REASON_CALLER_ON_TOOL,
        )
        assert await attempt(caller(relay, tool_token)) == (
            "closed",
            1008,
            REASON_TOOL_ON_CALLER,
        )
        expired = scoped_token(KEY, "scoped", TokenRole.TOOL, expires_in=1, now=time.time() - 10)
        assert await attempt(tool(relay, expired)) == ("closed", 1008, REASON_EXPIRED)
        # The right roles work, and so do tokens that have not expired yet.
        fresh = scoped_token(KEY, "scoped", TokenRole.TOOL, expires_in=3600)
        async with tool_peer(tool(relay, fresh)) as tool_ws, peer(caller(relay, caller_token)) as c:
            await wait_for_counts(relay, tools=1, callers=1)
            await round_trip(tool_ws, c, "scoped")
        async with (
            tool_peer(tool(relay, both_token)) as tool_ws,
            peer(caller(relay, both_token)) as c,
        ):
            await wait_for_counts(relay, tools=1, callers=1)
            await round_trip(tool_ws, c, "both")


async def test_a_caller_token_cannot_take_the_tool_slot(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery)
    caller_token = scoped_token(KEY, "guarded", TokenRole.CALLER)
    with trio.fail_after(10):
        real_tool = tool(relay, scoped_token(KEY, "guarded", TokenRole.TOOL))
        async with tool_peer(real_tool) as tool_ws, peer(caller(relay, caller_token)) as caller_ws:
            await wait_for_counts(relay, tools=1, callers=1)
            outcome = await attempt(tool(relay, caller_token))
            assert outcome == ("closed", 1008, REASON_CALLER_ON_TOOL)
            # The real tool was not replaced and still answers.
            await round_trip(tool_ws, caller_ws, "still mine")


async def test_old_key_works_while_listed_and_is_refused_once_removed(
    nursery: trio.Nursery,
) -> None:
    old_scoped = scoped_token(OLD_KEY, "rotated", TokenRole.TOOL)
    old_reference = encrypt_token(OLD_KEY, "rotated")
    with trio.fail_after(10):
        async with trio.open_nursery() as scope:
            rotating = await start_relay(scope, key=KEY, previous_keys=(OLD_KEY,))
            async with (
                tool_peer(tool(rotating, old_scoped)) as tool_ws,
                peer(caller(rotating, old_reference)) as caller_ws,
            ):
                await wait_for_counts(rotating, tools=1, callers=1)
                await round_trip(tool_ws, caller_ws, "old key")
            # The old key still opens the health endpoint too.
            response = await http_get(rotating.port, f"/mcp_endpoint/health?key={OLD_KEY}")
            assert response.status == 200
            scope.cancel_scope.cancel()
        retired = await start_relay(nursery, key=KEY)
        assert await attempt(tool(retired, old_scoped)) == ("closed", 1008, REASON_UNKNOWN_KEY)
        assert await attempt(caller(retired, old_reference)) == ("closed", 1008, REASON_WRONG_KEY)
        response = await http_get(retired.port, f"/mcp_endpoint/health?key={OLD_KEY}")
        assert response.status == 403


async def test_reference_tokens_can_be_refused(nursery: trio.Nursery) -> None:
    relay = await start_relay(nursery, reference_tokens=False)
    with trio.fail_after(10):
        outcome = await attempt(relay.tool_url("legacy"))
        assert outcome == ("closed", 1008, REASON_REFERENCE_REFUSED)
        async with tool_peer(tool(relay, scoped_token(KEY, "new", TokenRole.TOOL))):
            await wait_for_counts(relay, tools=1, callers=0)
            assert (await health(relay))["tool_connections"] == 1
