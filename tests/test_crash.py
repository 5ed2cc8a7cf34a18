"""Crashes, Ctrl-C, concurrent runs and dropped connections, with `imsearch ingest` as a real process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from imsearch.cli import cli

from .conftest import copy_photos

IMSEARCH = [str(Path(sys.executable).with_name("imsearch"))]
if not Path(IMSEARCH[0]).exists():
    IMSEARCH = [sys.executable, "-c", "from imsearch.cli import main; main()"]

# Runs a command as a process for which chmod 000 binds: as root (which owns the interpreter's folders), without
# the two capabilities that bypass file permissions.
UNPRIVILEGED = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH leave the bounding set (PR_CAPBSET_DROP)
    if libc.prctl(24, cap, 0, 0, 0) != 0:
        sys.exit(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def unprivileged(url: str, folder: Path) -> tuple[list[str], str]:
    """The command prefix that runs a process without root's power to read anything (none when not root), and
    the URL it connects with.

    The embedded test server's socket lies in its data folder, which only the server's own user may enter, and is
    its user's alone (0700): the socket is linked into `folder`, which the process can reach, and opened to it (the
    login is still checked: peer authentication maps the process's user, root, to the superuser).
    """
    if os.geteuid() != 0:
        return [], url
    params = conninfo_to_dict(url)
    host = str(params.get("host") or "")
    if host.startswith("/"):
        name = f".s.PGSQL.{params.get('port') or 5432}"
        os.link(Path(host) / name, folder / name)
        (folder / name).chmod(0o777)
        params["host"] = str(folder)
        url = make_conninfo(**params)
    return [sys.executable, "-c", UNPRIVILEGED], url


SUMMARY = re.compile(r"^(\d+) added, (\d+) updated, (\d+) skipped, (\d+) failed in [\d.]+ s")


def env(url: str, weights: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url, "IMSEARCH_WEIGHTS": weights}


def start(url: str, weights: str, *args: str, prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """`imsearch ARGS` as a child process (its own session, so signals reach only it)."""
    return subprocess.Popen([*prefix, *IMSEARCH, *args], env=env(url, weights), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def ingest_here(url: str, weights: str, folder: Path, *args: str) -> tuple[int, str, str]:
    """The same ingest in this process (the model is loaded already): for re-runs after a crash."""
    result = CliRunner().invoke(cli, ["--database-url", url, "ingest", str(folder), "--device", "cpu", *args],
                                env={"IMSEARCH_WEIGHTS": weights})
    return result.exit_code, result.stdout, result.stderr


def summary(stdout: str) -> tuple[int, int, int, int]:
    match = SUMMARY.match(stdout.splitlines()[-1] if stdout.strip() else "")
    assert match, stdout
    added, updated, skipped, failed = (int(g) for g in match.groups())
    return added, updated, skipped, failed


def query(url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def count(url: str) -> int:
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('public.images')").fetchone() == (None,):
            return 0
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]  # type: ignore[index]


def integrity(url: str) -> tuple[int, int, list[int]]:
    """(rows, distinct paths, distinct embedding dimensions): a half-written batch would show here."""
    rows, paths = query(url, "SELECT count(*), count(DISTINCT path) FROM images")[0]
    dims = [d for (d,) in query(url, "SELECT DISTINCT vector_dims(embedding) FROM images")]
    return rows, paths, dims


def wait_for_rows(url: str, at_least: int, *procs: subprocess.Popen[str], timeout: float = 180) -> int:
    """Poll until `at_least` rows are committed, while the processes still run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = count(url)
        if n >= at_least:
            return n
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"ingest ended before {at_least} rows were stored: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail(f"fewer than {at_least} rows after {timeout} s")


