"""A throwaway PostgreSQL primary and its hot standby, on free loopback ports.

The primary is made with `initdb` in a temporary folder (the suite's own
server is left alone: its replication settings are not ours to change);
`pg_basebackup -c fast` copies it, with a replication slot, into a second
folder that runs as a streaming hot standby, which replays each commit 50 ms
late (`recovery_min_apply_delay`) so that reading it right after a commit is
reliably stale. At the end of the session both
are stopped, the slot dropped and the folders removed. The server processes
run as the `postgres` user, as PostgreSQL requires of a root caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import service_unavailable
from .faults import dead_port

#: Seconds a server may take to start, or the standby to stream.
READY_LIMIT = 60.0
DATABASE = "dotmac"
SLOT = "dotmac_standby"


def _as_postgres(*command: str | Path) -> str:
    """Run `command` as the postgres user (directly when already that user)."""
    argv = [str(part) for part in command]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    done = subprocess.run(  # noqa: S603 - fixed tools, our own arguments
        argv, capture_output=True, text=True, timeout=READY_LIMIT, check=False
    )
    if done.returncode != 0:
        msg = f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout}"
        raise RuntimeError(msg)
    return done.stdout


@dataclass
class Server:
    """One PostgreSQL server of the pair: its folder, binaries and port."""

    directory: Path
    bindir: Path
    port: int

    @property
    def url(self) -> str:
        """The test database on this server, as a toolkit URL."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def dsn(self) -> str:
        """The same for asyncpg."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        log = str(self.directory / "server.log")
        _as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            log,
            "-w",
            "-t",
            str(int(READY_LIMIT)),
            "start",
        )

    def kill(self) -> None:
        """Stop at once, as a crash would (`-m immediate`): its clients see it go."""
        _as_postgres(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
        )

    def running(self) -> bool:
        """Whether the server's postmaster runs."""
        try:
            _as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status")
        except RuntimeError:
            return False
        return True

    @property
    def data(self) -> Path:
        """The data directory."""
        return self.directory / "data"

    def tool(self, name: str, *args: str | Path) -> str:
        """Run the client program `name` against this server; its output."""
        where = ("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres")
        return _as_postgres(self.bindir / name, *where, *args)

    def configure(self, lines: Sequence[str]) -> None:
        """Write the server's settings: its port and socket, and `lines`."""
        settings = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.directory}'",
            "shared_buffers = 32MB",
            "fsync = off",
            *lines,
        ]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n" + "\n".join(settings) + "\n")


@dataclass
class Replication:
    """A primary and a hot standby streaming from it through slot `SLOT`."""

    primary: Server
    standby: Server

    async def calls(self, server: Server, pattern: str) -> int:
        """Statements `server` ran whose text matches `pattern` (`ILIKE`)."""
        import asyncpg

        conn = await asyncpg.connect(server.dsn, timeout=5)
        try:
            count = await conn.fetchval(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                "WHERE query ILIKE $1",
                pattern,
            )
        finally:
            await conn.close()
        return int(count)

    async def replayed(self) -> None:
        """Wait until the standby has replayed everything the primary wrote."""
        import asyncpg

        primary = await asyncpg.connect(self.primary.dsn, timeout=5)
        standby = await asyncpg.connect(self.standby.dsn, timeout=5)
        try:
            target = await primary.fetchval("SELECT pg_current_wal_insert_lsn()::text")
            deadline = time.monotonic() + READY_LIMIT
            while await standby.fetchval(
                "SELECT pg_last_wal_replay_lsn() < $1::text::pg_lsn", target
            ):
                if time.monotonic() > deadline:
                    msg = "the standby did not catch up"
                    raise RuntimeError(msg)
                await asyncio.sleep(0.01)
        finally:
            await primary.close()
            await standby.close()

    async def wait_streaming(self) -> None:
        """Wait until the standby is in recovery and streams from the slot."""
        import asyncpg

        deadline = time.monotonic() + READY_LIMIT
        while True:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                standby = await asyncpg.connect(self.standby.dsn, timeout=2)
                primary = await asyncpg.connect(self.primary.dsn, timeout=2)
                try:
                    recovering = await standby.fetchval("SELECT pg_is_in_recovery()")
                    active = await primary.fetchval(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                        SLOT,
                    )
                finally:
                    await standby.close()
                    await primary.close()
                if recovering and active:
                    return
            if time.monotonic() > deadline:
                msg = f"standby on port {self.standby.port} is not streaming"
                raise RuntimeError(msg)
            await asyncio.sleep(0.1)


