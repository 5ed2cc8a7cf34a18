CREATE OR REPLACE FUNCTION public.imsearch_nearest(image_id bigint, k integer DEFAULT 5, mode text DEFAULT 'all'::text, max_distance double precision DEFAULT NULL::double precision)
 RETURNS TABLE(rank integer, id bigint, path text, class text, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'on'
 SET "hnsw.ef_search" TO '100'
 SET "hnsw.iterative_scan" TO 'relaxed_order'
 SET "hnsw.max_scan_tuples" TO '50000'
 SET enable_seqscan TO 'off'
AS $function$
#variable_conflict use_column
DECLARE
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, 1000);
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
    -- NULL: no limit. NaN sorts above every number, so NaN >= 2 holds; said on its own for a clearer condition
    IF max_distance = 'NaN' OR max_distance < 0 OR max_distance >= 2 THEN
        RAISE EXCEPTION 'max_distance must be a cosine distance, at least 0 and below 2, or NULL, not %',
            max_distance USING ERRCODE = 'invalid_parameter_value';
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
        WHERE max_distance IS NULL OR n.distance <= max_distance
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
            WHERE max_distance IS NULL OR n.distance <= max_distance
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
        WHERE max_distance IS NULL OR n.distance <= max_distance
        ORDER BY 1;
        RETURN;
    END IF;

    -- mode other through the query class's other-class index when it has one (migration 0005)
    SELECT count(*) INTO candidates FROM images i WHERE i.class <> q_class;
    IF candidates > exact_max AND EXISTS (
            SELECT FROM pg_indexes x WHERE x.tablename = 'images'
            AND x.indexname = 'images_embedding_hnsw_o_' || left(md5(q_class), 16)) THEN
        PERFORM set_config('hnsw.ef_search', least(greatest(250, 2 * k), 1000)::text, true);
        IF iterative THEN
            PERFORM set_config('hnsw.iterative_scan', 'off', true);
        END IF;
        PERFORM set_config('enable_sort', 'off', true);
        RETURN QUERY
        SELECT (row_number() OVER (ORDER BY n.distance, n.id))::integer, n.id, n.path, n.class, n.distance
        FROM (
            SELECT f.id, f.path, f.class, f.embedding <=> q AS distance
            FROM (
                SELECT i.id, i.path, i.class, i.embedding
                FROM images i
                WHERE i.sha256 IS DISTINCT FROM q_sha AND i.class <> q_class
                ORDER BY (subvector(i.embedding, 1, 1024) - subvector(i.embedding, 1025, 1024))::halfvec(1024)
                    <=> (subvector(q, 1, 1024) - subvector(q, 1025, 1024))::halfvec(1024)
                LIMIT greatest(50, k)
            ) f
            ORDER BY 4
            LIMIT k
        ) n
        WHERE max_distance IS NULL OR n.distance <= max_distance
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
               END ORDER BY c.class), '{}')
    INTO small_only, big_unindexed, branches
    FROM (SELECT i.class, count(*) AS n FROM images i WHERE i.class <> q_class GROUP BY i.class) c
    LEFT JOIN pg_indexes x
        ON x.tablename = 'images' AND x.indexname = 'images_embedding_hnsw_c_' || left(md5(c.class), 16);

    IF NOT small_only AND NOT big_unindexed AND cardinality(branches) <= 32 THEN
        PERFORM set_config('hnsw.ef_search', least(greatest(200, 2 * k), 1000)::text, true);
        IF iterative THEN
            PERFORM set_config('hnsw.iterative_scan', 'off', true);
        END IF;
        PERFORM set_config('enable_sort', 'off', true);
        RETURN QUERY EXECUTE
            'SELECT (row_number() OVER (ORDER BY u.distance, u.id))::integer, u.id, u.path, u.class, u.distance '
            'FROM (' || array_to_string(branches, ' UNION ALL ') || ' ORDER BY distance LIMIT $3) u '
            'WHERE $5 IS NULL OR u.distance <= $5 ORDER BY 1'
        USING q, q_sha, k, l2_normalize(q), max_distance;
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
    WHERE max_distance IS NULL OR n.distance <= max_distance
    ORDER BY 1;
END
$function$
