"""every class graph as dense as the whole-table one: m 32, ef_construction 128.

At a million rows in six classes, mode other searches the graphs of the five other classes (199,000 rows each) for
a query that sits in none of them. Through pgvector's default graph (m 16, ef_construction 64) such a search did not
return all of the fold's nearest rows, which the widening's bound takes for granted: mode other found 0.956 of the
generated queries' top five and 0.974 of the rare class's real photos', widening to 4,000. With the class graphs as
dense as the whole-table one (migration 0016), 1.000 and 1.000 (docs/scaling.md). The same pages on disk (the fold
fills them); about 2.3 times the build.

imsearch_index_class builds the denser graph from now on. Each existing class graph sparser than that is built again
beside it under another name, then put in its place: searches go on through the old graph meanwhile, writes wait.
That reads every row of the class, so a large library takes this revision only through `imsearch db upgrade`, which
shows each build's progress.

Downgrade restores 0013's imsearch_index_class and leaves the denser graphs, which serve 0017's searches as well.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create, size_build_memory

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

M = 32
EF_CONSTRUCTION = 128
# what the graph of one row takes in maintenance_work_mem at m 32 (pgvector 0.8; imsearch.db.indexes)
BYTES_PER_ROW = 3_300
PREFIX = "images_fold_hnsw_c_"
# the class graphs sparser than M
SPARSE = """
SELECT c.relname FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
WHERE x.indrelid = 'public.images'::regclass AND starts_with(c.relname, %(prefix)s)
  AND coalesce((SELECT split_part(o, '=', 2)::integer FROM unnest(c.reloptions) o WHERE starts_with(o, 'm=')), 16)
      < %(m)s
ORDER BY c.relname
"""


def upgrade() -> None:
    create("imsearch_index_class_0018.sql")
    raw = op.get_bind().connection.driver_connection
    for (name,) in raw.execute(SPARSE, {"prefix": PREFIX, "m": M}).fetchall():
        # the class's predicate as the index holds it: " WHERE (class = '...'::text)"
        definition = raw.execute("SELECT pg_get_indexdef(%s::regclass)", (name,)).fetchone()[0]
        predicate = definition[definition.index(" WHERE "):]
        rows = raw.execute(f"SELECT count(*) FROM images{predicate}").fetchone()[0]
        size_build_memory(rows, BYTES_PER_ROW)
        op.execute(f"CREATE INDEX {name}_dense ON images "
                   "USING hnsw ((l2_normalize(imsearch_fold(embedding))::halfvec(1024)) halfvec_ip_ops) "
                   f"WITH (m = {M}, ef_construction = {EF_CONSTRUCTION}){predicate}")
        op.execute(f"DROP INDEX {name}")
        op.execute(f"ALTER INDEX {name}_dense RENAME TO {name}")


def downgrade() -> None:
    create("imsearch_index_class_0013.sql")
