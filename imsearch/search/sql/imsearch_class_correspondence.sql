CREATE OR REPLACE FUNCTION public.imsearch_class_correspondence(k integer DEFAULT 5, mode text DEFAULT 'other'::text)
 RETURNS TABLE(class text, match_class text, matches bigint, share double precision)
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
#variable_conflict use_column
DECLARE
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, @EXACT_MAX_ROWS@);
    candidates bigint;
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(@EF_SEARCH@, 2 * k), 1000)::text, true);

    IF mode = 'other' THEN
        -- exact while every query's candidates are few, as find; beyond, the whole-table index with the wider
        -- beam find gives its per-class branches (so larger sets come out approximate)
        SELECT count(*) INTO candidates FROM images i WHERE i.class IS NOT NULL;
        IF candidates <= exact_max OR NOT iterative THEN
            PERFORM set_config('enable_indexscan', 'off', true);
        ELSE
            PERFORM set_config('hnsw.ef_search', least(greatest(@BRANCH_EF_SEARCH@, 2 * k), 1000)::text, true);
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
$function$
