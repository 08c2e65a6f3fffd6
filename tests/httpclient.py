"""A small MCP Streamable HTTP client for tests of the relay's HTTP front (httpx, under Trio).

It sends exactly what a test says, headers included, so that tests can break the protocol on
purpose; :func:`check_error` checks a refusal's status and JSON-RPC error body together.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import httpx

from .helpers import RunningRelay, open_tcp_from

#: The revision the client asks for (the newest the relay serves).
PROTOCOL: Final = "2025-11-25"
ACCEPT_BOTH: Final = "application/json, text/event-stream"
JSON: Final = "application/json"
SSE: Final = "text/event-stream"


def http_client(local_address: str | None = None) -> httpx.AsyncClient:
    """An httpx client that ignores the environment (no proxies), from ``local_address``
    (any 127/8 address: a client with an address of its own) when given."""
    transport = httpx.AsyncHTTPTransport(local_address=local_address, trust_env=False)
    return httpx.AsyncClient(transport=transport, trust_env=False, timeout=10)


def call_url(relay: RunningRelay, agent: str | None = None, *, token: str | None = None) -> str:
    """The Streamable HTTP endpoint: with ``agent``'s token (or ``token``) in the query, or
    with none when both are None."""
    base = f"{relay.http}/mcp_endpoint/call/"
    if token is None and agent is not None:
        token = relay.token(agent)
    return base if token is None else f"{base}?token={token}"


def initialize_message(rid: Any = 0, version: str = PROTOCOL) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "http-front-test", "version": "1.0"},
        },
    }


def call_message(rid: Any, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments or {}},
    }


@attrs.frozen
class SseEvent:
    id: str | None
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(text: str) -> list[SseEvent]:
    """The events of an SSE body (comments skipped; an event without data is kept, with
    ``data`` empty, as a priming event is)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        if fields:
            events.append(
                SseEvent(
                    id=fields["id"][-1] if "id" in fields else None,
                    event=fields["event"][-1] if "event" in fields else None,
                    data="\n".join(fields.get("data", [])),
                )
            )
    return events


def answer_of(response: httpx.Response) -> Any:
    """The JSON-RPC message a 200 answer to a request carries (JSON, or the last SSE event
    with data)."""
    assert response.status_code == 200, (response.status_code, response.text)
    kind = response.headers["content-type"].split(";")[0]
    if kind == JSON:
        return response.json()
    assert kind == SSE, kind
    events = [e for e in parse_sse(response.text) if e.data]
    assert events, response.text
    return events[-1].json()


def check_error(response: httpx.Response, status: int, code: int | None) -> dict[str, Any]:
    """Assert ``response`` is ``status`` with a JSON-RPC error ``code`` (id null) as its body,
    or no body when ``code`` is None; returns the error object."""
    assert response.status_code == status, (response.status_code, response.text)
    if code is None:
        assert response.content == b"", response.content
        return {}
    assert response.headers["content-type"] == JSON, response.headers
    body = response.json()
    assert body["jsonrpc"] == "2.0", body
    assert "id" in body and body["id"] is None, body
    assert "result" not in body, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]  # type: ignore[no-any-return]


class McpHttp:
    """A Streamable HTTP client of one URL on an ``httpx.AsyncClient`` (connections kept)."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url

    async def post(
        self,
        message: Any = None,
        *,
        session: str | None = None,
        accept: str | None = ACCEPT_BOTH,
        content_type: str | None = JSON,
        version: str | None = PROTOCOL,
        content: Any = None,
        headers: dict[str, str] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """POST ``message`` (or raw ``content``); ``session`` adds Mcp-Session-Id, ``version``
        MCP-Protocol-Version (with a session only, as the spec has clients do)."""
        sent: dict[str, str] = {}
        if accept is not None:
            sent["accept"] = accept
        if content_type is not None:
            sent["content-type"] = content_type
        if session is not None:
            sent["mcp-session-id"] = session
            if version is not None:
                sent["mcp-protocol-version"] = version
        sent.update(headers or {})
        body = json.dumps(message).encode() if content is None else content
        return await self.client.post(self.url, content=body, headers=sent, extensions=extensions)

    async def request(self, method: str, session: str | None, **headers: str) -> httpx.Response:
        """A GET or DELETE (``headers`` with ``_`` for ``-``)."""
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if session is not None:
            sent["mcp-session-id"] = session
            sent.setdefault("mcp-protocol-version", PROTOCOL)
        return await self.client.request(method, self.url, headers=sent)

    async def initialize(self, *, headers: dict[str, str] | None = None) -> str:
        """Open a session (initialize, then notifications/initialized); its id."""
        response = await self.post(initialize_message(), headers=headers)
        assert response.status_code == 200, (response.status_code, response.text)
        session = response.headers["mcp-session-id"]
        answer = answer_of(response)
        assert answer["id"] == 0 and answer["result"]["protocolVersion"] == PROTOCOL, answer
        done = await self.post(
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            session=session,
            headers=headers,
        )
        assert done.status_code == 202, (done.status_code, done.text)
        return session

    async def call(
        self,
        session: str,
        rid: Any,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        accept: str = ACCEPT_BOTH,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """``tools/call`` in ``session``: the response message."""
        response = await self.post(
            call_message(rid, name, arguments), session=session, accept=accept, headers=headers
        )
        return answer_of(response)


@asynccontextmanager
async def legacy_session(relay: RunningRelay, agent: str) -> AsyncIterator[str]:
    """An HTTP+SSE (2024-11-05) session of ``agent``, open while in the block: its
    ``session_id``. (A raw socket: httpx leaves its stream iterators to the garbage collector,
    a warning under Trio, when a stream is left before its end.)"""
    stream = await open_tcp_from("127.0.0.1", relay.port)
    async with stream:
        await stream.send_all(
            (
                f"GET /mcp_endpoint/sse/?token={relay.token(agent)} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{relay.port}\r\nAccept: {SSE}\r\n\r\n"
            ).encode()
        )
        data = b""
        while (found := re.search(rb"session_id=([A-Za-z0-9_-]+)\r?\n", data)) is None:
            chunk = await stream.receive_some(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data
        yield found.group(1).decode()
