"""The status page, ``/mcp_endpoint/status``: what the relay is doing, for people and scripts.

One snapshot of the router (agents, their servers and tool names, callers, requests in
flight), of the dispatcher's ring of recent errors and closes, and of the relay itself
(version, uptime), rendered as a small HTML page (no JavaScript; a meta refresh; CSS that
reads on a phone) or as JSON (``Accept: application/json`` or ``?format=json``).

Agent ids, server names, tool names and close reasons come from peers: every one of them is
HTML-escaped on the page, and the page forbids scripts altogether (its Content-Security-Policy
is ``default-src 'none'``), so a name that is markup shows as text.

The URLs to paste, per agent, carry the agent's *reference token* (``encrypt_token`` with the
signing key), the one manager-api hands out: it can be derived for any agent id, and it is
what the relay's default authenticator accepts. It is masked (its first characters, then
``…``) unless the request says ``reveal=1``. A relay that cannot derive it (an
``authenticator`` of the embedding application's, or reference tokens refused) shows
``<token>`` instead: mint one with ``trio-mcp-relay token``.
"""

from __future__ import annotations

import datetime
import html
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from .. import __version__
from .._auth import Endpoint, endpoint_url, redact
from .._frames import dumps
from .._http import HttpRequest
from .._routing import Router
from .recent import RecentErrors

__all__ = ["ERROR_WINDOW", "StatusPage"]

#: Seconds of recent errors and closes the page shows.
ERROR_WINDOW: Final = 600.0
#: Seconds between the page's own reloads (``?refresh=`` changes it; 0 turns it off).
DEFAULT_REFRESH: Final = 10
#: What stands for a token the relay cannot derive.
TOKEN_PLACEHOLDER: Final = "<token>"

