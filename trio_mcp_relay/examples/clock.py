"""A world clock: the time in any IANA timezone, conversions, and zone-name lookup.

Timezone data comes from :mod:`zoneinfo` (the system's database, or the ``tzdata`` package
where the system has none, as on Windows).
"""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from trio_mcp_relay.plugins import Plugin, ToolError, tool

__all__ = ["Clock", "UnknownTimezone", "find_timezones", "get_zone"]

Zone = Annotated[str, "IANA timezone name, e.g. 'Asia/Shanghai', 'Europe/Paris' or 'UTC'"]


class UnknownTimezone(ToolError):
    """The timezone name is not in the IANA database."""


@functools.cache
def _all_zones() -> tuple[str, ...]:
    return tuple(sorted(zoneinfo.available_timezones()))


def _normalize(text: str) -> str:
    return text.strip().replace(" ", "_").casefold()


def find_timezones(query: str, limit: int = 10) -> list[str]:
    """Zone names containing ``query`` (case-insensitive, spaces match ``_``), best first.

    Names whose last part (the city) starts with the query come first.
    """
    wanted = _normalize(query)
    matches = [name for name in _all_zones() if wanted in name.casefold()]
    matches.sort(key=lambda name: (not name.casefold().rsplit("/", 1)[-1].startswith(wanted), name))
    return matches[:limit]


def get_zone(name: str) -> zoneinfo.ZoneInfo:
    """The zone called ``name``; a case or space slip ("asia/shanghai") is forgiven.

    Raises:
        UnknownTimezone: no such zone (the message suggests close names).
    """
    candidates = [name.strip()]
    by_folded = {zone.casefold(): zone for zone in _all_zones()}
    if _normalize(name) in by_folded:
        candidates.append(by_folded[_normalize(name)])
    for candidate in candidates:
        try:
            return zoneinfo.ZoneInfo(candidate)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            continue  # ValueError: not a valid key at all ("../x", "")
    hint = find_timezones(name.strip().rsplit("/", 1)[-1], limit=5)
    suggestion = f"; did you mean {', '.join(hint)}?" if hint else "; e.g. 'Asia/Shanghai'"
    raise UnknownTimezone(f"unknown timezone {name!r}{suggestion}")


def _describe(moment: datetime, zone_name: str) -> dict[str, Any]:
    offset = moment.strftime("%z")
    return {
        "timezone": zone_name,
        "datetime": moment.isoformat(timespec="seconds"),
        "date": moment.date().isoformat(),
        "time": moment.strftime("%H:%M:%S"),
        "weekday": moment.strftime("%A"),
        "utc_offset": f"{offset[:3]}:{offset[3:]}",
        "abbreviation": moment.tzname(),
    }


def _parse_time(text: str, today: date) -> datetime:
    """``HH:MM[:SS]`` (on ``today``) or an ISO date-time, without a zone."""
    text = text.strip()
    try:
        return datetime.combine(today, time.fromisoformat(text))
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ToolError(
            f"cannot read the time {text!r}: use HH:MM, HH:MM:SS or YYYY-MM-DD HH:MM"
        ) from None
    return parsed.replace(tzinfo=None)


class Clock(Plugin):
    """Tells the time anywhere and converts times between timezones.

    Args:
        now: the current time, timezone-aware (tests pass a fixed one).
    """

    def __init__(self, now: Callable[[], datetime] | None = None) -> None:
        self._now = now or (lambda: datetime.now(UTC))

    @tool
    def current_time(self, timezone: Zone = "UTC") -> dict[str, Any]:
        """The current date and time in a timezone.

        Returns the ISO date-time, date, time, weekday, UTC offset and zone abbreviation.
        """
        zone = get_zone(timezone)
        return _describe(self._now().astimezone(zone), zone.key)

    @tool
    def convert_time(
        self,
        time: Annotated[str, "The time to convert: 'HH:MM' (today) or 'YYYY-MM-DD HH:MM'"],
        from_timezone: Zone,
        to_timezone: Zone,
    ) -> dict[str, Any]:
        """Convert a wall-clock time from one timezone to another."""
        source, target = get_zone(from_timezone), get_zone(to_timezone)
        today = self._now().astimezone(source).date()
        moment = _parse_time(time, today).replace(tzinfo=source)
        converted = moment.astimezone(target)
        shift = (converted.utcoffset() or timedelta()) - (moment.utcoffset() or timedelta())
        hours = shift.total_seconds() / 3600
        return {
            "from": _describe(moment, source.key),
            "to": _describe(converted, target.key),
            "difference_hours": int(hours) if hours.is_integer() else hours,
        }

    @tool
    def list_timezones(
        self,
        query: Annotated[str, "Part of a zone name: a city, region or country, e.g. 'york'"],
        limit: Annotated[int, "At most this many names (1-100)"] = 10,
    ) -> dict[str, Any]:
        """Find IANA timezone names matching a city or region name."""
        limit = max(1, min(limit, 100))
        matches = find_timezones(query, limit)
        return {"query": query, "timezones": matches}
