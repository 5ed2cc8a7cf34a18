CREATE OR REPLACE FUNCTION public.imsearch_class_index(prefix text, class text)
 RETURNS regclass
 LANGUAGE sql
 STABLE
AS $function$
-- the partial HNSW index of a class (prefix @CLASS_INDEX_PREFIX@, migration 0003) or of its other classes
-- (@OTHER_INDEX_PREFIX@, imsearch db index-other), NULL while it has none: the prefix and the first 16 hex digits
-- of the class's md5 (imsearch.search.index_name says the same in Python)
SELECT to_regclass(format('public.%I', prefix || left(md5(class), 16)))
$function$
CREATE OR REPLACE FUNCTION public.imsearch_search(query halfvec, k integer DEFAULT 5, mode text DEFAULT 'all'::text, query_class text DEFAULT NULL::text, skip_sha256 text DEFAULT NULL::text, max_distance double precision DEFAULT NULL::double precision, exact boolean DEFAULT false)
 RETURNS TABLE(rank integer, id bigint, path text, class text, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'on'
 SET "hnsw.ef_search" TO '@EF_SEARCH@'
 SET "hnsw.iterative_scan" TO 'relaxed_order'
 SET "hnsw.max_scan_tuples" TO '@MAX_SCAN_TUPLES@'
 SET enable_seqscan TO 'off'
AS $function$
-- imsearch's one search planner: imsearch find, the web page, evaluate and imsearch_nearest all come through here.
-- A 2048-d halfvec is stored out of line (TOAST), so the table looks small to the planner, which would rather scan
-- it and sort than use an index (659 ms instead of 0.4 ms at 100k rows): sequential scans stay off unless exact.
-- Each plan below only picks the rows to rank (`nearest`: a query of $1 the query, $2 skip_sha256, $3 k, $4 the
-- query at unit length, $6 query_class); one statement at the end ranks them.
#variable_conflict use_column
DECLARE
    -- whether this server has iterative index scans: the SET clause above names them only where imsearch found
    -- pgvector >= 0.8 when it created the function (imsearch.search.for_server)
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
    -- a session may move the exact-scan size and widen (or narrow) mode other's beams: SET imsearch.NAME = N
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, @EXACT_MAX_ROWS@);
    branch_ef integer := coalesce(nullif(current_setting('imsearch.branch_ef_search', true), '')::integer,
                                  @BRANCH_EF_SEARCH@);
    other_ef integer := coalesce(nullif(current_setting('imsearch.other_ef_search', true), '')::integer,
                                 @OTHER_EF_SEARCH@);
    scan_exactly boolean := exact;
    nearest text;
    candidates bigint;
    small_only boolean;
    big_unindexed boolean;
    branches text[];
