"""imsearch_search asks again deeper where its candidates cannot rule out a nearer row beyond them, and mode other
searches each other class's own index.

An index gives the nearest `imsearch.rerank_depth` candidates by the embedding's fold, which the exact distance
ranks. A photo far from every stored one sits where many rows are almost equally near, and the fold's error then
hides some of the exact top k beyond the first candidates (docs/scaling.md measured it). From this revision the
search checks its candidates: a row the index did not give lies at least as far by the fold as the farthest
candidate, so by the exact distance no nearer than that, less `imsearch.rerank_margin` standard deviations of the
fold's error over the candidates. Where the k-th candidate is farther than that, the search runs again four times as
deep, up to `imsearch.rerank_max_depth` (past ef_search's 1,000 through an iterative scan). imsearch_shard_search
passes the two new settings on to every shard.

Mode other with at most eight other classes, each with an index of its own or small enough to scan exactly, becomes
the union of one search of each: an iterative scan of the whole-table graph first crosses the query's own class,
where its nearest rows are (at a million rows in five classes it found 0.71 of the exact top five). Classes of up to
half the library now get an index of their own (an eighth before), so each row is in at most two graphs;
`imsearch db upgrade` builds the ones a library's classes now want (imsearch.api.Imsearch.upgrade), since a
migration cannot tell how long they take.

Nothing else is rebuilt: the functions alone change. Downgrade restores 0014's; class indexes built since stay and
serve mode same as before.

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
