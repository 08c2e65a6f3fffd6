"""The ``trio-mcp-relay`` command.

``trio-mcp-relay serve`` loads the configuration (flags, environment, the reference's
``data/.mcp-endpoint-server.cfg``), starts the relay, and once it is listening prints the URLs
a user copies into the xiaozhi console and into tool configs, as the reference server does at
start-up. The banner goes to stdout with ``print``, never through logging, so log shipping never
carries the key.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn, Protocol, cast

import trio
import typer

from trio_mcp_relay import _cmd_client, _cmd_pipe, _cmd_tools
from trio_mcp_relay._auth import (
    Endpoint,
    TokenRole,
    endpoint_url,
    health_url,
    scoped_token,
    with_route,
)
from trio_mcp_relay._config import ConfigError, RelayConfig, load_config, local_ip
from trio_mcp_relay._logs import configured_logging

__all__ = ["app", "main"]

BANNER_AGENT = "single_module"
"""The agent whose tool URL the banner shows: the reference's single-module deployment."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})

app = typer.Typer(
    name="trio-mcp-relay",
    help="A Trio relay for the Xiaozhi MCP endpoint protocol "
    "(wire-compatible with xinnan-tech/mcp-endpoint-server).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


class _ServeRelay(Protocol):
    """The shape of ``trio_mcp_relay.server.serve_relay`` that the CLI relies on."""

    def __call__(
        self,
        config: RelayConfig,
        *,
        shutdown: trio.Event | None = ...,
        embedded_tools: Mapping[str, Callable[[Any], Awaitable[None]]] | None = ...,
        handle: Any = ...,
        task_status: trio.TaskStatus[int] = ...,
    ) -> Awaitable[Any]: ...


def _show_version(value: bool) -> None:
    if value:
        from trio_mcp_relay import __version__

        print(f"trio-mcp-relay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """A Trio relay for the Xiaozhi MCP endpoint protocol.

    Tools (MCP servers) dial /mcp_endpoint/mcp/?token=..., callers (MCP clients) dial
    /mcp_endpoint/call/?token=..., and the relay forwards JSON-RPC between them.
    """


def _url_host(config: RelayConfig) -> str:
    """The host to put in the printed URLs.

    The reference always prints its outward IP. That is right for a wildcard bind; for a
    specific address (say 127.0.0.1) only that address can be reached.
    """
    host = local_ip() if config.host in _WILDCARD_HOSTS else config.host
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def banner(config: RelayConfig, port: int) -> list[str]:
    """The start-up lines: where the relay listens and the URLs to copy.

    The URLs carry scoped tokens for the agent ``single_module``, without expiry, made with
    the first key: ``tool`` for the tool bridge (it cannot be used to call), ``caller`` for
    MCP clients, and ``xiaozhi`` for xiaozhi-server, which only accepts a ``/mcp/`` URL and
    dials ``/call/`` with the same token itself, so it gets the caller token in that form.
    ``mcp`` is the caller URL over HTTP, for MCP clients (Streamable HTTP).
    None of them contains ``key`` or ``call`` in its token. Each start mints new tokens;
    those printed before stay valid as long as their key is configured.

    Args:
        config: The loaded configuration (its key must be set).
        port: The port actually bound (differs from ``config.port`` when that is 0).

    Returns:
        The lines to print, without newlines.
    """
    if config.key is None:
        raise ValueError("the configuration has no key; load it with load_config()")
    address = f"{_url_host(config)}:{port}"
    base = f"ws://{address}"
    tool_token = scoped_token(config.key, BANNER_AGENT, TokenRole.TOOL)
    caller_token = scoped_token(config.key, BANNER_AGENT, TokenRole.CALLER)

    def url(base: str, endpoint: Endpoint, token: str) -> str:
        # In a cluster, the agent's routing hint, for a load balancer to hash on.
        minted = endpoint_url(base, endpoint, token)
        return with_route(minted, BANNER_AGENT) if config.cluster else minted

    return [
        f"trio-mcp-relay listening on {config.host}:{port}",
        f"health:  {health_url(f'http://{address}', config.key)}",
        f"tool:    {url(base, Endpoint.TOOL, tool_token)}",
        f"caller:  {url(base, Endpoint.CALLER, caller_token)}",
        f"xiaozhi: {url(base, Endpoint.TOOL, caller_token)}",
        f"mcp:     {url(f'http://{address}', Endpoint.CALLER, caller_token)}",
    ]


async def run_with_banner(
    config: RelayConfig,
    serve_relay: _ServeRelay,
    embedded_tools: Mapping[str, Callable[[Any], Awaitable[None]]] | None = None,
    reload_config: Callable[[], RelayConfig] | None = None,
) -> None:
    """Run ``serve_relay`` and print the banner once it is listening.

    The first SIGINT (Ctrl-C) or SIGTERM (``docker stop``) starts a graceful shutdown: stop
    accepting, give in-flight requests ``shutdown_grace`` seconds, close every peer with 1001.
    A second signal cuts the grace period short. With ``reload_config``, SIGHUP reloads the
    configuration: what it returns is handed to the relay (see ``server/reload.py``), and
    when it raises :class:`ConfigError` the error is logged and nothing changes.

    Args:
        config: The loaded configuration.
        serve_relay: The server entry point; it reports its port via ``task_status``.
        embedded_tools: For ``serve_relay``.
        reload_config: Loads the configuration again, from the sources it came from.
    """
    shutdown = trio.Event()
    log = logging.getLogger("trio_mcp_relay")
    hangup = getattr(signal, "SIGHUP", None) if reload_config is not None else None
    handle: Any = None
    extra: dict[str, Any] = {}
    if hangup is not None:
        from trio_mcp_relay.server import RelayHandle

        handle = extra["handle"] = RelayHandle()
    watched = [signal.SIGINT, signal.SIGTERM] + ([hangup] if hangup is not None else [])
    with trio.open_signal_receiver(*watched) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: trio.TaskStatus[int]) -> None:
                await serve_relay(
                    config,
                    shutdown=shutdown,
                    embedded_tools=embedded_tools,
                    task_status=task_status,
                    **extra,
                )
                nursery.cancel_scope.cancel()  # the graceful shutdown is complete

            port: int = await nursery.start(serve)
            for line in banner(config, port):
                print(line, flush=True)
            async for signum in signals:
                if signum == hangup:
                    assert reload_config is not None
                    _reload(handle, reload_config, log)
                    continue
                if shutdown.is_set():
                    log.warning("second signal: stopping now")
                    nursery.cancel_scope.cancel()
                    break
                log.info("%s: shutting down gracefully", signal.Signals(signum).name)
                shutdown.set()


def _reload(handle: Any, reload_config: Callable[[], RelayConfig], log: logging.Logger) -> None:
    """SIGHUP: load the configuration again and hand it to the running relay."""
    log.info("SIGHUP: reloading the configuration")
    try:
        loaded = reload_config()
    except ConfigError as exc:
        log.error("reload failed, nothing changed: %s", exc)
        return
    if handle.running:
        handle.reload(loaded)


def _embedded_tools(specs: list[str], app_dir: Path) -> dict[str, Callable[[Any], Awaitable[None]]]:
    """``--tools AGENT=module:Class,...`` values -> agent -> a plugin host's ``serve``."""
    from trio_mcp_relay._cmd_tools import use_app_dir
    from trio_mcp_relay.plugins import PluginHost, PluginLoadError, load_plugin

    if specs:
        use_app_dir(app_dir)

    embedded: dict[str, Callable[[Any], Awaitable[None]]] = {}
    for spec in specs:
        agent, sep, plugins = spec.partition("=")
        if not sep or not agent or not plugins:
            print(f"error: --tools {spec!r}: expected AGENT=module:Class", file=sys.stderr)
            raise typer.Exit(2)
        try:
            host = PluginHost([load_plugin(p.strip()) for p in plugins.split(",") if p.strip()])
        except (PluginLoadError, ValueError) as exc:
            print(f"error: --tools {spec!r}: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        if agent in embedded:
            print(f"error: --tools: agent {agent!r} given twice", file=sys.stderr)
            raise typer.Exit(2)
        embedded[agent] = host.serve
    return embedded


def _exit_on_os_error(group: BaseExceptionGroup[OSError], config: RelayConfig) -> NoReturn:
    for exc in group.exceptions:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"error: cannot serve on {config.host}:{config.port}: {detail}", file=sys.stderr)
    raise typer.Exit(1)


def _load_server() -> _ServeRelay:
    # Imported only when serving: the server pulls in the whole networking stack, which
    # --help and configuration errors do not need, and this module must import without it.
    module = importlib.import_module("trio_mcp_relay.server")
    return cast(_ServeRelay, module.serve_relay)


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on. Env: HOST. Default: 0.0.0.0."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="TCP port to listen on (0 picks a free one). Env: PORT. Default: 8004."),
    ] = None,
    key: Annotated[
        list[str] | None,
        typer.Option(
            help="Server key: signs and checks tokens, guards /mcp_endpoint/health. Repeat it "
            "(or separate keys with commas) to rotate: the first signs new tokens, tokens "
            "made with any listed key are accepted. Env: SERVER_KEY. Default: [server] key "
            "from the config file, or a new random key saved there.",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Reference-format INI file ([server] host, port, key, log_level; [security] "
            "allowed_origins, enable_cors; [logging] log_file, max_file_size, backup_count); "
            "it must exist. No env var. "
            "Default: <data dir>/.mcp-endpoint-server.cfg if it exists.",
            dir_okay=False,
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory holding .mcp-endpoint-server.cfg. Env: DATA_DIR. Default: data.",
            file_okay=False,
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(
            help="DEBUG, INFO, WARNING, ERROR or CRITICAL. Env: LOG_LEVEL. Default: INFO."
        ),
    ] = None,
    max_message_size: Annotated[
        int | None,
        typer.Option(
            help="Largest WebSocket message accepted, in bytes. No env var. "
            "Default: 16777216 (16 MiB, as the reference)."
        ),
    ] = None,
    handshake_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a new connection has to complete its handshake. No env var. Default: 10."
        ),
    ] = None,
    forward_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request may wait in a tool's queue before it gets -32002. "
            "No env var. Default: 10."
        ),
    ] = None,
    init_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds each step of a tool server's initialization by the relay may take "
            "(initialize, each page of tools/list...); a server that lets one pass is closed "
            "4003. No env var. Default: 10."
        ),
    ] = None,
    tool_request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a tool-initiated request waits for a caller to answer. No env var. "
            "Default: 30."
        ),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            help="Separate key for /mcp_endpoint/health, so the token key need not be shared "
            "with monitoring. Env: ADMIN_KEY. Default: the server key.",
            show_default=False,
        ),
    ] = None,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a caller request may wait for the tool before the relay answers "
            "-32006 and cancels it at the tool; 0 waits forever. Default: 0."
        ),
    ] = None,
    ping_interval: Annotated[
        float | None,
        typer.Option(help="Seconds between WebSocket pings to each peer; 0 is off. Default: 20."),
    ] = None,
    ping_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a peer has to answer a ping (else close 1011). Default: 20."),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(help="Open connections at most; more get HTTP 503. Default: 10000."),
    ] = None,
    max_callers_per_agent: Annotated[
        int | None,
        typer.Option(help="Callers per agent at most; more are closed (4002). Default: 100."),
    ] = None,
    max_inflight_per_caller: Annotated[
        int | None,
        typer.Option(help="Requests in flight per caller; more get -32007. Default: 100."),
    ] = None,
    max_tool_requests: Annotated[
        int | None,
        typer.Option(
            help="Tool-initiated requests awaiting callers, per agent; more get -32007. "
            "Default: 32."
        ),
    ] = None,
    outbox_size: Annotated[
        int | None,
        typer.Option(
            help="Frames queued per connection at most: a caller over it is closed (1013), a "
            "request to a tool over it gets -32002. Default: 256."
        ),
    ] = None,
    outbox_bytes: Annotated[
        int | None,
        typer.Option(
            help="Bytes queued per connection at most, with the same consequences. "
            "Default: 16777216 (16 MiB)."
        ),
    ] = None,
    max_queued_bytes: Annotated[
        int | None,
        typer.Option(
            help="Bytes queued across all connections at most, likewise. "
            "Default: 268435456 (256 MiB)."
        ),
    ] = None,
    max_pending_per_address: Annotated[
        int | None,
        typer.Option(
            help="Connections one address may hold before authenticating; more get HTTP 503. "
            "Default: 64."
        ),
    ] = None,
    session_idle_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds an HTTP session (Streamable HTTP or HTTP+SSE client) lives with no "
            "request and no open stream; its requests in flight are then cancelled at the "
            "tool. No env var. Default: 300."
        ),
    ] = None,
    slow_caller_grace: Annotated[
        float | None,
        typer.Option(
            help="Seconds a frame may wait in a caller's queue before the caller is closed "
            "(1013). Default: 10."
        ),
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(
            help="Seconds in-flight requests get on SIGINT/SIGTERM before the rest are "
            "answered -32003. Default: 10."
        ),
    ] = None,
    auth_failures: Annotated[
        int | None,
        typer.Option(
            help="Failed authentications per client address within --auth-window after "
            "which its failing requests get HTTP 429 at once for --auth-ban seconds (a valid "
            "token or key is never refused); 0 is off. Default: 10."
        ),
    ] = None,
    auth_window: Annotated[
        float | None, typer.Option(help="See --auth-failures, in seconds. Default: 60.")
    ] = None,
    auth_ban: Annotated[
        float | None, typer.Option(help="See --auth-failures, in seconds. Default: 60.")
    ] = None,
    auth_delay: Annotated[
        float | None,
        typer.Option(
            help="Longest delay, in seconds, before a failed authentication is answered "
            "(1008 or 403); none for a first failure, then doubling; 0 is off. Default: 10."
        ),
    ] = None,
    auth_concurrency: Annotated[
        int | None,
        typer.Option(
            help="Failed authentications per client address waiting out their delay at "
            "once; more get HTTP 429. Default: 4."
        ),
    ] = None,
    reference_tokens: Annotated[
        bool | None,
        typer.Option(
            "--reference-tokens/--no-reference-tokens",
            help="Accept the reference server's tokens (both endpoints, no expiry) besides "
            "scoped ones. Env: REFERENCE_TOKENS. Default: accepted.",
            show_default=False,
        ),
    ] = None,
    trusted_proxies: Annotated[
        list[str] | None,
        typer.Option(
            help="Reverse proxies (addresses or networks, comma-separated or repeated) whose "
            "Forwarded, X-Forwarded-For or X-Real-IP header gives the client address for "
            "limits and logs. Env: TRUSTED_PROXIES. Default: none.",
            show_default=False,
        ),
    ] = None,
    log_file: Annotated[
        str | None,
        typer.Option(
            help="Also write the log to this file, rotated by size; relative to the working "
            "directory. Env: LOG_FILE. Config: [logging] log_file. Default: none.",
            show_default=False,
        ),
    ] = None,
    max_file_size: Annotated[
        str | None,
        typer.Option(
            help="Size at which the log file is rotated: 10MB, 512KB, 100B or bytes. "
            "Env: LOG_MAX_FILE_SIZE. Config: [logging] max_file_size. Default: 10MB.",
            show_default=False,
        ),
    ] = None,
    backup_count: Annotated[
        int | None,
        typer.Option(
            help="Rotated log files kept (FILE.1 is the newest). Env: LOG_BACKUP_COUNT. "
            "Config: [logging] backup_count. Default: 5.",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(
            help="text, or json: one JSON object per line (time, level, logger, message and "
            "extras) for log shippers. Env: LOG_FORMAT. Config: [logging] log_format. "
            "Default: text.",
            show_default=False,
        ),
    ] = None,
    metrics_token: Annotated[
        str | None,
        typer.Option(
            help="A token that opens /metrics besides the admin key (?key= or Authorization: "
            "Bearer), for a Prometheus server. Env: METRICS_TOKEN. Default: none.",
            show_default=False,
        ),
    ] = None,
    metrics_agents: Annotated[
        list[str] | None,
        typer.Option(
            help="Agents that always get their own label in /metrics (comma-separated or "
            "repeated). Env: METRICS_AGENTS. Default: none.",
            show_default=False,
        ),
    ] = None,
    metrics_top_agents: Annotated[
        int | None,
        typer.Option(
            help="How many more agents, those with the most connections, get their own label "
            "in /metrics; the rest count as 'other'. Env: METRICS_TOP_AGENTS. Default: 10."
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="Run as one node of a cluster: redis://HOST:PORT/DB of the Redis every node "
            "shares (pip install 'trio-mcp-relay[cluster]'). Any node then serves any "
            "connection of any agent. Env: CLUSTER. Default: none (alone).",
            show_default=False,
        ),
    ] = None,
    cluster_lease: Annotated[
        float | None,
        typer.Option(
            help="Seconds a node's leases live without its heartbeat: a node that dies leaves "
            "the other nodes' catalogs, and its requests are answered -32003, within this. "
            "Env: CLUSTER_LEASE. Default: 10.",
        ),
    ] = None,
    cluster_node: Annotated[
        str | None,
        typer.Option(
            help="This node's name in the cluster. Env: CLUSTER_NODE. Default: host name, "
            "port and a random suffix.",
            show_default=False,
        ),
    ] = None,
    tools: Annotated[
        list[str] | None,
        typer.Option(
            "--tools",
            help="Serve Python tool plugins in-process for an agent, no socket hop: "
            "AGENT=module:Class[,module:Class...]. Repeatable. A tool connecting over the "
            "network for that agent takes over while it is connected. Example: --tools "
            "single_module=trio_mcp_relay.examples.calculator:Calculator",
            show_default=False,
        ),
    ] = None,
    app_dir: Annotated[
        Path,
        typer.Option(
            help="Directory put first on the import path for --tools, where your plugin "
            "modules are; the current directory if not given.",
            file_okay=False,
            show_default=False,
        ),
    ] = Path("."),
) -> None:
    """Run the relay until interrupted.

    Prints the health URL and scoped tool, caller and xiaozhi-server URLs (for agent
    single_module) once listening. Flags
    beat environment variables, which beat the config file, which beats the defaults.
    SIGHUP reads the config file again and applies what can change live (keys, [tools]
    filters, [limits], log level) without dropping a connection; the log says what changed
    and what needs a restart.
    """
    flags: dict[str, object | None] = {
        "host": host,
        "port": port,
        "key": key or None,
        "log_level": log_level,
        "max_message_size": max_message_size,
        "handshake_timeout": handshake_timeout,
        "forward_timeout": forward_timeout,
        "tool_request_timeout": tool_request_timeout,
        "init_timeout": init_timeout,
        "admin_key": admin_key,
        "request_timeout": request_timeout,
        "ping_interval": ping_interval,
        "ping_timeout": ping_timeout,
        "max_connections": max_connections,
        "max_callers_per_agent": max_callers_per_agent,
        "max_inflight_per_caller": max_inflight_per_caller,
        "max_tool_requests": max_tool_requests,
        "outbox_size": outbox_size,
        "outbox_bytes": outbox_bytes,
        "max_queued_bytes": max_queued_bytes,
        "max_pending_per_address": max_pending_per_address,
        "slow_caller_grace": slow_caller_grace,
        "session_idle_timeout": session_idle_timeout,
        "shutdown_grace": shutdown_grace,
        "auth_failures": auth_failures,
        "auth_window": auth_window,
        "auth_ban": auth_ban,
        "auth_delay": auth_delay,
        "auth_concurrency": auth_concurrency,
        "reference_tokens": reference_tokens,
        "trusted_proxies": ",".join(trusted_proxies) if trusted_proxies else None,
        "log_file": log_file,
        "max_file_size": max_file_size,
        "backup_count": backup_count,
        "log_format": log_format,
        "metrics_token": metrics_token,
        "metrics_agents": ",".join(metrics_agents) if metrics_agents else None,
        "metrics_top_agents": metrics_top_agents,
        "cluster": cluster,
        "cluster_lease": cluster_lease,
        "cluster_node": cluster_node,
    }
    environ = dict(os.environ)  # a reload reads the environment as it was at start

    def reload_config() -> RelayConfig:
        return load_config(
            flags=flags, environ=environ, config_file=config, data_dir=data_dir, generate_key=False
        )

    try:
        relay_config = load_config(
            flags=flags, environ=environ, config_file=config, data_dir=data_dir
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None

    embedded = _embedded_tools(tools or [], app_dir)
    serve_relay = _load_server()

    failed: BaseExceptionGroup[OSError] | None = None
    with contextlib.ExitStack() as logs:
        try:
            logs.enter_context(
                configured_logging(
                    level=relay_config.log_level,
                    log_format=relay_config.log_format,
                    log_file=relay_config.log_file,
                    max_file_size=relay_config.max_file_size,
                    backup_count=relay_config.backup_count,
                    secrets=(*relay_config.keys, relay_config.admin_key or ""),
                    text_format=LOG_FORMAT,
                )
            )
        except OSError as exc:
            detail = exc.strerror or exc
            print(f"error: log file {relay_config.log_file}: {detail}", file=sys.stderr)
            raise typer.Exit(2) from None
        try:
            trio.run(run_with_banner, relay_config, serve_relay, embedded, reload_config)
        except* KeyboardInterrupt:
            pass
        except* OSError as group:
            failed = group
    if failed is not None:
        _exit_on_os_error(failed, relay_config)


_cmd_client.register(app)
_cmd_tools.register(app)
_cmd_pipe.register(app)


def main() -> None:
    """Entry point of the ``trio-mcp-relay`` console script."""
    app()
