"""class indexes: a function that gives one class its own partial HNSW index.

A filtered HNSW scan over the whole table loses recall when the filter drops the query's own neighbourhood
(`class <> X` for a query of class X): the greedy search spends itself inside X and leaks out at random points.
pgvector's answer for a filter column with few values is a partial index per value. Classes are data, so the
indexes are made when a class grows past the exact-scan threshold (imsearch calls this function after an
ingest); their definition lives here, with the schema.

Each indexes the unit-length embedding by inner product (the same order as cosine distance) rather than the
column itself: on the plain column the planner saw the whole-table index as just as good and used it with a
filter, which returns almost nothing for a class (recall@5 0.04 on 10k rows); an expression only these indexes
hold leaves it no such choice.

They are built denser than the whole-table index (m = 32, ef_construction = 200 against 16 and 64) because mode
*other* searches them from outside their class, where a sparse graph strands the search: on bench/search.py's
data (100k rows, a 20k-row class, queries from another class) recall@5 at ef_search 400 went from 0.77 to 1.0,
for about 2.7 times the build time (33 s instead of 12 s for that class on 2 cores).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION imsearch_index_class(cls text) RETURNS text
        LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
        DECLARE
            name text := 'images_embedding_hnsw_c_' || left(md5(cls), 16);
        BEGIN
            EXECUTE format(
                'CREATE INDEX IF NOT EXISTS %I ON images '
                'USING hnsw ((l2_normalize(embedding)::halfvec(2048)) halfvec_ip_ops) '
                'WITH (m = 32, ef_construction = 200) WHERE class = %L', name, cls);
            RETURN name;
        END
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION imsearch_index_class(text) FROM PUBLIC")


def downgrade() -> None:
    op.execute(
        """
        DO $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT indexname FROM pg_indexes
                     WHERE tablename = 'images' AND indexname LIKE 'images_embedding_hnsw_c_%' LOOP
                EXECUTE format('DROP INDEX %I', r.indexname);
            END LOOP;
        END
        $$
        """
    )
    op.execute("DROP FUNCTION imsearch_index_class(text)")