HEADERS: Final = (
    ("cache-control", "no-store"),
    ("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


def _iso(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def wants_json(request: HttpRequest) -> bool:
    """``?format=json``, or an ``Accept`` header asking for JSON rather than HTML."""
    fmt = request.query.get("format")
    if fmt is not None:
        return fmt.lower() == "json"
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "text/html" not in accept


def _base_url(request: HttpRequest, fallback: str) -> str:
    """Where peers dial, as the person reading the page reached the relay: its ``Host``, and
    ``wss`` behind a proxy that says it terminated TLS. Only displayed, to a key holder."""
    host = request.headers.get("host") or fallback
    proto = request.headers.get("x-forwarded-proto", "").lower()
    forwarded = request.headers.get("forwarded", "").lower()
    secure = proto == "https" or "proto=https" in forwarded
    return f"{'wss' if secure else 'ws'}://{host}"


class StatusPage:
    """Builds the status snapshot and renders it.

    Args:
        router: the routing core (read through its read-only accessors).
        recent: the dispatcher's ring of recent errors and closes.
        token_for: the reference token of an agent, or None when the relay cannot derive
            tokens (then the URLs show a placeholder).
        fallback_host: ``host:port`` for URLs when a request has no ``Host`` header.
    """

    def __init__(
        self,
        router: Router,
        recent: RecentErrors,
        token_for: Callable[[str], str] | None,
        fallback_host: str,
    ) -> None:
        self.router = router
        self.recent = recent
        self.token_for = token_for
        self.fallback_host = fallback_host
        self.started = time.time()

    def snapshot(self, request: HttpRequest) -> dict[str, Any]:
        """The page's data (what ``?format=json`` answers)."""
        now, clock = time.time(), trio.current_time()
        offset = now - clock  # router times are on Trio's clock
        reveal = request.query.get("reveal") == "1"
        base = _base_url(request, self.fallback_host)
        agents = []
        for agent, row in sorted(self.router.agents().items()):
            servers = [
                {
                    "server": server["identity"],
                    "server_id": server["server_id"],
                    "ready": server["ready"],
                    "tools": len(server["tools"]),
                    "tool_names": server["tools"],
                    "connected_since": _iso(server["connected_at"] + offset),
                    "connected_seconds": round(clock - server["connected_at"], 1),
                }
                for server in row["servers"]
            ]
            agents.append(
                {
                    "agent": agent,
                    "callers": row["callers"],
                    "in_flight": row["in_flight"],
                    "tool_requests": row["tool_requests"],
                    "parked": row["parked"],
                    "servers": servers,
                    "urls": self._urls(base, agent, reveal),
                }
            )
        stats = self.router.stats()
        errors = [
            {
                "at": _iso(event.at),
                "agent": event.agent,
                "role": event.role,
                "kind": event.kind,
                "code": event.code,
                "reason": event.reason,
            }
            for event in self.recent.since(now - ERROR_WINDOW)
        ]
        return {
            "version": __version__,
            "generated_at": _iso(now),
            "started_at": _iso(self.started),
            "uptime_seconds": round(now - self.started, 1),
            "connections": {
                "tools": stats["tool_connections"],
                "callers": stats["robot_connections"],
                "total": stats["total_connections"],
            },
            "agent_count": len(agents),
            "in_flight": sum(a["in_flight"] + a["tool_requests"] + a["parked"] for a in agents),
            "tokens": "unavailable"
            if self.token_for is None
            else "revealed"
            if reveal
            else "masked",
            "agents": agents,
            "error_window_seconds": ERROR_WINDOW,
            "errors": errors,
        }

    def _urls(self, base: str, agent: str, reveal: bool) -> dict[str, str]:
        if self.token_for is None:
            token = TOKEN_PLACEHOLDER
            return {
                "tool": f"{base}/mcp_endpoint/mcp/?token={token}",
                "caller": f"{base}/mcp_endpoint/call/?token={token}",
            }
        token = self.token_for(agent)
        tool = endpoint_url(base, Endpoint.TOOL, token)
        caller = endpoint_url(base, Endpoint.CALLER, token)
        if not reveal:
            tool, caller = _mask(tool), _mask(caller)
        return {"tool": tool, "caller": caller}

    def render(self, request: HttpRequest) -> tuple[bytes, str]:
        """The answer's body and content type: JSON or HTML, as the request asks."""
        data = self.snapshot(request)
        if wants_json(request):
            return dumps(data), "application/json"
        return render_html(data, _refresh(request)).encode("utf-8"), "text/html; charset=utf-8"


def _mask(url: str) -> str:
    head, sep, token = url.partition("?token=")
    return f"{head}{sep}{redact(token)}"


def _refresh(request: HttpRequest) -> int:
    try:
        return max(0, min(3600, int(request.query.get("refresh", DEFAULT_REFRESH))))
    except ValueError:
        return DEFAULT_REFRESH


_CSS: Final = """
:root { color-scheme: light dark; --line: #8884; --dim: #888; --ok: #2a7; --bad: #d44; }
* { box-sizing: border-box; }
body { font: 15px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 12px; max-width: 1100px; }
h1 { font-size: 1.3em; margin: 0 0 4px; }
h2 { font-size: 1.1em; margin: 0 0 6px; overflow-wrap: anywhere; }
.meta { color: var(--dim); margin: 0 0 12px; }
.totals { display: flex; flex-wrap: wrap; gap: 8px; margin: 0 0 14px; padding: 0; }
.totals li { list-style: none; border: 1px solid var(--line); border-radius: 6px;
  padding: 4px 10px; }
.totals b { font-size: 1.2em; }
.agents { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr));
  gap: 12px; }
section { border: 1px solid var(--line); border-radius: 8px; padding: 10px; min-width: 0; }
.counts { color: var(--dim); margin: 0 0 6px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
td.name { overflow-wrap: anywhere; } td.wide { overflow-wrap: anywhere; width: 100%; }
td.what { white-space: nowrap; }
th { font-weight: 600; font-size: .9em; }
.tools { color: var(--dim); font-size: .85em; }
.ok { color: var(--ok); } .bad { color: var(--bad); }
code { font-size: .82em; overflow-wrap: anywhere; word-break: break-all; }
dl { margin: 8px 0 0; } dt { font-weight: 600; font-size: .85em; } dd { margin: 0 0 4px; }
.errors { margin-top: 16px; overflow-x: auto; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_html(data: dict[str, Any], refresh: int = DEFAULT_REFRESH) -> str:
    """The snapshot as a page; every string from it is escaped."""
    out: list[str] = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
    ]
    if refresh:
        out.append(f'<meta http-equiv="refresh" content="{refresh}">')
    conns = data["connections"]
    out += [
        "<title>trio-mcp-relay status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>trio-mcp-relay status</h1>",
        f'<p class="meta">version {_e(data["version"])} · up '
        f"{_e(_duration(data['uptime_seconds']))} (since {_e(data['started_at'])})</p>",
        '<ul class="totals">',
        f"<li><b>{data['agent_count']}</b> agents</li>",
        f"<li><b>{conns['tools']}</b> servers</li>",
        f"<li><b>{conns['callers']}</b> callers</li>",
        f"<li><b>{data['in_flight']}</b> in flight</li>",
        f"<li><b>{len(data['errors'])}</b> errors/closes "
        f"({int(data['error_window_seconds'] // 60)} min)</li>",
        "</ul>",
        '<div class="agents">',
    ]
    for agent in data["agents"]:
        out.append(_agent_html(agent))
    if not data["agents"]:
        out.append("<p>No agent is connected.</p>")
    out.append("</div>")
    out.append(_errors_html(data["errors"], data["error_window_seconds"]))
    if data["tokens"] == "masked":
        note = "Tokens are masked: add <code>&amp;reveal=1</code> to the address to show them."
    elif data["tokens"] == "unavailable":
        note = "This relay cannot derive tokens: mint one with <code>trio-mcp-relay token</code>."
    else:
        note = "Tokens are shown in full: do not share this page."
    out.append(f'<p class="meta">{note} Same data as JSON: <code>&amp;format=json</code>.</p>')
    out.append("</body></html>")
    return "\n".join(out)


def _agent_html(agent: dict[str, Any]) -> str:
    rows = []
    for server in agent["servers"]:
        name = server["server"] if server["server"] is not None else "(initializing)"
        if server["server_id"] is not None and server["server_id"] != server["server"]:
            name = f"{name} [{server['server_id']}]"
        ready = '<span class="ok">yes</span>' if server["ready"] else '<span class="bad">no</span>'
        tools = ", ".join(server["tool_names"])
        since, age = server["connected_since"], _duration(server["connected_seconds"])
        rows.append(
            f'<tr><td class="wide">{_e(name)}'
            + (f'<div class="tools">{_e(tools)}</div>' if tools else "")
            + f"</td><td>{ready}</td><td>{server['tools']}</td>"
            f'<td title="{_e(since)}">{_e(age)}</td></tr>'
        )
    table = (
        "<table><tr><th>Server</th><th>Ready</th><th>Tools</th><th>Up</th></tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else "<p>No server connected.</p>"
    )
    waiting = agent["tool_requests"] + agent["parked"]
    counts = (
        f"{agent['callers']} callers · {len(agent['servers'])} servers · "
        f"{agent['in_flight']} in flight" + (f" · {waiting} waiting" if waiting else "")
    )
    urls = agent["urls"]
    return (
        f"<section><h2>{_e(agent['agent'])}</h2>"
        f'<p class="counts">{counts}</p>{table}'
        f"<dl><dt>Tool URL</dt><dd><code>{_e(urls['tool'])}</code></dd>"
        f"<dt>Caller URL</dt><dd><code>{_e(urls['caller'])}</code></dd></dl></section>"
    )


def _errors_html(errors: list[dict[str, Any]], window: float) -> str:
    """The events grouped by what happened (agent, side, code, reason), latest first."""
    minutes = int(window // 60)
    if not errors:
        return (
            f'<div class="errors"><h2>Errors</h2><p>None in the last {minutes} minutes.</p></div>'
        )
    groups: dict[tuple[str, str, str, int, str], list[str]] = {}
    for e in errors:  # newest first, so each group's first time is its latest
        key = (e["agent"], e["role"], e["kind"], e["code"], e["reason"])
        groups.setdefault(key, []).append(e["at"])
    rows = "".join(
        f"<tr><td>{_e(times[0][11:19])}</td><td>{len(times)}</td>"
        f'<td class="name">{_e(agent)}</td><td class="what">{_e(role)} {_e(kind)}<br>{code}</td>'
        f'<td class="wide">{_e(reason)}</td></tr>'
        for (agent, role, kind, code, reason), times in groups.items()
    )
    return (
        f'<div class="errors"><h2>Errors and closes, last {minutes} minutes</h2>'
        "<table><tr><th>Last (UTC)</th><th>×</th><th>Agent</th><th>What</th><th>Reason</th></tr>"
        f"{rows}</table></div>"
    )
