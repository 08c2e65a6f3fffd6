"""A small stdio MCP server built on the official MCP SDK, for tests/test_real_clients.py.

Not vendored: written for this project (MIT, as the rest of it). Run as
``python mcp_server.py NAME``: an ``MCPServer`` (the SDK 2.x name of FastMCP) whose
``serverInfo.name`` is NAME and whose tools are all prefixed with NAME, so that two of them
under one agent have different identities and no colliding tool names:

* ``NAME_add(a, b)``: the sum, as text.
* ``NAME_whoami()``: ``NAME pid=<pid>``.
* ``NAME_count(n)``: reports progress 1..n of n (when the caller asked for progress), then
  answers ``counted n``.
* ``NAME_wait_for(path)``: creates ``path.started`` at once, then answers, with the text of
  ``path``, once that file exists (a request a test knows is in flight, and keeps there for
  as long as it wants).
"""

from __future__ import annotations

import os
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer

NAME = sys.argv[1] if len(sys.argv) > 1 else "sdk-server"

server = MCPServer(NAME)


@server.tool(name=f"{NAME}_add", description=f"Add two integers ({NAME}).")
def add(a: int, b: int) -> str:
    return str(a + b)


@server.tool(name=f"{NAME}_whoami", description=f"Which server answers ({NAME}).")
def whoami() -> str:
    return f"{NAME} pid={os.getpid()}"


@server.tool(name=f"{NAME}_count", description="Report progress n times, then answer.")
async def count(n: int, ctx: Context) -> str:
    for step in range(1, n + 1):
        await ctx.report_progress(step, n, f"step {step}")
    return f"counted {n}"


@server.tool(name=f"{NAME}_wait_for", description="Answer once the file at path exists.")
async def wait_for(path: str) -> str:
    target = anyio.Path(path)
    await anyio.Path(f"{path}.started").write_text("")  # the request reached the server
    # Another process creates the file: there is no event to wait on, so poll.
    while not await target.exists():  # noqa: ASYNC110
        await anyio.sleep(0.02)
    return await target.read_text()


if __name__ == "__main__":
    server.run(transport="stdio")
