"""imsearch audit at scale: wall time, memory and label-suspect recall on synthetic rows with flipped labels.

    .venv/bin/python bench/audit.py                     # 10k and 100k rows
    .venv/bin/python bench/audit.py --sizes 20000       # any sizes

Each size gets a fresh imsearch database (schema from its migrations) filled by COPY with scene-like vectors, a
perceptual hash per row (the generator's 5 % near-duplicates keep their source's, 0-2 bits changed) and 2 % of the
rows filed under another class (bench/synthetic.py, fill_audit); then the HNSW indexes are built and
`Imsearch.audit()` runs as `imsearch audit` does. No file exists, so the audit works from the rows alone: no model.

The audit runs in a process of its own for each size, started before anything is loaded (Linux keeps a process's
peak RSS across the exec that starts it), so that its peak RSS (resource.getrusage, ru_maxrss) is the audit's and not
the load's. Uses DATABASE_URL when set (each size gets a fresh database, dropped
afterwards), else a throwaway server set up as imsearch's embedded one. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import resource
import time
from collections import Counter
from dataclasses import dataclass

from synthetic import GENERATORS, Labelled, bench_server, drop_database, fill_audit, fresh_database

from imsearch import Imsearch
from imsearch.audit.findings import KINDS


@dataclass(frozen=True)
class Measured:
    """What the auditing process sends back: timings, memory, and the findings reduced to what is scored."""

    seconds: float
    rss_before: int  # KiB, ru_maxrss once imsearch is imported and the database open
    rss_peak: int  # KiB, ru_maxrss after the audit
    counts: dict[str, int]
    labels: dict[str, str | None]  # path -> suggested class
    pairs: set[frozenset[str]]  # {path, partner path} of the duplicate and leak findings
    hash_bits: int
    sample: int


def audit_in_process(jobs: multiprocessing.Queue, out: multiprocessing.Queue) -> None:
    """Run in a process of its own: wait for a database URL, audit it, and send back a Measured."""
    url, k = jobs.get()
    with Imsearch(url) as app:
        app.store.conn.execute("SELECT 1")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        result = app.audit(k=k)
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.put(Measured(
        seconds, before, peak, dict(Counter(f.kind for f in result.findings)),
        {f.path: f.suggested_class for f in result.of("label")},
        {frozenset((f.path, f.partner.path)) for f in result.findings
         if f.kind in ("duplicate", "leak") and f.partner is not None},
        result.calibration.bits, result.calibration.sample))


class Auditor:
    """A process that will audit one database; started while this one is still small."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.jobs: multiprocessing.Queue = ctx.Queue()
        self.out: multiprocessing.Queue = ctx.Queue()
        self.process = ctx.Process(target=audit_in_process, args=(self.jobs, self.out), daemon=True)
        self.process.start()

    def audit(self, url: str, k: int) -> Measured:
        self.jobs.put((url, k))
        while True:
            try:
                measured: Measured = self.out.get(timeout=5)
            except queue.Empty:
                if not self.process.is_alive():
                    raise SystemExit(f"the auditing process failed (exit code {self.process.exitcode})") from None
                continue
            self.process.join()
            return measured


def report(rows: int, loaded: Labelled, m: Measured) -> None:
    flipped = loaded.flipped
    found = [p for p in m.labels if p in flipped]
    recall = len(found) / len(flipped) if flipped else float("nan")
    precision = len(found) / len(m.labels) if m.labels else float("nan")
    right = sum(m.labels[p] == flipped[p] for p in found)
    copies = {frozenset(p) for p in loaded.copies}
    print(f"\n{rows:,} rows: COPY {loaded.load_s:.1f} s ({rows / loaded.load_s:,.0f} rows/s), "
          f"HNSW builds (fold, hash, classes) {loaded.build_s:.1f} s")
    print(f"audit: {m.seconds:.1f} s ({rows / m.seconds:,.0f} rows/s), peak RSS {m.rss_peak / 1024:,.0f} MiB "
          f"(ru_maxrss of the auditing process; {m.rss_before / 1024:,.0f} MiB before the audit); "
          f"calibration sample {m.sample}, hash bits {m.hash_bits}")
    print("findings: " + ", ".join(f"{kind} {m.counts.get(kind, 0):,}" for kind in KINDS))
    print(f"labels: {len(flipped)} flipped, {len(m.labels)} flagged; recall {recall:.3f} ({len(found)}), "
          f"precision {precision:.3f}; suggested class = true class for {right} of {len(found)}")
    print(f"copies: {len(copies)} made (same hash, 0-2 bits changed), {len(copies & m.pairs)} found as a "
          f"duplicate or leak pair; {len(m.pairs - copies)} other pairs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="row counts")
    ap.add_argument("-k", type=int, default=10, help="neighbours per image, as `imsearch audit -k`")
    ap.add_argument("--data", choices=GENERATORS, default="scenes", help="synthetic vectors (bench/synthetic.py)")
    ap.add_argument("--keep", action="store_true", help="keep the bench databases")
    args = ap.parse_args()
    print(f"imsearch audit bench: {args.data} data, k={args.k}, 2 % of the labels flipped")
    seconds: dict[int, float] = {}
    auditors = [Auditor() for _ in args.sizes]
    with bench_server() as admin:
        for rows, auditor in zip(args.sizes, auditors):
            name = f"imsearch_bench_audit_{rows}"
            url = fresh_database(admin, name)
            try:
                # -- schema from imsearch's migrations, rows by COPY, the indexes rebuilt as the migrations define them
                loaded = fill_audit(url, GENERATORS[args.data](seed=rows), rows, seed=rows)
                # -- the audit, in a process of its own
                measured = auditor.audit(url, args.k)
                report(rows, loaded, measured)
                seconds[rows] = measured.seconds
            finally:
                if not args.keep:
                    drop_database(admin, name)
    if len(seconds) > 1:
        (small, a), *_, (large, b) = sorted(seconds.items())
        print(f"\naudit time from {small:,} to {large:,} rows: x{b / a:.1f} for x{large / small:.0f} the rows")


if __name__ == "__main__":
    main()
