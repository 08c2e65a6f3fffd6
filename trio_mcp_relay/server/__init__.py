"""The Trio shell around the routing core: sockets, peers, timeouts, HTTP.

Where each piece lives:

* :mod:`.serve`: ``serve_relay``, listeners, the accept loop, one task per connection.
* :mod:`.handshake`: the WebSocket opening handshake, authentication, per-address admission.
* :mod:`.dispatch`: carries out the router's actions on peers; what a full queue means.
* :mod:`.peer`: one connection's outbox, writer, fast path and close state.
* :mod:`.outbox`: the bounded (frames and bytes) queue a peer's writer drains.
* :mod:`.lifecycle`: deadline timer, keepalive, embedded tools, shutdown.
* :mod:`.routes`: the plain HTTP endpoints (info, health, status) and CORS.
* :mod:`.status`: the status page (HTML and JSON); :mod:`.recent`: its ring of recent errors.
* :mod:`.reload`: reloading the configuration of a running relay (``SIGHUP``).
"""

from __future__ import annotations

from .lifecycle import EmbeddedTool
from .reload import RelayHandle, ReloadReport
from .serve import serve_relay

__all__ = ["EmbeddedTool", "RelayHandle", "ReloadReport", "serve_relay"]
