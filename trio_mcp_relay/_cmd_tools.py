"""``trio-mcp-relay tools``: serve Python tool plugins to an MCP endpoint.

Plugins are named ``package.module:ClassName`` and loaded with
:func:`trio_mcp_relay.plugins.load_plugin`; the command then runs
:func:`trio_mcp_relay.plugins.run_tools` until interrupted. Everything the user can get
wrong before connecting (no endpoint, a URL that is not ws://, a plugin that does not load,
two tools with one name) exits with status 2 and one line saying what; an endpoint that
refuses the token exits with status 1. SIGINT (Ctrl-C) and SIGTERM exit 0.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import trio
import trio_websocket
import typer

from trio_mcp_relay._auth import RedactingFilter
from trio_mcp_relay._endpoint import describe_connect_failure, tool_side_url
from trio_mcp_relay._pipe import check_server_id, url_server_id
from trio_mcp_relay.plugins import (
    EndpointRefused,
    Plugin,
    PluginHost,
    PluginLoadError,
    _check_endpoint_url,
    load_plugin,
    run_tools,
)

__all__ = ["register"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_HELP = """Serve Python tool plugins to an MCP endpoint.

Connects to the endpoint's tool URL as an MCP server and serves the tools of every
plugin given as MODULE:CLASS (a subclass of trio_mcp_relay.plugins.Plugin, created with
no arguments). When the connection drops it reconnects, waiting 0.5 s doubling up to
30 s between attempts. A bad token (close code 1008) or another tool connection of the same server
identity replacing this one (4001) ends the command with status 1.

Several plugin sets on one token: each --set ID=MODULE:CLASS[,MODULE:CLASS...]
is served on a connection of its own with server_id=ID, so the sets join the
agent side by side (the relay lists the tools of all of them; a tool name
another set already has is listed as ID_name). The MODULE:CLASS arguments, if
any, are one more set, which uses the URL's server_id if it has one (else the
relay names it by its serverInfo, trio-mcp-relay-tools). Two sets (or two
commands) with one server_id replace each other. ID is 1 to 64 printable
characters; in the URL it is percent-encoded, with the first letter of "key"
or "call" escaped (xiaozhi-server refuses URLs containing those words).

\b
Example, serving the bundled calculator and world clock:
  export MCP_ENDPOINT='ws://127.0.0.1:8004/mcp_endpoint/mcp/?token=...'
  trio-mcp-relay tools trio_mcp_relay.examples.calculator:Calculator \\
      trio_mcp_relay.examples.clock:Clock

\b
Your own plugin in ./my_tools.py (the current directory is importable):
  trio-mcp-relay tools --endpoint "$URL" my_tools:MyTools

\b
Two sets on one token, as servers "math" and "time":
  trio-mcp-relay tools --set math=trio_mcp_relay.examples.calculator:Calculator \\
      --set time=trio_mcp_relay.examples.clock:Clock
"""


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def use_app_dir(app_dir: Path) -> None:
    """Put ``app_dir`` first on the import path, as app servers (uvicorn, gunicorn) do.

    A console script's ``sys.path`` starts at its own directory, not the user's, so without
    this ``my_tools:MyTools`` would not find ``./my_tools.py``.
    """
    path = str(app_dir.resolve())
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)


def _load_all(specs: list[str], app_dir: Path) -> list[Plugin]:
    use_app_dir(app_dir)
    plugins: list[Plugin] = []
    for spec in specs:
        try:
            plugins.append(load_plugin(spec))
        except PluginLoadError as exc:
            _fail(str(exc))
    return plugins


def _parse_sets(given: list[str]) -> list[tuple[str, list[str]]]:
    """``--set ID=MODULE:CLASS[,MODULE:CLASS...]`` values as (ID, specs), checked."""
    sets: list[tuple[str, list[str]]] = []
    for value in given:
        server_id, sep, rest = value.partition("=")
        specs = [spec.strip() for spec in rest.split(",") if spec.strip()]
        if not sep or not server_id or not specs:
            _fail(f"--set {value!r}: expected ID=MODULE:CLASS[,MODULE:CLASS...]")
        try:
            check_server_id(server_id, f"--set {value!r}: ID")
        except ValueError as exc:
            _fail(str(exc))
        if server_id in [seen for seen, _ in sets]:
            _fail(f"--set: the ID {server_id!r} is given twice (the sets would replace each other)")
        sets.append((server_id, specs))
    return sets


#: One connection to make: its server_id (None: the URL's, or none) and its plugins.
PluginSet = tuple[str | None, list[Plugin]]


async def _run_until_signalled(
    url: str, sets: list[PluginSet], reconnect: bool, page_size: int
) -> None:
    """Run every set until all have ended, or until SIGINT / SIGTERM (then return normally).

    A set that fails (a refused token, or a connection that cannot be made without
    --reconnect) ends them all."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = len(sets)

            async def serve(server_id: str | None, plugins: list[Plugin]) -> None:
                nonlocal running
                await run_tools(
                    url, plugins, reconnect=reconnect, page_size=page_size, server_id=server_id
                )
                running -= 1
                if not running:
                    nursery.cancel_scope.cancel()

            for server_id, plugins in sets:
                nursery.start_soon(serve, server_id, plugins)
            async for signum in signals:
                logging.getLogger("trio_mcp_relay").info(
                    "%s: stopping", signal.Signals(signum).name
                )
                nursery.cancel_scope.cancel()
                break


