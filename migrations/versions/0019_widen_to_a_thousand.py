"""Widening stops at 1,000 candidates, pgvector's largest ef_search, instead of 4,000.

Past 1,000 the widening went on through an iterative scan of the graph, which a search paid for in time and which,
measured at a million rows in six classes (docs/scaling.md, "Schema 0019"), found nothing more: with the same
queries, widening to 1,000 found the same share of the exact top five in every mode as widening to 4,000, for
generated queries and real photos, in at most two thirds of the time (real photos in mode all: p50 1.6 s instead of
2.1 s). At 100,000 rows it found 0.998-1.000 in every mode, where 4,000 found 0.998-1.000 (one real photo's
fifth match, in mode all). In 101 classes, where mode other is the iterative scan of the whole-table graph, the scan
past 1,000 found a little more (0.836 of generated queries' top five against 0.820, both far from 0.99). A session
that wants the deeper search still sets imsearch.rerank_max_depth.

imsearch_search alone changes (its default depth); no index is touched. Downgrade restores 0017's.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from __future__ import annotations

from imsearch_migrations.functions import create

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create("imsearch_search_0019.sql")


def downgrade() -> None:
    create("imsearch_search_0017.sql")
