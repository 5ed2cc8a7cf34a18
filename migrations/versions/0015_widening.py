"""imsearch_search asks again deeper where its candidates cannot rule out a nearer row beyond them.

An index gives the nearest `imsearch.rerank_depth` candidates by the embedding's fold, which the exact distance
ranks. A photo far from every stored one sits where many rows are almost equally near, and the fold's error then
hides some of the exact top k beyond the first candidates (docs/scaling.md measured it). From this revision the
search checks its candidates: a row the index did not give lies at least as far by the fold as the farthest
candidate, so by the exact distance no nearer than that, less `imsearch.rerank_margin` standard deviations of the
fold's error over the candidates. Where the k-th candidate is farther than that, the search runs again four times as
deep, up to `imsearch.rerank_max_depth`. imsearch_shard_search passes the two new settings on to every shard.

Nothing is rebuilt: the functions alone change. Downgrade restores 0014's.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from imsearch_migrations.functions import create

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create("imsearch_shard_search_0015.sql", "imsearch_search_0015.sql")


def downgrade() -> None:
    create("imsearch_shard_search_0014.sql", "imsearch_search_0014.sql")