BEGIN
    IF k IS NULL OR k < 1 OR k > @MAX_K@ THEN
        RAISE EXCEPTION 'k must be between 1 and @MAX_K@, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode IS NULL OR mode NOT IN (@MODES@) THEN
        RAISE EXCEPTION 'unknown mode %; use one of all, same, other', quote_nullable(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NULL: no limit. NaN sorts above every number, so NaN >= 2 holds; said on its own for a clearer condition
    IF max_distance = 'NaN' OR max_distance < 0 OR max_distance >= 2 THEN
        RAISE EXCEPTION 'max_distance must be a cosine distance, at least 0 and below 2, or NULL, not %',
            max_distance USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF query IS NULL OR vector_dims(query) <> @DIMENSIONS@ THEN
        RAISE EXCEPTION 'query must be a halfvec of @DIMENSIONS@ dimensions, not %',
            coalesce(vector_dims(query)::text || ' dimensions', 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode <> 'all' THEN
        IF query_class IS NULL THEN
            RAISE EXCEPTION 'mode % needs the query''s class', mode USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT FROM images i WHERE i.class = query_class) THEN
            RAISE EXCEPTION 'class % is not stored', quote_literal(query_class) USING ERRCODE = '@UNKNOWN_CLASS@';
        END IF;
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(@EF_SEARCH@, 2 * k), 1000)::text, true);

    IF exact OR mode = 'all' THEN
        NULL;  -- the whole-table index, or every row: below
    ELSIF mode = 'same' THEN
        -- a class of at most exact_max rows is scanned exactly through the btree on class (counted no further);
        -- a larger one through its own index (migration 0003), which holds the unit-length embedding by inner
        -- product: it orders rows as cosine distance does, and is searched like an unfiltered index
        SELECT count(*) INTO candidates FROM (SELECT FROM images i WHERE i.class = query_class LIMIT exact_max + 1) c;
        IF candidates <= exact_max THEN
            scan_exactly := true;
        ELSIF imsearch_class_index('@CLASS_INDEX_PREFIX@', query_class) IS NOT NULL THEN
            nearest := 'SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                       'WHERE i.sha256 IS DISTINCT FROM $2 AND i.class = $6 '
                       'ORDER BY l2_normalize(i.embedding)::halfvec(@DIMENSIONS@) <#> $4 LIMIT $3';
        ELSIF NOT iterative THEN
            scan_exactly := true;
        END IF;
    ELSE
        -- mode other. A filtered scan of the whole-table index loses results here: the greedy search spends itself
        -- inside the query's own class. So: the query class's other-class index (imsearch db index-other) when it
        -- has one: one search of a graph over every other class on the fold of the embedding, its nearest
        -- @OTHER_DEPTH@ ranked by the exact distance
        SELECT count(*) INTO candidates FROM (SELECT FROM images i WHERE i.class <> query_class LIMIT exact_max + 1) c;
        IF candidates > exact_max AND imsearch_class_index('@OTHER_INDEX_PREFIX@', query_class) IS NOT NULL THEN
            PERFORM set_config('hnsw.ef_search', least(greatest(other_ef, 2 * k), 1000)::text, true);
            nearest := 'SELECT f.id, f.path, f.class, f.embedding <=> $1 AS distance FROM ('
                       'SELECT i.id, i.path, i.class, i.embedding FROM images i '
                       'WHERE i.sha256 IS DISTINCT FROM $2 AND i.class <> $6 '
                       'ORDER BY @FOLD_ROW@ <=> @FOLD_QUERY@ '
                       'LIMIT greatest(@OTHER_DEPTH@, $3)) f ORDER BY 4 LIMIT $3';
        ELSE
            -- else, with at most @MAX_BRANCHES@ other classes, each either small or with its own index, the union
            -- of the same-class query over every other class, merged by distance (the classes found by skipping
            -- through the btree on class, each counted no further than exact_max); else the whole-table index
            -- scanned iteratively (pgvector >= 0.8), exactly on older pgvector; exactly while every other class
            -- is small
            WITH RECURSIVE stored(class) AS (
                (SELECT i.class FROM images i WHERE i.class IS NOT NULL ORDER BY i.class LIMIT 1)
                UNION ALL
                SELECT (SELECT i.class FROM images i WHERE i.class > s.class ORDER BY i.class LIMIT 1)
                FROM stored s WHERE s.class IS NOT NULL
            ), others AS (
                SELECT s.class,
                       (SELECT count(*) FROM (SELECT FROM images i WHERE i.class = s.class LIMIT exact_max + 1) c) AS n,
                       imsearch_class_index('@CLASS_INDEX_PREFIX@', s.class) AS index
                FROM stored s
                WHERE s.class IS NOT NULL AND s.class <> query_class
                LIMIT @MAX_BRANCHES@ + 1
            )
            SELECT coalesce(bool_and(o.n <= exact_max), true),
                   coalesce(bool_or(o.n > exact_max AND o.index IS NULL), false),
                   coalesce(array_agg(
                       CASE WHEN o.n <= exact_max THEN format(
                           '(SELECT * FROM (SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                           'WHERE i.sha256 IS DISTINCT FROM $2 AND i.class = %L OFFSET 0) AS small '
                           'ORDER BY small.distance LIMIT $3)', o.class)
                       ELSE format(
                           '(SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                           'WHERE i.sha256 IS DISTINCT FROM $2 AND i.class = %L '
                           'ORDER BY l2_normalize(i.embedding)::halfvec(@DIMENSIONS@) <#> $4 LIMIT $3)', o.class)
                       END ORDER BY o.class), '{}')
            INTO small_only, big_unindexed, branches
            FROM others o;
            IF cardinality(branches) > @MAX_BRANCHES@ THEN
                small_only := false;
                big_unindexed := true;
            END IF;
            IF NOT small_only AND NOT big_unindexed THEN
                PERFORM set_config('hnsw.ef_search', least(greatest(branch_ef, 2 * k), 1000)::text, true);
                nearest := array_to_string(branches, ' UNION ALL ') || ' ORDER BY distance LIMIT $3';
            ELSE
                scan_exactly := small_only OR NOT iterative;
            END IF;
        END IF;
    END IF;

    IF iterative AND NOT scan_exactly AND (nearest IS NOT NULL OR mode = 'all') THEN
        -- only a filtered scan of the whole-table index goes on past its beam
        PERFORM set_config('hnsw.iterative_scan', 'off', true);
    END IF;
    IF nearest IS NOT NULL THEN
        -- an index of the class's own, or the union of them: searched like an unfiltered index, its rows in order
        PERFORM set_config('enable_sort', 'off', true);  -- else the planner reads the btree on class and sorts
    ELSE
        -- every mode's own filter, on the whole-table index (iteratively when filtered) or exactly
        nearest := 'SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                   'WHERE i.sha256 IS DISTINCT FROM $2'
                   || CASE mode WHEN 'same' THEN ' AND i.class = $6' WHEN 'other' THEN ' AND i.class <> $6' ELSE '' END
                   || ' ORDER BY i.embedding <=> $1 LIMIT $3';
    END IF;
    IF scan_exactly THEN
        -- every candidate read and sorted: through the btree on class or the table, whichever costs less (with
        -- both kinds of scan off, PostgreSQL would take the cheaper disabled one: the whole-table HNSW index)
        PERFORM set_config('enable_indexscan', 'off', true);
        PERFORM set_config('enable_seqscan', 'on', true);
    END IF;
    RETURN QUERY EXECUTE
        'SELECT (row_number() OVER (ORDER BY n.distance, n.id))::integer, n.id, n.path, n.class, n.distance '
        'FROM (' || nearest || ') n WHERE $5 IS NULL OR n.distance <= $5 ORDER BY 1'
    USING query, skip_sha256, k, l2_normalize(query), max_distance, query_class;
