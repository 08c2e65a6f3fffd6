"""Configuration: precedence, the reference's INI file, error messages, key persistence."""

from __future__ import annotations

import configparser
import ipaddress
import re
import socket
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_mcp_relay._config import (
    CONFIG_FILE_NAME,
    ConfigError,
    RelayConfig,
    load_config,
    local_ip,
)

KEY = "0123456789abcdef0123456789abcdef"

# The reference server's data/.mcp-endpoint-server.cfg, as its ConfigManager writes it after
# generating a key, plus the sections it carries that the relay does not use.
REFERENCE_INI = f"""\
[server]
host = 127.0.0.1
port = 8005
debug = false
log_level = warning
key = {KEY}

[websocket]
max_connections = 1000
ping_interval = 30
ping_timeout = 10
close_timeout = 10

[security]
allowed_origins = *
enable_cors = false

[logging]
log_file = logs/mcp_server.log
max_file_size = 10MB
backup_count = 5
"""


def load(
    tmp_path: Path,
    *,
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    config_file: Path | None = None,
    data_dir: Path | None = None,
) -> RelayConfig:
    return load_config(
        flags=flags or {},
        environ=environ or {},
        config_file=config_file,
        data_dir=tmp_path if data_dir is None else data_dir,
    )


def write_cfg(directory: Path, text: str) -> Path:
    path = directory / CONFIG_FILE_NAME
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **kwargs)
    return str(caught.value)


# --- The model ------------------------------------------------------------------------------


def test_field_names_and_defaults() -> None:
    defaults = {field.name: field.default for field in attrs.fields(RelayConfig)}
    assert defaults == {
        "host": "0.0.0.0",
        "port": 8004,
        "key": None,
        "data_dir": Path("data"),
        "log_level": "INFO",
        "enable_cors": True,
        "allowed_origins": ("*",),
        "max_message_size": 16 * 1024 * 1024,
        "handshake_timeout": 10.0,
        "forward_timeout": 10.0,
        "tool_request_timeout": 30.0,
        "outbox_size": 256,
        "outbox_bytes": 16 * 1024 * 1024,
        "max_queued_bytes": 256 * 1024 * 1024,
        "max_pending_per_address": 64,
        "admin_key": None,
        "ping_interval": 20.0,
        "ping_timeout": 20.0,
        "max_connections": 10000,
        "max_callers_per_agent": 100,
        "max_inflight_per_caller": 100,
        "max_tool_requests": 32,
        "request_timeout": 0.0,
        "slow_caller_grace": 10.0,
        "session_idle_timeout": 300.0,
        "shutdown_grace": 10.0,
        "auth_failures": 10,
        "auth_window": 60.0,
        "auth_ban": 60.0,
        "auth_delay": 10.0,
        "auth_concurrency": 4,
        "previous_keys": (),
        "reference_tokens": True,
        "trusted_proxies": (),
        "init_timeout": 10.0,
        "tool_filters": attrs.Factory(dict),
        "log_file": "",
        "max_file_size": 10 * 1024 * 1024,
        "backup_count": 5,
        "log_format": "text",
        "metrics_token": None,
        "metrics_agents": (),
        "metrics_top_agents": 10,
        "cluster": "",
        "cluster_lease": 10.0,
        "cluster_node": "",
    }


def test_config_is_frozen_and_hides_its_key() -> None:
    config = RelayConfig(key=KEY)
    assert KEY not in repr(config)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": -1},
        {"port": 65536},
        {"log_level": "LOUD"},
        {"max_message_size": 0},
        {"outbox_size": -5},
        {"handshake_timeout": 0.0},
        {"forward_timeout": float("nan")},
        {"tool_request_timeout": float("inf")},
        {"host": ""},
        {"key": ""},
    ],
)
def test_validators_reject_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RelayConfig(**kwargs)


def test_log_level_is_case_insensitive_and_stored_upper_case() -> None:
    assert RelayConfig(log_level="debug").log_level == "DEBUG"


# --- Defaults and precedence ----------------------------------------------------------------


def test_defaults_with_no_sources(tmp_path: Path) -> None:
    config = load(tmp_path)
    expected = RelayConfig(data_dir=tmp_path, key=config.key)
    assert config == expected


