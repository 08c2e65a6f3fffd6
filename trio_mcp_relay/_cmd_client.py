"""Client-side commands: ``call``, ``check``, ``token``, ``url`` and ``fuzz``."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import trio
import typer

from ._auth import (
    Endpoint,
    TokenRole,
    caller_url,
    encrypt_token,
    endpoint_url,
    scoped_token,
    tool_url,
)
from ._config import ConfigError, RelayConfig, load_config, local_ip

__all__ = ["register"]

KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="Server key. Default: SERVER_KEY, else [server] key of the config file.",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", help="Reference-format INI file to read the key from.", dir_okay=False
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Directory of .mcp-endpoint-server.cfg. Default: data."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _key_config(key: str | None, config: Path | None, data_dir: Path | None) -> RelayConfig:
    """The configuration as ``serve`` would see it (so the same key), without generating one."""
    cfg_dir = data_dir or Path(os.environ.get("DATA_DIR", "data"))
    has_file = config is not None or (cfg_dir / ".mcp-endpoint-server.cfg").exists()
    if key is None and "SERVER_KEY" not in os.environ and not has_file:
        raise _fail("no key: pass --key, set SERVER_KEY, or point --config at the relay's file")
    try:
        return load_config(
            flags={"key": key}, environ=os.environ, config_file=config, data_dir=data_dir
        )
    except ConfigError as exc:
        raise _fail(str(exc)) from None


RoleOption = Annotated[
    str | None,
    typer.Option(
        "--role",
        help="Mint a scoped token that opens only this endpoint: tool, caller or both. "
        "Default: a reference-scheme token (both endpoints, never expires).",
        show_default=False,
    ),
]
ExpiresOption = Annotated[
    float | None,
    typer.Option(
        "--expires",
        help="With --role: the token stops working after this many seconds. "
        "Default: never expires.",
        show_default=False,
    ),
]
ServerIdOption = Annotated[
    str | None,
    typer.Option(
        "--server-id",
        help="With --role: bind the token to this tool server id. Default: none.",
        show_default=False,
    ),
]


def _mint(
    cfg: RelayConfig,
    agent_id: str,
    role: str | None,
    expires: float | None,
    server_id: str | None,
    md5: bool,
) -> str:
    """A scoped token when a role is given, else a reference token; usage errors exit 2."""
    assert cfg.key is not None
    if role is None:
        if expires is not None or server_id is not None:
            raise _fail("--expires and --server-id need --role (scoped tokens carry them)")
        return encrypt_token(cfg.key, agent_id, md5=md5)
    try:
        parsed = TokenRole.from_label(role)
    except ValueError as exc:
        raise _fail(f"--role: {exc}") from None
    if expires is not None and not expires > 0:
        raise _fail(f"--expires: {expires:g} is not a positive number of seconds")
    if server_id == "":
        raise _fail("--server-id: must not be empty")
    if md5:
        agent_id = hashlib.md5(agent_id.encode("utf-8")).hexdigest()
    return scoped_token(cfg.key, agent_id, parsed, expires_in=expires, server_id=server_id)


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def register(app: typer.Typer) -> None:
    """Add the client-side commands to ``app``."""
    app.command(name="token")(token_command)
    app.command(name="url")(url_command)
    app.command(name="check")(check_command)
    app.command(name="fuzz")(fuzz_command)
    app.add_typer(call_app, name="call")


# ------------------------------------------------------------------------- token / url


def token_command(
    agent_id: Annotated[str, typer.Argument(help="The agent id to put in the token.")],
    role: RoleOption = None,
    expires: ExpiresOption = None,
    server_id: ServerIdOption = None,
    md5: Annotated[
        bool, typer.Option("--md5", help="Put md5(agent id) in the token, as manager-api does.")
    ] = False,
    quoted: Annotated[
        bool, typer.Option("--quoted", help="URL-encode the token for a query string.")
    ] = False,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Mint a token for AGENT_ID with the configured key (the first one, if several).

    Without --role, a reference-scheme token (what manager-api makes); with --role, a scoped
    token. Neither contains "key" or "call", which xiaozhi-server refuses in URLs.

    Example: trio-mcp-relay token my-agent --role tool --expires 2592000 --key 0123...
    """
    cfg = _key_config(key, config, data_dir)
    minted = _mint(cfg, agent_id, role, expires, server_id, md5)
    print(quote(minted, safe="") if quoted else minted)


