"""sql access: functions and views for BI tools (nearest images, class correspondence, duplicate pairs, catalog).

Every function is SECURITY DEFINER with a pinned search_path, so a read-only role needs EXECUTE on it and no
privilege on `images` (whose raw vectors stay out of reach); EXECUTE is revoked from PUBLIC and granted per role
by `imsearch db grant-reader`. Views run with their owner's privileges, so SELECT on a view is all a role needs.

imsearch_nearest plans each query as `imsearch find` does (imsearch/search/__init__.py), so both return the same images:
mode all scans the HNSW index; a class of at most `imsearch.exact_max_rows` rows (default 1000) is scanned
exactly, a larger one through its own partial index when it has one (migration 0003 names them); mode other is
the union of those per-class queries; where that cannot be, the whole-table index is scanned iteratively
(pgvector >= 0.8), else exactly. Settings made inside a function are named in its SET clause, so they end when
the function returns.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import re

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Mirrors imsearch.search: EXACT_MAX_ROWS, EF_SEARCH, BRANCH_EF_SEARCH, MAX_SCAN_TUPLES, MAX_BRANCHES.
COMMON_SETTINGS = """
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

# Declarations and plan choice shared by the functions: `iterative` is true where pgvector can scan iteratively.
PLAN_DECLARE = """
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, 1000);
"""

