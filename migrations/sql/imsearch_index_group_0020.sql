CREATE OR REPLACE FUNCTION public.imsearch_index_group(grp integer)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- one group graph (migration 0020): the unit-length fold of the rows whose class falls in group `grp`, as a class
-- index holds it. Built for a library of many classes past 250000 rows, where the whole-table graph strands
-- queries between tight classes: every row is in exactly one group graph, and modes all and other search all
-- 8 of them
DECLARE
    name text := 'images_fold_hnsw_g' || grp;
BEGIN
    IF grp IS NULL OR grp < 0 OR grp >= 8 THEN
        RAISE EXCEPTION 'a group is a number from 0 to 8 - 1, not %', grp
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON images '
        'USING hnsw ((l2_normalize(imsearch_fold(embedding))::halfvec(1024)) halfvec_ip_ops) '
        'WITH (m = 32, ef_construction = 128) WHERE imsearch_class_group(class) = %s',
        name, grp);
    RETURN name;
END
$function$
