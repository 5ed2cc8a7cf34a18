"""other-class indexes: an optional HNSW index per class over every other class, making mode other one search.

Mode other for a query of class X reads the rows `WHERE class <> X`. By default imsearch searches each other
class through its own index (migration 0003) and merges the answers: complete, but one graph search per class.
`imsearch db index-other` calls imsearch_index_other(X) for every class, which gives `class <> X` a graph of its
own, built as the class indexes are (the unit-length embedding, m = 32, ef_construction = 200), so that mode
other is a single search. They order by cosine distance where the class indexes use the inner product (the same
order on unit vectors): `class = Y` implies `class <> X`, so with the same operator the planner may serve a
same-class query from an other-class index with a filter, which it did at 10k rows. On bench/search.py's scene
data at 100k rows they took mode other from 30-35 ms to 9-11.5 ms, at recall@5 0.94-0.96 instead of 0.99-1.0
(docs/scaling.md). The price is that every row sits in (classes - 1) of these indexes: storage and insert work
grow with the number of classes, which is why they are opt-in; once any exist, imsearch keeps them complete for
new classes after each ingest.

imsearch_nearest takes the same path as `imsearch find` when the query's class has one
(migrations/sql/imsearch_nearest_0005.sql).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION imsearch_index_other(cls text) RETURNS text
        LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
        DECLARE
            name text := 'images_embedding_hnsw_o_' || left(md5(cls), 16);
        BEGIN
            EXECUTE format(
                'CREATE INDEX IF NOT EXISTS %I ON images '
                'USING hnsw ((l2_normalize(embedding)::halfvec(2048)) halfvec_cosine_ops) '
                'WITH (m = 32, ef_construction = 200) WHERE class <> %L', name, cls);
            RETURN name;
        END
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION imsearch_index_other(text) FROM PUBLIC")
    create("imsearch_nearest_0005.sql")


def downgrade() -> None:
    create("imsearch_nearest_0004.sql")
    op.execute(
        """
        DO $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT indexname FROM pg_indexes
                     WHERE tablename = 'images' AND indexname LIKE 'images_embedding_hnsw_o_%' LOOP
                EXECUTE format('DROP INDEX %I', r.indexname);
            END LOOP;
        END
        $$
        """
    )
    op.execute("DROP FUNCTION imsearch_index_other(text)")
