"""`imsearch db serve`: the embedded PostgreSQL over TCP with password auth, tried from real processes."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from imsearch.cli import cli
from imsearch.db.embedded import stop
from imsearch.db.server import Endpoint, is_loopback, tls_supported
from imsearch.db.sqlaccess import READER_CONNECTION_LIMIT
from tests.conftest import copy_photos

IMSEARCH = [sys.executable, "-c", "from imsearch.cli import main; main()"]
ROLE, PASSWORD = "bi_reader", "correct horse battery"


@pytest.fixture
def home(tmp_path, weights):
    """Environment for imsearch processes with their own embedded server; it is stopped whatever happens."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(IMSEARCH_HOME=str(tmp_path / "home"), IMSEARCH_WEIGHTS=weights)
    yield env
    stop(tmp_path / "home" / "pgdata")


def imsearch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*IMSEARCH, *args], env=env, capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_until(lines: queue.Queue[str | None], prefix: str, timeout: float = 120) -> list[str]:
    """Lines of a process's stdout up to the first that starts with prefix."""
    seen: list[str] = []
    while True:
        line = lines.get(timeout=timeout)
        if line is None:
            raise AssertionError(f"the process ended before printing {prefix!r}: {seen}")
        seen.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return seen


def test_db_serve_accepts_password_logins_over_tcp_until_stopped(home, tmp_path):
    photos = copy_photos(tmp_path / "photos", 1)
    assert imsearch(home, "ingest", str(photos)).returncode == 0
    granted = imsearch(home, "db", "grant-reader", ROLE, "--password", PASSWORD)
    assert granted.returncode == 0, granted.stderr
    port = free_port()
    proc = subprocess.Popen([*IMSEARCH, "db", "serve", "--port", str(port)], env=home, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=lambda: [*map(lines.put, proc.stdout or []), lines.put(None)], daemon=True).start()
        printed = read_until(lines, "  psql")
        url = f"postgresql://{ROLE}@127.0.0.1:{port}/postgres"
        assert printed[1:5] == ["  host      127.0.0.1", f"  port      {port}", "  database  postgres",
                                f"  user      {ROLE} (read-only)"]
        assert f"  url       {url}" in printed

        with psycopg.connect(host="127.0.0.1", port=port, dbname="postgres", user=ROLE, password=PASSWORD,
                             autocommit=True) as c:
            assert len(c.execute("SELECT * FROM class_summary").fetchall()) == 5
            some_id = c.execute("SELECT min(id) FROM image_catalog").fetchone()[0]
            assert len(c.execute("SELECT * FROM imsearch_nearest(%s, 2, 'other')", (some_id,)).fetchall()) == 2
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                c.execute("DELETE FROM images")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host="127.0.0.1", port=port, dbname="postgres", user=ROLE, password="wrong")
        for elsewhere in ("template1", "template0"):  # imsearch's database only
            with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
                psycopg.connect(host="127.0.0.1", port=port, dbname=elsewhere, user=ROLE, password=PASSWORD)
        with pytest.raises(psycopg.OperationalError):  # the superuser has no password: no TCP login
            psycopg.connect(host="127.0.0.1", port=port, dbname="postgres", user="postgres", password="")
        if shutil.which("psql"):
            out = subprocess.run(["psql", url, "-At", "-c", "SELECT count(*) FROM image_catalog"], text=True,
                                 capture_output=True, env={**os.environ, "PGPASSWORD": PASSWORD}, timeout=30)
            assert out.stdout.strip() == "5", out.stderr

        held, refused = [], []  # a BI tool opening 100 logins at once
        for _ in range(100):
            try:
                held.append(psycopg.connect(host="127.0.0.1", port=port, dbname="postgres", user=ROLE,
                                            password=PASSWORD, connect_timeout=10))
            except psycopg.OperationalError as exc:
                refused.append(str(exc))
        assert len(held) == READER_CONNECTION_LIMIT
        assert all(f'too many connections for role "{ROLE}"' in r for r in refused)
        shown = imsearch(home, "db", "url")
        assert shown.returncode == 0
        assert shown.stdout.strip().endswith(f"&port={port}")  # imsearch's own processes keep the socket
        with contextlib.ExitStack() as stack:  # and keep room for many of their own sessions
            owners = [stack.enter_context(psycopg.connect(shown.stdout.strip())) for _ in range(10)]
            assert [c.execute("SELECT count(*) FROM images").fetchone()[0] for c in owners] == [5] * 10
        for c in held:
            c.close()
        assert f"  port      {port}" in shown.stderr and f"  url       {url}" in shown.stderr
        assert imsearch(home, "db", "url", "--tcp").stdout.strip() == url

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped" in (proc.stderr.read() if proc.stderr else "")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=port, dbname="postgres", user=ROLE, password=PASSWORD,
                            connect_timeout=5)
        assert not (Path(home["IMSEARCH_HOME"]) / "pgdata" / "postmaster.pid").exists()
        assert imsearch(home, "db", "url", "--tcp").returncode == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_db_serve_refuses_a_port_in_use(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = imsearch(home, "db", "serve", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"Error: cannot listen on 127.0.0.1:{port}")
    assert "--port" in result.stderr


def test_db_serve_is_for_the_embedded_server_only(database_url):
    result = CliRunner().invoke(cli, ["--database-url", database_url, "db", "serve"])
    assert result.exit_code == 2
    assert "serves the embedded PostgreSQL" in result.stderr


def test_only_loopback_addresses_count_as_local():
    assert is_loopback("127.0.0.1") and is_loopback("localhost,::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("*") and not is_loopback("127.0.0.1,192.168.1.5")
    wide = Endpoint("0.0.0.0", 5433, "postgres", (), 1)
    assert wide.url("bi") == "postgresql://bi@127.0.0.1:5433/postgres"
    assert any("other machines can reach it" in line for line in wide.describe())
    assert any("grant-reader NAME" in line for line in wide.describe())


def test_db_serve_beyond_loopback_refuses_to_run_without_tls(home):
    result = imsearch(home, "db", "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 1
    assert "--host 0.0.0.0 lets other machines in" in result.stderr and "in clear text" in result.stderr
    assert "--tls-cert FILE" in result.stderr if tls_supported() else "SSH tunnel" in result.stderr


def own_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_db_serve_beyond_loopback_speaks_tls_only_or_refuses_on_a_build_without_it(home, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    port = free_port()
    if not tls_supported():  # refused before the certificate is read
        cert.write_text("certificate")
        key.write_text("key")
        result = imsearch(home, "db", "serve", "--host", "0.0.0.0", "--port", str(port), "--tls-cert", str(cert),
                          "--tls-key", str(key))
        assert result.returncode == 1 and "this embedded PostgreSQL build has no TLS" in result.stderr
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return
    if not shutil.which("openssl"):
        pytest.fail("openssl is missing: it makes this test's certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=imsearch",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    assert imsearch(home, "db", "grant-reader", ROLE, "--password", PASSWORD).returncode == 0
    proc = subprocess.Popen([*IMSEARCH, "db", "serve", "--host", "0.0.0.0", "--port", str(port),
                             "--tls-cert", str(cert), "--tls-key", str(key)], env=home, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=lambda: [*map(lines.put, proc.stdout or []), lines.put(None)], daemon=True).start()
        read_until(lines, "  note")
        login = {"port": port, "dbname": "postgres", "user": ROLE, "password": PASSWORD, "connect_timeout": 10}
        with psycopg.connect(host="127.0.0.1", sslmode="require", **login) as c:
            assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        address = own_address()
        if address is not None:  # from another machine's point of view: this machine's own network address
            with pytest.raises(psycopg.OperationalError, match="no encryption"):
                psycopg.connect(host=address, sslmode="disable", **login)
            with psycopg.connect(host=address, sslmode="require", **login) as c:
                assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        key_copy = Path(home["IMSEARCH_HOME"]) / "pgdata" / "server.key"
        assert key_copy.stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
