CREATE OR REPLACE FUNCTION public.imsearch_index_class(cls text)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- a class's own partial index (imsearch builds one for a class past 1000 rows that holds a small share of
-- the library): the unit-length fold by inner product, which orders rows as the fold's cosine distance does but is
-- an expression only these indexes hold, so the planner cannot take the whole-table index with a filter for it; a
-- graph as dense as the whole-table one (migration 0018)
DECLARE
    name text := 'images_fold_hnsw_c_' || left(md5(cls), 16);
BEGIN
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON images '
        'USING hnsw ((l2_normalize(imsearch_fold(embedding))::halfvec(1024)) halfvec_ip_ops) '
        'WITH (m = 32, ef_construction = 128) WHERE class = %L', name, cls);
    RETURN name;
END
$function$
