"""What every MCP HTTP request is checked for, and the answer a failed check gets.

A handler that finds a request it cannot serve raises :class:`Refusal`; the front answers it
with the status and the JSON-RPC error (``id: null``) the MCP specification gives for it.
"""

from __future__ import annotations

from typing import Any, Final

from ..._frames import INVALID_REQUEST, MISSING, PARSE_ERROR, Frame, FrameError, error_frame
from ..._frames import parse_frame as _parse_frame
from ...core.catalog import SUPPORTED_PROTOCOL_VERSIONS
from .conn import Request

__all__ = [
    "UNSUPPORTED_PROTOCOL_VERSION",
    "Refusal",
    "accepts",
    "check_version",
    "parse_message",
]

#: The JSON-RPC error for an ``MCP-Protocol-Version`` the relay does not serve (MCP 2026-07-28
#: names it; earlier revisions only say 400).
UNSUPPORTED_PROTOCOL_VERSION: Final = -32022


class Refusal(Exception):
    """A request answered with an error; ``close``: and the connection ends after it."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        data: Any = MISSING,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_frame(None, code, message, data)
        self.headers = headers
        self.close = close


def accepts(request: Request) -> tuple[bool, bool]:
    """Whether the client accepts (``application/json``, ``text/event-stream``): media types
    or their wildcards, not refused with ``q=0``; no ``Accept`` at all accepts anything."""
    header = request.headers.get("accept", "")
    if not header.strip():
        return True, True
    ranges: dict[str, bool] = {}
    for part in header.lower().split(","):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        refused = any(
            p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in parameters
        )
        ranges[media] = ranges.get(media, False) or not refused

    def accepted(kind: str) -> bool:
        family = kind.split("/")[0] + "/*"
        return any(ranges.get(media, False) for media in (kind, family, "*/*"))

    return accepted("application/json"), accepted("text/event-stream")


def check_version(request: Request) -> None:
    """Refuse an ``MCP-Protocol-Version`` the relay does not serve (none: fine)."""
    version = request.headers.get("mcp-protocol-version")
    if version is not None and version not in SUPPORTED_PROTOCOL_VERSIONS:
        raise Refusal(
            400,
            UNSUPPORTED_PROTOCOL_VERSION,
            f"Bad Request: unsupported MCP-Protocol-Version {version}",
            {"supported": list(SUPPORTED_PROTOCOL_VERSIONS), "requested": version},
        )


def parse_message(request: Request) -> Frame:
    """The one JSON-RPC message a POST carries (415, 400 with -32700 or -32600 otherwise)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise Refusal(
            415, INVALID_REQUEST, "Unsupported Media Type: Content-Type must be application/json"
        )
    try:
        return _parse_frame(request.body)
    except FrameError as exc:
        raise Refusal(
            400,
            exc.code,
            "Parse error" if exc.code == PARSE_ERROR else "Invalid Request",
            {"details": exc.reason},
        ) from None
