"""one planner: imsearch_search(query, k, mode, query_class, skip_sha256, max_distance, exact) plans and runs every
search; imsearch_nearest and imsearch_class_correspondence call it.

imsearch find, the web page, evaluate and the audit call the new function with a query vector; imsearch_nearest
calls it with a stored image's vector, class and content, and imsearch_class_correspondence with every stored
image's, so the searches SQL users run are find's by construction, not by a copy kept equal by hand. The planner
counts a class no further than the exact-scan size and finds the stored classes by skipping through the btree on
class, where the functions it replaces counted every row of the other classes per call. imsearch_search returns
imsearch_nearest's columns; SQLSTATE IM001 says the query's class has no stored image.

The two functions keep their signatures, so CREATE OR REPLACE keeps their grants; the roles that may call
imsearch_nearest (the readers of `imsearch db grant-reader`) may call imsearch_search too, and EXECUTE on it is
revoked from PUBLIC. Downgrade restores revision 0010's texts and 0007's setting, and drops imsearch_search.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create, grant, grantees

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SEARCH = "imsearch_search(halfvec, integer, text, text, text, double precision, boolean)"
NEAREST = "imsearch_nearest(bigint, integer, text, double precision)"
CORRESPONDENCE = "imsearch_class_correspondence(integer, text)"
COMMENT = ("imsearch: the k stored images nearest to a query vector (halfvec(2048)), as imsearch find ranks them "
           "(mode all, same or other, the last two within or outside query_class), less those holding the content "
           "skip_sha256 and those farther than max_distance; exact scans every candidate")


def upgrade() -> None:
    create("imsearch_search_0011.sql")
    grant(SEARCH, grantees(NEAREST), COMMENT)
    create("imsearch_nearest_0011.sql")
    create("imsearch_class_correspondence_0011.sql")


def downgrade() -> None:
    create("imsearch_nearest_0010.sql")
    create("imsearch_class_correspondence_0004.sql")
    op.execute(f"ALTER FUNCTION {CORRESPONDENCE} SET enable_seqscan = off")  # as migration 0007 left it
    op.execute(f"DROP FUNCTION {SEARCH}")
