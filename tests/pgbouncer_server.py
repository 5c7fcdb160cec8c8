"""A throwaway PgBouncer in transaction mode in front of this run's database.

Two server connections for all of its clients, so that consecutive round trips
of one client really land on different server connections. Its files (config,
auth file, log, pid file, Unix socket) live in a temporary directory that is
removed with it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from .conftest import PG_URL, service_unavailable
from .faults import dead_port

__all__ = ["POOL_SIZE", "pgbouncer"]

#: Server connections PgBouncer keeps per database and user.
POOL_SIZE = 2
#: The user PgBouncer runs as when started by root (it refuses to run as root).
RUN_AS = "postgres"


def _config(directory: Path, port: int) -> str:
    server = make_url(PG_URL)
    host, server_port = server.host or "127.0.0.1", server.port or 5432
    return f"""\
[databases]
{server.database} = host={host} port={server_port} dbname={server.database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {directory}
auth_type = trust
auth_file = {directory}/userlist.txt
pool_mode = transaction
default_pool_size = {POOL_SIZE}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 500
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
admin_users = {server.username or RUN_AS}
"""


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> None:
    """Return once PgBouncer accepts connections; raise if it exits or never does."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"pgbouncer exited with status {process.returncode}"
            raise RuntimeError(msg)
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    msg = "pgbouncer did not listen within 10 s"
    raise RuntimeError(msg)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop our PgBouncer by its pid, after checking the pid is still it."""
    if process.poll() is not None:
        return
    comm = Path(f"/proc/{process.pid}/comm")
    if comm.exists() and comm.read_text().strip() != "pgbouncer":
        return  # not the process we started: never signal it
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[str]:
    """The URL of a transaction-mode PgBouncer in front of this run's database."""
    binary = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path="/usr/sbin:/usr/local/sbin"
    )
    if binary is None:
        missing = FileNotFoundError("pgbouncer is not installed")
        service_unavailable("PgBouncer", "pgbouncer", missing)
    directory = Path(tempfile.mkdtemp(prefix="dotmac-pgbouncer-"))
    port = dead_port()
    user = make_url(PG_URL).username or RUN_AS
    (directory / "userlist.txt").write_text(f'"{user}" ""\n')
    config = directory / "pgbouncer.ini"
    config.write_text(_config(directory, port))
    command = [binary]
    if os.geteuid() == 0:
        # Root may not run PgBouncer: it switches to RUN_AS, which must be
        # able to write its log, pid file and socket in the directory.
        try:
            account = pwd.getpwnam(RUN_AS)
        except KeyError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            service_unavailable("PgBouncer", "pgbouncer", exc)
        for path in (directory, *directory.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
        command += ["-u", RUN_AS]
    # Its own log says why it stopped once running; stderr, why it did not start.
    errors = (directory / "stderr.log").open("wb")
    try:
        process = subprocess.Popen(  # noqa: S603 - our own binary and config
            [*command, str(config)], stdout=subprocess.DEVNULL, stderr=errors
        )
    except OSError as exc:
        errors.close()
        shutil.rmtree(directory, ignore_errors=True)
        service_unavailable("PgBouncer", binary, exc)
    url = (
        make_url(PG_URL)
        .set(host="127.0.0.1", port=port)
        .render_as_string(hide_password=False)
    )
    try:
        _wait_listening(process, port)
    except RuntimeError as exc:
        _stop(process)
        errors.close()
        logs = [directory / "stderr.log", directory / "pgbouncer.log"]
        detail = "".join(log.read_text()[-2000:] for log in logs if log.exists())
        shutil.rmtree(directory, ignore_errors=True)
        service_unavailable("PgBouncer", url, RuntimeError(f"{exc}\n{detail}"))
    try:
        yield url
    finally:
        _stop(process)
        errors.close()
        shutil.rmtree(directory, ignore_errors=True)
