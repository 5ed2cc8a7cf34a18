"""Another OS user on the same machine cannot reach the embedded PostgreSQL, and no server outlives imsearch."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from imsearch.db import embedded
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
        assert server is not None and embedded.owners(pgdata) == [user.pid]
        user.send_signal(how)
        user.wait(timeout=30)
        assert wait_stopped(pgdata), "the server outlived its last user"
        assert embedded.owners(pgdata) == []
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
        time.sleep(3 * embedded.WATCH_EVERY)
        assert embedded.postmaster(pgdata) == first  # the other one still uses it
        users[1].communicate("\n", timeout=60)  # a normal exit: it stops the server itself
        assert embedded.postmaster(pgdata) is None
    finally:
        for user in users:
            if user.poll() is None:
                user.kill()
        embedded.stop(pgdata)
