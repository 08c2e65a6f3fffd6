"""A Streamable HTTP MCP server from the official MCP Python SDK, for the pipe tests.

``python http_server.py PORT`` serves ``/mcp`` (Streamable HTTP) on 127.0.0.1:PORT with the
tools ``add(a, b)`` and ``echo(text)``; ``python http_server.py PORT sse`` serves the older
HTTP+SSE transport instead (``/sse``, posting to ``/messages/``). Requests without
``Authorization: Bearer kitchen`` get HTTP 401, so a test sees that the pipe sends the headers
of its config entry.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

try:
    from mcp.server import MCPServer
except ImportError:  # the SDK before 2.0
    from mcp.server.fastmcp import FastMCP as MCPServer

server = MCPServer("kitchen-http")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two numbers."""
    return str(a + b)


@server.tool()
def echo(text: str) -> str:
    """Say it back."""
    return text


app = server.sse_app() if sys.argv[2:] == ["sse"] else server.streamable_http_app()


async def guarded(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != (
        b"Bearer kitchen"
    ):
        await send({"type": "http.response.start", "status": 401, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})
        return
    await app(scope, receive, send)


if __name__ == "__main__":
    uvicorn.run(guarded, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
