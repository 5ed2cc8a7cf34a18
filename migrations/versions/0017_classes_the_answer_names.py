"""Mode all in a large library also asks the graphs of the classes its answer names.

At a million rows in six classes the whole-table graph (m 32 since 0016) found 0.978 of a far photo's exact top
five in mode all, and the same photos' own classes' graphs 0.99: the whole-table graph leads such a photo to the
right classes more often than to the right rows in them. From this revision, in a library of more than
`imsearch.union_min_rows` rows (250,000, the table's estimate in pg_class.reltuples), mode all takes the whole-table
graph's answer, searches the own graphs of the classes it names (at most `imsearch.union_max_classes`, 8) at the
same depth, and ranks the union; the widening then goes on over every branch. At a million rows in six classes
that found 0.990 (docs/scaling.md); in a hundred tight classes it did no better, where the whole-table graph
strands a query in the wrong classes.

The number of other classes up to which mode other searches each one's own index (0015's fixed 8) becomes the same
session setting; a coordinator passes both settings on to its shards. A row two branches give is ranked once.

Tried and dropped on the way, with figures in docs/scaling.md: mode all as the union of every class's graph (0.988
at a million rows, slower), and asking only a union's failing branches again (never more candidates than asking
every branch; mode other found 0.964 on its query set, every branch 0.956-0.984 on others).

The functions alone change. Downgrade restores 0015's.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

from imsearch_migrations.functions import create

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create("imsearch_shard_search_0017.sql", "imsearch_search_0017.sql")


def downgrade() -> None:
    create("imsearch_shard_search_0015.sql", "imsearch_search_0015.sql")
