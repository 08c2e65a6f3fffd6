"""The URL grammar shared by check, fuzz, call, pipe and tools, and the failure vocabulary."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
import trio_websocket

from tests.helpers import KEY
from trio_mcp_relay._auth import decrypt_agent_id
from trio_mcp_relay._endpoint import (
    UrlError,
    describe_connect_failure,
    parse_endpoint_url,
    tool_side_url,
)

TOKEN = "1+08xP+MVKq5/x=="  # a raw "+" as pasted from a terminal must survive


@pytest.mark.parametrize(
    ("url", "kind", "ws_base", "key", "token"),
    [
        ("http://h:8004", "base", "ws://h:8004", None, None),
        ("h:8004", "base", "ws://h:8004", None, None),
        ("wss://relay.example.com/relay/", "base", "wss://relay.example.com/relay", None, None),
        (f"http://h:8004/mcp_endpoint/health?key={KEY}", "health", "ws://h:8004", KEY, None),
        (f"ws://h:8004/mcp_endpoint/mcp/?token={TOKEN}", "tool", "ws://h:8004", None, TOKEN),
        (f"ws://h/mcp_endpoint/call?token={TOKEN}", "caller", "ws://h", None, TOKEN),
        (f"https://h/p/mcp_endpoint/mcp/?token={TOKEN}", "tool", "wss://h/p", None, TOKEN),
        (f"wss://api.xiaozhi.me/mcp/?token={TOKEN}", "other", "wss://api.xiaozhi.me", None, TOKEN),
    ],
)
def test_every_form_of_the_grammar_is_understood(
    url: str, kind: str, ws_base: str, key: str | None, token: str | None
) -> None:
    endpoint = parse_endpoint_url(url)
    assert (endpoint.kind, endpoint.ws_base, endpoint.key, endpoint.token) == (
        kind,
        ws_base,
        key,
        token,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h/", "must start with http://, https://, ws:// or wss://, not ftp://"),
        ("http://:80/", "has no host"),
        ("http://h:port/", "port is not a number"),
    ],
)
def test_urls_that_name_no_endpoint_say_why(url: str, message: str) -> None:
    with pytest.raises(UrlError, match=message):
        parse_endpoint_url(url)


def test_a_tool_bridge_gets_a_tool_url_from_any_form() -> None:
    tool = f"ws://h:1/mcp_endpoint/mcp/?token={TOKEN}"
    assert tool_side_url(tool) == (tool, None)
    hosted = f"wss://api.xiaozhi.me/mcp/?token={TOKEN}"
    assert tool_side_url(hosted) == (hosted, None)
    derived, note = tool_side_url(f"ws://h:1/mcp_endpoint/call/?token={TOKEN}")
    assert derived == "ws://h:1/mcp_endpoint/mcp/?token=1%2B08xP%2BMVKq5%2Fx%3D%3D"
    assert note is not None and "caller URL" in note
    minted, note = tool_side_url(f"http://h:1/mcp_endpoint/health?key={KEY}")
    assert minted.startswith("ws://h:1/mcp_endpoint/mcp/?token=")
    assert decrypt_agent_id(KEY, unquote(minted.split("token=")[1])) == "single_module"
    assert note is not None and "single_module" in note
    with pytest.raises(UrlError, match="has no token: give the tool URL"):
        tool_side_url("http://h:1")
    assert tool_side_url("ws://h:1/") == ("ws://h:1/", None)  # an endpoint without tokens


def test_connection_failures_are_one_line_saying_what_to_fix() -> None:
    url = "ws://h:1/mcp_endpoint/mcp/?token=t"
    refused = trio_websocket.HandshakeError()
    refused.__cause__ = OSError("all attempts to connect failed")
    refused.__cause__.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert describe_connect_failure(refused, url).startswith("nothing listens at h:1")
    banned = trio_websocket.ConnectionRejected(429, (), b"")
    assert "HTTP 429" in describe_connect_failure(banned, url)
    assert "wait" in describe_connect_failure(banned, url)
    plain = trio_websocket.ConnectionRejected(404, (), b"")
    assert "instead of a WebSocket upgrade" in describe_connect_failure(plain, url)
    for exc in (refused, banned, plain):
        assert "\n" not in describe_connect_failure(exc, url)
