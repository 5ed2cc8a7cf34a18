"""`imsearch serve` as a real process on a loopback port: deadlines, the connection cap under an open-file limit
of 1,024, and coming back after its embedded PostgreSQL is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench import connections, hostile
from tests.conftest import ROOMS, copy_photos

MB = 1024 * 1024


def photo() -> bytes:
    return sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0].read_bytes()


@pytest.fixture
def library(app, tmp_path) -> str:
    """A database holding one photo per class; its URL."""
    assert app.ingest(copy_photos(tmp_path / "photos", 1)).added == 5
    return app.settings.database_url


def read_until_closed(s: socket.socket, within: float) -> tuple[bytes, float]:
    """What the server sends before it closes the connection, and when it closed it (seconds from now)."""
    started = time.monotonic()
    s.settimeout(within)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def test_1100_idle_connections_under_an_open_file_limit_of_1024_leave_the_page_answering(library, weights, tmp_path):
    log = tmp_path / "serve.log"
    # Deadlines far off: what keeps the page answering here is the connection cap, not the header deadline.
    with hostile.serving(library, weights, log, open_files=1024,
                             args=["--header-timeout", "120", "--keep-alive", "120"]) as (base, proc), \
            connections.idle_sockets(base, 1100) as idle:
        time.sleep(1)
        for _ in range(3):
            started = time.monotonic()
            health = httpx.get(base + "/api/health", timeout=10)
            assert health.status_code == 200 and time.monotonic() - started < 3
            found = httpx.post(base + "/api/find", files={"file": ("photo.jpg", photo(), "image/jpeg")}, timeout=10)
            assert found.status_code == 200 and len(found.json()[0]["matches"]) == 5
        assert connections.open_descriptors(proc.pid) < 1024 - 64
        assert connections.still_open(idle) < 1024 - 64, "the oldest idle connections make room for new ones"
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Too many open files" not in text, text[-3000:]
    assert "at most 352 connections at once (not 1000): the open-file limit is 1024" in text


def test_headers_and_body_have_deadlines_and_a_stalled_upload_leaves_no_temporary_file(library, weights, tmp_path):
    with hostile.serving(library, weights, tmp_path / "serve.log",
                             args=["--header-timeout", "2", "--body-timeout", "3"]) as (base, proc):
        silent = socket.create_connection(connections.address(base))
        partial = socket.create_connection(connections.address(base))
        partial.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line never comes
        stalled = connections.stall_upload(base, 5 * MB, 20 * MB)
        deadline = time.monotonic() + 2
        while connections.spooled_bytes(proc.pid) < 4 * MB:  # Starlette spools a part over 1 MB to a file
            assert time.monotonic() < deadline, "the upload was not spooled to a temporary file"
            time.sleep(0.05)
        assert httpx.get(base + "/api/health", timeout=5).status_code == 200  # meanwhile, the page answers

        data, after = read_until_closed(silent, 10)
        assert data == b"" and after < 4  # nothing was asked: closed without an answer
        data, after = read_until_closed(partial, 10)
        assert data.startswith(b"HTTP/1.1 408 ") and after < 4
        assert data.endswith(b'{"detail": "the request\'s headers did not arrive within 2 s"}')
        data, after = read_until_closed(stalled, 10)
        assert data.startswith(b"HTTP/1.1 408 ") and after < 4
        assert data.endswith(b'{"detail": "the request\'s body did not arrive within 3 s"}')
        deadline = time.monotonic() + 2
        while connections.spooled_bytes(proc.pid) > 0:
            assert time.monotonic() < deadline, "the stalled upload's temporary file is still open"
            time.sleep(0.05)
        found = httpx.post(base + "/api/find", files={"file": ("photo.jpg", photo(), "image/jpeg")}, timeout=30)
        assert found.status_code == 200
        for s in (silent, partial, stalled):
            s.close()


def test_beyond_the_connection_cap_the_longest_idle_connection_makes_room(library, weights, tmp_path):
    with hostile.serving(library, weights, tmp_path / "serve.log",
                             args=["--max-connections", "8", "--header-timeout", "120"]) as (base, _), \
            connections.idle_sockets(base, 8) as idle:
        time.sleep(0.5)
        first = idle[0]
        with httpx.Client(timeout=5) as client:  # a keep-alive connection, busy only while it asks
            for _ in range(3):
                assert client.get(base + "/api/health").status_code == 200
        data, after = read_until_closed(first, 5)
        assert data == b"" and after < 1, "the oldest idle connection was closed for the new one"


def test_the_page_comes_back_after_kill_9_of_its_embedded_server(weights, tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(IMSEARCH_HOME=str(home), IMSEARCH_WEIGHTS=weights)
    photos = copy_photos(tmp_path / "photos", 1)
    ingest = subprocess.run([sys.executable, "-c", "from imsearch.cli import main; main()", "ingest", str(photos),
                             "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert ingest.returncode == 0, ingest.stderr
    pid_file = home / "pgdata" / "postmaster.pid"
    try:
        with hostile.serving(None, weights, tmp_path / "serve.log", env=env) as (base, _):
            assert httpx.get(base + "/api/health", timeout=10).json()["images"] == 5
            postmaster = int(pid_file.read_text().split()[0])
            os.kill(postmaster, signal.SIGKILL)
            while Path(f"/proc/{postmaster}").exists():
                time.sleep(0.05)
            killed = time.monotonic()
            answers = []
            while True:
                response = httpx.get(base + "/api/health", timeout=30)
                answers.append((response.status_code, response.json()))
                if response.status_code == 200:
                    break
                assert time.monotonic() - killed < 20, answers
                time.sleep(0.2)
            assert time.monotonic() - killed < 10, answers
            assert answers[-1][1]["images"] == 5
            for status, body in answers[:-1]:
                assert status == 503 and body == {"detail": "the database is not answering; try again in a moment"}
            assert int(pid_file.read_text().split()[0]) != postmaster, "a new server runs"
            found = httpx.post(base + "/api/find", files={"file": ("photo.jpg", photo(), "image/jpeg")}, timeout=30)
            assert found.status_code == 200 and len(found.json()[0]["matches"]) == 5
    finally:
        from imsearch.db import embedded

        embedded.stop(home / "pgdata")