def _bindir() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_basebackup").exists():
            return candidate
    found = shutil.which("initdb")
    if found is None:
        msg = "initdb / pg_basebackup not found (PostgreSQL server packages)"
        raise RuntimeError(msg)
    return Path(found).parent


async def _make() -> Replication:
    bindir = _bindir()
    # Run as root, the servers run as the postgres user and own their folders;
    # run as anyone else, they run as that user.
    owner = (
        pwd.getpwnam("postgres") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    )
    directory = Path(tempfile.mkdtemp(prefix="dotmac-replication-"))
    os.chown(directory, owner.pw_uid, owner.pw_gid)
    primary = Server(directory / "primary", bindir, dead_port())
    standby = Server(directory / "standby", bindir, dead_port())
    for server in (primary, standby):
        server.directory.mkdir()
        os.chown(server.directory, owner.pw_uid, owner.pw_gid)
    pair = Replication(primary, standby)
    try:
        # initdb's pg_hba.conf trusts local and loopback clients, replication too.
        _as_postgres(
            str(bindir / "initdb"),
            "-D",
            str(primary.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "--no-instructions",
        )
        # pg_stat_statements counts, on each server, the statements it ran.
        preload = "shared_preload_libraries = 'pg_stat_statements'"
        primary.configure(["wal_level = replica", "max_wal_senders = 4", preload])
        primary.start()
        primary.tool("createdb", DATABASE)
        primary.tool(
            "pg_basebackup",
            "-D",
            standby.data,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-C",
            "-S",
            SLOT,
        )
        primary.tool(
            "psql", "-d", DATABASE, "-c", "CREATE EXTENSION pg_stat_statements"
        )
        # Replay each commit 50 ms late: a read right after a commit misses it
        # on the standby every time, so a stale read cannot pass unnoticed.
        standby.configure(
            ["hot_standby = on", preload, "recovery_min_apply_delay = 50"]
        )
        standby.start()
        await pair.wait_streaming()
    except BaseException:
        _remove(pair)
        raise
    return pair


def _drop_slot(primary: Server) -> None:
    """Drop the standby's slot (the walsender lets it go just after the standby)."""
    query = (
        "SELECT count(pg_drop_replication_slot(slot_name)) FROM pg_replication_slots"
        f" WHERE slot_name = '{SLOT}' AND NOT active"
    )
    left = f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
    for _ in range(100):
        primary.tool("psql", "-d", DATABASE, "-Atc", query)
        if primary.tool("psql", "-d", DATABASE, "-Atc", left).strip() == "0":
            return
        time.sleep(0.05)


def _remove(pair: Replication) -> None:
    if pair.standby.data.exists() and pair.standby.running():
        with contextlib.suppress(RuntimeError):
            pair.standby.kill()
    if pair.primary.data.exists() and pair.primary.running():
        with contextlib.suppress(RuntimeError):
            _drop_slot(pair.primary)
        with contextlib.suppress(RuntimeError):
            pair.primary.kill()
    shutil.rmtree(pair.primary.directory.parent, ignore_errors=True)


@pytest.fixture(scope="session", name="pg_replication")
async def pg_replication_fixture() -> AsyncIterator[Replication]:
    """A throwaway PostgreSQL primary with a streaming hot standby."""
    try:
        pair = await _make()
    except Exception as exc:  # noqa: BLE001 - any failure: nothing to test on
        service_unavailable("a PostgreSQL primary with a hot standby", "initdb", exc)
    try:
        yield pair
    finally:
        _remove(pair)