def wait_for_no_other_sessions(url: str, timeout: float = 30) -> None:
    """Until the server has finished with a killed client's session (its last commit included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        others = query(url, "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()")[0][0]
        if others == 0:
            return
        time.sleep(0.05)
    pytest.fail("the killed ingest's session did not end")


N = 25  # photos per test: 5 in each of 5 classes, seven batches of 4


@pytest.fixture
def photos(tmp_path) -> Path:
    return copy_photos(tmp_path / "photos", N // 5)


def test_kill_9_mid_ingest_then_the_same_ingest_stores_each_image_once(database_url, weights, photos):
    proc = start(database_url, weights, "ingest", str(photos), "--device", "cpu", "--batch-size", "4")
    wait_for_rows(database_url, 4, proc)
    proc.kill()
    proc.communicate()
    wait_for_no_other_sessions(database_url)
    at_kill = count(database_url)
    assert 4 <= at_kill < N, "the kill must land half-way"
    code, out, err = ingest_here(database_url, weights, photos, "--batch-size", "4")
    assert (code, err) == (0, "")
    assert summary(out) == (N - at_kill, 0, at_kill, 0)
    assert integrity(database_url) == (N, N, [2048])


def test_ctrl_c_stops_after_the_current_batch_with_a_summary_and_a_rerun_finishes(database_url, weights, photos):
    proc = start(database_url, weights, "ingest", str(photos), "--device", "cpu", "--batch-size", "4")
    at_signal = wait_for_rows(database_url, 4, proc)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc, timeout=60)
    assert code == 1
    assert err == ""
    assert out.rstrip().endswith("(interrupted: re-run to finish)")
    added, updated, skipped, failed = summary(out)
    assert (updated, skipped, failed) == (0, 0, 0)
    assert added == count(database_url) < N
    assert added - at_signal <= 2 * 4, "it stops within a batch or two, not at the end"
    code, out, err = ingest_here(database_url, weights, photos, "--batch-size", "4")
    assert (code, err) == (0, "")
    assert summary(out) == (N - added, 0, added, 0)
    assert integrity(database_url) == (N, N, [2048])


def test_two_ingests_of_one_folder_at_once_store_each_image_once_while_find_answers(database_url, weights, photos):
    # Both start on an empty database, so they also race to create the schema.
    first = start(database_url, weights, "ingest", str(photos), "--device", "cpu", "--batch-size", "4")
    second = start(database_url, weights, "ingest", str(photos), "--device", "cpu", "--batch-size", "3")
    wait_for_rows(database_url, 5, first, second)
    query_photo = sorted(photos.glob("kitchen/*.jpg"))[0]
    found = CliRunner().invoke(cli, ["--database-url", database_url, "find", str(query_photo), "-k", "3",
                                     "--device", "cpu", "--include-self"], env={"IMSEARCH_WEIGHTS": weights})
    still_writing = first.poll() is None or second.poll() is None
    results = [finish(first), finish(second)]
    assert found.exit_code == 0, found.output
    assert len(found.stdout.splitlines()) == 2 + 3  # header, rule, k rows
    assert still_writing, "find must run while an ingest writes"
    assert [(code, err) for code, _, err in results] == [(0, ""), (0, "")]
    counts = [summary(out) for _, out, _ in results]
    assert all(added + updated + skipped == N and failed == 0 for added, updated, skipped, failed in counts)
    assert counts[0][0] + counts[1][0] == N  # each image added by exactly one of them
    assert integrity(database_url) == (N, N, [2048])


def test_a_dropped_connection_mid_ingest_is_retried_and_every_row_stored_once(database_url, weights, photos):
    proc = start(database_url, weights, "ingest", str(photos), "--device", "cpu", "--batch-size", "4")
    wait_for_rows(database_url, 4, proc)
    terminated = query(database_url, "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                                      "FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND pid <> pg_backend_pid()")[0][0]
    assert terminated == 1
    code, out, err = finish(proc)
    assert code == 0, err
    assert re.fullmatch(r"imsearch: database connection lost \(.+\); reconnecting\n", err), err
    added, updated, skipped, failed = summary(out)
    assert added + updated == N and (skipped, failed) == (0, 0)
    assert integrity(database_url) == (N, N, [2048])


def test_unreadable_file_and_folder_are_named_and_their_rows_never_pruned(database_url, weights):
    # A world-readable tree, so that an unprivileged process reaches everything but what is locked.
    shared = Path(tempfile.mkdtemp(prefix="imsearch-locked-"))
    try:
        shared.chmod(0o755)
        prefix, url = unprivileged(database_url, shared)
        own_weights = shared / "weights.pth"
        shutil.copyfile(weights, own_weights)
        photos = copy_photos(shared / "photos", 2)
        for folder in [photos, *photos.iterdir()]:
            folder.chmod(0o755)
        assert summary(ingest_here(database_url, weights, photos)[1]) == (10, 0, 0, 0)
        locked_file = sorted((photos / "kitchen").glob("*.jpg"))[0]
        locked_folder = photos / "bedroom"
        locked_file.chmod(0)
        locked_folder.chmod(0)
        code, out, err = finish(start(url, str(own_weights), "ingest", str(photos), "--device", "cpu", "--prune",
                                      prefix=prefix))
    finally:
        for path in shared.rglob("*"):
            path.chmod(0o755)
        shutil.rmtree(shared)
    assert code == 1, err
    assert sorted(err.splitlines()) == sorted([
        f"{locked_folder}: cannot read folder (Permission denied)",
        f"{locked_file}: cannot read (Permission denied)",
    ])
    assert summary(out) == (0, 0, 7, 2)  # 10 stored: 2 behind the locked folder, 1 locked file, 7 unchanged
    assert count(database_url) == 10, "rows of files that exist but cannot be read are not pruned"


def test_a_server_process_killed_by_a_signal_is_one_line_naming_statement_signal_and_log(tmp_path, weights):
    """As when pgvector hits an instruction the CPU lacks: the backend dies by SIGILL on the first INSERT."""
    from imsearch.db import embedded

    home = tmp_path / "home"
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environment.update(IMSEARCH_HOME=str(home), IMSEARCH_WEIGHTS=weights)
    first, more = copy_photos(tmp_path / "first", 2), copy_photos(tmp_path / "more", 2, start=2)

    def imsearch(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*IMSEARCH, *args], env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    assert finish(imsearch("ingest", str(first), "--device", "cpu"))[0] == 0
    url = embedded.start(home / "pgdata")
    try:
        blocker = psycopg.connect(url)  # the server's crash recovery ends this session too
        blocker.execute("LOCK TABLE images IN SHARE MODE")  # reads go on, the ingest's INSERT waits
        proc = imsearch("ingest", str(more), "--device", "cpu", "--batch-size", "4")
        deadline = time.monotonic() + 120
        while not (waiting := query(url, "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                         "AND query ~ '^[[:space:]]*INSERT INTO images'")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(waiting[0][0], signal.SIGILL)
        code, out, err = finish(proc)
        blocker.close()
        deadline = time.monotonic() + 60
        while True:  # the server restarts every process after a crash, then replays its log
            try:
                rows = integrity(url)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "the server did not recover from the crash"
                time.sleep(0.2)
    finally:
        from imsearch.db.embedded.programs import pg_ctl

        pg_ctl(home / "pgdata", "-w", "-m", "immediate", "stop")  # a crashed server needs no clean shutdown
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch(
        rf"Error: the database server's process {waiting[0][0]} was killed by signal 4 \(SIGILL\) while running "
        rf"`\s*INSERT INTO images \(path, class, .+`; nothing of it was stored, and what was stored before is kept "
        rf"\(server log: {re.escape(str(home / 'pgdata' / 'log'))}\)\n", err)
    assert rows == (10, 10, [2048])
