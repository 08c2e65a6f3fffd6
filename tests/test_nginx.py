"""The README's nginx configuration, run for real in front of a relay (skipped without nginx).

TLS terminated by nginx with a throwaway self-signed certificate; both WebSocket endpoints
and the health endpoint through it; the relay trusting nginx's address, so that clients
behind it are told apart by the header nginx writes.
"""

from __future__ import annotations

import datetime
import functools
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio_websocket import open_websocket_url

from tests.helpers import (
    CUSTOM,
    KEY,
    open_tcp_from,
    recv,
    request,
    result,
    send,
    start_relay,
    tool_peer,
)
from trio_mcp_relay import TokenRole, scoped_token

README = (Path(__file__).parent.parent / "README.md").read_text()
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def readme_config() -> str:
    match = re.search(r"```nginx\n(.*?)```", README, re.S)
    assert match, "README lost its nginx configuration"
    return match.group(1)


def test_readme_trusts_the_proxy_its_nginx_configuration_runs_on() -> None:
    config = readme_config()
    upstream = set(re.findall(r"proxy_pass http://([\d.]+):(\d+);", config))
    assert upstream == {("127.0.0.1", "8004")}
    assert "trio-mcp-relay serve --host 127.0.0.1 --port 8004 --trusted-proxies 127.0.0.1" in (
        README
    )
    for location in config.split("location")[1:]:
        assert "X-Forwarded-For   $proxy_add_x_forwarded_for" in location
        assert 'Forwarded         ""' in location


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def https_get(source: str, port: int, target: str, context: ssl.SSLContext) -> int:
    """The status of one HTTPS GET through nginx, sent from ``source`` (any 127/8 address)."""
    plain = await open_tcp_from(source, port)
    stream = trio.SSLStream(plain, context, server_hostname="relay.example.com")
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: relay.example.com\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, data
            data += chunk
    return int(data.split(b" ", 2)[1])


async def test_the_readme_nginx_configuration_in_front_of_a_relay(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert NGINX is not None
    caplog.set_level("INFO", logger="trio_mcp_relay")
    relay = await start_relay(nursery, trusted_proxies=("127.0.0.1",), auth_failures=3)
    https_port, http_port = free_port(), free_port()
    cert, key = self_signed(tmp_path)
    config = (
        readme_config()
        .replace("listen 80;", f"listen 127.0.0.1:{http_port};")
        .replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
        .replace("127.0.0.1:8004", f"127.0.0.1:{relay.port}")
        .replace("/etc/letsencrypt/live/relay.example.com/fullchain.pem", str(cert))
        .replace("/etc/letsencrypt/live/relay.example.com/privkey.pem", str(key))
    )
    (tmp_path / "relay.conf").write_text(config)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{\n access_log {tmp_path}/access.log;\n"
        f" client_body_temp_path {tmp_path}/body;\n proxy_temp_path {tmp_path}/proxy;\n"
        f" include {tmp_path}/relay.conf;\n}}\n"
    )
    command = [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with trio.fail_after(20):
        process = await nursery.start(
            functools.partial(trio.run_process, command, check=False, stderr=subprocess.PIPE)
        )
        try:
            while True:  # nginx has no "ready" signal: wait for its port
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", https_port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
            base = f"wss://127.0.0.1:{https_port}/mcp_endpoint"
            tool_token = scoped_token(KEY, "proxied", TokenRole.TOOL)
            caller_token = scoped_token(KEY, "proxied", TokenRole.CALLER)
            tool_url = f"{base}/mcp/?token={tool_token}"
            caller_url = f"{base}/call/?token={caller_token}"
            async with (
                tool_peer(tool_url, ssl_context=context) as tool,
                open_websocket_url(caller_url, ssl_context=context) as caller,
            ):
                await send(caller, request(0, CUSTOM))
                frame = await recv(tool)
                await send(tool, result(frame["id"], {"via": "nginx"}))
                assert await recv(caller) == result(0, {"via": "nginx"})
            health = f"/mcp_endpoint/health?key={KEY}"
            assert await https_get("127.0.0.2", https_port, health, context) == 200
            # 127.0.0.2 keeps failing: refused at once; 127.0.0.3, behind the same nginx, is
            # another client and gets its ordinary 403.
            wrong = "/mcp_endpoint/health?key=guess"
            for _ in range(3):
                assert await https_get("127.0.0.2", https_port, wrong, context) == 403
            assert await https_get("127.0.0.2", https_port, wrong, context) == 429
            assert await https_get("127.0.0.3", https_port, wrong, context) == 403
            assert await https_get("127.0.0.2", https_port, health, context) == 200
        finally:
            process.terminate()
    assert "127.0.0.2: refused: too many failed authentications" in caplog.text
