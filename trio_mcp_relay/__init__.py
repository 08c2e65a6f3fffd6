"""trio-mcp-relay: a Trio MCP endpoint relay, wire-compatible with mcp-endpoint-server."""

from __future__ import annotations

__version__ = "0.1.0"