@pytest.mark.parametrize(
    ("field", "env_name", "file_value", "env_value", "flag_value", "default"),
    [
        ("port", "PORT", "1111", "2222", 3333, 8004),
        ("host", "HOST", "10.0.0.1", "10.0.0.2", "10.0.0.3", "0.0.0.0"),
        ("key", "SERVER_KEY", "file-key", "env-key", "flag-key", None),
        ("log_level", "LOG_LEVEL", "ERROR", "WARNING", "DEBUG", "INFO"),
    ],
)
def test_precedence_flags_beat_environment_beat_file_beat_defaults(
    tmp_path: Path,
    field: str,
    env_name: str,
    file_value: str,
    env_value: str,
    flag_value: object,
    default: object,
) -> None:
    with_file = tmp_path / "with-file"
    with_file.mkdir()
    # A key must come from somewhere, or one would be generated and written into the file.
    key_line = "" if field == "key" else f"key = {KEY}\n"
    write_cfg(with_file, f"[server]\n{key_line}{field} = {file_value}\n")
    flags = {field: flag_value}
    environ = {env_name: env_value}

    def value(**kwargs: Any) -> str:
        return str(getattr(load(tmp_path, **kwargs), field))

    assert value(flags=flags, environ=environ, data_dir=with_file) == str(flag_value)
    assert value(flags={field: None}, environ=environ, data_dir=with_file) == env_value
    assert value(data_dir=with_file) == file_value
    if default is not None:
        without_file = tmp_path / "without-file"
        without_file.mkdir()
        assert value(environ={"SERVER_KEY": KEY}, data_dir=without_file) == str(default)


def test_none_flags_mean_not_given(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        flags={name: None for name in attrs.fields_dict(RelayConfig)},
        environ={"PORT": "9000", "SERVER_KEY": KEY},
    )
    assert config.port == 9000


def test_relay_limits_can_be_given_as_flags(tmp_path: Path) -> None:
    flags = {
        "max_message_size": 1024,
        "handshake_timeout": 1.5,
        "forward_timeout": 2,
        "tool_request_timeout": "4.5",
        "outbox_size": 8,
        "enable_cors": False,
        "allowed_origins": ("http://a",),
    }
    config = load(tmp_path, flags=flags, environ={"SERVER_KEY": KEY})
    assert config.max_message_size == 1024
    assert config.handshake_timeout == 1.5
    assert config.forward_timeout == 2.0
    assert isinstance(config.forward_timeout, float)
    assert config.tool_request_timeout == 4.5
    assert config.outbox_size == 8
    assert config.enable_cors is False
    assert config.allowed_origins == ("http://a",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("False", False),
        ("1", True),
        ("0", False),
        ("yes", True),
        ("NO", False),
        ("on", True),
        ("off", False),
    ],
)
def test_enable_cors_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    environ = {"ENABLE_CORS": text, "SERVER_KEY": KEY}
    assert load(tmp_path, environ=environ).enable_cors is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", ("*",)),
        (
            "http://a.example, https://b.example:8443",
            ("http://a.example", "https://b.example:8443"),
        ),
        ("http://a,,", ("http://a",)),
        ("", ()),
    ],
)
def test_allowed_origins_are_comma_separated(
    tmp_path: Path, text: str, expected: tuple[str, ...]
) -> None:
    environ = {"ALLOWED_ORIGINS": text, "SERVER_KEY": KEY}
    assert load(tmp_path, environ=environ).allowed_origins == expected


def test_data_dir_sources(tmp_path: Path) -> None:
    from_env = tmp_path / "env"
    from_arg = tmp_path / "arg"
    for directory, port in ((from_env, "1001"), (from_arg, "1002")):
        directory.mkdir()
        write_cfg(directory, f"[server]\nkey = {KEY}\nport = {port}\n")
    environ = {"DATA_DIR": str(from_env)}
    by_env = load_config(flags={}, environ=environ, config_file=None, data_dir=None)
    assert (by_env.data_dir, by_env.port) == (from_env, 1001)
    by_arg = load_config(flags={}, environ=environ, config_file=None, data_dir=from_arg)
    assert (by_arg.data_dir, by_arg.port) == (from_arg, 1002)
    by_flag = load_config(
        flags={"data_dir": from_arg}, environ=environ, config_file=None, data_dir=None
    )
    assert by_flag.data_dir == from_arg


