"""mode other's beam: the SQL functions search other classes with ef_search 200, as `imsearch find` does.

find's per-class branches for mode other went from ef_search 400 to 200 (imsearch.search.BRANCH_EF_SEARCH): on
bench/search.py's scene data at 100k rows recall@5 stayed 1.0 and p50 fell from 48-60 to 31-35 ms
(bench/other_mode.py). imsearch_nearest and imsearch_class_correspondence (migration 0002) mirror find's
planning, so their beam changes with it; the rest of each function stays as it is.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FUNCTIONS = ("imsearch_nearest(bigint, integer, text)", "imsearch_class_correspondence(integer, text)")


def set_beam(old: int, new: int) -> None:
    for function in FUNCTIONS:
        op.execute(
            f"""
            DO $$
            DECLARE
                definition text := pg_get_functiondef('{function}'::regprocedure);
            BEGIN
                IF position('greatest({old}, 2 * k)' IN definition) = 0 THEN
                    RAISE EXCEPTION '{function} has no beam of {old} to change';
                END IF;
                EXECUTE replace(definition, 'greatest({old}, 2 * k)', 'greatest({new}, 2 * k)');
            END
            $$
            """
        )


def upgrade() -> None:
    set_beam(400, 200)


def downgrade() -> None:
    set_beam(200, 400)