def tools(
    specs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="MODULE:CLASS",
            help="Plugins to serve on one connection, e.g. "
            "trio_mcp_relay.examples.calculator:Calculator (optional with --set).",
            show_default=False,
        ),
    ] = None,
    plugin_sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="ID=MODULE:CLASS[,...]",
            help="A plugin set served on a connection of its own with server_id=ID, beside "
            "the other sets on the same token; repeat for several sets.",
            show_default=False,
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            envvar="MCP_ENDPOINT",
            show_envvar=False,
            help="The endpoint's tool URL, ws://HOST:PORT/mcp_endpoint/mcp/?token=TOKEN "
            "(wss:// for TLS); a caller URL or the health URL is turned into one. "
            "Env: MCP_ENDPOINT, which keeps the token out of the process list.",
            show_default=False,
        ),
    ] = None,
    reconnect: Annotated[
        bool,
        typer.Option(
            "--reconnect/--no-reconnect",
            help="Reconnect when the connection drops; with --no-reconnect, exit when it "
            "ends (status 1 if it cannot be made).",
        ),
    ] = True,
    page_size: Annotated[int, typer.Option(min=1, help="Tools per tools/list page.")] = 50,
    app_dir: Annotated[
        Path,
        typer.Option(
            help="Directory put first on the import path, where your plugin modules are.",
            file_okay=False,
        ),
    ] = Path("."),
    log_level: Annotated[
        str,
        typer.Option(
            help="DEBUG, INFO, WARNING, ERROR or CRITICAL. Env: LOG_LEVEL.",
            envvar="LOG_LEVEL",
            show_envvar=False,
        ),
    ] = "INFO",
) -> None:
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        _fail(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {log_level!r}")
    sets_given = _parse_sets(plugin_sets or [])
    if not specs and not sets_given:
        _fail("no plugins: give MODULE:CLASS arguments, or --set ID=MODULE:CLASS")
    if not endpoint:
        _fail("no endpoint: pass --endpoint URL or set MCP_ENDPOINT")
    try:
        endpoint, note = tool_side_url(endpoint)
        _check_endpoint_url(endpoint)
    except ValueError as exc:
        _fail(str(exc))
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    sets: list[PluginSet] = []
    if specs:
        sets.append((None, _load_all(specs, app_dir)))
    for set_id, named in sets_given:
        if set_id == url_server_id(endpoint) and specs:
            _fail(f"--set {set_id}: the URL's server_id is already the MODULE:CLASS set's")
        sets.append((set_id, _load_all(named, app_dir)))
    for server_id, plugins in sets:
        try:
            PluginHost(plugins, page_size=page_size)  # tool-name clashes, before connecting
        except ValueError as exc:
            _fail(str(exc) if server_id is None else f"--set {server_id}: {exc}")

    logging.basicConfig(level=level, format=_LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())

    refused: EndpointRefused | None = None
    failed: BaseException | None = None
    try:
        trio.run(_run_until_signalled, endpoint, sets, reconnect, page_size)
    except* KeyboardInterrupt:
        pass  # Ctrl-C before the signal receiver was in place
    except* EndpointRefused as group:
        refused = group.exceptions[0]  # type: ignore[assignment]
    except* (trio_websocket.HandshakeError, OSError) as group:
        failed = group.exceptions[0]
    if refused is not None:
        _fail(str(refused), 1)
    if failed is not None:
        _fail(describe_connect_failure(failed, endpoint), 1)


def register(app: typer.Typer) -> None:
    """Add the ``tools`` command to ``app``."""
    app.command("tools", help=_HELP, no_args_is_help=True)(tools)