def test_unknown_flag_names_are_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prot"):
        load(tmp_path, flags={"prot": 1})


@given(port=st.integers(0, 65535))
def test_any_port_number_from_the_environment(port: int) -> None:
    # No file is read or written: the key comes from the environment and data_dir is unused.
    config = load_config(
        flags={},
        environ={"PORT": str(port), "SERVER_KEY": KEY},
        config_file=None,
        data_dir=Path("/nonexistent-trio-mcp-relay-test-dir"),
    )
    assert config.port == port


# --- The reference's INI file ---------------------------------------------------------------


def test_reads_the_reference_file_as_is(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, REFERENCE_INI)
    config = load(tmp_path)
    assert config.host == "127.0.0.1"
    assert config.port == 8005
    assert config.key == KEY
    assert config.log_level == "WARNING"
    assert config.enable_cors is False
    assert config.allowed_origins == ("*",)
    assert path.read_text(encoding="utf-8") == REFERENCE_INI  # a file with a key is not touched


def test_reads_an_explicit_config_file(tmp_path: Path) -> None:
    elsewhere = tmp_path / "etc" / "relay.ini"
    elsewhere.parent.mkdir()
    elsewhere.write_text(REFERENCE_INI, encoding="utf-8")
    write_cfg(tmp_path, "[server]\nport = 1\n")  # ignored: an explicit file replaces it
    config = load(tmp_path, config_file=elsewhere)
    assert (config.port, config.key) == (8005, KEY)


def test_inline_comments_and_byte_order_mark_are_tolerated(tmp_path: Path) -> None:
    text = "\ufeff[server]\nhost = 0.0.0.0          # listen address\nport = 8010 ; port\n"
    write_cfg(tmp_path, text + f"key = {KEY}\n")
    config = load(tmp_path)
    assert (config.host, config.port) == ("0.0.0.0", 8010)


def test_percent_signs_are_taken_literally(tmp_path: Path) -> None:
    write_cfg(tmp_path, "[server]\nkey = 100%secret\n")
    assert load(tmp_path).key == "100%secret"


def test_explicit_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.cfg"
    message = config_error(tmp_path, config_file=missing)
    assert "--config" in message
    assert str(missing) in message
    assert not missing.exists()


def test_unparseable_file_names_the_file(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "port = 8004\n")
    message = config_error(tmp_path)
    assert str(path) in message
    assert "section" in message


