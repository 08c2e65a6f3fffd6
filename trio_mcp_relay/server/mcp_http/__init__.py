"""MCP over HTTP on the caller endpoint: Streamable HTTP (2025-03-26 and later) and the older
HTTP+SSE (2024-11-05), each session a caller of its agent.

Layers, bottom up: ``conn`` (HTTP/1.1 on h11: bodies, keep-alive, streamed answers),
``events`` (pure: a session's streams, routing, resumption, bounds), ``session`` (the caller
adapter the dispatcher runs), ``sessions`` (by id; open, run, expire, end), ``checks`` and
``sse`` (refusals; events on the wire), ``streamable`` and ``legacy`` (the two transports),
``front`` (a connection's requests, path, method, origin and token).
"""

from .front import PATHS, McpHttpFront

__all__ = ["PATHS", "McpHttpFront"]
