CREATE OR REPLACE FUNCTION public.imsearch_duplicate_pairs(max_distance double precision, neighbours integer DEFAULT 10)
 RETURNS TABLE(id bigint, duplicate_id bigint, distance double precision)
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
$function$
