"""Reloading the configuration: which settings change live, filters and timeouts in the core,
the embedding API, and SIGHUP to a real ``trio-mcp-relay serve``."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.helpers import KEY, peer, recv, request, result, send, tool_peer
from tests.test_aggregator import Net, only
from trio_mcp_relay import ConfigError, RelayConfig, RelayHandle, ToolFilter, load_config
from trio_mcp_relay._auth import caller_url, tool_url
from trio_mcp_relay._frames import REQUEST_TIMEOUT
from trio_mcp_relay.core.session import AgentFilters
from trio_mcp_relay.server import serve_relay
from trio_mcp_relay.server.reload import LIVE_SETTINGS, RESTART_SETTINGS, plan_reload

KEY_B = "fedcba9876543210fedcba9876543210"
TIMEOUT = 10
#: A subprocess start on a loaded machine takes seconds; every step after it is fast.
SUBPROCESS_TIMEOUT = 60
LIST_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


def running(**overrides: Any) -> RelayConfig:
    return RelayConfig(**{"host": "127.0.0.1", "port": 0, "key": KEY, **overrides})


# ----------------------------------------------------------------------------- what is live


def test_every_setting_is_either_live_or_needs_a_restart() -> None:
    """A new setting must be sorted into one kind, or a reload would silently ignore it."""
    names = {field.name for field in attrs.fields(RelayConfig)}
    assert names == LIVE_SETTINGS | RESTART_SETTINGS
    assert not LIVE_SETTINGS & RESTART_SETTINGS


def test_nothing_changed_changes_nothing() -> None:
    config = running()
    effective, report = plan_reload(config, running())
    assert effective is config
    assert (report.changed, report.needs_restart, report.lines) == ((), (), ())


def test_new_keys_are_live_and_never_shown() -> None:
    old = running()
    new = running(key=KEY_B, previous_keys=(KEY,), admin_key="monitoring-secret-0123")
    effective, report = plan_reload(old, new)
    assert effective.keys == (KEY_B, KEY)
    assert effective.admin_key == "monitoring-secret-0123"
    assert report.changed == ("key", "admin_key")
    assert report.needs_restart == ()
    assert report.lines == (
        "key: 1 key -> 2 keys (1 added, 0 removed; the signing key changed)",
        "admin_key: set (the health endpoint takes it instead of the server keys)",
    )
    text = "\n".join(report.lines)
    for secret in (KEY, KEY_B, "monitoring-secret-0123"):
        assert secret[:4] not in text


def test_limits_are_live_and_the_listener_waits_for_a_restart() -> None:
    old = running(tool_filters={"*": AgentFilters(ToolFilter(deny=("debug_*",)))})
    new = running(
        host="0.0.0.0",
        max_message_size=1024,
        max_inflight_per_caller=5,
        request_timeout=2.5,
        log_level="debug",
        allowed_origins=("https://a.example", "https://b.example"),
        tool_filters={"kitchen": AgentFilters(ToolFilter(allow=("cook*",)))},
    )
    effective, report = plan_reload(old, new)
    assert report.changed == (
        "log_level",
        "allowed_origins",
        "max_inflight_per_caller",
        "request_timeout",
        "tool_filters",
    )
    assert report.needs_restart == ("host", "max_message_size")
    # The relay runs on with the old listener and message size, and every live value.
    assert (effective.host, effective.max_message_size) == ("127.0.0.1", old.max_message_size)
    assert (effective.max_inflight_per_caller, effective.request_timeout) == (5, 2.5)
    assert effective.log_level == "DEBUG"
    assert dict(effective.tool_filters) == dict(new.tool_filters)
    assert "max_inflight_per_caller: 100 -> 5" in report.lines
    assert "allowed_origins: * -> https://a.example,https://b.example" in report.lines
    assert "tool filters: changed for *, kitchen ('*': every agent)" in report.lines
    assert report.lines[-2:] == (
        "host: 127.0.0.1 -> 0.0.0.0: needs a restart (it stays 127.0.0.1 until then)",
        "max_message_size: 16777216 -> 1024: needs a restart (it stays 16777216 until then)",
    )
    # Asked again with the same file, the restart settings are reported again, nothing else.
    _, again = plan_reload(effective, new)
    assert (again.changed, again.needs_restart) == ((), ("host", "max_message_size"))


def test_a_reload_never_generates_a_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.cfg"
    path.write_text("[server]\nport = 0\n[limits]\nmax_inflight_per_caller = 7\n")
    with pytest.raises(ConfigError, match=r"\[server\] key in .*: no key"):
        load_config(flags={}, environ={}, config_file=path, data_dir=tmp_path, generate_key=False)
    assert "key" not in path.read_text()
    loaded = load_config(flags={}, environ={}, config_file=path, data_dir=tmp_path)
    assert loaded.max_inflight_per_caller == 7  # [limits] is read like the rest of the file


def test_limits_in_the_file_are_checked_and_named(tmp_path: Path) -> None:
    path = tmp_path / "relay.cfg"
    path.write_text(f"[server]\nkey = {KEY}\n[limits]\nrequest_timeout = soon\n")
    with pytest.raises(ConfigError, match=r"\[limits\] request_timeout in .*not a number"):
        load_config(flags={}, environ={}, config_file=path, data_dir=tmp_path)


# ----------------------------------------------------------------------------- the core


def test_changing_the_filters_tells_the_callers_whose_view_changed() -> None:
    net = Net(list_changed_delay=0.2)
    net.server("calc", ["add", "debug_dump"])
    net.server("calc", ["forecast"], agent="b")
    caller, other = net.caller(), net.caller(agent="b")
    assert net.listed(caller) == ["add", "debug_dump"]
    assert net.listed(other) == ["forecast"]
    net.expire(1.0)  # what the servers' arrival set up has passed, unseen: nothing changed
    assert net.pop(caller) == net.pop(other) == []

    net.router.set_filters({}, AgentFilters(ToolFilter(deny=("debug_*",))), now=net.now)
    assert net.pop(caller) == []  # coalesced like any catalog change...
    net.expire(0.2)
    assert only(net.pop(caller)) == LIST_CHANGED  # ...then told, once
    assert net.pop(other) == []  # its tools are the same as before
    assert net.listed(caller) == ["add"]

    # The same filters again change nothing anyone sees: no notification.
    net.router.set_filters({}, AgentFilters(ToolFilter(deny=("debug_*",))), now=net.now)
    net.expire(1.0)
    assert net.pop(caller) == []

    # Agents that connect later get the new filters from the start.
    net.server("calc", ["add", "debug_x"], agent="c")
    late = net.caller(agent="c")
    assert net.listed(late) == ["add"]


def test_a_shortened_timeout_does_not_wait_behind_deadlines_set_before() -> None:
    net = Net(request_timeout=10.0)
    tool = net.server("calc", ["add"])
    caller = net.caller()
    net.call(caller, "slow", "tools/call", {"name": "add"})
    net.router.request_timeout = 1.0  # as a reload does
    net.expire(0.5)
    net.call(caller, "fast", "tools/call", {"name": "add"})
    assert len(net.pop(tool)) == 2
    net.expire(1.5)  # t = 2: past the second request's deadline, not the first's
    [answer] = net.pop(caller)
    assert answer["id"] == "fast"
    assert answer["error"]["code"] == REQUEST_TIMEOUT
    net.expire(9.0)
    assert only(net.pop(caller))["id"] == "slow"


# ----------------------------------------------------------------------------- embedding


async def call_through(tool: WebSocketConnection, caller: WebSocketConnection, rid: str) -> None:
    """One tools/call from ``caller`` answered by ``tool``, through the relay."""
    await send(caller, request(rid, "tools/call", {"name": "cook", "arguments": {}}))
    forwarded = await recv(tool)
    assert forwarded["method"] == "tools/call"
    await send(tool, result(forwarded["id"], {"content": [], "by": rid}))
    assert await recv(caller) == result(rid, {"content": [], "by": rid})


async def initialized_caller(ws: WebSocketConnection) -> None:
    await send(ws, request("init", "initialize", {"capabilities": {}}))
    assert (await recv(ws))["id"] == "init"


async def test_a_handle_reloads_filters_and_keys_of_a_running_relay() -> None:
    handle = RelayHandle()
    with pytest.raises(RuntimeError):
        handle.reload(running())
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            config = running()
            port = await nursery.start(functools.partial(serve_relay, config, handle=handle))
            base = f"ws://127.0.0.1:{port}"
            async with (
                tool_peer(tool_url(base, KEY, "kitchen"), tools=["cook", "debug_dump"]) as tool,
                peer(caller_url(base, KEY, "kitchen")) as caller,
            ):
                await initialized_caller(caller)
                filters = {"*": AgentFilters(ToolFilter(deny=("debug_*",)))}
                report = handle.reload(attrs.evolve(config, key=KEY_B, tool_filters=filters))
                assert report.changed == ("key", "tool_filters")
                assert await recv(caller) == LIST_CHANGED
                await send(caller, request("list", "tools/list"))
                tools = (await recv(caller))["result"]["tools"]
                assert [t["name"] for t in tools] == ["cook"]
                # Once more, now that the tool's arrival is long told: back to no filter.
                handle.reload(attrs.evolve(config, key=KEY_B))
                assert await recv(caller) == LIST_CHANGED
                await send(caller, request("list", "tools/list"))
                tools = (await recv(caller))["result"]["tools"]
                assert [t["name"] for t in tools] == ["cook", "debug_dump"]
                await call_through(tool, caller, "still-up")
                async with peer(caller_url(base, KEY_B, "kitchen")) as new_caller:
                    await call_through(tool, new_caller, "new-key")
            nursery.cancel_scope.cancel()
    assert not handle.running


# ----------------------------------------------------------------------------- SIGHUP


async def wait_for_log(path: Path, text: str) -> str:
    """Poll the relay's log file until it holds ``text`` (bounded by the caller's fail_after)."""
    while text not in (log := await trio.Path(path).read_text()):  # noqa: ASYNC110
        await trio.sleep(0.05)
    return log


async def test_sighup_after_changing_the_key_list_keeps_connections_up(tmp_path: Path) -> None:
    """The issue's "done when": a token of the new key works, existing connections stay up.

    The old key is dropped altogether: connections opened with its tokens stay up (they are
    not authenticated again), new connections with its tokens are refused.
    """
    with trio.fail_after(SUBPROCESS_TIMEOUT):
        cfg = tmp_path / "relay.cfg"
        limits = "[limits]\nauth_delay = 0.05\n"
        cfg.write_text(f"[server]\nhost = 127.0.0.1\nport = 0\nkey = {KEY}\n{limits}")
        log_path = tmp_path / "relay.log"
        unset = {"HOST", "PORT", "SERVER_KEY", "ADMIN_KEY", "DATA_DIR", "LOG_LEVEL"}
        env = {k: v for k, v in os.environ.items() if k not in unset}
        command = [sys.executable, "-m", "trio_mcp_relay", "serve", "--config", str(cfg)]
        with log_path.open("wb") as log_file:
            relay = await trio.lowlevel.open_process(
                command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=log_file
            )
        assert relay.stdout is not None
        try:
            banner = b""
            while b"\n" not in banner:
                chunk = await relay.stdout.receive_some(4096)
                assert chunk, log_path.read_text()
                banner += chunk
            port = int(banner.split(b"\n")[0].rsplit(b":", 1)[1])
            base = f"ws://127.0.0.1:{port}"
            async with (
                tool_peer(tool_url(base, KEY, "kitchen"), tools=["cook"]) as tool,
                peer(caller_url(base, KEY, "kitchen")) as caller,
            ):
                await initialized_caller(caller)
                await call_through(tool, caller, "before")

                cfg.write_text(
                    f"[server]\nhost = 0.0.0.0\nport = 0\nkey = {KEY_B}\n"
                    f"{limits}max_inflight_per_caller = 7\n"
                )
                relay.send_signal(signal.SIGHUP)
                await wait_for_log(log_path, "reload: host")

                async with peer(caller_url(base, KEY_B, "kitchen")) as new_caller:
                    await call_through(tool, new_caller, "new-key")
                await call_through(tool, caller, "old-caller")  # opened with the old key: up
                async with peer(caller_url(base, KEY, "kitchen")) as refused:
                    with pytest.raises(ConnectionClosed) as closed:
                        await refused.get_message()
                    assert closed.value.reason.code == 1008

                # A configuration that does not load changes nothing.
                cfg.write_text(f"[server]\nport = eighty\nkey = {KEY}\n")
                relay.send_signal(signal.SIGHUP)
                await wait_for_log(log_path, "reload failed")
                async with peer(caller_url(base, KEY_B, "kitchen")) as again:
                    await call_through(tool, again, "after-failure")
                await call_through(tool, caller, "last")
        finally:
            relay.send_signal(signal.SIGTERM)
            assert await relay.wait() == 0
    log = log_path.read_text()
    assert "reload: key: 1 key -> 1 key (1 added, 1 removed; the signing key changed)" in log
    assert "reload: max_inflight_per_caller: 100 -> 7" in log
    assert "reload: host: 127.0.0.1 -> 0.0.0.0: needs a restart" in log
    assert "reload failed, nothing changed: [server] port in" in log
    assert "'eighty' is not an integer" in log
    for secret in (KEY, KEY_B):
        assert secret not in log


async def test_a_reloaded_metrics_token_opens_metrics() -> None:
    import functools

    import attrs
    import trio

    from tests.helpers import KEY, http_get
    from trio_mcp_relay import RelayConfig, RelayHandle, serve_relay

    config = RelayConfig(host="127.0.0.1", port=0, key=KEY, auth_delay=0.01)
    handle = RelayHandle()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_relay, config, handle=handle))
            assert (await http_get(port, "/metrics?key=scrape-token")).status == 403
            report = handle.reload(attrs.evolve(config, metrics_token="scrape-token"))
            assert report.changed == ("metrics_token",)
            assert not any("scrape-token" in line for line in report.lines)
            assert (await http_get(port, "/metrics?key=scrape-token")).status == 200
            nursery.cancel_scope.cancel()