def test_duplicate_option_names_the_file(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[server]\nport = 1\nport = 2\n")
    assert str(path) in config_error(tmp_path)


# --- Malformed values name the setting and its source ---------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"environ": {"PORT": "abc"}}, "PORT (environment): 'abc' is not an integer"),
        ({"environ": {"PORT": "8004.5"}}, "PORT (environment): '8004.5' is not an integer"),
        ({"environ": {"PORT": "70000"}}, "PORT (environment): 70000 is not a port number"),
        ({"environ": {"LOG_LEVEL": "verbose"}}, "LOG_LEVEL (environment): 'VERBOSE' is not one"),
        ({"environ": {"ENABLE_CORS": "maybe"}}, "ENABLE_CORS (environment): 'maybe' is not a"),
        ({"environ": {"HOST": ""}}, "HOST (environment): must not be empty"),
        ({"environ": {"SERVER_KEY": ""}}, "SERVER_KEY (environment): must not be empty"),
        ({"flags": {"port": -1}}, "--port: -1 is not a port number"),
        ({"flags": {"port": True}}, "--port: True is not an integer"),
        ({"flags": {"key": ""}}, "--key: must not be empty"),
        ({"flags": {"max_message_size": 0}}, "--max-message-size: 0 is not a positive number"),
        ({"flags": {"handshake_timeout": -1.0}}, "--handshake-timeout: -1.0 is not a positive"),
        ({"flags": {"forward_timeout": "soon"}}, "--forward-timeout: 'soon' is not a number"),
        ({"flags": {"tool_request_timeout": 0}}, "--tool-request-timeout: 0.0 is not a positive"),
        ({"flags": {"outbox_size": 1.5}}, "--outbox-size: 1.5 is not an integer"),
        ({"flags": {"allowed_origins": 5}}, "--allowed-origins: 5 is not a comma-separated"),
    ],
)
def test_malformed_values_name_the_setting(
    tmp_path: Path, kwargs: dict[str, Any], expected: str
) -> None:
    kwargs.setdefault("environ", {}).setdefault("SERVER_KEY", KEY)
    assert expected in config_error(tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ({}, {"DATA_DIR": ""}, "DATA_DIR (environment): must not be empty"),
        ({"data_dir": 5}, {}, "--data-dir: 5 is not a path"),
    ],
)
def test_malformed_data_dir_names_the_setting(
    flags: dict[str, object], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(flags=flags, environ=environ, config_file=None, data_dir=None)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[server]\nport = abc", "[server] port in {path}: 'abc' is not an integer"),
        ("[server]\nport = 99999", "[server] port in {path}: 99999 is not a port number"),
        ("[server]\nlog_level = chatty", "[server] log_level in {path}: 'CHATTY' is not one of"),
        ("[server]\nkey =", "[server] key in {path}: must not be empty"),
        ("[server]\nhost =", "[server] host in {path}: must not be empty"),
        ("[security]\nenable_cors = perhaps", "[security] enable_cors in {path}: 'perhaps'"),
    ],
)
def test_malformed_file_values_name_section_option_and_file(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = write_cfg(tmp_path, f"{line}\n")
    assert expected.format(path=path) in config_error(tmp_path)


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    message = config_error(tmp_path, environ={"PORT": "x", "ENABLE_CORS": "y"})
    assert "PORT (environment)" in message
    assert "ENABLE_CORS (environment)" in message


def test_errors_never_show_the_key(tmp_path: Path) -> None:
    write_cfg(tmp_path, f"[server]\nkey = {KEY}\nport = nope\n")
    assert KEY not in config_error(tmp_path)


# --- Key generation and persistence ---------------------------------------------------------


def test_generated_key_is_saved_and_found_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "deep" / "data"
    first = load(tmp_path, data_dir=data_dir)
    assert first.key is not None
    assert re.fullmatch(r"[0-9a-f]{32}", first.key)
    path = data_dir / CONFIG_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    parser = configparser.ConfigParser()
    parser.read(path, encoding="utf-8")
    assert parser.get("server", "key") == first.key

    second = load(tmp_path, data_dir=data_dir)
    assert second.key == first.key
    assert list(data_dir.iterdir()) == [path]  # no temporary files left behind


def test_generated_keys_differ_between_data_dirs(tmp_path: Path) -> None:
    one = load(tmp_path, data_dir=tmp_path / "one")
    two = load(tmp_path, data_dir=tmp_path / "two")
    assert one.key != two.key


def test_key_is_added_to_an_existing_file_keeping_its_content(tmp_path: Path) -> None:
    original = REFERENCE_INI.replace(f"key = {KEY}\n", "").replace(
        "[server]\n", "# my relay\n[server]\n"
    )
    path = write_cfg(tmp_path, original)
    path.chmod(0o644)
    config = load(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert f"key = {config.key}\n" in text
    assert text.replace(f"key = {config.key}\n", "") == original
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reread = load(tmp_path)
    assert (reread.key, reread.port, reread.enable_cors) == (config.key, 8005, False)


def test_key_is_added_to_a_file_without_a_server_section(tmp_path: Path) -> None:
    path = write_cfg(tmp_path, "[security]\nenable_cors = false")  # no final newline
    config = load(tmp_path)
    assert load(tmp_path).key == config.key
    assert load(tmp_path).enable_cors is False
    assert path.read_text(encoding="utf-8").startswith("[security]\nenable_cors = false\n")


def test_key_is_saved_into_an_explicit_config_file(tmp_path: Path) -> None:
    explicit = tmp_path / "relay.ini"
    explicit.write_text("[server]\nport = 8100\n", encoding="utf-8")
    config = load(tmp_path, config_file=explicit)
    assert load(tmp_path, config_file=explicit).key == config.key
    assert not (tmp_path / CONFIG_FILE_NAME).exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"environ": {"SERVER_KEY": "from-env"}}, {"flags": {"key": "from-flag"}}],
)
def test_no_file_is_written_when_a_key_is_given(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    config = load(tmp_path, **kwargs)
    assert config.key in {"from-env", "from-flag"}
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_written_when_the_configuration_is_invalid(tmp_path: Path) -> None:
    config_error(tmp_path, environ={"PORT": "abc"})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_data_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory", encoding="utf-8")
    message = config_error(tmp_path, data_dir=blocker / "data")
    assert "cannot save the generated key" in message


# --- local_ip -------------------------------------------------------------------------------


def test_local_ip_is_an_ipv4_address() -> None:
    assert isinstance(ipaddress.ip_address(local_ip()), ipaddress.IPv4Address)


class _RecordingSocket:
    """Stands in for a UDP socket; records what is done with it."""

    calls: list[str]

    def __init__(self, family: int, kind: int) -> None:
        assert (family, kind) == (socket.AF_INET, socket.SOCK_DGRAM)
        self.calls = _RecordingSocket.calls

    def __enter__(self) -> _RecordingSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.calls.append("close")

    def connect(self, address: tuple[str, int]) -> None:
        self.calls.append("connect")

    def getsockname(self) -> tuple[str, int]:
        return ("192.0.2.7", 54321)

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"local_ip must not call {name}")


