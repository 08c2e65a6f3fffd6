# trio-mcp-relay in the reference server's place: same port (8004), same data directory
# (/app/data, where .mcp-endpoint-server.cfg and its key live), same relative paths from
# /app (so the reference INI's "log_file = logs/mcp_server.log" lands in /app/logs).
#
#   docker build -t trio-mcp-relay .
#   docker run -d -p 8004:8004 -v "$PWD/data:/app/data" trio-mcp-relay
#
# tests/test_deploy.py runs this file's install commands, CMD and HEALTHCHECK in a fresh
# virtual environment; keep them in step with it.

# --- Build: a wheel of the project, installed with its dependencies into /opt/venv ----------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# .dockerignore lets in only what the wheel needs (never a data/ directory and its key).
COPY pyproject.toml README.md ./
COPY trio_mcp_relay ./trio_mcp_relay
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir /wheels/*.whl

# --- Run: the venv alone, as an unprivileged user -------------------------------------------
FROM python:3.11-slim-bookworm
# A fixed uid/gid, so a bind-mounted ./data can be given to it: chown -R 10001:10001 data
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /app relay \
 && mkdir -p /app/data /app/logs \
 && chown relay:relay /app/data /app/logs
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/app/data
WORKDIR /app
USER relay
VOLUME ["/app/data"]
EXPOSE 8004
# The keyless info endpoint (GET /mcp_endpoint/ -> status "running"), at the port serve
# reads from PORT or the data directory's config file: see trio_mcp_relay/_healthcheck.py
# for why not the keyed health endpoint.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["python", "-m", "trio_mcp_relay._healthcheck"]
# SIGTERM starts the relay's graceful shutdown (stop accepting, shutdown_grace seconds for
# requests in flight, close 1001). Exec form: the relay is PID 1 and gets the signal itself.
STOPSIGNAL SIGTERM
CMD ["trio-mcp-relay", "serve"]
