"""Mode all as the union of the classes' own graphs where there are few classes, and each branch widened alone.

At a million rows in six classes a photo far from every stored one found 0.91 of its exact top five through the
whole-table graph (0.98 through the denser one of 0016), and 0.99 through its class's own graph of a fifth of the
rows. From this revision mode all, like mode other since 0015, searches each class's own index where there are at
most `imsearch.union_max_classes` classes (8), each with an index of its own or small enough to scan exactly (the
rows of no class too, where they are few), and ranks the union; with more classes, or a class of over half the
library (which has no index of its own), it goes through the whole-table graph as before. 0 turns the union off for
both modes.

Each branch of a union now has its own depth and its own bound: where the k-th candidate is farther than what a
branch could still hold, only that branch is asked again deeper (0015 asked every branch again). The coordinator of
a sharded library passes imsearch.union_max_classes on to its shards.

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
