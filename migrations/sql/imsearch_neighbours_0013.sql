CREATE OR REPLACE FUNCTION public.imsearch_neighbours(ids bigint[], k integer DEFAULT 10)
 RETURNS TABLE(id bigint, neighbour_id bigint, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'off'
 SET "hnsw.ef_search" TO '64'
 SET "hnsw.iterative_scan" TO 'off'
 SET enable_seqscan TO 'off'
AS $function$
-- the planner's second entry: each of these stored images' (NULL: every stored image's) k nearest other stored
-- images through the whole-table index, its nearest `depth` by the fold re-ranked by the exact distance, unranked;
-- the audit, the calibration and imsearch_duplicate_pairs use it (sorts off: else the planner may sort the table by
-- the fold for each image rather than search the index; the ranking of the candidates still sorts)
#variable_conflict use_column
DECLARE
    depth integer;
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    depth := least(greatest(64, 4 * k), 1000);
    PERFORM set_config('hnsw.ef_search', depth::text, true);
    RETURN QUERY
    SELECT s.id, m.id, m.distance
    FROM images s
    CROSS JOIN LATERAL (
        SELECT c.id, c.embedding <=> s.embedding AS distance
        FROM (
            SELECT i.id, i.embedding
            FROM images i
            WHERE i.id <> s.id
            ORDER BY imsearch_fold(i.embedding)::halfvec(1024) <=> imsearch_fold(s.embedding)
            LIMIT depth
        ) c
        ORDER BY 2
        LIMIT k
    ) m
    WHERE ids IS NULL OR s.id = ANY(ids);
END
$function$
