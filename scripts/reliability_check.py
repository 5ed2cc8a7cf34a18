"""Reliability check by hand: 300 good photos plus every bad case, a kill -9, two concurrent ingests.

    .venv/bin/python scripts/reliability_check.py [--photos 300] [--seed N]

Uses DATABASE_URL as an admin connection when set (it creates and drops its own databases), else a private
embedded PostgreSQL in a temporary folder; IMSEARCH_WEIGHTS when set, else the stand-in checkpoint of
../shared/tools/make_test_weights.py (random weights: distances mean nothing beyond "same photo or not").
Every ingest runs as a real `imsearch` process. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import psycopg

from imsearch.db import embedded
from imsearch.files import printable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import badfiles  # noqa: E402 - the matrix the tests use

SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"
IMSEARCH = str(Path(sys.executable).with_name("imsearch"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300, help="good photos (base and test splits, 5 classes)")
    parser.add_argument("--seed", type=int, default=None, help="for the kill point")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    work = Path(tempfile.mkdtemp(prefix="imsearch-reliability-"))
    failures: list[str] = []
    stderr_all: list[str] = []
    try:
        admin, stop_server = server(work)
        weights = os.environ.get("IMSEARCH_WEIGHTS") or stand_in_weights(work)

        # -- 1. the folders: good/ holds the photos, messy/ the same photos plus every case of the matrix ----
        good = copy_photos(work / "good", args.photos)
        messy = copy_photos(work / "messy", args.photos)
        badfiles.build(messy, sorted((ROOMS / "test").glob("*/*.jpg")))
        print(f"folders: {args.photos} good photos; messy = those + {len(badfiles.GOOD)} awkward good files "
              f"+ {len(badfiles.BAD)} bad ones (+{sum(1 for c in badfiles.CASES if c.alias_of)} symlinks)")

        # -- 2. the messy folder ---------------------------------------------------------------------------
        url = database(admin, "messy")
        started = time.perf_counter()
        code, out, err = run(url, weights, "ingest", str(messy), "--device", "cpu")
        seconds = time.perf_counter() - started
        stderr_all.append(err)
        lines = err.splitlines()
        named: dict[str, int] = {}
        for case in badfiles.BAD:
            shown = printable(badfiles.reported_path(messy, case)) + ": "
            named[case.id] = sum(1 for line in lines if line.startswith(shown))
        once = sum(1 for c in badfiles.BAD if named[c.id] == 1)
        rows, paths, dims = integrity(url)
        twin = distance(url, messy / "dining_room/exif-rotated.jpg", messy / "dining_room/exif-twin.jpg")
        twin_png = distance(url, messy / "dining_room/exif-rotated.png", messy / "dining_room/exif-twin.png")
        expected_rows = args.photos + len(badfiles.GOOD)
        print(f"messy ingest: exit {code} in {seconds:.1f} s; {out.strip()}")
        print(f"  bad files named exactly once: {once}/{len(badfiles.BAD)}; stderr lines: {len(lines)}")
        print(f"  rows {rows} (expected {expected_rows}), distinct paths {paths}, dimensions {dims}")
        print(f"  EXIF-rotated photo vs its upright twin: cosine distance {twin:.5f} (JPEG), {twin_png:.5f} (PNG)")
        check(failures, code == 1, "messy ingest exits 1")
        check(failures, once == len(badfiles.BAD) and len(lines) == len(badfiles.BAD), "each bad file named once")
        check(failures, (rows, paths, dims) == (expected_rows, expected_rows, [2048]), "every good file once")
        check(failures, twin < 0.01 and twin_png < 0.01, "EXIF twins within 0.01")

        # -- 3. kill -9 at a random point, then the same ingest again ---------------------------------------
        url = database(admin, "kill")
        rate = float(re.search(r"\(([\d.]+) img/s\)", out)[1])  # type: ignore[index]
        delay = random.Random(seed).uniform(0.1, 0.7) * args.photos / rate
        proc = start(url, weights, "ingest", str(good), "--device", "cpu", "--batch-size", "8")
        wait_for_rows(url, 1, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        stderr_all.append(err)
        wait_for_quiet(url)
        at_kill = count(url)
        code, out, err = run(url, weights, "ingest", str(good), "--device", "cpu", "--batch-size", "8")
        stderr_all.append(err)
        rows, paths, dims = integrity(url)
        print(f"kill -9 (seed {seed}) {delay:.1f} s after the first commit: {at_kill} rows stored; "
              f"re-run: exit {code}, {out.strip()}")
        print(f"  rows {rows}, distinct paths {paths}, dimensions {dims}")
        check(failures, 0 < at_kill < args.photos, "the kill landed half-way")
        check(failures, code == 0 and (rows, paths, dims) == (args.photos, args.photos, [2048]),
              "kill -9 and re-run leave every photo once")

        # -- 4. two ingests of the same folder at once, on a fresh database ---------------------------------
        url = database(admin, "concurrent")
        procs = [start(url, weights, "ingest", str(good), "--device", "cpu", "--batch-size", str(b)) for b in (8, 5)]
        results = [p.communicate() for p in procs]
        stderr_all.extend(err for _, err in results)
        rows, paths, dims = integrity(url)
        codes = [p.returncode for p in procs]
        print(f"two concurrent ingests: exit {codes}; " + " | ".join(out.strip() for out, _ in results))
        print(f"  rows {rows}, distinct paths {paths}, dimensions {dims}")
        check(failures, codes == [0, 0] and (rows, paths, dims) == (args.photos, args.photos, [2048]),
              "two concurrent ingests leave every photo once")

        tracebacks = sum(err.count("Traceback") for err in stderr_all)
        print(f"tracebacks on stderr across all runs: {tracebacks}")
        check(failures, tracebacks == 0, "no traceback")
        stop_server()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("all checks hold" if not failures else "FAILED: " + "; ".join(failures))
    sys.exit(1 if failures else 0)


def check(failures: list[str], ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)


# -- set-up ----------------------------------------------------------------------------------------------------


def server(work: Path) -> tuple[str, Callable[[], object]]:
    """An admin URL: DATABASE_URL, else a throwaway embedded server (and how to stop it)."""
    given = os.environ.get("DATABASE_URL")
    if given:
        return given, lambda: None
    throwaway = embedded.temporary()
    return throwaway.__enter__(), lambda: throwaway.__exit__(None, None, None)


def database(admin: str, name: str) -> str:
    name = f"imsearch_reliability_{name}_{os.getpid()}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(admin)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def stand_in_weights(work: Path) -> str:
    out = work / "standin.pth"
    subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), str(out)], check=True,
                   capture_output=True)
    return str(out)


def copy_photos(dest: Path, n: int) -> Path:
    """n photos, the same number per class: the base split's first, then the test split's."""
    classes = sorted(p.name for p in (ROOMS / "base").iterdir() if p.is_dir())
    for cls in classes:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        pool = sorted((ROOMS / "base" / cls).glob("*.jpg")) + sorted((ROOMS / "test" / cls).glob("*.jpg"))
        for src in pool[: n // len(classes)]:
            shutil.copy2(src, dest / cls / src.name)
    return dest


# -- processes and queries -------------------------------------------------------------------------------------


def start(url: str, weights: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "IMSEARCH_WEIGHTS": weights}
    return subprocess.Popen([IMSEARCH, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(url: str, weights: str, *args: str) -> tuple[int, str, str]:
    proc = start(url, weights, *args)
    out, err = proc.communicate()
    return proc.returncode, out, err


def count(url: str) -> int:
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('public.images')").fetchone() == (None,):
            return 0
        return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])  # type: ignore[index]


def integrity(url: str) -> tuple[int, int, list[int]]:
    with psycopg.connect(url) as conn:
        rows, paths = conn.execute("SELECT count(*), count(DISTINCT path) FROM images").fetchone()  # type: ignore[misc]
        dims = [d for (d,) in conn.execute("SELECT DISTINCT vector_dims(embedding) FROM images")]
    return rows, paths, dims


def distance(url: str, a: Path, b: Path) -> float:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT x.embedding <=> y.embedding FROM images x, images y "
                           "WHERE x.path = %s AND y.path = %s", (str(a.resolve()), str(b.resolve()))).fetchone()
    return float(row[0]) if row else float("nan")


def wait_for_rows(url: str, n: int, proc: subprocess.Popen[str]) -> None:
    while count(url) < n:
        if proc.poll() is not None:
            raise SystemExit(f"ingest ended before storing {n} rows: {proc.communicate()}")
        time.sleep(0.05)


def wait_for_quiet(url: str) -> None:
    """Until the killed client's session is gone on the server."""
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()").fetchone() != (0,):
            time.sleep(0.05)


if __name__ == "__main__":
    main()
