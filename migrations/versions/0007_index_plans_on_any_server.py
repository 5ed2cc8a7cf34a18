"""index plans on any server: the SQL functions search through the HNSW indexes whatever the server's settings.

A 2048-d halfvec (4 KB) is moved out of line (TOAST), so the planner sees a small heap: at PostgreSQL's default
settings it chose a parallel scan of the table and a sort over the HNSW index for mode all (659 ms instead of
0.4 ms at 100k rows). `imsearch find` turns sequential scans off for the queries meant to use an index (SET LOCAL,
imsearch.search.plan); the SQL functions get the same setting here, for their own duration. Their exact paths
still scan exactly: with sequential scans off the planner reads a small class through its btree on `class`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SEARCHING_FUNCTIONS = (
    "imsearch_nearest(bigint, integer, text)",
    "imsearch_class_correspondence(integer, text)",
    "imsearch_duplicate_pairs(double precision, integer)",
)


def upgrade() -> None:
    for signature in SEARCHING_FUNCTIONS:
        op.execute(f"ALTER FUNCTION {signature} SET enable_seqscan = off")


def downgrade() -> None:
    for signature in SEARCHING_FUNCTIONS:
        op.execute(f"ALTER FUNCTION {signature} RESET enable_seqscan")
