CREATE OR REPLACE FUNCTION public.imsearch_search(query halfvec, k integer DEFAULT 5, mode text DEFAULT 'all'::text, query_class text DEFAULT NULL::text, skip_sha256 text DEFAULT NULL::text, max_distance double precision DEFAULT NULL::double precision, exact boolean DEFAULT false)
 RETURNS TABLE(rank integer, id bigint, path text, class text, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'on'
 SET "hnsw.ef_search" TO '200'
 SET "hnsw.iterative_scan" TO 'relaxed_order'
 SET "hnsw.max_scan_tuples" TO '50000'
 SET enable_seqscan TO 'off'
AS $function$
-- imsearch's one search planner: imsearch find, the web page, evaluate and imsearch_nearest all come through here.
-- The vector indexes hold the embedding's fold (imsearch_fold, migration 0013): an index gives the nearest `depth`
-- candidates by the fold's distance, and one statement at the end ranks them by the exact distance from the stored
-- halfvec. A 2048-d halfvec is stored out of line (TOAST), so the table looks small to the planner, which would
-- rather scan it and sort than use an index: sequential scans stay off unless exact.
#variable_conflict use_column
DECLARE
    -- whether this server has iterative index scans: the SET clause above names them only where imsearch found
    -- pgvector >= 0.8 when it created the function (imsearch.search.for_server)
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
    -- a session may move the exact-scan size and the re-ranking depth: SET imsearch.NAME = N
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, 1000);
    depth integer := coalesce(nullif(current_setting('imsearch.rerank_depth', true), '')::integer, 200);
    filter text := CASE mode WHEN 'same' THEN ' AND i.class = $5' WHEN 'other' THEN ' AND i.class <> $5' ELSE '' END;
    scan_exactly boolean := exact;
    order_by text;
    nearest text;
    candidates bigint;
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode IS NULL OR mode NOT IN ('all', 'same', 'other') THEN
        RAISE EXCEPTION 'unknown mode %; use one of all, same, other', quote_nullable(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NULL: no limit. NaN sorts above every number, so NaN >= 2 holds; said on its own for a clearer condition
    IF max_distance = 'NaN' OR max_distance < 0 OR max_distance >= 2 THEN
        RAISE EXCEPTION 'max_distance must be a cosine distance, at least 0 and below 2, or NULL, not %',
            max_distance USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF query IS NULL OR vector_dims(query) <> 2048 THEN
        RAISE EXCEPTION 'query must be a halfvec of 2048 dimensions, not %',
            coalesce(vector_dims(query)::text || ' dimensions', 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode <> 'all' THEN
        IF query_class IS NULL THEN
            RAISE EXCEPTION 'mode % needs the query''s class', mode USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT FROM images i WHERE i.class = query_class) THEN
            RAISE EXCEPTION 'class % is not stored', quote_literal(query_class) USING ERRCODE = 'IM001';
        END IF;
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'public.images'::regclass) = 'p' THEN
        -- a sharded library (imsearch db shard add): every shard plans and answers for its own rows, the nearest k
        -- of their answers ranked here
        nearest := 'SELECT s.id, s.path, s.class, s.distance FROM imsearch_shard_search($1, $3, $9, $5, $2, $4, $10) s '
                   'ORDER BY 4, 1 LIMIT $3';
    ELSE
        depth := least(greatest(depth, 4 * k), 1000);
        PERFORM set_config('hnsw.ef_search', depth::text, true);

        -- a filter that keeps at most exact_max rows is scanned exactly through the btree on class (counted no further)
        IF NOT exact AND mode = 'same' THEN
            SELECT count(*) INTO candidates FROM (SELECT FROM images i WHERE i.class = query_class LIMIT exact_max + 1) c;
            scan_exactly := candidates <= exact_max;
        ELSIF NOT exact AND mode = 'other' THEN
            SELECT count(*) INTO candidates FROM (SELECT FROM images i WHERE i.class <> query_class LIMIT exact_max + 1) c;
            scan_exactly := candidates <= exact_max;
        END IF;
        IF scan_exactly THEN
            NULL;
        ELSIF mode = 'same' AND imsearch_class_index('images_fold_hnsw_c_', query_class) IS NOT NULL THEN
            -- a class of a small share of the library has its own index, searched like an unfiltered one
            order_by := 'l2_normalize(imsearch_fold(i.embedding))::halfvec(1024) <#> $7';
            PERFORM set_config('hnsw.iterative_scan', 'off', true);
        ELSIF to_regclass('public.images_fold_hnsw') IS NOT NULL AND (mode = 'all' OR iterative) THEN
            -- the whole-table index; with a filter (a large class, or every class but the query's) scanned iteratively
            -- (pgvector >= 0.8) until `depth` rows pass it. While a bulk load has the index down: exactly
            order_by := 'imsearch_fold(i.embedding)::halfvec(1024) <=> $6';
            IF mode = 'all' THEN
                PERFORM set_config('hnsw.iterative_scan', 'off', true);
            END IF;
        ELSE
            scan_exactly := true;
        END IF;

        IF NOT scan_exactly THEN
            -- an index gives the candidates in order: else the planner reads the btree on class and sorts every row of
            -- the class by its fold (the ranking of the candidates still sorts, the one sort left to take)
            PERFORM set_config('enable_sort', 'off', true);
        END IF;
        IF scan_exactly THEN
            -- every candidate read and sorted: through the btree on class or the table, whichever costs less (with
            -- both kinds of scan off, PostgreSQL would take the cheaper disabled one: an HNSW index)
            PERFORM set_config('enable_indexscan', 'off', true);
            PERFORM set_config('enable_seqscan', 'on', true);
            nearest := 'SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                       'WHERE i.sha256 IS DISTINCT FROM $2' || filter || ' ORDER BY 4 LIMIT $3';
        ELSE
            nearest := 'SELECT c.id, c.path, c.class, c.embedding <=> $1 AS distance FROM ('
                       'SELECT i.id, i.path, i.class, i.embedding FROM images i '
                       'WHERE i.sha256 IS DISTINCT FROM $2' || filter || ' ORDER BY ' || order_by || ' LIMIT $8) c '
                       'ORDER BY 4 LIMIT $3';
        END IF;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT (row_number() OVER (ORDER BY n.distance, n.id))::integer, n.id, n.path, n.class, n.distance '
        'FROM (' || nearest || ') n WHERE $4 IS NULL OR n.distance <= $4 ORDER BY 1'
    USING query, skip_sha256, k, max_distance, query_class, imsearch_fold(query), l2_normalize(imsearch_fold(query)),
          depth, mode, exact;
END
$function$
