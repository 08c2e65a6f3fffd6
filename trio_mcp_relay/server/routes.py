"""Plain HTTP on the relay's port: a small route table, CORS, the health and status endpoints.

Each route is a function of the request that answers it and returns; the connection is
closed afterwards (the endpoints are probes, not an API).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .. import __version__
from .._auth import key_matches
from .._config import RelayConfig
from .._frames import AUTHENTICATION_ERROR
from .._guard import FailureLimiter
from .._http import HttpRequest, respond
from .counts import ShellCounts
from .status import HEADERS as STATUS_HEADERS
from .status import StatusPage

__all__ = ["HttpRoutes", "credential", "too_many_failures"]

log = logging.getLogger("trio_mcp_relay.server")

_Headers = list[tuple[str, str]]
_Handler = Callable[[trio.abc.Stream, HttpRequest, _Headers, str], Awaitable[None]]


class HttpRoutes:
    """Answers the plain HTTP requests.

    Args:
        config: CORS settings.
        health_keys: the keys the health endpoint accepts (any of them).
        stats: the connection counts the health endpoint reports.
        limiter: the failed-authentication policy a wrong key is answered by.
        status: the status page (``/mcp_endpoint/status``, guarded by ``health_keys``).
        counts: where failed authentications are counted, if anywhere.
    """

    def __init__(
        self,
        config: RelayConfig,
        health_keys: Sequence[str],
        stats: Callable[[], dict[str, Any]],
        limiter: FailureLimiter,
        status: StatusPage | None = None,
        counts: ShellCounts | None = None,
    ) -> None:
        self.config = config
        self.health_keys = health_keys
        self._stats = stats
        self._limiter = limiter
        self._counts = counts
        self._routes: dict[str, _Handler] = {
            "/": self._root,
            "/mcp_endpoint": self._info,
            "/mcp_endpoint/": self._info,
            "/mcp_endpoint/health": self._health,
            "/mcp_endpoint/health/": self._health,
        }
        self._status_page = status
        if status is not None:
            self._routes["/mcp_endpoint/status"] = self._status
            self._routes["/mcp_endpoint/status/"] = self._status

    def add_route(self, path: str, handler: _Handler) -> None:
        """Answer ``path`` with ``handler(stream, request, cors_headers, client)``."""
        self._routes[path] = handler

    def cors_headers(self, request: HttpRequest) -> list[tuple[str, str]]:
        """The CORS headers for an answer to ``request`` (none when CORS is off)."""
        value = self.config.cors_origin(request.headers.get("origin"))
        if value is None:
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
        if key_matches(request.query.get("key", ""), self.health_keys):
            body: dict[str, Any] = {
                "jsonrpc": "2.0",
                "result": {"status": "success", "connections": self._stats()},
                "id": None,
            }
            await respond(stream, 200, body, headers=cors, head_only=head_only)
            return
        await self.refuse_key(stream, request, cors, client)

    async def _status(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        cors: list[tuple[str, str]],
        client: str,
    ) -> None:
        head_only = request.method == "HEAD"
        assert self._status_page is not None
        if not key_matches(credential(request), self.health_keys):
            await self.refuse_key(stream, request, cors, client)
            return
        payload, content_type = self._status_page.render(request)
        await respond(
            stream,
            200,
            payload,
            headers=[*STATUS_HEADERS, *cors],
            head_only=head_only,
            content_type=content_type,
        )

    async def refuse_key(
        self,
        stream: trio.abc.Stream,
        request: HttpRequest,
        cors: list[tuple[str, str]],
        client: str,
    ) -> None:
        """Answer a request whose key is missing or wrong: 403 after the failed-authentication
        delay, or 429 for an address that keeps failing."""
        head_only = request.method == "HEAD"
        if self._counts is not None:
            self._counts.auth_failed("admin_key")
        body = {
            "jsonrpc": "2.0",
            "error": {
                "code": AUTHENTICATION_ERROR,
                "message": "Authentication error",
                "data": {"details": "the key is missing or wrong"},
            },
            "id": None,
        }
        # A failed authentication: delayed, or 429 for an address that keeps failing.
        penalty = self._limiter.penalize(client, trio.current_time())
        if penalty.retry_after is not None:
            await too_many_failures(stream, client, penalty.retry_after)
            return
        try:
            await trio.sleep(penalty.delay)
            await respond(stream, 403, body, headers=cors, head_only=head_only)
        finally:
            self._limiter.release(client)


def credential(request: HttpRequest) -> str:
    """The key a request carries: ``?key=``, else ``Authorization: Bearer <key>``."""
    key = request.query.get("key", "")
    if key:
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


async def too_many_failures(stream: trio.abc.Stream, client: str, retry: float) -> None:
    """HTTP 429 for an address that keeps failing to authenticate (never for a request with
    a valid credential: see ``_guard.py``)."""
    log.info("%s: refused: too many failed authentications", client)
    seconds = math.ceil(retry)
    await respond(
        stream,
        429,
        {"error": "too many failed authentications", "retry_after": seconds},
        headers=[("retry-after", str(seconds))],
    )
