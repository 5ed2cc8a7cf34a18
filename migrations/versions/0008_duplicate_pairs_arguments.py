"""duplicate pairs arguments: imsearch_duplicate_pairs refuses a max_distance that is not a cosine distance.

PostgreSQL orders NaN above every number, so `distance <= 'NaN'` held for every pair and
`imsearch_duplicate_pairs('NaN')` returned every image's neighbours as duplicates; a negative max_distance
returned nothing and 2 or more everything, without a word. The function now refuses NULL, NaN, negative and
>= 2 (as `imsearch duplicates` does) with an error that names the argument, as it already did for neighbours
outside 1-500. Its signature, result columns, grants and comment stay: BI tools and readers keep using it.

Both texts are written out in full: the one this revision creates, and the one of revisions 0002 and 0007 that
downgrade restores (0007 added `SET enable_seqscan = off`, kept here as the last setting, where ALTER put it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import re

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SETTINGS = """
    SET search_path = public, pg_temp
    SET plan_cache_mode = force_custom_plan
    SET enable_indexscan = on
    SET enable_sort = on
    SET hnsw.ef_search = 100
"""
ITERATIVE_SETTINGS = """
    SET hnsw.iterative_scan = relaxed_order
    SET hnsw.max_scan_tuples = 50000
"""
SEQSCAN_OFF = """
    SET enable_seqscan = off
"""

DUPLICATE_PAIRS = """
CREATE OR REPLACE FUNCTION imsearch_duplicate_pairs(max_distance double precision, neighbours integer DEFAULT 10)
RETURNS TABLE (id bigint, duplicate_id bigint, distance double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER
{settings}
AS $body$
#variable_conflict use_column
DECLARE
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
BEGIN
    -- NaN sorts above every number, so NaN >= 2 holds; said on its own for a clearer condition
    IF max_distance IS NULL OR max_distance = 'NaN' OR max_distance < 0 OR max_distance >= 2 THEN
        RAISE EXCEPTION 'max_distance must be a cosine distance, at least 0 and below 2, not %',
            coalesce(max_distance::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF neighbours IS NULL OR neighbours < 1 OR neighbours > 500 THEN
        RAISE EXCEPTION 'neighbours must be between 1 and 500, not %', coalesce(neighbours::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(64, 2 * neighbours), 1000)::text, true);
    IF iterative THEN
        PERFORM set_config('hnsw.iterative_scan', 'off', true);
    END IF;
    RETURN QUERY
    SELECT DISTINCT ON (1, 2) least(s.id, m.id), greatest(s.id, m.id), m.distance
    FROM images s
    CROSS JOIN LATERAL (
        SELECT i.id, i.embedding <=> s.embedding AS distance
        FROM images i
        WHERE i.id <> s.id
        ORDER BY i.embedding <=> s.embedding
        LIMIT neighbours
    ) m
    WHERE m.distance <= max_distance
    ORDER BY 1, 2;
END
$body$
"""

# Revision 0002's text (with its shared declarations), as 0007 left it.
PREVIOUS_DUPLICATE_PAIRS = """
CREATE OR REPLACE FUNCTION imsearch_duplicate_pairs(max_distance double precision, neighbours integer DEFAULT 10)
RETURNS TABLE (id bigint, duplicate_id bigint, distance double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER
{settings}
AS $body$
#variable_conflict use_column
DECLARE
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, 1000);
BEGIN
    IF neighbours IS NULL OR neighbours < 1 OR neighbours > 500 THEN
        RAISE EXCEPTION 'neighbours must be between 1 and 500, not %', neighbours
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(64, 2 * neighbours), 1000)::text, true);
    IF iterative THEN
        PERFORM set_config('hnsw.iterative_scan', 'off', true);
    END IF;
    RETURN QUERY
    SELECT DISTINCT ON (1, 2) least(s.id, m.id), greatest(s.id, m.id), m.distance
    FROM images s
    CROSS JOIN LATERAL (
        SELECT i.id, i.embedding <=> s.embedding AS distance
        FROM images i
        WHERE i.id <> s.id
        ORDER BY i.embedding <=> s.embedding
        LIMIT neighbours
    ) m
    WHERE m.distance <= max_distance
    ORDER BY 1, 2;
END
$body$
"""


def _settings() -> str:
    """The function's SET clause: iterative scans only where the server's pgvector (0.8+) has them."""
    version = op.get_bind().exec_driver_sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'").scalar()
    iterates = tuple(int(p) for p in re.findall(r"\d+", version or "0")[:2]) >= (0, 8)
    return SETTINGS + (ITERATIVE_SETTINGS if iterates else "") + SEQSCAN_OFF


def upgrade() -> None:
    op.execute(DUPLICATE_PAIRS.format(settings=_settings()))


def downgrade() -> None:
    op.execute(PREVIOUS_DUPLICATE_PAIRS.format(settings=_settings()))
