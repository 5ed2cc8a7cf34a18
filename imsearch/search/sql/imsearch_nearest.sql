CREATE OR REPLACE FUNCTION public.imsearch_nearest(image_id bigint, k integer DEFAULT 5, mode text DEFAULT 'all'::text, max_distance double precision DEFAULT NULL::double precision)
 RETURNS TABLE(rank integer, id bigint, path text, class text, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- a stored image as the query, searched as imsearch find searches it: its own content left out
#variable_conflict use_column
DECLARE
    q halfvec;
    q_class text;
    q_sha text;
BEGIN
    SELECT i.embedding, i.class, i.sha256 INTO q, q_class, q_sha FROM images i WHERE i.id = image_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no stored image has id %', image_id USING ERRCODE = 'no_data_found';
    END IF;
    IF mode IN ('same', 'other') AND q_class IS NULL THEN
        RAISE EXCEPTION 'image % has no class; mode % needs one', image_id, mode
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY SELECT * FROM imsearch_search(q, k, mode, q_class, q_sha, max_distance);
END
$function$
