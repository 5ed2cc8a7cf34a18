"""`imsearch ingest --ray` on a running local Ray cluster against a plain `imsearch ingest` of the same photos.

    .venv/bin/python bench/ray_ingest.py                     # 1,000 large JPEGs, a cluster of 2 CPUs
    .venv/bin/python bench/ray_ingest.py --rounds 3          # each arm three times, alternating; medians

Makes its own 4032x3024 JPEGs (quality 90) upscaled from ../shared/datasets/rooms (bench/ingest.py's, cached in
the same folder), the stand-in weights unless --weights is given, a throwaway data folder (the ONNX export is
made once, before either arm, as an earlier ingest would have) and a throwaway embedded PostgreSQL (or
DATABASE_URL), where each arm ingests into a fresh database. The plain arm runs with no cluster up; then a local
cluster of --cpus CPUs starts (not timed: it is the running cluster `--ray` joins), and the Ray arm runs on it.
Each arm is the whole command, `python -m imsearch ingest FOLDER --json [--ray ADDRESS]`, timed from start to
exit. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest import make_photos
from synthetic import bench_server, drop_database, fresh_database

from imsearch.db.migrate import upgrade
from imsearch.model.runtimes import cpu_threads, get_model

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))

# Holds a local Ray cluster of argv[1] CPUs for as long as its stdin stays open; prints the cluster's address.
CLUSTER = """import sys
import ray
context = ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False)
print(context.address_info["gcs_address"], flush=True)
sys.stdin.read()
"""


def timed_ingest(folder: Path, url: str, weights: str, extra: list[str]) -> tuple[float, dict]:
    """The whole `imsearch ingest --json` command in a process of its own: wall seconds, and its summary."""
    cmd = [sys.executable, "-m", "imsearch", "--database-url", url, "ingest", str(folder), "--json",
           "--weights", weights, *extra]
    # Ray 2.52+ starts local clusters with token authentication; a driver given an address sends the token
    # (~/.ray/auth_token, which the cluster wrote) only when asked to.
    env = {**os.environ, "RAY_AUTH_MODE": "token"} if "--ray" in extra else None
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - t
    try:
        return seconds, json.loads(done.stdout)
    except json.JSONDecodeError:
        sys.exit(f"{' '.join(cmd[3:])} failed (exit {done.returncode}): {done.stdout[:800]}{done.stderr[-800:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=1000, help="large JPEGs to ingest")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--weights", help="weights name or file [default: a stand-in written by ../shared/tools]")
    ap.add_argument("--rounds", type=int, default=1, help="repeat both arms, alternating; print medians")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "imsearch-bench-jpegs"),
                    help="where the large JPEGs are kept between runs (bench/ingest.py's folder)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="imsearch-bench-ray-") as tmp:
        # -- a data folder of its own (the ONNX export), the weights, the photos
        os.environ["IMSEARCH_HOME"] = str(Path(tmp) / "home")
        weights = args.weights
        if weights is None:
            weights = str(Path(tmp) / "standin.pth")
            subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), weights],
                           check=True, capture_output=True)
        t = time.perf_counter()
        files = make_photos(Path(args.cache) / "photos", args.photos)
        folder = Path(tmp) / "photos"  # exactly these files, linked from the cache
        for f in files:
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            (folder / f.parent.name / f.name).symlink_to(f)
        get_model(weights, device="cpu", backend="onnx")  # the export both arms find cached
        print(f"{len(files)} JPEGs 4032x3024 q90 ({time.perf_counter() - t:.0f} s to make or find); {cpu_threads()} "
              f"CPUs here; a Ray cluster of {args.cpus} CPUs; {args.rounds} round(s)")

        # -- a database server: each arm ingests into a fresh database on it
        with bench_server() as admin:
            times: dict[str, list[float]] = {"plain": [], "ray": []}
            try:
                for _ in range(args.rounds):
                    # -- the plain ingest, with no cluster up
                    url = fresh_database(admin, "imsearch_bench_ray")
                    upgrade(url)
                    seconds, plain = timed_ingest(folder, url, weights, [])
                    times["plain"].append(seconds)
                    print(f"plain:  {seconds:6.1f} s ({plain['added']} added, {len(plain['failed'])} failed; "
                          f"{plain['seconds']:.1f} s in ingest)")
                    # -- the same on a running local cluster
                    cluster = subprocess.Popen([sys.executable, "-c", CLUSTER, str(args.cpus)], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                    try:
                        address = cluster.stdout.readline().strip()  # type: ignore[union-attr]
                        url = fresh_database(admin, "imsearch_bench_ray")
                        upgrade(url)
                        seconds, on_ray = timed_ingest(folder, url, weights, ["--ray", address])
                    finally:
                        cluster.stdin.close()  # type: ignore[union-attr]
                        cluster.wait(timeout=120)
                    times["ray"].append(seconds)
                    print(f"ray:    {seconds:6.1f} s ({on_ray['added']} added, {len(on_ray['failed'])} failed; "
                          f"{on_ray['seconds']:.1f} s in ingest)")
            finally:
                drop_database(admin, "imsearch_bench_ray")
        plain_s, ray_s = statistics.median(times["plain"]), statistics.median(times["ray"])
        print(f"\nplain {plain_s:.1f} s ({len(files) / plain_s:.1f} img/s), ray {ray_s:.1f} s "
              f"({len(files) / ray_s:.1f} img/s): plain/ray = {plain_s / ray_s:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
