"""Cold `imsearch find`: where the time of a new process goes, with the embedded server already running and with
it stopped.

    .venv/bin/python bench/coldstart.py                   # 5 runs each way, default backend (auto)
    .venv/bin/python bench/coldstart.py --backend torch   # the same on torch
    .venv/bin/python bench/coldstart.py --runs 9

Stores 100 photos of ../shared/datasets/rooms/base in the embedded PostgreSQL of a throwaway IMSEARCH_HOME (the
ingest makes the ONNX export there), then runs `imsearch --debug find PHOTO` in a new process each time and reads
the phase timings it logs:

    start-up  the interpreter and the CLI's imports, up to the command (click, imsearch.cli)
    imports   the library: numpy, Pillow, psycopg, imsearch.api
    database  the embedded server started or joined, the connection, the schema check, the class counts
    model     the model, loaded in a thread while the database starts: ONNX Runtime's import, the checksums,
              the session (torch: its import and the checkpoint)
    wait      how long find then still waited for the model
    decode, embed, search   the query photo, the model on it, the SQL
    exit      after the command: the embedded server stops with its last user when nobody else holds it

With the server running, this process holds it (as `imsearch serve` or another imsearch would); cold, it is
stopped before each run. Figures taken while other programs run are noisy. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imsearch import Imsearch
from imsearch.db import embedded

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"
COLUMNS = ("total", "start-up", "imports", "database", "model", "wait", "decode", "embed", "search", "exit")
TIMING = re.compile(r"^imsearch: timing: (.+) (\d+\.\d+) s$")


def imsearch_command() -> list[str]:
    """The `imsearch` script beside this interpreter, as a user runs it; else `python -m imsearch`."""
    script = Path(sys.executable).parent / "imsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imsearch"]


def find_once(query: Path, env: dict[str, str]) -> dict[str, float]:
    """One `imsearch --debug find` in a new process: its wall time and its logged phases."""
    started = time.perf_counter()
    proc = subprocess.run([*imsearch_command(), "--debug", "find", str(query), "--json"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"imsearch find failed: {proc.stderr.strip()[-800:]}")
    phases: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = TIMING.match(line)
        if m:  # the first: the model's loading thread logs before find, which waited for it, logs its wait
            phases.setdefault(m.group(1), float(m.group(2)))
    row = {"total": total, **{k: phases.get(k, 0.0) for k in ("start-up", "imports", "database", "model",
                                                                "decode", "embed", "search")}}
    main_thread = sum(row[k] for k in ("imports", "database", "decode", "embed", "search"))
    row["wait"] = max(0.0, phases.get("command", 0.0) - main_thread)
    row["exit"] = max(0.0, total - row["start-up"] - phases.get("command", 0.0))
    return row


def report(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}")
    print("run  " + "  ".join(f"{c:>8}" for c in COLUMNS))
    for i, row in enumerate(rows, 1):
        print(f"{i:3d}  " + "  ".join(f"{row[c]:8.3f}" for c in COLUMNS))
    print("med  " + "  ".join(f"{statistics.median(r[c] for r in rows):8.3f}" for c in COLUMNS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    ap.add_argument("--weights", help="weights name or file [default: a stand-in written by ../shared/tools]")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="imsearch-coldstart-"))
    tmp.chmod(0o711)  # run as root, the embedded server's user passes through to its data folder
    try:
        # -- a data folder of its own, weights, 100 stored photos (and the export, made by this ingest)
        os.environ["IMSEARCH_HOME"] = str(tmp / "home")
        os.environ.pop("DATABASE_URL", None)
        weights = args.weights
        if weights is None:
            weights = str(tmp / "standin.pth")
            subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), weights],
                           check=True, capture_output=True)
        photos = tmp / "photos"
        for src in sorted((ROOMS / "base").glob("*/*.jpg"))[::4]:
            (photos / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, photos / src.parent.name / src.name)
        with Imsearch(weights=weights, backend=args.backend) as app:
            stored = app.ingest(photos).added
            print(f"{stored} photos stored with {app.embedder.identity} on {app.embedder.backend}; "
                  f"{os.cpu_count()} CPUs; backend {args.backend}")
        env = {**os.environ, "IMSEARCH_WEIGHTS": weights, "IMSEARCH_BACKEND": args.backend}
        query = sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0]
        find_once(query, env)  # the first start after the ingest may still set up files; not counted

        # -- the embedded server already running: this process holds it
        embedded.start()
        running = [find_once(query, env) for _ in range(args.runs)]
        report(f"server already running: {args.runs} x `imsearch find {query.name}` (seconds)", running)

        # -- the embedded server stopped before each run: find starts it, and stops it as it exits
        cold = []
        for _ in range(args.runs):
            embedded.stop()
            cold.append(find_once(query, env))
        report(f"server cold: {args.runs} x `imsearch find {query.name}` (seconds)", cold)
    finally:
        embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
