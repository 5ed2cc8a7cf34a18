CREATE OR REPLACE FUNCTION public.imsearch_class_index(prefix text, class text)
 RETURNS regclass
 LANGUAGE sql
 STABLE
AS $function$
-- the partial HNSW index of a class (prefix images_fold_hnsw_c_, imsearch_index_class), NULL while it has none:
-- the prefix and the first 16 hex digits of the class's md5 (imsearch.search.index_name says the same in Python)
SELECT to_regclass(format('public.%I', prefix || left(md5(class), 16)))
$function$