def test_local_ip_only_connects_and_never_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    _RecordingSocket.calls = []
    monkeypatch.setattr("trio_mcp_relay._config.socket.socket", _RecordingSocket)
    assert local_ip() == "192.0.2.7"
    assert _RecordingSocket.calls == ["connect", "close"]


def test_local_ip_falls_back_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unreachable(_RecordingSocket):
        def connect(self, address: tuple[str, int]) -> None:
            raise OSError(101, "Network is unreachable")

    _RecordingSocket.calls = []
    monkeypatch.setattr("trio_mcp_relay._config.socket.socket", Unreachable)
    assert local_ip() == "127.0.0.1"


# --- Key rotation, token schemes, trusted proxies ---------------------------------------------

OLD = "fedcba9876543210fedcba9876543210"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flags": {"key": [KEY, OLD]}},  # --key given twice
        {"flags": {"key": [f"{KEY},{OLD}"]}},
        {"environ": {"SERVER_KEY": f"{KEY}, {OLD}"}},
        {"file": f"[server]\nkey = {KEY},{OLD}\n"},
    ],
)
def test_several_keys_the_first_signs(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    if "file" in kwargs:
        write_cfg(tmp_path, kwargs.pop("file"))
    config = load(tmp_path, **kwargs)
    assert config.key == KEY
    assert config.previous_keys == (OLD,)
    assert config.keys == (KEY, OLD)
    assert KEY not in repr(config) and OLD not in repr(config)
    assert not (tmp_path / CONFIG_FILE_NAME).exists() or "file" not in kwargs


def test_one_key_has_no_previous_keys_and_duplicates_are_dropped(tmp_path: Path) -> None:
    assert load(tmp_path, environ={"SERVER_KEY": KEY}).keys == (KEY,)
    assert load(tmp_path, environ={"SERVER_KEY": f"{KEY},{KEY}"}).keys == (KEY,)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"environ": {"SERVER_KEY": f"{KEY},,{OLD}"}}, "SERVER_KEY (environment): an empty key"),
        ({"flags": {"key": [KEY, ""]}}, "--key: must not hold an empty key"),
        ({"environ": {"TRUSTED_PROXIES": "10.0.0.1,nginx"}}, "TRUSTED_PROXIES (environment):"),
        ({"flags": {"trusted_proxies": ("10.0.0.0/33",)}}, "--trusted-proxies: '10.0.0.0/33'"),
        ({"environ": {"REFERENCE_TOKENS": "sometimes"}}, "REFERENCE_TOKENS (environment):"),
        ({"flags": {"auth_delay": -1}}, "--auth-delay: -1.0 is not zero or a positive"),
        ({"flags": {"auth_concurrency": 0}}, "--auth-concurrency: 0 is not a positive"),
    ],
)
def test_malformed_new_settings_name_the_setting(
    tmp_path: Path, kwargs: dict[str, Any], expected: str
) -> None:
    kwargs.setdefault("environ", {}).setdefault("SERVER_KEY", KEY)
    assert expected in config_error(tmp_path, **kwargs)


