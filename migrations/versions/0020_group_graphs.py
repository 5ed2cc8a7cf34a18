"""Group graphs: in a library of many classes, modes all and other search eight graphs, each of some classes.

At a million rows in 101 tight classes the whole-table graph stranded queries among the wrong classes: even asked
1,000 deep it found 0.980 of generated queries' top five in mode all and 0.954 of real photos', and 0.824 in mode
other, whose iterative scan must first cross the query's own class. Eight graphs, each of the classes a hash of the
name puts in it (imsearch_class_group), asked together 1,000 deep found 1.000, 0.998 and 1.000, at about a second
a query (docs/scaling.md, "Schema 0020").

This migration adds imsearch_class_group, imsearch_index_group (the builder, which only the owner may run) and the
planner that uses the group graphs where a library has more than imsearch.union_max_classes classes and all eight
graphs exist. It builds no graph: imsearch builds them, as it builds class indexes, once a library passes
imsearch.search.UNION_MIN_ROWS rows in more than UNION_MAX_CLASSES classes (after an ingest, a load or
`imsearch db upgrade`). Downgrade drops the group graphs and the two functions and restores 0019's planner.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

GROUPS = 8  # imsearch.search.GROUPS as of this revision
PREFIX = "images_fold_hnsw_g"


def upgrade() -> None:
    create("imsearch_class_group_0020.sql", "imsearch_index_group_0020.sql", "imsearch_search_0020.sql")
    op.execute("REVOKE ALL ON FUNCTION imsearch_index_group(integer) FROM PUBLIC")


def downgrade() -> None:
    create("imsearch_search_0019.sql")
    for n in range(GROUPS):
        op.execute(f"DROP INDEX IF EXISTS {PREFIX}{n}")
    op.execute("DROP FUNCTION imsearch_index_group(integer)")
    op.execute("DROP FUNCTION imsearch_class_group(text)")
