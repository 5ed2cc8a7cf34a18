"""folded other-class indexes: `imsearch db index-other` indexes a 1,024-d fold of the embedding, re-ranked exactly.

The other-class indexes of migration 0005 held the whole 2048-d unit embedding. An HNSW search reads one index
page per vector it compares, and a query of class X searches X's other-class graph from outside it, where it
needs a wide beam: on bench/search.py's scene data at 100k rows that took 9-12.7 ms at recall@5 0.94-0.98.
These indexes hold `subvector(embedding, 1, 1024) - subvector(embedding, 1025, 1024)` instead, a fold that
pgvector computes itself (nothing is stored besides the index): half the bytes per compared vector, a third of
the index size. The graph is sparser and built more carefully (m = 16, ef_construction = 400, against 32 and 200):
fewer pages per step, and on the same queries recall@5 0.97 at ef_search 200 in 5 ms where m = 32 /
ef_construction = 200 took 7-8 ms for 0.96, in the same build time. The search takes the 50 nearest by the
fold's cosine distance and ranks them by the exact distance (docs/scaling.md); `imsearch db index-other` checks
the recall on stored photos after each build.

The full-width indexes of migration 0005 are dropped here: the new query cannot use them, and they would only cost
inserts. Run `imsearch db index-other` again to build the folded ones.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def index_other(expression: str, graph: str) -> None:
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION imsearch_index_other(cls text) RETURNS text
        LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
        DECLARE
            name text := 'images_embedding_hnsw_o_' || left(md5(cls), 16);
        BEGIN
            EXECUTE format(
                'CREATE INDEX IF NOT EXISTS %I ON images '
                'USING hnsw (({expression}) halfvec_cosine_ops) '
                'WITH ({graph}) WHERE class <> %L', name, cls);
            RETURN name;
        END
        $$
        """
    )


def drop_other_indexes() -> None:
    op.execute(
        """
        DO $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT indexname FROM pg_indexes
                     WHERE tablename = 'images' AND indexname LIKE 'images_embedding_hnsw\\_o\\_%' LOOP
                RAISE NOTICE 'dropped %: run imsearch db index-other to build it again', r.indexname;
                EXECUTE format('DROP INDEX %I', r.indexname);
            END LOOP;
        END
        $$
        """
    )


def upgrade() -> None:
    drop_other_indexes()
    index_other("(subvector(embedding, 1, 1024) - subvector(embedding, 1025, 1024))::halfvec(1024)",
                "m = 16, ef_construction = 400")
    create("imsearch_nearest_0006.sql")


def downgrade() -> None:
    drop_other_indexes()
    index_other("l2_normalize(embedding)::halfvec(2048)", "m = 32, ef_construction = 200")
    create("imsearch_nearest_0005.sql")