NEAREST = """
CREATE FUNCTION imsearch_nearest(image_id bigint, k integer DEFAULT 5, mode text DEFAULT 'all')
RETURNS TABLE (rank integer, id bigint, path text, class text, distance double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER
{settings}
AS $body$
#variable_conflict use_column
DECLARE
    {declare}
    q halfvec;
    q_class text;
    q_sha text;
    candidates bigint;
    class_indexed boolean;
    small_only boolean;
    big_unindexed boolean;
    branches text[];
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode IS NULL OR mode NOT IN ('all', 'same', 'other') THEN
        RAISE EXCEPTION 'unknown mode %; use one of all, same, other', quote_nullable(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT i.embedding, i.class, i.sha256 INTO q, q_class, q_sha FROM images i WHERE i.id = image_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no stored image has id %', image_id USING ERRCODE = 'no_data_found';
    END IF;
    IF mode <> 'all' AND q_class IS NULL THEN
        RAISE EXCEPTION 'image % has no class; mode % needs one', image_id, mode
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(100, 2 * k), 1000)::text, true);

    IF mode = 'all' THEN
        IF iterative THEN
            PERFORM set_config('hnsw.iterative_scan', 'off', true);
        END IF;
        RETURN QUERY
        SELECT (row_number() OVER (ORDER BY n.distance, n.id))::integer, n.id, n.path, n.class, n.distance
        FROM (
            SELECT i.id, i.path, i.class, i.embedding <=> q AS distance
            FROM images i
            WHERE i.sha256 IS DISTINCT FROM q_sha
            ORDER BY i.embedding <=> q
            LIMIT k
        ) n
        ORDER BY 1;
        RETURN;
    END IF;

    IF mode = 'same' THEN
        SELECT count(*) INTO candidates FROM images i WHERE i.class = q_class;
        class_indexed := EXISTS (SELECT FROM pg_indexes x WHERE x.tablename = 'images'
                                 AND x.indexname = 'images_embedding_hnsw_c_' || left(md5(q_class), 16));
        IF candidates <= exact_max OR NOT (class_indexed OR iterative) THEN
            PERFORM set_config('enable_indexscan', 'off', true);
        ELSIF class_indexed THEN
            -- custom plans see q_class as a constant, so the class's partial index matches
            PERFORM set_config('enable_sort', 'off', true);
        END IF;
        IF iterative AND (class_indexed OR candidates <= exact_max) THEN
            PERFORM set_config('hnsw.iterative_scan', 'off', true);
        END IF;
        IF class_indexed AND candidates > exact_max THEN
            -- the class index holds the unit-length embedding by inner product (migration 0003)
            RETURN QUERY
            SELECT (row_number() OVER (ORDER BY n.distance, n.id))::integer, n.id, n.path, n.class, n.distance
            FROM (
                SELECT i.id, i.path, i.class, i.embedding <=> q AS distance
                FROM images i
                WHERE i.sha256 IS DISTINCT FROM q_sha AND i.class = q_class
                ORDER BY l2_normalize(i.embedding)::halfvec(2048) <#> l2_normalize(q)
                LIMIT k
            ) n
            ORDER BY 1;
            RETURN;
        END IF;
        RETURN QUERY
        SELECT (row_number() OVER (ORDER BY n.distance, n.id))::integer, n.id, n.path, n.class, n.distance
        FROM (
            SELECT i.id, i.path, i.class, i.embedding <=> q AS distance
            FROM images i
            WHERE i.sha256 IS DISTINCT FROM q_sha AND i.class = q_class
            ORDER BY i.embedding <=> q
            LIMIT k
        ) n
        ORDER BY 1;
        RETURN;
    END IF;

    -- mode other: as find, the union of the same-class query over every other class when each is small or has
    -- its own index (at most 32 classes); else the whole-table index scanned iteratively; else exactly.
    SELECT coalesce(bool_and(c.n <= exact_max), true),
           coalesce(bool_or(c.n > exact_max AND x.indexname IS NULL), false),
           coalesce(array_agg(
               CASE WHEN c.n <= exact_max THEN format(
                   '(SELECT * FROM (SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                   'WHERE i.sha256 IS DISTINCT FROM $2 AND i.class = %L OFFSET 0) AS small '
                   'ORDER BY small.distance LIMIT $3)', c.class)
               ELSE format(
                   '(SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                   'WHERE i.sha256 IS DISTINCT FROM $2 AND i.class = %L '
                   'ORDER BY l2_normalize(i.embedding)::halfvec(2048) <#> $4 LIMIT $3)',
                   c.class)
               END ORDER BY c.class), '{{}}')
    INTO small_only, big_unindexed, branches
    FROM (SELECT i.class, count(*) AS n FROM images i WHERE i.class <> q_class GROUP BY i.class) c
    LEFT JOIN pg_indexes x
        ON x.tablename = 'images' AND x.indexname = 'images_embedding_hnsw_c_' || left(md5(c.class), 16);

    IF NOT small_only AND NOT big_unindexed AND cardinality(branches) <= 32 THEN
        PERFORM set_config('hnsw.ef_search', least(greatest(400, 2 * k), 1000)::text, true);
        IF iterative THEN
            PERFORM set_config('hnsw.iterative_scan', 'off', true);
        END IF;
        PERFORM set_config('enable_sort', 'off', true);
        RETURN QUERY EXECUTE
            'SELECT (row_number() OVER (ORDER BY u.distance, u.id))::integer, u.id, u.path, u.class, u.distance '
            'FROM (' || array_to_string(branches, ' UNION ALL ') || ' ORDER BY distance LIMIT $3) u ORDER BY 1'
        USING q, q_sha, k, l2_normalize(q);
        RETURN;
    END IF;
    IF small_only OR NOT iterative THEN
        PERFORM set_config('enable_indexscan', 'off', true);
    END IF;
    RETURN QUERY
    SELECT (row_number() OVER (ORDER BY n.distance, n.id))::integer, n.id, n.path, n.class, n.distance
    FROM (
        SELECT i.id, i.path, i.class, i.embedding <=> q AS distance
        FROM images i
        WHERE i.sha256 IS DISTINCT FROM q_sha AND i.class <> q_class
        ORDER BY i.embedding <=> q
        LIMIT k
    ) n
    ORDER BY 1;
END
$body$
"""

