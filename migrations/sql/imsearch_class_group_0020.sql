CREATE OR REPLACE FUNCTION public.imsearch_class_group(class text)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
-- which of the 8 group graphs holds a class's rows (migration 0020): the first 32 bits of the class's md5, so
-- that every server and imsearch.search.class_group agree and a new class needs no graph built again; rows of no
-- class are in group 0
SELECT coalesce(((('x' || left(pg_catalog.md5(class), 8))::bit(32)::bigint) % 8)::integer, 0)
$function$
