CREATE OR REPLACE FUNCTION public.imsearch_index_all()
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- the whole-table index (migration 0013): every row's fold by cosine distance, in a graph twice as dense as
-- pgvector's default (migration 0016). A bulk load drops it while its rows go in and calls this after; it leaves an
-- index that exists as it is
BEGIN
    EXECUTE 'CREATE INDEX IF NOT EXISTS images_fold_hnsw ON images '
            'USING hnsw ((imsearch_fold(embedding)::halfvec(1024)) halfvec_cosine_ops) '
            'WITH (m = 32, ef_construction = 128)';
    RETURN 'images_fold_hnsw';
END
$function$
