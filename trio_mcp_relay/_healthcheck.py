"""``python -m trio_mcp_relay._healthcheck``: exit 0 when the relay on this host answers.

The container's ``HEALTHCHECK`` (and anyone's probe) runs it. It asks the keyless info
endpoint, ``GET /mcp_endpoint/``, and wants ``{"result": {"status": "running"}}``. Not the
health endpoint: that one needs the server key, and a probe that sent a stale or missing key
every 30 seconds would be counted as failed authentications from 127.0.0.1 (delays, then 429
for every client behind that address; see ``_guard.py``). The info endpoint proves what a
probe can: the process accepts connections and its HTTP layer answers.

Where to knock is found the way ``trio-mcp-relay serve`` finds where to listen when it gets
no flags: ``HOST``/``PORT`` from the environment, else ``[server] host``/``port`` in
``<DATA_DIR>/.mcp-endpoint-server.cfg``, else 0.0.0.0:8004. A wildcard host means loopback.
So a user who changes the port in the reference's INI file keeps a healthy container. The
config file is only read, never written, and no key is read at all.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._config import CONFIG_FILE_NAME, ConfigError, _read_file

__all__ = ["main", "probe_url"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def probe_url(environ: Mapping[str, str]) -> str:
    """The URL of the info endpoint of the relay that ``serve`` would start with ``environ``.

    Raises:
        ConfigError: The config file exists but cannot be read.
    """
    path = Path(environ.get("DATA_DIR", "data")) / CONFIG_FILE_NAME
    from_file = _read_file(path) if path.is_file() else {}
    host = environ.get("HOST", from_file.get("host", "0.0.0.0")).strip()
    port = environ.get("PORT", from_file.get("port", "8004")).strip()
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/mcp_endpoint/"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Probe once; print one line saying why when unhealthy. Returns the exit status.

    Args:
        argv: ``[URL]`` to probe that URL instead of the one :func:`probe_url` finds.
        environ: The environment, usually ``os.environ``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        url = args[0] if args else probe_url(os.environ if environ is None else environ)
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    shown = url.split("?", 1)[0]  # a query could hold a key: it stays out of the output
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
        print(f"unhealthy: {shown}: {exc}", file=sys.stderr)
        return 1
    result = body.get("result") if isinstance(body, dict) else None
    status = result.get("status") if isinstance(result, dict) else None
    if status != "running":
        print(f"unhealthy: {shown}: status {status!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
