"""Plain HTTP on the relay's port: a small route table, CORS, and the health endpoint.

Each route is a function of the request that answers it and returns; the connection is
closed afterwards (the endpoints are probes, not an API).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .. import __version__
from .._config import RelayConfig
from .._frames import AUTHENTICATION_ERROR
from .._http import HttpRequest, respond

__all__ = ["HttpRoutes"]

_Headers = list[tuple[str, str]]
_Handler = Callable[[trio.abc.Stream, HttpRequest, _Headers, str], Awaitable[None]]


class HttpRoutes:
    """Answers the plain HTTP requests.

    Args:
        config: CORS settings.
        admin_key: the key the health endpoint asks for.
        stats: the connection counts the health endpoint reports.
        on_auth_failure: called with the client's host when a wrong key is presented.
    """

    def __init__(
        self,
        config: RelayConfig,
        admin_key: str,
        stats: Callable[[], dict[str, Any]],
        on_auth_failure: Callable[[str], None],
    ) -> None:
        self.config = config
        self.admin_key = admin_key
        self._stats = stats
        self._on_auth_failure = on_auth_failure
        self._routes: dict[str, _Handler] = {
            "/": self._root,
            "/mcp_endpoint": self._info,
            "/mcp_endpoint/": self._info,
            "/mcp_endpoint/health": self._health,
            "/mcp_endpoint/health/": self._health,
        }

    def cors_headers(self, request: HttpRequest) -> list[tuple[str, str]]:
        """The CORS headers for an answer to ``request`` (none when CORS is off)."""
        if not self.config.enable_cors:
            return []
        origin = request.headers.get("origin")
        allowed = self.config.allowed_origins
        if "*" in allowed:
            value = "*"
        elif origin is not None and origin in allowed:
            value = origin
        else:
            return []
        return [
            ("access-control-allow-origin", value),
            ("access-control-allow-methods", "GET, OPTIONS"),
            ("access-control-allow-headers", "*"),
            ("vary", "Origin"),
        ]

    async def answer(self, stream: trio.abc.Stream, request: HttpRequest, client: str) -> None:
        """Answer one plain HTTP request from ``client`` (a host)."""
        cors = self.cors_headers(request)
        if request.method == "OPTIONS":
            await respond(stream, 204, headers=cors)
            return
        if request.method not in ("GET", "HEAD"):
            await respond(stream, 405, {"error": "method not allowed"}, headers=cors)
            return
        handler = self._routes.get(request.path)
        if handler is None:
            await respond(stream, 404, {"error": "not found", "path": request.path}, headers=cors)
        else:
            await handler(stream, request, cors, client)

    async def _root(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        cors: list[tuple[str, str]],
        client: str,
    ) -> None:
        await respond(stream, 307, headers=[("location", "/mcp_endpoint/"), *cors])

    async def _info(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        cors: list[tuple[str, str]],
        client: str,
    ) -> None:
        body = {
            "jsonrpc": "2.0",
            "result": {
                "message": "MCP Endpoint Server",
                "version": __version__,
                "status": "running",
            },
            "id": None,
        }
        await respond(stream, 200, body, headers=cors, head_only=request.method == "HEAD")

    async def _health(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        cors: list[tuple[str, str]],
        client: str,
    ) -> None:
        head_only = request.method == "HEAD"
        key = request.query.get("key", "")
        expected = self.admin_key
        if expected and hmac.compare_digest(key.encode(), expected.encode()):
            body: dict[str, Any] = {
                "jsonrpc": "2.0",
                "result": {"status": "success", "connections": self._stats()},
                "id": None,
            }
            await respond(stream, 200, body, headers=cors, head_only=head_only)
            return
        body = {
            "jsonrpc": "2.0",
            "error": {
                "code": AUTHENTICATION_ERROR,
                "message": "Authentication error",
                "data": {"details": "the key is missing or wrong"},
            },
            "id": None,
        }
        self._on_auth_failure(client)
        await respond(stream, 403, body, headers=cors, head_only=head_only)
