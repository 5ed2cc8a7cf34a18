"""Connections that never end: `imsearch serve` under an open-file limit of 1,024 with 1,100 idle sockets open,
and slow uploads that stop half-way.

    .venv/bin/python bench/connections.py                      # 1,100 idle sockets, 25 stalled uploads
    .venv/bin/python bench/connections.py --idle 2000 --seconds 30

Stores 2 photos per class of ../shared/datasets/rooms/base in a database it creates and drops on the server of
DATABASE_URL (else of a throwaway embedded PostgreSQL), and serves them with `imsearch serve` on a loopback port in
a process whose open-file limit is 1,024 (soft and hard, as `ulimit -n 1024`), with the stand-in weights unless
IMSEARCH_WEIGHTS is set. Then: --idle sockets connect and send nothing, while a fresh client asks for
/api/health and searches with a photo once a second for --seconds; then --stalled clients each send the headers
and 19 MB of a 20 MB upload and stop, and the bytes of the temporary files the server holds are read from
/proc. Prints what each probe got, how long it took, and how many lines the server logged; asserts nothing.

tests/test_serve.py imports the helpers below (`idle_sockets`, `stall_upload`, `spooled_bytes`) and serves with
`hostile.serving`, as this bench does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

try:
    from . import hostile  # imported as bench.connections, by the tests
except ImportError:
    import hostile  # run as a script

ROOMS = hostile.ROOMS
MB = 1024 * 1024


def raise_own_limit(needed: int) -> None:
    """Let this process open `needed` more sockets: its soft open-file limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@contextlib.contextmanager
def idle_sockets(base: str, n: int) -> Iterator[list[socket.socket]]:
    """`n` connections to the server that send nothing (the kernel completes them whether or not it accepts)."""
    raise_own_limit(n)
    opened: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(address(base), timeout=5)
            opened.append(s)
        yield opened
    finally:
        for s in opened:
            s.close()


def still_open(sockets: Sequence[socket.socket]) -> int:
    """How many of these connections the server has not closed (a closed one reads as EOF or a reset)."""
    count = 0
    for s in sockets:
        s.setblocking(False)
        try:
            data = s.recv(4096)
        except BlockingIOError:
            count += 1
            continue
        except OSError:
            continue
        finally:
            s.setblocking(True)
        if data and not data.startswith(b"HTTP/1.1 408"):
            count += 1
    return count


def stall_upload(base: str, sent: int, declared: int, name: str = "stalled.png") -> socket.socket:
    """A connection that sends the headers and `sent` bytes of a `declared`-byte multipart upload, then nothing."""
    boundary = b"imsearch-stall"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="' + name.encode() +
            b'"\r\nContent-Type: image/png\r\n\r\n')
    host, port = address(base)
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"POST /api/find HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
              b"Content-Length: " + str(declared).encode() + b"\r\n\r\n" + head)
    chunk = b"\x89PNG" * (256 * 1024)
    left = sent - len(head)
    while left > 0:
        s.sendall(chunk[:left])
        left -= len(chunk)
    return s


def spooled_bytes(pid: int) -> int:
    """Bytes of the deleted (unnamed temporary) files the process holds open, read from /proc."""
    total = 0
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).endswith("(deleted)"):
                total += os.stat(fd).st_size
    return total


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def probe(base: str, photo: bytes, timeout: float = 10) -> list[tuple[str, str, float]]:
    """A fresh client's health check and search: (what, status or error, seconds) for each."""
    out = []
    for what in ("health", "find"):
        started = time.perf_counter()
        try:
            with httpx.Client(timeout=timeout) as client:
                if what == "health":
                    response = client.get(base + "/api/health")
                else:
                    response = client.post(base + "/api/find", files={"file": ("photo.jpg", photo, "image/jpeg")})
            status = str(response.status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        out.append((what, status, time.perf_counter() - started))
    return out


def log_summary(log: Path) -> str:
    text = log.read_bytes().decode(errors="replace")
    return (f"{len(text.splitlines())} log lines, {text.count('Traceback')} tracebacks, "
            f"{text.count('Too many open files')} 'Too many open files'")


def main() -> None:
    from synthetic import bench_server, drop_database, fresh_database


    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1100, help="idle connections [1100]")
    parser.add_argument("--open-files", type=int, default=1024, help="the server's open-file limit [1024]")
    parser.add_argument("--seconds", type=float, default=20, help="how long to probe under the idle sockets [20]")
    parser.add_argument("--stalled", type=int, default=25, help="uploads that stop half-way [25]")
    parser.add_argument("--serve-args", default="", help="more options for `imsearch serve`, one string")
    args = parser.parse_args()

    name = f"imsearch_bench_connections_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="imsearch-bench-connections-") as tmp, bench_server() as admin:
        work = Path(tmp)
        url = fresh_database(admin, name)
        # 1. Weights and 2 photos per class.
        weights, _ = hostile.stored_library(work, url, 2)
        photo = sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0].read_bytes()

        log = work / "serve.log"
        try:
            serve = hostile.serving(url, weights, log, args=args.serve_args.split(), open_files=args.open_files)
            with serve as (base, proc):
                print(f"imsearch serve, open-file limit {args.open_files}: {open_descriptors(proc.pid)} descriptors "
                      "at rest; " + ", ".join(f"{w} {s} in {t:.2f} s" for w, s, t in probe(base, photo)))
                # 2. Idle sockets, and a fresh client once a second.
                started = time.monotonic()
                with idle_sockets(base, args.idle) as idle:
                    print(f"{args.idle} idle sockets open in {time.monotonic() - started:.1f} s")
                    while time.monotonic() - started < args.seconds:
                        at = time.monotonic() - started
                        got = probe(base, photo)
                        print(f"  t={at:5.1f} s: " + ", ".join(f"{w} {s} in {t:.2f} s" for w, s, t in got) +
                              f"; server descriptors {open_descriptors(proc.pid)}, idle sockets still open "
                              f"{still_open(idle)}")
                        time.sleep(max(0.0, 1 - (time.monotonic() - started - at)))
                print(f"after the idle sockets: {log_summary(log)}")
                # 3. Uploads that stop after 19 MB of 20.
                stalled = [stall_upload(base, 19 * MB, 20 * MB) for _ in range(args.stalled)]
                time.sleep(1)
                print(f"{args.stalled} stalled uploads: temporary files {spooled_bytes(proc.pid) / MB:.0f} MB")
                for wait in (30, 65):
                    time.sleep(wait - (1 if wait == 30 else 30))
                    print(f"  {wait} s later: temporary files {spooled_bytes(proc.pid) / MB:.0f} MB, "
                          f"stalled connections still open {still_open(stalled)}; "
                          + ", ".join(f"{w} {s} in {t:.2f} s" for w, s, t in probe(base, photo)))
                for s in stalled:
                    s.close()
                print(f"at the end: {log_summary(log)}")
        finally:
            drop_database(admin, name)


if __name__ == "__main__":
    main()
