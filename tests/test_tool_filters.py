"""Tool filters in the config file, and --init-timeout, as the relay reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_mcp_relay import ConfigError, ToolFilter, load_config
from trio_mcp_relay.core.session import AgentFilters


def load(tmp_path: Path, text: str) -> dict[str, AgentFilters]:
    path = tmp_path / "relay.cfg"
    path.write_text("[server]\nkey = 0123456789abcdef0123456789abcdef\n" + text)
    config = load_config(flags={}, environ={}, config_file=path, data_dir=tmp_path)
    return dict(config.tool_filters)


def test_sections_give_filters_per_agent_and_per_server(tmp_path: Path) -> None:
    filters = load(
        tmp_path,
        "[tools]\ndeny = debug_*, *_internal\n"
        "[tools:kitchen]\nallow = cook* timer_*\n"
        "[tools:kitchen:weather]\ndeny = radar\n"
        "[tools:*:clock]\nallow = now\n",
    )
    every = filters["*"]
    assert every.tools == ToolFilter(deny=("debug_*", "*_internal"))
    assert every.servers == {"clock": ToolFilter(allow=("now",))}
    kitchen = filters["kitchen"]
    assert kitchen.tools == ToolFilter(allow=("cook*", "timer_*"))
    assert kitchen.servers == {
        "clock": ToolFilter(allow=("now",)),
        "weather": ToolFilter(deny=("radar",)),
    }
    assert not kitchen.tools.allows("debug_x") and kitchen.tools.allows("cook_rice")


def test_no_sections_no_filters(tmp_path: Path) -> None:
    assert load(tmp_path, "") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tools]\nallowed = x\n", "unknown option 'allowed'"),
        ("[tools:*]\ndeny = x\n", "write [tools] for every agent"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path, text)


def test_init_timeout_flag(tmp_path: Path) -> None:
    config = load_config(
        flags={"init_timeout": 2.5}, environ={}, config_file=None, data_dir=tmp_path
    )
    assert config.init_timeout == 2.5
    with pytest.raises(ConfigError, match="--init-timeout"):
        load_config(flags={"init_timeout": 0.0}, environ={}, config_file=None, data_dir=tmp_path)
