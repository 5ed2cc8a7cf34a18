"""One embedded server: its data folder, its process (start or join, stop, watch) and its clean-up at exit."""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from ...errors import DatabaseUnavailable
from ...settings import embedded_pgdata
from ..datafolder import open_own_file, read_file
from ..serverlog import log_file
from . import config
from .config import DATABASE, PORT
from .owners import Owners, start_time
from .programs import SUPERUSER, SYSTEM_USER, can_enter, initdb, pg_ctl, server_user

log = logging.getLogger(__name__)

WATCHER = "imsearch-watcher.pid"
WATCH_EVERY = 1.0  # seconds between the watcher's checks
WATCHER_MODULE = "imsearch.db.embedded"  # python -m imsearch.db.embedded watch PGDATA


@dataclass(frozen=True)
class Postmaster:
    """A running server, as its postmaster.pid tells it."""

    pid: int
    port: int
    socket_dir: Path | None
    hostname: str  # listen_addresses: empty when the server has no TCP port
    status: str

    def url(self) -> str:
        """The superuser's libpq URI through the socket."""
        return f"postgresql://{SUPERUSER}@/{DATABASE}?host={quote(str(self.socket_dir), safe='/')}&port={self.port}"


def postmaster(pgdata: Path) -> Postmaster | None:
    """The server running on pgdata, else None."""
    data = read_file(pgdata / "postmaster.pid", limit=4096)
    if data is None:
        return None
    lines = data.decode(errors="replace").splitlines()
    if not lines or not lines[0].strip().isdigit() or not _runs(int(lines[0]), "postgres"):
        return None
    field = [line.strip() for line in lines] + [""] * 8
    return Postmaster(int(field[0]), int(field[3] or PORT), Path(field[4]) if field[4] else None, field[5], field[7])


def _runs(pid: int, name: str | None = None, argument: str | None = None) -> bool:
    """Whether process `pid` is the program `name`, or has `argument` on its command line."""
    import psutil

    try:
        process = psutil.Process(pid)
        return (name is None or process.name() == name) and (argument is None or argument in process.cmdline())
    except psutil.Error:
        return False


_held: dict[Path, int] = {}  # the data folder locks this process holds
_joined: dict[Path, EmbeddedServer] = {}  # the servers this process registered with, left at exit
_exit_hook = False  # whether _leave_all is registered with atexit


def _leave_all() -> None:
    for server in reversed(list(_joined.values())):
        server.leave()