CORRESPONDENCE = """
CREATE FUNCTION imsearch_class_correspondence(k integer DEFAULT 5, mode text DEFAULT 'other')
RETURNS TABLE (class text, match_class text, matches bigint, share double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER
{settings}
AS $body$
#variable_conflict use_column
DECLARE
    {declare}
    candidates bigint;
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(100, 2 * k), 1000)::text, true);

    IF mode = 'other' THEN
        -- exact while every query's candidates are few, as find; beyond, the whole-table index with the wider
        -- beam find gives its per-class branches (so larger sets come out approximate)
        SELECT count(*) INTO candidates FROM images i WHERE i.class IS NOT NULL;
        IF candidates <= exact_max OR NOT iterative THEN
            PERFORM set_config('enable_indexscan', 'off', true);
        ELSE
            PERFORM set_config('hnsw.ef_search', least(greatest(400, 2 * k), 1000)::text, true);
        END IF;
        RETURN QUERY
        SELECT h.class, h.match_class, count(*),
               count(*)::double precision / sum(count(*)) OVER (PARTITION BY h.class)
        FROM (
            SELECT s.class, m.class AS match_class
            FROM images s
            CROSS JOIN LATERAL (
                SELECT i.class
                FROM images i
                WHERE i.sha256 IS DISTINCT FROM s.sha256 AND i.class <> s.class
                ORDER BY i.embedding <=> s.embedding
                LIMIT k
            ) m
            WHERE s.class IS NOT NULL
        ) h
        GROUP BY h.class, h.match_class
        ORDER BY 1, 2;
    ELSIF mode = 'all' THEN
        IF iterative THEN
            PERFORM set_config('hnsw.iterative_scan', 'off', true);
        END IF;
        RETURN QUERY
        SELECT h.class, h.match_class, count(*),
               count(*)::double precision / sum(count(*)) OVER (PARTITION BY h.class)
        FROM (
            SELECT s.class, m.class AS match_class
            FROM images s
            CROSS JOIN LATERAL (
                SELECT i.class
                FROM images i
                WHERE i.sha256 IS DISTINCT FROM s.sha256
                ORDER BY i.embedding <=> s.embedding
                LIMIT k
            ) m
            WHERE s.class IS NOT NULL
        ) h
        GROUP BY h.class, h.match_class
        ORDER BY 1, 2;
    ELSE
        RAISE EXCEPTION 'unknown mode %; use other or all', quote_nullable(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$body$
"""

DUPLICATE_PAIRS = """
CREATE FUNCTION imsearch_duplicate_pairs(max_distance double precision, neighbours integer DEFAULT 10)
RETURNS TABLE (id bigint, duplicate_id bigint, distance double precision)
LANGUAGE plpgsql STABLE SECURITY DEFINER
{settings}
AS $body$
#variable_conflict use_column
DECLARE
    {declare}
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

FUNCTIONS = (
    "imsearch_nearest(bigint, integer, text)",
    "imsearch_class_correspondence(integer, text)",
    "imsearch_duplicate_pairs(double precision, integer)",
)

VIEWS = """
CREATE VIEW image_catalog AS
SELECT id, path, class, bytes, width, height, ingested_at
FROM images;

CREATE VIEW class_summary AS
SELECT class, count(*) AS images, count(*)::double precision / sum(count(*)) OVER () AS share
FROM images
GROUP BY class;

CREATE VIEW class_correspondence AS
SELECT class, match_class, matches, share
FROM imsearch_class_correspondence(5, 'other');
"""


COMMENTS = {
    "VIEW image_catalog": "imsearch: every stored image without its vector; bytes = file size, width and height "
                          "in pixels (upright)",
    "VIEW class_summary": "imsearch: images per class and each class's share of all stored images",
    "VIEW class_correspondence": "imsearch: for each class, where the 5 nearest other-class images of its images "
                                 "fall (share: row-normalised)",
    "FUNCTION imsearch_nearest(bigint, integer, text)": "imsearch: the k stored images nearest to a stored image, "
                                                        "as imsearch find ranks them (mode all, same or other)",
    "FUNCTION imsearch_class_correspondence(integer, text)": "imsearch: for each class, how the k nearest "
                                                             "neighbours of its images spread over classes (mode "
                                                             "other or all), row-normalised",
    "FUNCTION imsearch_duplicate_pairs(double precision, integer)": "imsearch: pairs of stored images at cosine "
                                                                    "distance <= max_distance among each image's "
                                                                    "nearest neighbours",
}


def _pgvector_iterates() -> bool:
    """Whether the server's pgvector has iterative index scans (0.8+); older ones reject those settings.

    Decided when the migration runs: after a pgvector upgrade the functions keep scanning large filtered sets
    exactly (correct, only slower) until this migration runs again.
    """
    version = op.get_bind().exec_driver_sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'").scalar()
    return tuple(int(p) for p in re.findall(r"\d+", version or "0")[:2]) >= (0, 8)


def upgrade() -> None:
    settings = COMMON_SETTINGS + (ITERATIVE_SETTINGS if _pgvector_iterates() else "")
    for sql in (NEAREST, CORRESPONDENCE, DUPLICATE_PAIRS):
        op.execute(sql.format(settings=settings, declare=PLAN_DECLARE.strip()))
    for signature in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
    op.execute(VIEWS)
    for target, text in COMMENTS.items():
        op.execute(f"COMMENT ON {target} IS '{text.replace(chr(39), chr(39) * 2)}'")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS class_correspondence, class_summary, image_catalog")
    for signature in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