END
$function$
CREATE OR REPLACE FUNCTION public.imsearch_neighbours(ids bigint[], k integer DEFAULT 10)
 RETURNS TABLE(id bigint, neighbour_id bigint, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'on'
 SET "hnsw.ef_search" TO '@NEIGHBOURS_EF_SEARCH@'
 SET "hnsw.iterative_scan" TO 'off'
 SET enable_seqscan TO 'off'
AS $function$
-- the planner's second entry: each of these stored images' (NULL: every stored image's) k nearest other stored
-- images through the whole-table index, unranked; the audit, the calibration and imsearch_duplicate_pairs use it
#variable_conflict use_column
BEGIN
    IF k IS NULL OR k < 1 OR k > @MAX_K@ THEN
        RAISE EXCEPTION 'k must be between 1 and @MAX_K@, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(@NEIGHBOURS_EF_SEARCH@, 2 * k), 1000)::text, true);
    RETURN QUERY
    SELECT s.id, m.id, m.distance
    FROM images s
    CROSS JOIN LATERAL (
        SELECT i.id, i.embedding <=> s.embedding AS distance
        FROM images i
        WHERE i.id <> s.id
        ORDER BY i.embedding <=> s.embedding
        LIMIT k
    ) m
    WHERE ids IS NULL OR s.id = ANY(ids);
END
$function$
