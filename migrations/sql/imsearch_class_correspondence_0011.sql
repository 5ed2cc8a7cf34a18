CREATE OR REPLACE FUNCTION public.imsearch_class_correspondence(k integer DEFAULT 5, mode text DEFAULT 'other'::text)
 RETURNS TABLE(class text, match_class text, matches bigint, share double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- every stored image with a class searched as imsearch find searches it (mode other or all), its matches counted
-- by class
#variable_conflict use_column
BEGIN
    IF mode IS NULL OR mode NOT IN ('other', 'all') THEN
        RAISE EXCEPTION 'unknown mode %; use other or all', quote_nullable(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT s.class, m.class, count(*), count(*)::double precision / sum(count(*)) OVER (PARTITION BY s.class)
    FROM images s
    CROSS JOIN LATERAL imsearch_search(s.embedding, k, mode, s.class, s.sha256) m
    WHERE s.class IS NOT NULL
    GROUP BY s.class, m.class
    ORDER BY 1, 2;
END
$function$
