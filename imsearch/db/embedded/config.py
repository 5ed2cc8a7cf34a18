"""The embedded server's configuration: who may log in (pg_hba.conf, pg_ident.conf), its command line, the folder
of its socket, and the memory and extension tuning of a new server."""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import stat
import tempfile
from pathlib import Path
from typing import Any, Literal

from ...errors import DatabaseUnavailable
from ...settings import build_memory_mb, shared_buffers_mb
from ..datafolder import write_file
from .programs import SUPERUSER, SYSTEM_USER, server_user

log = logging.getLogger(__name__)

DATABASE = "postgres"  # the embedded server's database
PORT = 5432  # names the socket file (.s.PGSQL.5432); there is no TCP port unless `imsearch db serve` opens one
SOCKET_PATH_MAX = 107  # a Unix socket's path: 108 bytes with the closing NUL
IDENT_MAP = "imsearch"
# Connection slots only the superuser may take, so that readers' logins (each reader capped at
# sqlaccess.READER_CONNECTION_LIMIT, but several add up) never lock imsearch's own processes out: of PostgreSQL's
# default 100, readers share the other 80. Given on the command line, it overrides postgresql.conf.
RESERVED_CONNECTIONS = 20
# Logins through the socket: the kernel says which OS user connects (peer), and pg_ident.conf maps only imsearch's
# own users to `postgres` (only they may enter the socket's folder anyway). Over TCP (`imsearch db serve`),
# read-only roles (`imsearch db grant-reader`) log in with their password, to imsearch's database only: elsewhere
# PostgreSQL's defaults would let them create large objects.
HBA_HEADER = f"""\
# Written by imsearch at every start of the embedded server; changes here are lost.
local   all             {SUPERUSER:<15} peer map={IDENT_MAP}
local   all             all                                     scram-sha-256
"""
HBA_LOOPBACK = f"""\
host    {DATABASE:<15} all             127.0.0.1/32            scram-sha-256
host    {DATABASE:<15} all             ::1/128                 scram-sha-256
"""
HBA_ANY_ADDRESS = f"hostssl {DATABASE:<15} all             all                     scram-sha-256\n"
# Who may reach the server over TCP: nobody (the socket only), this machine, or any address (with TLS).
Tcp = Literal["none", "loopback", "any"]


def write_hba(pgdata: Path, tcp: Tcp = "none") -> None:
    """pg_hba.conf and pg_ident.conf: peer logins on the socket for imsearch's own OS users; over TCP (`db serve`),
    passwords, and beyond loopback TLS as well. They keep the owner of the data folder."""
    users = sorted({getpass.getuser(), *([SYSTEM_USER] if server_user() is not None else [])})
    hba = HBA_HEADER + {"none": "", "loopback": HBA_LOOPBACK, "any": HBA_LOOPBACK + HBA_ANY_ADDRESS}[tcp]
    ident = "".join(f"{IDENT_MAP:<15} {shlex.quote(u):<31} {SUPERUSER}\n" for u in users)
    for name, text in (("pg_hba.conf", hba), ("pg_ident.conf", ident)):
        write_file(pgdata / name, text.encode(), server_user())


def options(socket_dir: Path, *, host: str = "", port: int = PORT, extra: str = "") -> str:
    """The postgres command line pg_ctl passes on: listen addresses (none by default), port, socket folder."""
    return (f"-h {shlex.quote(host)} -p {port} -k {shlex.quote(str(socket_dir))} "
            f"-c unix_socket_permissions=0700 -c superuser_reserved_connections={RESERVED_CONNECTIONS} "
            f"{extra}").strip()


def socket_dir(pgdata: Path, user: Any) -> Path:
    """The data folder (only the server's user may enter it); where its path is too long for a socket, a new
    0700 folder of the server's user under /tmp, never a shared one."""
    if len(str(pgdata / f".s.PGSQL.{PORT}")) <= SOCKET_PATH_MAX:
        return pgdata
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        if len(base) + len(f"/imsearch-pg-12345678/.s.PGSQL.{PORT}") <= SOCKET_PATH_MAX:
            folder = Path(tempfile.mkdtemp(prefix="imsearch-pg-", dir=base))  # mode 0700, in a sticky /tmp
            if user is not None:
                os.chown(folder, user.pw_uid, user.pw_gid)
            log.info("socket path under %s is too long: using %s", pgdata, folder)
            return folder
    raise DatabaseUnavailable(f"no short private folder for the embedded PostgreSQL's socket (the path under "
                              f"{pgdata} is too long and so is the temporary folder's); set a shorter IMSEARCH_HOME")


def is_private(folder: Path | None, pgdata: Path) -> bool:
    """Whether only the server's user may enter a server's socket folder (servers of earlier builds could use a
    shared one)."""
    if folder is None:
        return False
    if folder == pgdata:
        return True
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    user = server_user()
    uid = user.pw_uid if user is not None else os.geteuid()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077


def tune(uri: str) -> None:
    """Size the server's memory for HNSW indexes and bring the vector extension up to the shipped version.

    An index search reads pages at random; at PostgreSQL's default 128 MB of shared_buffers a 100k-row library
    (1.5 GB of indexes) reads most of them from the OS cache, which made mode other 1.6x slower. An HNSW build whose
    graph outgrows maintenance_work_mem (64 MB: about 10,000 rows) goes on far slower (docs/scaling.md has both).
    Only initdb's values are replaced: a value set by anyone else (`ALTER SYSTEM`, postgresql.conf) is left alone.
    """
    import psycopg

    from ..connect import update_vector  # psycopg and numpy: not for the watcher, which imports this package

    wanted = (("shared_buffers", 128, shared_buffers_mb()), ("maintenance_work_mem", 64, build_memory_mb()))
    try:
        with psycopg.connect(uri, autocommit=True) as conn:
            update_vector(conn)
            # A read-only login may use imsearch's database only (pg_hba.conf says so too): template1 has
            # PostgreSQL's defaults, under which any role may create large objects.
            conn.execute("REVOKE CONNECT ON DATABASE template1 FROM PUBLIC")
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
