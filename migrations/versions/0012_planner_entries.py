"""planner entries: every vector search goes through the planner's template; imsearch_duplicate_pairs calls it.

The audit, the calibration and imsearch_duplicate_pairs each wrote their own nearest-neighbour query, so the index
choices lived in four places. `imsearch_neighbours(ids, k)` is the template's second entry (imsearch/search/sql/
imsearch_search.sql): each of these stored images' (NULL: every stored image's) k nearest other stored images
through the whole-table index, with the audit's beam (ef_search 64, or twice k) and no iterative scan. The audit
and the calibration call it, and imsearch_duplicate_pairs is now a call of it: same signature, argument checks,
result, grants and comment (CREATE OR REPLACE keeps the last two).

`imsearch_class_index(prefix, class)` is the one SQL rule that names a class's partial index; imsearch_search uses
it for the class, other-class and union plans. imsearch_search now builds each plan's candidate query and ranks
them in one statement, and turns the iterative scan off in one place; it returns what it returned.

The two new functions are the owner's: EXECUTE is revoked from PUBLIC, as for migration 0002's functions
(imsearch_search and imsearch_duplicate_pairs run as their owner and call them). Downgrade restores revision 0011's
imsearch_search and 0008's imsearch_duplicate_pairs, and drops the two.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create, grant

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

CLASS_INDEX = "imsearch_class_index(text, text)"
NEIGHBOURS = "imsearch_neighbours(bigint[], integer)"
COMMENTS = {
    CLASS_INDEX: "imsearch: the partial HNSW index of a class (prefix images_embedding_hnsw_c_) or of its other "
                 "classes (images_embedding_hnsw_o_), NULL while there is none",
    NEIGHBOURS: "imsearch: each of these stored images' (NULL: every stored image's) k nearest other stored images "
                "by cosine distance, through the whole-table index, unranked",
}


def upgrade() -> None:
    create("imsearch_class_index_0012.sql")
    grant(CLASS_INDEX, [], COMMENTS[CLASS_INDEX])
    create("imsearch_neighbours_0012.sql")
    grant(NEIGHBOURS, [], COMMENTS[NEIGHBOURS])
    create("imsearch_search_0012.sql")
    create("imsearch_duplicate_pairs_0012.sql")


def downgrade() -> None:
    create("imsearch_duplicate_pairs_0008.sql")
    create("imsearch_search_0011.sql")
    op.execute(f"DROP FUNCTION {NEIGHBOURS}")
    op.execute(f"DROP FUNCTION {CLASS_INDEX}")
