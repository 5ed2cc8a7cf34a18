"""the whole-table graph twice as dense: m 32, ef_construction 128 (pgvector's default is 16 and 64).

At a million rows the default graph over every row's fold strands queries: a photo far from every stored one found
0.91 of its exact top five in mode all even where the search widened to 4,000 candidates, because the graph search
did not return the fold's nearest rows, and over 100 tight classes a greedy search could not cross from one to
another. The same rows in a graph of m 32, ef_construction 128 found 0.98 (docs/scaling.md). It takes the same
pages on disk (the 1,024-d fold fills them, not the links), about a fifth more memory to build and 2.3 times as long.
Class indexes keep pgvector's default graph: each covers one class, where 0.99 held.

imsearch_index_all builds the denser graph from now on. An existing whole-table graph sparser than that is built
again beside it under another name, then put in its place: searches go on through the old graph meanwhile, writes
wait. That reads every stored vector (minutes at a million rows), so a large library takes this revision only
through `imsearch db upgrade`, which shows the build's progress.

Downgrade restores 0013's imsearch_index_all and leaves the denser graph, which serves 0015's searches as well.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create, size_build_memory

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

M = 32
EF_CONSTRUCTION = 128
# what the graph of one row takes in maintenance_work_mem at m 32 (pgvector 0.8; imsearch.db.indexes)
BYTES_PER_ROW = 3_300
OPTIONS = """
SELECT coalesce((SELECT split_part(o, '=', 2)::integer FROM unnest(c.reloptions) o WHERE starts_with(o, 'm=')), 16)
FROM pg_class c WHERE c.oid = to_regclass('public.images_fold_hnsw')
"""


def upgrade() -> None:
    create("imsearch_index_all_0016.sql")
    m = op.get_bind().exec_driver_sql(OPTIONS).scalar()
    if m is None or m >= M:  # no whole-table graph here (a load has it down, a sharded coordinator), or dense already
        return
    size_build_memory(op.get_bind().exec_driver_sql("SELECT count(*) FROM images").scalar(), BYTES_PER_ROW)
    op.execute("CREATE INDEX images_fold_hnsw_dense ON images "
               "USING hnsw ((imsearch_fold(embedding)::halfvec(1024)) halfvec_cosine_ops) "
               f"WITH (m = {M}, ef_construction = {EF_CONSTRUCTION})")
    op.execute("DROP INDEX images_fold_hnsw")
    op.execute("ALTER INDEX images_fold_hnsw_dense RENAME TO images_fold_hnsw")


def downgrade() -> None:
    create("imsearch_index_all_0013.sql")
