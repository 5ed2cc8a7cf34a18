"""imsearch audit on 10,000 synthetic rows with 2 % of their labels flipped: the label suspects are the flipped rows,
image_audit holds exactly the findings, and a row's findings go when it is deleted or its class changes.

No stored file exists, so the audit works from the rows alone (exact content and the stored hashes) and needs no
model. The rows are bench/synthetic.py's scene-like vectors, loaded as bench/audit.py loads them.
"""

from __future__ import annotations

import os
from collections import Counter

import psycopg
import pytest

from bench import synthetic
from imsearch import Imsearch
from imsearch.audit.calibration import UNMEASURED_HASH_BITS
from tests.conftest import scratch_database

ROWS = 10_000
K = 10


@pytest.fixture(scope="module")
def audited(server_url):
    """A fresh database of ROWS rows, 2 % of them filed under another class, audited once for the module's tests
    (loading and auditing take most of a minute): (url, what was loaded, the audit)."""
    with scratch_database(server_url, f"imsearch_test_{os.getpid()}_audit_labels") as url:
        loaded = synthetic.fill_audit(url, synthetic.Scenes(seed=ROWS), ROWS, seed=ROWS)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Imsearch, "embedder", property(lambda self: pytest.fail("the audit loaded the model")))
            with Imsearch(url) as app:
                result = app.audit(k=K)
        yield url, loaded, result


def test_rows_without_files_are_audited_without_the_model(audited):
    _, loaded, result = audited
    assert result.images == ROWS and not result.files_readable
    assert result.calibration.sample == 0 and result.calibration.bits == UNMEASURED_HASH_BITS
    assert result.calibration.distance is None
    assert len(loaded.flipped) == ROWS // 50
    print(f"{ROWS:,} rows: COPY {loaded.load_s:.1f} s, HNSW builds {loaded.build_s:.1f} s, "
          f"audit {result.seconds:.1f} s")


def test_label_suspects_are_the_flipped_rows(audited):
    _, loaded, result = audited
    flagged = {f.path: f.suggested_class for f in result.of("label")}
    found = [p for p in loaded.flipped if p in flagged]
    recall = len(found) / len(loaded.flipped)
    precision = len(found) / len(flagged)
    right = sum(flagged[p] == loaded.flipped[p] for p in found) / len(found)
    figures = (f"{len(loaded.flipped)} flipped, {len(flagged)} flagged: recall {recall:.3f}, precision "
               f"{precision:.3f}, suggested class = true class for {right:.3f} of the flipped rows found")
    print(figures)
    assert recall >= 0.9, figures
    assert precision >= 0.8, figures
    assert right > 0.5, figures


def test_copies_are_found_by_their_hash(audited):
    _, loaded, result = audited
    pairs = {frozenset((f.path, f.partner.path)) for f in result.findings
             if f.kind in ("duplicate", "leak") and f.partner is not None}
    copies = {frozenset(p) for p in loaded.copies}
    assert copies <= pairs
    assert pairs <= copies  # random hashes of distinct photos are never within the threshold


def test_image_audit_holds_the_findings_and_forgets_deleted_and_relabelled_rows(audited):
    url, loaded, result = audited
    with psycopg.connect(url, autocommit=True) as conn:
        stored = dict(conn.execute("SELECT kind, count(*) FROM image_audit GROUP BY kind").fetchall())
        assert stored == dict(Counter(f.kind for f in result.findings))
        rows = Counter(conn.execute("SELECT image_id, kind, partner_id FROM image_audit").fetchall())
        assert rows == Counter((f.id, f.kind, f.partner.id if f.partner else None) for f in result.findings)

        def mentions(image_id: int) -> int:
            return conn.execute("SELECT count(*) FROM image_audit WHERE %s IN (image_id, partner_id)",
                                (image_id,)).fetchone()[0]

        def total() -> int:
            return conn.execute("SELECT count(*) FROM image_audit").fetchone()[0]

        deleted, relabelled = [f for f in result.of("label") if f.path in loaded.flipped][:2]
        before, mine = total(), mentions(deleted.id)
        assert mine > 0
        conn.execute("DELETE FROM images WHERE id = %s", (deleted.id,))
        assert mentions(deleted.id) == 0 and total() == before - mine  # ON DELETE CASCADE, and nothing else

        before, mine = total(), mentions(relabelled.id)
        assert mine > 0
        conn.execute("UPDATE images SET class = %s WHERE id = %s", (loaded.flipped[relabelled.path], relabelled.id))
        assert mentions(relabelled.id) == 0 and total() == before - mine  # the trigger, and nothing else
