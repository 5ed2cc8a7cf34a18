CREATE OR REPLACE FUNCTION public.imsearch_duplicate_pairs(max_distance double precision, neighbours integer DEFAULT 10)
 RETURNS TABLE(id bigint, duplicate_id bigint, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- pairs of stored images within a cosine distance among each one's nearest, searched as the audit searches them
#variable_conflict use_column
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
    RETURN QUERY
    SELECT DISTINCT ON (1, 2) least(n.id, n.neighbour_id), greatest(n.id, n.neighbour_id), n.distance
    FROM imsearch_neighbours(NULL, neighbours) n
    WHERE n.distance <= max_distance
    ORDER BY 1, 2;
END
$function$