def url_command(
    agent_id: Annotated[str, typer.Argument(help="The agent id the URLs are for.")],
    host: Annotated[
        str | None,
        typer.Option(help="Host name in the URLs. Default: this machine's address."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port in the URLs. Default: as configured.")
    ] = None,
    secure: Annotated[
        bool, typer.Option("--secure", help="wss:// (behind a TLS proxy) instead of ws://.")
    ] = False,
    md5: Annotated[
        bool, typer.Option("--md5", help="Put md5(agent id) in the token, as manager-api does.")
    ] = False,
    role: RoleOption = None,
    expires: ExpiresOption = None,
    server_id: ServerIdOption = None,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print the URLs of AGENT_ID for the configured key.

    Without --role: the tool and caller URLs, with the same reference-scheme token. With
    --role tool: the tool URL; --role caller: the caller URL, and the xiaozhi URL to give
    xiaozhi-server (a /mcp/ URL with the caller token: it dials /call/ itself); --role both:
    tool and caller URLs with one token.

    Example: trio-mcp-relay url my-agent --role tool --host relay.example.com --port 443 --secure
    """
    cfg = _key_config(key, config, data_dir)
    assert cfg.key is not None
    base = f"{'wss' if secure else 'ws'}://{host or local_ip()}:{port or cfg.port}"
    if role is None:
        _mint(cfg, agent_id, role, expires, server_id, md5)  # the usage checks
        print(f"tool:    {tool_url(base, cfg.key, agent_id, md5=md5)}")
        print(f"caller:  {caller_url(base, cfg.key, agent_id, md5=md5)}")
        return
    token = _mint(cfg, agent_id, role, expires, server_id, md5)
    parsed = TokenRole.from_label(role)
    if parsed is not TokenRole.CALLER:
        print(f"tool:    {endpoint_url(base, Endpoint.TOOL, token)}")
    if parsed is not TokenRole.TOOL:
        print(f"caller:  {endpoint_url(base, Endpoint.CALLER, token)}")
    if parsed is TokenRole.CALLER:
        print(f"xiaozhi: {endpoint_url(base, Endpoint.TOOL, token)}")


# ------------------------------------------------------------------------- call

call_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
)


@call_app.callback()
def _call_root(
    ctx: typer.Context,
    url: Annotated[
        str,
        typer.Argument(help="Caller URL: ws://host:port/mcp_endpoint/call/?token=..."),
    ],
    timeout: Annotated[float, typer.Option(help="Seconds each request may take.")] = 30.0,
) -> None:
    """A caller client: list tools, call one, or send raw JSON-RPC (MCP handshake included).

    Options such as --timeout go before the URL. Example session:

    \b
        trio-mcp-relay call "ws://127.0.0.1:8004/mcp_endpoint/call/?token=..." tools
        trio-mcp-relay call "ws://...?token=..." call add --args '{"a": 1, "b": 2}'
        trio-mcp-relay call --timeout 5 "ws://...?token=..." request ping
    """
    if not url.startswith(("ws://", "wss://")):
        raise _fail(f"the URL must start with ws:// or wss://, got {url!r}")
    ctx.obj = (url, timeout)


def _run_caller(ctx: typer.Context, work: Any) -> Any:
    from trio_websocket import ConnectionClosed, HandshakeError

    from ._check import describe_error
    from .client import RpcError, open_caller

    url, timeout = ctx.obj

    async def main() -> Any:
        async with open_caller(url, timeout=timeout) as caller:
            return await work(caller)

    try:
        try:
            return trio.run(main)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
    except RpcError as exc:
        raise _fail(f"the server answered with error {exc}", 1) from None
    except (HandshakeError, OSError) as exc:
        raise _fail(f"cannot connect to {_safe(url)}: {describe_error(exc)}", 1) from None
    except ConnectionClosed as exc:
        reason = exc.reason
        detail = f"{reason.code} {reason.reason or ''}" if reason else "1006"
        raise _fail(f"the connection was closed: {detail}", 1) from None
    except trio.TooSlowError:
        raise _fail(f"no answer within {timeout:g} s", 1) from None


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The single exception inside nested one-member groups (else the group itself)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _safe(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@call_app.command("tools")
def call_tools(ctx: typer.Context) -> None:
    """List the agent's tools as a table."""
    tools: list[dict[str, Any]] = _run_caller(ctx, lambda caller: caller.list_tools())
    if not tools:
        print("(no tools)")
        return
    width = max(len(t.get("name", "")) for t in tools)
    for t in tools:
        schema = t.get("inputSchema") or {}
        params = ", ".join(schema.get("properties", {}))
        description = (t.get("description") or "").strip().splitlines()
        print(f"{t.get('name', ''):<{width}}  ({params})  {description[0] if description else ''}")


@call_app.command("call")
def call_tool(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The tool's name.")],
    args: Annotated[str, typer.Option("--args", help="Arguments as a JSON object.")] = "{}",
) -> None:
    """Call a tool and print its result."""
    try:
        arguments = json.loads(args)
    except ValueError as exc:
        raise _fail(f"--args is not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise _fail("--args must be a JSON object, e.g. '{\"a\": 1}'")
    result = _run_caller(ctx, lambda caller: caller.call_tool(name, arguments))
    texts = [c.get("text", "") for c in result.get("content", []) if c.get("type") == "text"]
    if texts and "structuredContent" not in result:
        print("\n".join(texts))
    else:
        print(_pretty(result.get("structuredContent", result)))
    if result.get("isError"):
        raise typer.Exit(1)


@call_app.command("request")
def call_request(
    ctx: typer.Context,
    method: Annotated[str, typer.Argument(help="JSON-RPC method, e.g. tools/list.")],
    params: Annotated[str | None, typer.Argument(help="Params as JSON.")] = None,
) -> None:
    """Send one raw JSON-RPC request and print its result."""
    try:
        parsed = None if params is None else json.loads(params)
    except ValueError as exc:
        raise _fail(f"PARAMS is not JSON: {exc}") from None
    print(_pretty(_run_caller(ctx, lambda caller: caller.request(method, parsed))))


# ------------------------------------------------------------------------- check


def check_command(
    url: Annotated[
        str | None,
        typer.Option(help="Base URL of the endpoint, e.g. http://127.0.0.1:8004 (or https://)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Host, when --url is not given.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port, when --url is not given.")] = 8004,
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds each step may take.")] = 10.0,
) -> None:
    """Check that an MCP endpoint works: health with the key, a tool and a caller connection,
    a forwarded round trip, the error for a missing tool, and a bad token refused.

    Prints a pass/fail table with a hint for each failure; exits 0 only if all pass. Works
    against trio-mcp-relay, the reference mcp-endpoint-server, and either behind a proxy.

    Example: trio-mcp-relay check --url http://127.0.0.1:8004 --key 0123...
    """
    from ._check import Endpoint, run_checks

    cfg = _key_config(key, config, data_dir)
    assert cfg.key is not None
    base = (url or f"http://{host}:{port}").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise _fail(f"--url must start with http:// or https://, got {base!r}")
    results = trio.run(run_checks, Endpoint(base, cfg.key, timeout))
    width = max(len(r.name) for r in results)
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'}  {r.name:<{width}}  {r.detail}")
        if not r.ok and r.hint:
            print(f"      {'':<{width}}  hint: {r.hint}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    if failed:
        raise typer.Exit(1)


# ------------------------------------------------------------------------- fuzz


def fuzz_command(
    url: Annotated[
        str, typer.Option(help="Base WebSocket URL of the endpoint, e.g. ws://127.0.0.1:8004.")
    ] = "ws://127.0.0.1:8004",
    key: KeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    examples: Annotated[int, typer.Option(help="How many scripts to try.")] = 100,
    seed: Annotated[int | None, typer.Option(help="Random seed, to repeat a run.")] = None,
    patience: Annotated[
        float, typer.Option(help="Seconds to wait for answers in each script.")
    ] = 2.0,
) -> None:
    """Fuzz a live endpoint with hypothesis and check the relay invariants.

    Each script connects a tool and up to four callers for a fresh agent and sends
    interleaved requests with colliding ids, invalid frames from both sides, tool
    notifications and out-of-order answers. Checked: the endpoint stays up, every
    well-formed request is answered exactly once with its own id, nothing reaches the wrong
    caller, invalid frames get -32700/-32600. On a failure, prints the minimal failing
    script found by shrinking; exits 1.

    Example: trio-mcp-relay fuzz --url ws://127.0.0.1:8004 --key 0123... --examples 200
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from .testing import Session, check_session, sessions

    cfg = _key_config(key, config, data_dir)
    assert cfg.key is not None
    if not url.startswith(("ws://", "wss://")):
        raise _fail(f"--url must start with ws:// or wss://, got {url!r}")
    base = url.rstrip("/")
    failures: list[tuple[Session, list[str]]] = []
    tried = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(sessions())
    def one(session: Session) -> None:
        nonlocal tried
        tried += 1
        agent = f"trio-mcp-relay-fuzz-{secrets.token_hex(6)}"
        tool, caller = tool_url(base, cfg.key or "", agent), caller_url(base, cfg.key or "", agent)
        problems = trio.run(lambda: check_session(tool, caller, session, patience=patience))
        if problems:
            failures.append((session, problems))
            raise AssertionError(problems[0])

    if seed is not None:
        one = hypothesis_seed(seed)(one)
    try:
        one()
    except AssertionError:
        session, problems = failures[-1]
        print(f"FAIL after {tried} scripts. Minimal failing script:", file=sys.stderr)
        print(f"  callers: {session.callers}", file=sys.stderr)
        for step in session.steps:
            print(f"  {step.who!s:>5} {step.kind:<8} {step.value!r:.100}", file=sys.stderr)
        print("Violations:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"{tried} scripts, 0 failed: every invariant held")
