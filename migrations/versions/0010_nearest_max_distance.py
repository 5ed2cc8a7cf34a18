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

from pathlib import Path

from alembic import op

from imsearch.search import for_server

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

SQL = Path(__file__).resolve().parent.parent / "sql"  # each function's full text as of a revision

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


def create(name: str) -> None:
    """Create a function from its frozen text, as this server's pgvector takes it."""
    version = op.get_bind().exec_driver_sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'").scalar()
    op.execute(for_server((SQL / name).read_text(), version))


def grantees(signature: str) -> list[str]:
    """The roles (PUBLIC included) holding EXECUTE on a function besides its owner, as GRANT names them, each
    followed by WITH GRANT OPTION where it had that."""
    rows = op.get_bind().exec_driver_sql(
        f"""
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
               || CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
        FROM pg_proc p
        CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE p.oid = '{signature}'::regprocedure AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner
        ORDER BY 1
        """
    ).fetchall()
    return [r[0] for r in rows]


def grant(signature: str, roles: list[str]) -> None:
    """EXECUTE for these roles only (a new function's default grant to PUBLIC is revoked, as migration 0002 did)."""
    op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
    for role in roles:
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {role}")
    op.execute(f"COMMENT ON FUNCTION {signature} IS '{COMMENTS[signature].replace(chr(39), chr(39) * 2)}'")


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
