"""``trio-mcp-relay pipe``: bridge stdio MCP servers to an MCP endpoint.

The command only gathers inputs, sets up logging and signals, and runs
:func:`trio_mcp_relay._pipe.run_pipe`; the pipe module is imported when the command runs, so
that the rest of the command line does not pay for it.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import trio
import typer

if TYPE_CHECKING:
    from ._pipe import PipeOptions, ServerSpec

__all__ = ["register"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

log = logging.getLogger("trio_mcp_relay.pipe")


async def _run_until_signalled(
    endpoint: str, servers: list[ServerSpec], options: PipeOptions
) -> None:
    """Run the pipe until SIGINT (Ctrl-C) or SIGTERM, then stop everything cleanly."""
    from ._pipe import run_pipe

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_pipe, endpoint, servers, options)
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def pipe(
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="The stdio MCP server to run, with its arguments (put -- before it). A lone "
            "script.py runs with the python on PATH (or --python). Without a command, the "
            "servers of the config file are run.",
            show_default=False,
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="WebSocket URL of the MCP endpoint, token included: "
            "ws://HOST:8004/mcp_endpoint/mcp/?token=... or wss://api.xiaozhi.me/mcp/?token=.... "
            "Env: MCP_ENDPOINT (also read from ./.env).",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help='mcp_pipe.py config file: {"mcpServers": {NAME: {"command": ..., "args": '
            '[...], "env": {...}, "disabled": false}}}, or for a remote server {"type": '
            '"http" (Streamable HTTP) or "sse", "url": ..., "headers": {...}}; one WebSocket '
            "per enabled server, with NAME as its server_id, so that the servers join one "
            "agent side by side. Env: MCP_CONFIG. Default: ./mcp_config.json.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Name of the command's server in logs and in front of its stderr lines. "
            "Default: the script's name.",
            show_default=False,
        ),
    ] = None,
    backoff_initial: Annotated[
        float,
        typer.Option(
            help="Seconds before the first reconnect, and before the first restart of a "
            "server that exited; each further wait doubles (with ±20% jitter).",
            min=0.001,
        ),
    ] = 1.0,
    backoff_max: Annotated[
        float,
        typer.Option(
            help="The longest wait between reconnects or restarts, in seconds.", min=0.001
        ),
    ] = 60.0,
    backoff_reset: Annotated[
        float,
        typer.Option(
            help="A connection (or server process) that stayed up this many seconds starts "
            "the backoff again from --backoff-initial.",
            min=0,
        ),
    ] = 30.0,
    ping_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between WebSocket pings; a ping not answered within as long "
            "drops the connection, which is then redialled. 0 turns pings off.",
            min=0,
        ),
    ] = 20.0,
    buffer_lines: Annotated[
        int,
        typer.Option(
            help="Server output lines kept while disconnected and sent after reconnecting; "
            "when full, the oldest are dropped with a warning.",
            min=1,
        ),
    ] = 1000,
    kill_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a server gets to exit after SIGTERM (on Ctrl-C or SIGTERM) before "
            "it is killed.",
            min=0,
        ),
    ] = 5.0,
    python: Annotated[
        str | None,
        typer.Option(
            help="The Python that runs a lone script.py. Default: python on PATH (the "
            "active environment, where the script's dependencies are).",
            show_default=False,
        ),
    ] = None,
    max_restarts: Annotated[
        int,
        typer.Option(
            help="Give up on a server that exits this many times in a row, each time within "
            "--backoff-reset seconds of starting (0: never).",
            min=0,
        ),
    ] = 5,
    log_level: Annotated[
        str,
        typer.Option(help="DEBUG, INFO, WARNING, ERROR or CRITICAL.", envvar="LOG_LEVEL"),
    ] = "INFO",
) -> None:
    """Bridge MCP servers to an MCP endpoint (a drop-in for mcp_pipe.py).

    Each server runs as a child process and gets its own WebSocket to the endpoint: every
    WebSocket message goes to the server's stdin as one line, every line of its stdout goes
    back as one message. Config entries of type http (Streamable HTTP) and sse are remote
    servers, bridged over HTTP with the entry's headers. The WebSocket is redialled with
    backoff when it drops, and the server keeps running meanwhile (its output is buffered); a
    server that exits is restarted (up to --max-restarts quick exits in a row).
    Each server's stderr is shown on ours, prefixed with [name]. Ctrl-C or SIGTERM closes
    the WebSockets (code 1000) and stops the servers.

    Each server of a config file dials the endpoint URL with &server_id=NAME added (its
    name in the file, 1 to 64 printable characters), so several servers on one token join
    the agent instead of replacing each other; the relay lists all their tools. The name is
    percent-encoded, and the first letter of "key" or "call" in it is written as its escape
    (keyboard: %6Beyboard; the relay decodes it back), because xiaozhi-server refuses an
    endpoint URL containing those words. A lone command sends no server_id (the relay names
    it by its serverInfo); a server_id already in the URL is kept for a single server, and
    refused for several (they would replace each other).

    \b
    Examples:
      trio-mcp-relay pipe --endpoint "wss://api.xiaozhi.me/mcp/?token=..." \\
          -- python calculator.py
      trio-mcp-relay pipe calculator.py   # with the python on PATH
      export MCP_ENDPOINT="ws://192.168.1.20:8004/mcp_endpoint/mcp/?token=..."
      trio-mcp-relay pipe               # the servers of ./mcp_config.json
    """
    from ._auth import RedactingFilter
    from ._pipe import PipeConfigError, PipeFailed, PipeOptions, prepare

    level = log_level.upper()
    if level not in LEVELS:
        typer.echo(
            f"error: --log-level must be one of {', '.join(LEVELS)}, not {log_level!r}",
            err=True,
        )
        raise typer.Exit(2)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    # httpx logs every request at INFO; the bridge logs what matters about remote servers.
    logging.getLogger("httpx").setLevel(max(logging.getLevelName(level), logging.WARNING))

    try:
        options = PipeOptions(
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            backoff_reset=backoff_reset,
            ping_interval=ping_interval,
            ping_timeout=ping_interval or 20.0,
            buffer_lines=buffer_lines,
            kill_timeout=kill_timeout,
            max_restarts=max_restarts,
        )
        url, servers = prepare(
            python=python,
            endpoint=endpoint,
            config=config,
            command=command or [],
            name=name,
            environ=os.environ,
            cwd=Path.cwd(),
        )
    except (PipeConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    log.info("bridging %s", ", ".join(spec.name for spec in servers))
    failed: PipeFailed | None = None
    try:
        trio.run(_run_until_signalled, url, servers, options)
    except* KeyboardInterrupt:  # a Ctrl-C before the signal handler was installed
        pass
    except* PipeFailed as group:
        failed = group.exceptions[0]  # type: ignore[assignment]
    if failed is not None:
        typer.echo(f"error: {failed}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the ``pipe`` command to ``app``.

    Everything after the first argument that is not an option belongs to the server command,
    so ``pipe python -u server.py --port 3`` passes ``-u`` and ``--port 3`` to the server;
    ``--`` makes that explicit.
    """
    app.command("pipe", context_settings={"allow_interspersed_args": False})(pipe)