def test_trusted_proxies_and_reference_tokens_from_every_source(tmp_path: Path) -> None:
    write_cfg(
        tmp_path,
        f"[server]\nkey = {KEY}\n[security]\ntrusted_proxies = 10.0.0.0/8, ::1\n"
        "reference_tokens = false\n",
    )
    from_file = load(tmp_path)
    assert from_file.trusted_proxies == ("10.0.0.0/8", "::1")
    assert from_file.reference_tokens is False
    from_env = load(tmp_path, environ={"TRUSTED_PROXIES": "127.0.0.1", "REFERENCE_TOKENS": "1"})
    assert from_env.trusted_proxies == ("127.0.0.1",)
    assert from_env.reference_tokens is True
    from_flags = load(tmp_path, flags={"trusted_proxies": ["192.0.2.0/24", "192.0.2.7"]})
    assert from_flags.trusted_proxies == ("192.0.2.0/24", "192.0.2.7")


def test_metrics_settings_from_every_source(tmp_path: Path) -> None:
    write_cfg(
        tmp_path,
        f"[server]\nkey = {KEY}\n[security]\nmetrics_token = from-file\n"
        "[metrics]\nagents = a, b\ntop_agents = 3\n",
    )
    from_file = load(tmp_path)
    assert from_file.metrics_token == "from-file"
    assert from_file.metrics_agents == ("a", "b")
    assert from_file.metrics_top_agents == 3
    assert "from-file" not in repr(from_file)
    env = {"METRICS_TOKEN": "from-env", "METRICS_AGENTS": "c", "METRICS_TOP_AGENTS": "0"}
    from_env = load(tmp_path, environ=env)
    assert (from_env.metrics_token, from_env.metrics_agents) == ("from-env", ("c",))
    assert from_env.metrics_top_agents == 0
    flags = {"metrics_token": "from-flag", "metrics_agents": "d,e", "metrics_top_agents": 5}
    from_flags = load(tmp_path, environ=env, flags=flags)
    assert from_flags.metrics_token == "from-flag"
    assert from_flags.metrics_agents == ("d", "e")
    assert from_flags.metrics_top_agents == 5
    error = config_error(tmp_path, environ={"METRICS_TOP_AGENTS": "-1"})
    assert "METRICS_TOP_AGENTS (environment)" in error


def test_cluster_settings_from_file_environment_and_flags(tmp_path: Path) -> None:
    assert load(tmp_path).cluster == ""  # alone by default
    write_cfg(
        tmp_path,
        f"[server]\nkey = {KEY}\n[cluster]\nredis = redis://:secret@r1:6379/2\nlease = 5\n"
        "node = edge-1\n",
    )
    from_file = load(tmp_path)
    assert (from_file.cluster, from_file.cluster_lease) == ("redis://:secret@r1:6379/2", 5.0)
    assert from_file.cluster_node == "edge-1"
    assert "secret" not in repr(from_file)  # the Redis password is redacted
    env = {"CLUSTER": "redis://r2:6379/0", "CLUSTER_LEASE": "3", "CLUSTER_NODE": "edge-2"}
    from_env = load(tmp_path, environ=env)
    assert (from_env.cluster, from_env.cluster_lease, from_env.cluster_node) == (
        "redis://r2:6379/0",
        3.0,
        "edge-2",
    )
    from_flags = load(tmp_path, environ=env, flags={"cluster": "rediss://r3:6380/1"})
    assert from_flags.cluster == "rediss://r3:6380/1"
    error = config_error(tmp_path, environ={"CLUSTER": "http://r:6379"})
    assert "CLUSTER (environment)" in error and "redis://HOST:PORT/DB" in error
    error = config_error(tmp_path, environ={"CLUSTER_LEASE": "0.5"})
    assert "CLUSTER_LEASE (environment)" in error and "between 1 and 300" in error
    error = config_error(tmp_path, flags={"cluster_node": "a b"})
    assert "--cluster-node" in error
    error = config_error(tmp_path, environ={"CLUSTER": "http://user:pw@r:6379"})
    assert "pw" not in error
