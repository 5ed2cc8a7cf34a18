"""nearest max_distance: imsearch_nearest takes a fourth argument, and imsearch_duplicate_distance() names the limit.

`imsearch_nearest(image_id, k, mode, max_distance)` drops the matches farther than `max_distance` after ranking, as
`imsearch find --max-distance` does: the k nearest, less those beyond it, so fewer than k may come back. NULL (the
default) is no limit; NaN, negative and >= 2 are errors that name the argument, as imsearch_duplicate_pairs's
(migration 0008). `imsearch_duplicate_distance()` is the duplicate distance calibrated for the model of the stored
rows (model_calibration, migration 0009: the user's override, else the measured one; NULL when there is none, or
when the rows come from more than one model), so that a BI tool can write
`imsearch_nearest(42, 5, 'all', imsearch_duplicate_distance())`.

A new argument makes a new function, so the three-argument imsearch_nearest is dropped and the four-argument one
created from its full text (migrations/sql/imsearch_nearest_0010.sql, which keeps the SET clause migration 0007
left: `enable_seqscan = off`, last). Calls with one to three arguments keep working. Every role that could call the
old one (the readers of `imsearch db grant-reader`) may call both new functions; EXECUTE stays revoked from PUBLIC
(migration 0002), unless it had been granted back. Downgrade restores revision 0006's text, 0007's setting, and
the same grants. A view of your own that calls imsearch_nearest stops the upgrade (DROP without CASCADE): drop it
first, and create it again afterwards.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op
from imsearch_migrations.functions import create, grantees
from imsearch_migrations.functions import grant as grant_with

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

NEAREST = "imsearch_nearest(bigint, integer, text, double precision)"
PREVIOUS_NEAREST = "imsearch_nearest(bigint, integer, text)"
DUPLICATE_DISTANCE = "imsearch_duplicate_distance()"

# The model of the stored rows: min = max through the btree on images.model (two index probes, no scan).
DUPLICATE_DISTANCE_SQL = """
CREATE FUNCTION imsearch_duplicate_distance()
RETURNS double precision
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = public, pg_temp
AS $body$
    SELECT coalesce(c.override_distance, c.duplicate_distance)
    FROM (SELECT min(i.model) AS model, max(i.model) AS last FROM images i) m
    JOIN model_calibration c ON c.model = m.model
    WHERE m.model = m.last
$body$
"""

COMMENTS = {
    NEAREST: "imsearch: the k stored images nearest to a stored image, as imsearch find ranks them (mode all, same "
             "or other), less those farther than max_distance (NULL: no limit)",
    PREVIOUS_NEAREST: "imsearch: the k stored images nearest to a stored image, as imsearch find ranks them (mode "
                      "all, same or other)",
    DUPLICATE_DISTANCE: "imsearch: the duplicate distance calibrated for the stored rows' model (its override, "
                        "else the measured one); NULL when not calibrated",
}


def grant(signature: str, roles: list[str]) -> None:
    grant_with(signature, roles, COMMENTS[signature])


def upgrade() -> None:
    roles = grantees(PREVIOUS_NEAREST)
    op.execute(f"DROP FUNCTION {PREVIOUS_NEAREST}")
    create("imsearch_nearest_0010.sql")
    grant(NEAREST, roles)
    op.execute(DUPLICATE_DISTANCE_SQL)
    grant(DUPLICATE_DISTANCE, roles)


def downgrade() -> None:
    roles = grantees(NEAREST)
    op.execute(f"DROP FUNCTION {DUPLICATE_DISTANCE}")
    op.execute(f"DROP FUNCTION {NEAREST}")
    create("imsearch_nearest_0006.sql")
    op.execute(f"ALTER FUNCTION {PREVIOUS_NEAREST} SET enable_seqscan = off")  # as migration 0007 left it
    grant(PREVIOUS_NEAREST, roles)