class EmbeddedServer:
    """The embedded PostgreSQL of one data folder (default: under IMSEARCH_HOME).

    Every imsearch process that starts it joins it, as one of its `owners`; the last one to leave stops it, and a
    watcher process stops it when they were all killed. A process leaves at exit, or earlier by `leave`.
    """

    def __init__(self, pgdata: Path | None = None) -> None:
        self.pgdata = (pgdata or embedded_pgdata()).resolve()
        self.owners = Owners(self.pgdata)

    @property
    def log(self) -> Path:
        return log_file(self.pgdata)

    def running(self) -> Postmaster | None:
        """The server running on this data folder, else None."""
        return postmaster(self.pgdata)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Only one imsearch process at a time starts, stops or reconfigures the server (re-entrant)."""
        path = self.pgdata.parent / f".{self.pgdata.name}.lock"
        if path in _held:
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _held[path] = fd
            yield
        finally:
            _held.pop(path, None)
            os.close(fd)

    def pg_ctl(self, *args: str) -> None:
        pg_ctl(self.pgdata, *args)

    def start(self, *, tune: bool = True) -> str:
        """Start (or join) the server and return its libpq URI; this process then counts as one of its users until
        it exits (or `leave`s).

        With `tune`, the server's memory is sized for HNSW indexes and pgvector brought up to the shipped version.
        """
        try:
            self._make_parent()
            with self.lock():
                server = self.running()
                if server is not None and not config.is_private(server.socket_dir, self.pgdata):
                    self._restart_private(server)
                    server = None
                launched = server is None
                server = server or self._launch()
                self.owners.add()
                self._ensure_watcher()
        except DatabaseUnavailable:
            raise
        except (OSError, subprocess.SubprocessError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise DatabaseUnavailable(f"cannot start the embedded PostgreSQL in {self.pgdata}: {detail} "
                                      f"(log: {self.log}; set DATABASE_URL to use another server)") from None
        global _exit_hook
        if not _exit_hook:
            atexit.register(_leave_all)
            _exit_hook = True
        _joined[self.pgdata] = self
        uri = server.url()
        if tune and launched:  # a server another process started was tuned by it
            config.tune(uri)
        return uri

    def stop(self) -> bool:
        """Stop the server whoever started it (for scripts and tests); False when it was not running."""
        if not self.pgdata.parent.is_dir():
            return False
        _joined.pop(self.pgdata, None)
        with self.lock():
            if self.pgdata.is_dir():
                self.owners.remove()
            server = self.running()
            if server is None:
                return False
            self.shutdown(server)
        return True

    def leave(self) -> None:
        """This process no longer uses the server (at exit, or when `db serve` ends); the last one stops it."""
        _joined.pop(self.pgdata, None)
        try:
            with self.lock():
                if self.pgdata.is_dir() and not self.owners.remove() and (server := self.running()) is not None:
                    self.shutdown(server)
        except (OSError, DatabaseUnavailable) as exc:
            log.warning("could not stop the embedded PostgreSQL in %s: %s", self.pgdata, exc)

    def shutdown(self, server: Postmaster) -> None:
        """Stop the server (fast mode: sessions are ended, committed work is kept) and remove its private socket
        folder."""
        try:
            self.pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
        except DatabaseUnavailable:
            if self.running() is not None:
                self.pg_ctl("-w", "-m", "immediate", "stop")
        if server.socket_dir is not None and server.socket_dir != self.pgdata:
            shutil.rmtree(server.socket_dir, ignore_errors=True)

    def wait_ready(self, timeout: float = 30.0) -> Postmaster:
        """The server once postmaster.pid says it accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            server = self.running()
            if server is not None and server.status == "ready":
                return server
            if time.monotonic() > deadline:
                raise DatabaseUnavailable(f"the embedded PostgreSQL in {self.pgdata} did not come up "
                                          f"(log: {self.log})")
            time.sleep(0.1)

    def _make_parent(self) -> None:
        """Create the data folder's parent; run by root, the server's user may pass (not list) the folders made."""
        parent = self.pgdata.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        if missing and server_user() is not None:
            for folder in reversed(missing):
                folder.chmod(folder.stat().st_mode | 0o011)

    def _check_passable(self, user: Any) -> None:
        """Run by root, the server's user must pass every folder above the data folder. No folder's mode is widened
        for it (earlier builds made a 0700 home folder 0755): one it cannot pass is an error."""
        parent = self.pgdata.parent
        if can_enter(parent):
            return
        blocked = next((p for p in reversed([parent, *parent.parents]) if not _passable(p, user)), parent)
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL runs as the system user {SYSTEM_USER} when imsearch runs as root, and {blocked} "
            f"(mode {blocked.stat().st_mode & 0o777:04o}) does not let it through; imsearch does not widen it. "
            f"Set IMSEARCH_HOME to a folder it can reach (as root the default is /var/lib/imsearch), run imsearch as "
            f"another user, or set DATABASE_URL"
        )

    def _adopt(self, user: Any) -> None:
        """Make a data folder written by an earlier embedded build runnable by this one.

        Run by root, the server runs as SYSTEM_USER, and PostgreSQL refuses a data folder that another user
        owns: a folder made by pgserver (user `pgserver`) is handed over, file by file. Same major version, so the
        files themselves need nothing; pgvector's catalog entry is updated at start (`config.tune`).
        """
        if not (self.pgdata / "PG_VERSION").exists():
            return
        if self.pgdata.stat().st_uid == user.pw_uid and (self.pgdata / "PG_VERSION").stat().st_uid == user.pw_uid:
            return
        log.info("handing %s over to the system user %s", self.pgdata, SYSTEM_USER)
        for folder, dirs, files in os.walk(self.pgdata):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.lchown(name, user.pw_uid, user.pw_gid)

    def _launch(self) -> Postmaster:
        """initdb when the folder is new, then start the server on a private socket and no TCP port."""
        user = server_user()
        if user is not None:
            self._check_passable(user)
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            self._adopt(user)
            if self.pgdata.lstat().st_uid != user.pw_uid:
                os.lchown(self.pgdata, user.pw_uid, user.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("creating the embedded PostgreSQL data folder %s", self.pgdata)
            initdb(self.pgdata)
        config.write_hba(self.pgdata)
        folder = config.socket_dir(self.pgdata, user)
        self.pg_ctl("-w", "-t", "60", "-l", str(self.log), "-o", config.options(folder), "start")
        return self.wait_ready()

    def _restart_private(self, server: Postmaster) -> None:
        """A running server whose socket folder others may enter: restart it privately when no one else uses it."""
        if self.owners.live(others=True):
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL in {self.pgdata} listens on a socket in {server.socket_dir}, which other "
                "users may enter, and imsearch processes still use it; run again when they have finished")
        log.info("restarting the embedded PostgreSQL: its socket folder %s is not private", server.socket_dir)
        self.shutdown(server)

    def _ensure_watcher(self) -> None:
        """A detached process that stops the server once all of its users are gone, killed ones included."""
        try:
            pid = int(read_file(self.pgdata / WATCHER, limit=64) or b"0")
        except ValueError:
            pid = 0
        if pid and start_time(pid) is not None and _runs(pid, argument=WATCHER_MODULE):
            return
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[3]), *filter(None, [os.environ.get("PYTHONPATH")])])}
        # sh starts it in the background and exits: the watcher belongs to no imsearch process and no terminal.
        subprocess.run(["/bin/sh", "-c", f'exec "$0" -m {WATCHER_MODULE} watch "$1" </dev/null >/dev/null 2>&1 &',
                        sys.executable, str(self.pgdata)], env=env, cwd="/", start_new_session=True, check=False,
                       timeout=30)

    def watch(self) -> None:
        """The watcher: stop the server when no registered imsearch process has been alive for two checks."""
        fd = open_own_file(self.pgdata / WATCHER)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return  # another watcher has the folder
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        idle = 0
        while True:
            time.sleep(WATCH_EVERY)
            with self.lock():
                server = self.running()
                if server is None:
                    return
                idle = 0 if self.owners.live() else idle + 1
                if idle >= 2:
                    self.shutdown(server)
                    return


def _passable(folder: Path, user: Any) -> bool:
    st = folder.stat()
    bit = 0o100 if st.st_uid == user.pw_uid else 0o010 if st.st_gid == user.pw_gid else 0o001
    return bool(st.st_mode & bit)
