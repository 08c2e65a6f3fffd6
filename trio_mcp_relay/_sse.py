"""A ``text/event-stream`` parser, for the HTTP clients (``_remote`` and ``client``)."""

from __future__ import annotations

import attrs

__all__ = ["SseParser"]


@attrs.define
class SseParser:
    """``text/event-stream`` lines in, ``(event, data)`` out (the WHATWG rules that matter).

    Feed it each line without its line ending (as ``httpx``'s ``aiter_lines`` gives them); an
    empty line ends an event, which :meth:`feed` then returns. Comments and events with no
    ``data`` (an SSE priming event carries only an ``id``) give nothing; ``data`` may be
    ``""``, which callers skip.
    """

    event: str = ""
    data: list[str] = attrs.Factory(list)

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            out = (self.event or "message", "\n".join(self.data)) if self.data else None
            self.event, self.data = "", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None
