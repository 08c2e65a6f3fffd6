"""Small pieces of JSON-RPC the session and the caller front both write and read."""

from __future__ import annotations

from typing import Any, Final

from .._frames import MISSING, Id, dumps

__all__ = [
    "CANCELLED",
    "notification",
    "progress_token",
    "result_frame",
    "same_id",
    "with_progress_token",
]

CANCELLED: Final = "notifications/cancelled"


def same_id(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def notification(method: str, params: dict[str, Any] | None = None) -> bytes:
    frame: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        frame["params"] = params
    return dumps(frame)


def progress_token(params: Any) -> Any:
    if isinstance(params, dict):
        meta = params.get("_meta")
        if isinstance(meta, dict):
            return meta.get("progressToken", MISSING)
    return MISSING


def with_progress_token(params: dict[str, Any], token: Any) -> dict[str, Any]:
    return {**params, "_meta": {**params["_meta"], "progressToken": token}}


def result_frame(rid: Id, result: Any) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": rid, "result": result})
