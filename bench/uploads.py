"""Uploads under attack: the memory of `imsearch serve` and its normal searches while clients send hostile uploads.

    .venv/bin/python bench/uploads.py                         # 8 hostile clients for 10 s
    .venv/bin/python bench/uploads.py --clients 16 --seconds 30

Stores 5 photos per class of ../shared/datasets/rooms/base in a database it creates and drops on the server of
DATABASE_URL (else of a throwaway embedded PostgreSQL), and serves them with `imsearch serve` on a loopback port,
with the stand-in weights unless IMSEARCH_WEIGHTS is set. It times normal searches (an unseen room photo) alone,
then again while --clients threads send the uploads of bench/hostile.py one after another: a 9990x9990 1-bit PNG,
39 MP RGBA PNG and TIFFs, a WebP, a 100 MP progressive JPEG, bodies just under the upload limit, PostScript named
.jpg, a 4000x2900 JPEG of 3,010 scans, a 1x3,000,000 TIFF in one-row strips. Each of those, and the dearest
JPEG accepted (39.7 MP in 50 scans), is first sent alone: its time and the server's peak RSS. The server's RSS, its
children included, is sampled every 50 ms. Client and server share this machine's cores. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import hostile
import httpx
import psutil
from synthetic import bench_server, drop_database, fresh_database

ROOMS = hostile.ROOMS
MB = 1024 * 1024


def alone(base: str, pid: int, upload: hostile.Upload) -> tuple[int, float, int]:
    """One upload sent with nothing else going on: its status, seconds, and the server's peak RSS meanwhile."""
    process = psutil.Process(pid)
    peak = hostile.rss(process)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, hostile.rss(process))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        status = hostile.post(client, base, upload.name, upload.data, upload.mime).status_code
        seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return status, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="hostile clients at once [8]")
    parser.add_argument("--seconds", type=float, default=10, help="how long the hostile load lasts [10]")
    args = parser.parse_args()

    name = f"imsearch_bench_uploads_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="imsearch-bench-uploads-") as tmp, bench_server() as admin:
        work = Path(tmp)
        url = fresh_database(admin, name)
        # 1. Weights (IMSEARCH_WEIGHTS, else the stand-in checkpoint) and 5 photos per class stored.
        weights, stored = hostile.stored_library(work, url, 5)
        normal = sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0].read_bytes()
        uploads = hostile.uploads()

        # 2. Serve them, and search with nothing else going on.
        try:
            with hostile.serving(url, weights, work / "serve.log") as (base, server):
                pid = server.pid
                quiet = hostile.quiet_searches(base, normal, seconds=5)
                # 3. Each hostile upload alone: its time and the server's peak memory.
                dearest = hostile.Upload("scans-50-40mp.jpg", hostile.many_scans_jpeg(6300, 6300, 40), "image/jpeg",
                                         frozenset({200}))
                single = {upload.name: alone(base, pid, upload) for upload in [*uploads, dearest]}
                rest = hostile.rss(psutil.Process(pid))
                # 4. The same searches under hostile uploads.
                load = hostile.pound(base, pid, uploads, normal, seconds=args.seconds, clients=args.clients)
        finally:
            drop_database(admin, name)

    print(f"imsearch serve over {stored} stored photos, {os.cpu_count()} CPUs")
    print(f"  RSS at rest:                       {load.idle_rss / MB:7.0f} MB")
    print(f"  normal search alone, p50:          {statistics.median(quiet):7.3f} s  ({len(quiet)} searches)")
    print(f"each upload alone (status, seconds, server peak RSS above {rest / MB:.0f} MB):")
    for name, (status, seconds, peak) in single.items():
        print(f"    {name:24} {status}  {seconds:7.2f} s  {max(0, peak - rest) / MB:+7.0f} MB")
    print(f"under {args.clients} hostile clients for {args.seconds:g} s:")
    print(f"  peak RSS:                          {load.peak_rss / MB:7.0f} MB  "
          f"(+{(load.peak_rss - load.idle_rss) / MB:.0f} MB)")
    statuses = sorted({s for s, _ in load.normal})
    print(f"  normal search p50:                 {load.normal_p50():7.3f} s  ({len(load.normal)} searches, "
          f"statuses {', '.join(str(s) for s in statuses)})")
    if load.normal:
        print(f"  normal search slowest:             {max(s for _, s in load.normal):7.3f} s")
    retry = sum(1 for _, status, after, _ in load.hostile if status == 503 and after)
    print(f"  hostile uploads answered:          {len(load.hostile):7d}  (503 with Retry-After: {retry})")
    for upload in uploads:
        counts = load.counts().get(upload.name, {})
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        print(f"    {upload.name:24} {len(upload.data) / MB:6.2f} MB  {shown}")


if __name__ == "__main__":
    main()
