"""The deployment files keep the README's promises: Dockerfile, compose file, systemd unit.

No Docker daemon and no registry of base images here, so the image is tested as far as that
allows: its files are parsed and checked against each other and against the README, and its
commands run outside Docker. The CMD and HEALTHCHECK run in this environment on every test
run. The install commands (the build stage's RUN lines, on a build context copied through
.dockerignore) run in a fresh virtual environment only when TRIO_MCP_RELAY_DEPLOY_TESTS=1:
that takes about a minute of package installs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import attrs
import pytest
import yaml

from trio_mcp_relay._config import CONFIG_FILE_NAME, RelayConfig
from trio_mcp_relay._healthcheck import main as healthcheck_main
from trio_mcp_relay._healthcheck import probe_url

from .helpers import KEY, relay_in_thread

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
COMPOSE_SERVICE = "mcp-endpoint-server"  # the reference's, so `docker logs -f` stays the same
#: What a user of the reference has: `./data` next to the compose file, mounted here.
REFERENCE_PORT, REFERENCE_MOUNT = "8004:8004", "./data:/app/data"


# --- Reading the files ----------------------------------------------------------------------


@attrs.frozen
class Instruction:
    name: str
    args: str


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """The Dockerfile's instructions by build stage (each starts with its FROM).

    Enough of the format for this file: comments, blank lines, backslash continuations.
    """
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    stages: list[list[Instruction]] = []
    for line in logical:
        name, _, args = line.partition(" ")
        instruction = Instruction(name.upper(), args.strip())
        if instruction.name == "FROM":
            stages.append([])
        assert stages, f"{line!r} comes before any FROM"
        stages[-1].append(instruction)
    return stages


def only(stage: list[Instruction], name: str) -> str:
    found = [i.args for i in stage if i.name == name]
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in (i.args for i in stage if i.name == "ENV"):
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; the shell form would keep signals from PID 1."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_of(stage: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    options, _, command = only(stage, "HEALTHCHECK").partition("CMD ")
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in options.split())
    return flags, exec_form(command)


@pytest.fixture(scope="module")
def image() -> list[Instruction]:
    """The final stage: what runs."""
    return dockerfile_stages((ROOT / "Dockerfile").read_text())[-1]


@pytest.fixture(scope="module")
def service() -> dict[str, object]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    found = compose["services"][COMPOSE_SERVICE]
    assert isinstance(found, dict)
    return found


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, with /) out of the build context.

    Docker's rules: the last pattern matching the path or one of its parent directories
    wins; ``!`` lets it back in; ``*`` stays within one path element, ``**`` spans any.
    """

    def regex(pattern: str) -> re.Pattern[str]:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        table = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(table.get(p, re.escape(p)) for p in parts))

    pieces = path.split("/")
    prefixes = ["/".join(pieces[: n + 1]) for n in range(len(pieces))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        compiled = regex(pattern.removeprefix("!"))
        if any(compiled.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def systemd_unit() -> list[tuple[str, str, str]]:
    """(section, key, value) of contrib/trio-mcp-relay.service, repeated keys kept."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in (ROOT / "contrib" / "trio-mcp-relay.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(key: str) -> list[str]:
    return [value for section, k, value in systemd_unit() if section == "Service" and k == key]


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)?", text)
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


# --- The files agree with each other and with the README -------------------------------------


def test_the_image_runs_as_a_fixed_non_root_user_on_slim_python(image: list[Instruction]) -> None:
    base = only(image, "FROM")
    match = re.fullmatch(r"python:3\.(\d+)-slim(?:-\w+)?", base)
    assert match and int(match.group(1)) >= 11, base
    user = only(image, "USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    created = " ".join(i.args for i in image if i.name == "RUN")
    assert re.search(rf"useradd [^&]*--uid 10001 [^&]*\b{user}\b", created), created
    # USER comes before CMD: the relay itself is not root.
    names = [i.name for i in image]
    assert names.index("USER") < names.index("CMD")
    assert "chown -R 10001:10001 data" in README


def test_the_image_keeps_the_reference_port_and_data_directory(image: list[Instruction]) -> None:
    assert only(image, "WORKDIR") == "/app"
    assert only(image, "EXPOSE") == "8004"
    assert exec_form(only(image, "VOLUME")) == ["/app/data"]
    assert env_of(image)["DATA_DIR"] == "/app/data"
    assert RelayConfig().port == 8004
    assert only(image, "STOPSIGNAL") == "SIGTERM"
    assert exec_form(only(image, "CMD"))[0] == "trio-mcp-relay"


def test_the_health_check_asks_the_keyless_endpoint(image: list[Instruction]) -> None:
    flags, command = healthcheck_of(image)
    assert command == ["python", "-m", "trio_mcp_relay._healthcheck"]
    assert seconds(flags["timeout"]) > 5  # the probe's own urlopen timeout
    assert not any("key" in word for word in command)


def test_compose_is_the_reference_s_with_the_image_swapped(
    service: dict[str, object], image: list[Instruction]
) -> None:
    assert service["container_name"] == COMPOSE_SERVICE
    assert service["restart"] == "always"
    assert service["ports"] == [REFERENCE_PORT]
    assert service["volumes"] == [REFERENCE_MOUNT]
    assert REFERENCE_MOUNT.split(":")[1] == env_of(image)["DATA_DIR"]
    assert REFERENCE_PORT.split(":")[1] == only(image, "EXPOSE")
    environment = service["environment"]
    assert isinstance(environment, list) and "TZ=Asia/Shanghai" in environment
    healthcheck = service["healthcheck"]
    assert isinstance(healthcheck, dict)
    flags, command = healthcheck_of(image)
    assert healthcheck["test"] == ["CMD", *command]
    assert {k: str(healthcheck[k.replace("-", "_")]) for k in flags} == flags
    # Docker's default of 10 s would SIGKILL the relay before its graceful shutdown is over.
    grace = service["stop_grace_period"]
    assert isinstance(grace, str) and seconds(grace) >= RelayConfig().shutdown_grace + 10


def test_the_readme_shows_the_port_volume_user_and_health_check(image: list[Instruction]) -> None:
    section = README.split("### Docker", 1)[1].split("\n### ", 1)[0]
    for promise in (
        REFERENCE_PORT,
        REFERENCE_MOUNT,
        "docker compose up -d",
        "docker logs -f mcp-endpoint-server",
        "10001",
        " ".join(healthcheck_of(image)[1]),
        "/mcp_endpoint/",
    ):
        assert promise in section, promise


def test_dockerignore_lets_in_what_the_build_copies_and_keeps_data_out() -> None:
    patterns = dockerignore()
    build = dockerfile_stages((ROOT / "Dockerfile").read_text())[0]
    for copy in (i.args for i in build if i.name == "COPY"):
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert not ignored(source, patterns), source
    assert not ignored("trio_mcp_relay/server/serve.py", patterns)
    for secret in (f"data/{CONFIG_FILE_NAME}", ".git/config", "tests/helpers.py", ".env"):
        assert ignored(secret, patterns), secret
    assert ignored("trio_mcp_relay/__pycache__/x.pyc", patterns)


def test_the_systemd_unit_stops_gracefully_and_keeps_its_state() -> None:
    assert unit_values("DynamicUser") == ["yes"]
    assert unit_values("StateDirectory") == ["trio-mcp-relay"]
    assert "DATA_DIR=%S/trio-mcp-relay" in unit_values("Environment")
    assert unit_values("Restart") == ["on-failure"]
    assert unit_values("KillSignal") == ["SIGTERM"]
    (timeout,) = unit_values("TimeoutStopSec")
    assert seconds(timeout) >= RelayConfig().shutdown_grace + 10
    (exec_start,) = unit_values("ExecStart")
    dockerfile_cmd = exec_form(
        only(dockerfile_stages((ROOT / "Dockerfile").read_text())[-1], "CMD")
    )
    assert shlex.split(exec_start)[1:] == dockerfile_cmd[1:]
    assert Path(shlex.split(exec_start)[0]).name == dockerfile_cmd[0]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert unit_values(hardening), hardening


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` wants ExecStart to exist: point it at this Python."""
    text = (ROOT / "contrib" / "trio-mcp-relay.service").read_text()
    (exec_start,) = unit_values("ExecStart")
    unit = tmp_path / "trio-mcp-relay.service"
    unit.write_text(text.replace(shlex.split(exec_start)[0], sys.executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# --- The health check ------------------------------------------------------------------------


def test_probe_url_finds_the_port_the_way_serve_does(tmp_path: Path) -> None:
    assert probe_url({"DATA_DIR": str(tmp_path)}) == "http://127.0.0.1:8004/mcp_endpoint/"
    (tmp_path / CONFIG_FILE_NAME).write_text(
        f"[server]\nhost = 0.0.0.0\nport = 9004  # the reference's docs comment here\nkey = {KEY}\n"
    )
    assert probe_url({"DATA_DIR": str(tmp_path)}) == "http://127.0.0.1:9004/mcp_endpoint/"
    assert probe_url({"DATA_DIR": str(tmp_path), "PORT": "9005", "HOST": "::"}) == (
        "http://[::1]:9005/mcp_endpoint/"
    )
    assert probe_url({"DATA_DIR": str(tmp_path), "HOST": "10.0.0.5"}).startswith(
        "http://10.0.0.5:9004/"
    )


def test_healthcheck_passes_on_a_running_relay_and_fails_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with relay_in_thread() as relay:
        environ = {"DATA_DIR": str(tmp_path), "PORT": str(relay.port)}
        assert healthcheck_main([], environ) == 0
        # The keyed endpoint without its key is refused (403): unhealthy, not "running".
        keyed = f"http://127.0.0.1:{relay.port}/mcp_endpoint/health"
        assert healthcheck_main([keyed], environ) == 1
        assert "unhealthy: " in capsys.readouterr().err
        # An answer that is not the info endpoint's: 200, but not "running".
        assert healthcheck_main([f"{keyed}?key={KEY}"], environ) == 1
        err = capsys.readouterr().err
        assert "status 'success'" in err and KEY not in err
    assert healthcheck_main([], environ) == 1
    assert "Connection refused" in capsys.readouterr().err
    (tmp_path / CONFIG_FILE_NAME).write_text("not an ini file")
    assert healthcheck_main([], {"DATA_DIR": str(tmp_path)}) == 1
    assert "unhealthy: config file" in capsys.readouterr().err


# --- The image's commands, outside Docker ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@attrs.frozen
class Container:
    """Paths standing in for the image's, on this machine."""

    app: Path  # WORKDIR
    data: Path  # the volume
    env: Mapping[str, str]


def container(tmp_path: Path, image: list[Instruction], bin_dir: Path) -> Container:
    """The image's environment (its ENV lines) with paths and the port moved into tmp_path.

    HOST is 127.0.0.1 rather than the image's 0.0.0.0, so that the test listens on loopback
    only (``probe_url`` maps 0.0.0.0 to 127.0.0.1 the same way).
    """
    app = tmp_path / "app"
    data = app / "data"
    data.mkdir(parents=True)
    env = env_of(image)
    env["PATH"] = (
        env["PATH"].replace("/opt/venv/bin", str(bin_dir)).replace("$PATH", os.environ["PATH"])
    )
    env["DATA_DIR"] = str(data)
    # A clean environment, as in the image: nothing of this test run's, no PYTHONPATH, no
    # settings; the machine's pip configuration stays so that installs find the packages.
    clean = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k in ("HOME", "LANG")}
    return Container(app, data, {**clean, **env, "HOST": "127.0.0.1", "PORT": str(free_port())})


@attrs.frozen
class Ran:
    banner: list[str]
    healthy: subprocess.CompletedProcess[str]
    exit_code: int
    stderr: str
    unhealthy_after: subprocess.CompletedProcess[str]


def run_cmd_and_healthcheck(box: Container, image: list[Instruction]) -> Ran:
    """Start the image's CMD, run its HEALTHCHECK, stop it with its STOPSIGNAL."""
    cmd = exec_form(only(image, "CMD"))
    _, check = healthcheck_of(image)
    program = shutil.which(cmd[0], path=box.env["PATH"])
    python = shutil.which(check[0], path=box.env["PATH"])
    assert program and python, box.env["PATH"]

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, *check[1:]],
            cwd=box.app,
            env=box.env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    with subprocess.Popen(
        [program, *cmd[1:]],
        cwd=box.app,
        env=box.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as relay:
        try:
            assert relay.stdout is not None
            banner = [relay.stdout.readline().strip() for _ in range(5)]
            healthy = probe()
        finally:
            relay.send_signal(getattr(signal, only(image, "STOPSIGNAL")))
            _, stderr = relay.communicate(timeout=30)
    return Ran(banner, healthy, relay.returncode, stderr, probe())


def check_run(ran: Ran, box: Container) -> None:
    assert ran.banner[0] == f"trio-mcp-relay listening on 127.0.0.1:{box.env['PORT']}", ran.stderr
    assert ran.healthy.returncode == 0, ran.healthy.stderr
    assert ran.exit_code == 0, ran.stderr
    assert "SIGTERM: shutting down gracefully" in ran.stderr
    assert ran.unhealthy_after.returncode == 1
    assert "unhealthy: http://127.0.0.1:" in ran.unhealthy_after.stderr
    # The generated key went into the volume, where the next container finds it.
    assert "key = " in (box.data / CONFIG_FILE_NAME).read_text()


def test_the_image_s_cmd_and_healthcheck_in_this_environment(
    tmp_path: Path, image: list[Instruction]
) -> None:
    """With this environment's Python and console script standing in for /opt/venv."""
    box = container(tmp_path, image, Path(sys.executable).parent)
    box = attrs.evolve(box, env={**box.env, "PYTHONPATH": str(ROOT)})  # this checkout's code
    check_run(run_cmd_and_healthcheck(box, image), box)


@pytest.mark.skipif(
    os.environ.get("TRIO_MCP_RELAY_DEPLOY_TESTS") != "1",
    reason="installs packages into a fresh venv (about a minute): TRIO_MCP_RELAY_DEPLOY_TESTS=1",
)
def test_the_image_s_install_commands_in_a_fresh_venv(
    tmp_path: Path, image: list[Instruction]
) -> None:
    """The build stage's RUN lines, on the build context .dockerignore lets through, then the
    final stage's CMD and HEALTHCHECK from the venv they made. The final stage's own RUN (a
    user and directories) needs root and is not run."""
    source = tmp_path / "src"
    patterns = dockerignore()
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and not ignored(relative, patterns):
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / relative)
    build = dockerfile_stages((ROOT / "Dockerfile").read_text())[0]
    assert only(build, "WORKDIR") == "/src"
    # The base image's `python`: this interpreter.
    base_bin = tmp_path / "base-bin"
    base_bin.mkdir()
    (base_bin / "python").symlink_to(sys.executable)
    venv = tmp_path / "venv"
    box = container(tmp_path, image, venv / "bin")
    run_env = {**box.env, "PATH": f"{base_bin}:{os.environ['PATH']}"}
    for run in (i.args for i in build if i.name == "RUN"):
        command = run.replace("/opt/venv", str(venv)).replace("/wheels", str(tmp_path / "wheels"))
        result = subprocess.run(
            ["sh", "-c", command],
            cwd=source,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The venv's package is the wheel's, not this checkout's.
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import trio_mcp_relay; print(trio_mcp_relay.__file__)",
        ],
        cwd=box.app,
        env=box.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.startswith(str(venv)), where
    check_run(run_cmd_and_healthcheck(box, image), box)
