"""mode other's beam: the SQL functions search other classes with ef_search 200, as `imsearch find` does.

find's per-class branches for mode other went from ef_search 400 to 200 (imsearch.search.BRANCH_EF_SEARCH): on
bench/search.py's scene data at 100k rows recall@5 stayed 1.0 and p50 fell from 48-60 to 31-35 ms
(bench/other_mode.py). imsearch_nearest and imsearch_class_correspondence (migration 0002) mirror find's
planning, so their beam changes with it; the rest of each function stays as it is. Each function's full text as
of this revision (and of the one before, for downgrade) is a file in migrations/sql.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from imsearch_migrations.functions import create

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create("imsearch_nearest_0004.sql", "imsearch_class_correspondence_0004.sql")


def downgrade() -> None:
    create("imsearch_nearest_0002.sql", "imsearch_class_correspondence_0002.sql")
