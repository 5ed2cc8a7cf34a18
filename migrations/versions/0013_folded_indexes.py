"""folded indexes: each vector indexed about once, every search re-ranked by the exact distance.

Up to 0012 a vector was in up to four HNSW graphs, each a full-width halfvec(2048) (one page a row): the whole-table
index for mode all, a partial index per class past 1,000 rows for mode same, and with `imsearch db index-other` one
per class over every other class. At 100k rows that was 2.9 GB of indexes; at a million, about 29 GB.

Now every graph holds imsearch_fold(embedding), a 1,024-d random-sign fold (a third of a page a row):

- images_fold_hnsw over every row (imsearch_index_all, which a bulk load calls after its rows are in): mode all,
  mode other (scanned iteratively until enough rows pass the filter) and mode same for a large class;
- a partial index per class past 1,000 rows that holds at most an eighth of the library (imsearch_index_class),
  where a filtered scan of the whole-table graph would wade through the other classes.

imsearch_search takes an index's nearest 200 (imsearch.rerank_depth) and ranks them by the exact distance from the
stored halfvec, so answers and distances are the exact ones for whatever the fold finds; docs/scaling.md has the
measurements. The other-class indexes and imsearch_index_other are dropped (`imsearch db index-other` has nothing
left to build). width, height and bytes become nullable: `imsearch load` stores embeddings computed elsewhere, whose
files may not say them.

The builds read every stored vector: minutes at a million rows, so imsearch runs this migration only through
`imsearch db upgrade`, which shows their progress. Downgrade restores 0012's functions and full-width indexes (the
class indexes for classes past 1,000 rows; other-class ones are left to `imsearch db index-other`), and stores 0 as
the size of rows loaded without one.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from imsearch_migrations.functions import create, grant
from imsearch_migrations.functions import size_build_memory as build_memory

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

FOLD = "imsearch_fold(halfvec)"
COMMENT = ("imsearch: the 1,024-d random-sign fold of an embedding that imsearch's HNSW indexes hold; searches rank "
           "what it finds by the exact distance")
SIZES = ("width", "height", "bytes")
EXACT_MAX_ROWS = 1000
CLASS_INDEX_MAX_SHARE = 0.125


def drop_indexes(pattern: str) -> None:
    op.execute(
        f"""
        DO $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT indexname FROM pg_indexes WHERE tablename = 'images' AND indexname LIKE '{pattern}' LOOP
                EXECUTE format('DROP INDEX %I', r.indexname);
            END LOOP;
        END
        $$
        """
    )


def index_classes(share: float | None) -> None:
    """imsearch_index_class for each class past EXACT_MAX_ROWS rows (with `share`: holding at most that share),
    one at a time: an index cannot be built by a statement still reading its table."""
    rule = f"AND count(*) <= {share} * (SELECT count(*) FROM images)" if share is not None else ""
    bind = op.get_bind()
    classes = bind.exec_driver_sql(
        f"SELECT class FROM images WHERE class IS NOT NULL GROUP BY class HAVING count(*) > {EXACT_MAX_ROWS} {rule}"
    ).scalars().all()
    for cls in classes:
        bind.execute(sa.text("SELECT imsearch_index_class(:cls)"), {"cls": cls})


def size_build_memory() -> None:
    """The maintenance_work_mem the graphs of every stored row need, for this session's builds."""
    build_memory(op.get_bind().exec_driver_sql("SELECT count(*) FROM images").scalar())


def upgrade() -> None:
    size_build_memory()
    drop_indexes("images\\_embedding\\_hnsw%")
    op.execute("DROP FUNCTION IF EXISTS imsearch_index_other(text)")
    for column in SIZES:
        op.alter_column("images", column, nullable=True)
    create("imsearch_fold_0013.sql")
    grant(FOLD, ["PUBLIC"], COMMENT)
    create("imsearch_class_index_0013.sql", "imsearch_index_all_0013.sql", "imsearch_index_class_0013.sql",
           "imsearch_search_0013.sql", "imsearch_neighbours_0013.sql")
    op.execute("REVOKE ALL ON FUNCTION imsearch_index_all() FROM PUBLIC")
    op.execute("SELECT imsearch_index_all()")
    index_classes(CLASS_INDEX_MAX_SHARE)


def downgrade() -> None:
    size_build_memory()
    drop_indexes("images\\_fold\\_hnsw%")
    for column in SIZES:
        op.execute(f"UPDATE images SET {column} = 0 WHERE {column} IS NULL")
        op.alter_column("images", column, nullable=False)
    create("imsearch_neighbours_0012.sql", "imsearch_search_0012.sql", "imsearch_class_index_0012.sql")
    op.execute(
        """
        CREATE OR REPLACE FUNCTION imsearch_index_class(cls text) RETURNS text
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
    op.execute(
        """
        CREATE FUNCTION imsearch_index_other(cls text) RETURNS text
        LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
        DECLARE
            name text := 'images_embedding_hnsw_o_' || left(md5(cls), 16);
        BEGIN
            EXECUTE format(
                'CREATE INDEX IF NOT EXISTS %I ON images '
                'USING hnsw (((subvector(embedding, 1, 1024) - subvector(embedding, 1025, 1024))::halfvec(1024)) '
                'halfvec_cosine_ops) WITH (m = 16, ef_construction = 400) WHERE class <> %L', name, cls);
            RETURN name;
        END
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION imsearch_index_other(text) FROM PUBLIC")
    op.execute("DROP FUNCTION imsearch_index_all()")
    op.execute(f"DROP FUNCTION {FOLD}")
    op.execute("CREATE INDEX images_embedding_hnsw ON images USING hnsw (embedding halfvec_cosine_ops) "
               "WITH (m = 16, ef_construction = 64)")
    index_classes(None)
