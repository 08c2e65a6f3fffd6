"""MCP over HTTP on the caller endpoint: Streamable HTTP (2025-03-26 and later) and the older
HTTP+SSE (2024-11-05), each session a caller of its agent.

``conn`` is HTTP/1.1 on h11, ``events`` the pure stream and resumption bookkeeping, ``session``
the caller adapter the dispatcher runs, ``store`` the sessions by id, ``front`` the handlers.
"""

from .front import PATHS, McpHttpFront

__all__ = ["PATHS", "McpHttpFront"]
