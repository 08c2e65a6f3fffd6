"""Middleware: code of an embedding application that sees every caller request and its answer.

A middleware is an object with two methods, both optional (subclass :class:`Middleware` and
override what you need). The session calls them synchronously, in the order the middleware
was given for requests and in the reverse order for answers:

``request(call)``
    A caller request, before it is answered or forwarded. ``call`` says who asks
    (:attr:`Call.agent`, :attr:`Call.caller`), what (:attr:`Call.method`,
    :attr:`Call.params`) and where it goes (:attr:`Call.server`: the identity of the server
    it is routed to, or None when the relay answers it itself: ``initialize``, the lists,
    ``ping``). Return to pass it; assign ``call.params`` to rewrite it (the relay routes the
    rewritten request); raise :class:`Refused` to answer it with that JSON-RPC error instead.
``answer(call, reply)``
    The answer to that request, before it reaches the caller: ``reply.result`` or
    ``reply.error``. Assign either to rewrite it, or raise :class:`Refused` to replace it
    with an error.

Any other exception a middleware raises is logged and answered ``-32603`` (internal error)
for that request only; the relay goes on. Middleware must not block: it runs inside the
routing core, between two frames.

Example: an audit log and a per-agent tool authorization (the README's example; it is also a
test, ``tests/test_middleware.py``)::

    class OnlyCalculator(Middleware):
        def request(self, call: Call) -> None:
            if call.method == "tools/call" and call.agent == "kiosk":
                if call.params.get("name") not in {"add", "multiply"}:
                    raise Refused(-32602, "Unknown tool: " + str(call.params.get("name")))

        def answer(self, call: Call, reply: Reply) -> None:
            if call.method == "tools/list" and call.agent == "kiosk" and reply.result:
                tools = reply.result["tools"]
                reply.result = {**reply.result,
                                "tools": [t for t in tools if t["name"] in {"add", "multiply"}]}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import attrs

from .._frames import INTERNAL_ERROR, MISSING, Id

__all__ = ["Call", "Middleware", "Refused", "Reply", "run_answer_hooks", "run_request_hooks"]

log = logging.getLogger("trio_mcp_relay.routing")

_FAILED: Final = {"code": INTERNAL_ERROR, "message": "Internal error", "data": "middleware failed"}


@attrs.define(slots=True, eq=False)
class Call:
    """One caller request, as middleware sees it.

    Attributes:
        agent: the agent (the id inside the token).
        caller: the caller's connection number (stable while it is connected).
        id: the request id the caller chose.
        method: the JSON-RPC method.
        params: the params (MISSING when the request had none); a middleware may replace it.
        server: the identity of the server the request is routed to; None when the relay
            answers it itself (``initialize``, ``*/list``, ``ping``, ``logging/setLevel``) or
            refuses it before routing.
    """

    agent: str
    caller: int
    id: Id
    method: str
    params: Any
    server: str | None = None


@attrs.define(slots=True, eq=False)
class Reply:
    """The answer to a :class:`Call`: exactly one of ``result`` and ``error`` is set.

    Attributes:
        result: the result (MISSING for an error).
        error: the error object (``{"code": ..., "message": ..., "data"?: ...}``) or None.
    """

    result: Any = MISSING
    error: dict[str, Any] | None = None


class Refused(Exception):
    """Raised by a middleware to answer a request with a JSON-RPC error.

    Args:
        code: the JSON-RPC error code, e.g. ``-32602``.
        message: the error message.
        data: optional error data.
    """

    def __init__(self, code: int, message: str, data: Any = MISSING) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not MISSING:
            error["data"] = self.data
        return error


class Middleware:
    """Base class: both hooks pass everything through. Override one or both."""

    def request(self, call: Call) -> None:
        """See the module docstring."""

    def answer(self, call: Call, reply: Reply) -> None:
        """See the module docstring."""


def run_request_hooks(middleware: Sequence[Middleware], call: Call) -> dict[str, Any] | None:
    """Run each ``request`` hook in order; the error to answer with when one refused (or
    raised: ``-32603``), else None."""
    for each in middleware:
        try:
            each.request(call)
        except Refused as refusal:
            return refusal.to_error()
        except Exception:
            log.exception("agent %s: middleware %r failed on %s", call.agent, each, call.method)
            return dict(_FAILED)
    return None


def run_answer_hooks(middleware: Sequence[Middleware], call: Call, reply: Reply) -> None:
    """Run each ``answer`` hook in reverse order on ``reply`` (a hook that raises turns it
    into its error, or ``-32603``)."""
    for each in reversed(middleware):
        try:
            each.answer(call, reply)
        except Refused as refusal:
            reply.result, reply.error = MISSING, refusal.to_error()
        except Exception:
            log.exception(
                "agent %s: middleware %r failed on the answer to %s", call.agent, each, call.method
            )
            reply.result, reply.error = MISSING, dict(_FAILED)
