CREATE OR REPLACE FUNCTION public.imsearch_shard_search(query halfvec, k integer, mode text, query_class text, skip_sha256 text, max_distance double precision, exact boolean)
 RETURNS TABLE(id bigint, path text, class text, distance double precision)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- imsearch_search on a sharded library (`imsearch db shard add`, migration 0014): images is partitioned by the hash
-- of path into foreign tables, one per shard server. Every shard runs its own imsearch_search, with its own indexes
-- and the planner settings of its SET clause (a query pushed down through postgres_fdw would plan with the shard's
-- defaults), all at once through dblink's asynchronous calls; the nearest k of their answers are the library's
-- (imsearch_search ranks them).
-- The settings imsearch reads from a session (imsearch.rerank_depth, rerank_max_depth, rerank_margin,
-- exact_max_rows, union_max_classes and union_min_rows) are passed on. A shard that cannot answer fails the search,
-- naming it; with imsearch.partial = on it is left out with a WARNING that names it, and the answer is marked
-- partial by that warning
#variable_conflict use_column
DECLARE
    partial boolean := coalesce(nullif(current_setting('imsearch.partial', true), ''), 'off')::boolean;
    shard record;
    conn text;
    at text;
    sent text[] := '{}';
    sent_at text[] := '{}';
    remote text;
    ids bigint[] := '{}';
    paths text[] := '{}';
    classes text[] := '{}';
    distances double precision[] := '{}';
    i integer;
BEGIN
    -- a shard that holds no row of the query's class answers mode same with nothing, and mode other as mode all
    remote := format(
        'SELECT s.id, s.path, s.class, s.distance '
        'FROM (SELECT EXISTS (SELECT FROM public.images WHERE class = %1$L) AS has, '
        'set_config(''imsearch.rerank_depth'', %8$L, true), set_config(''imsearch.exact_max_rows'', %9$L, true), '
        'set_config(''imsearch.rerank_max_depth'', %10$L, true), set_config(''imsearch.rerank_margin'', %11$L, true), '
        'set_config(''imsearch.union_max_classes'', %12$L, true), set_config(''imsearch.union_min_rows'', %13$L, true)) h, '
        'LATERAL public.imsearch_search(%2$L::public.halfvec, %3$s, '
        'CASE WHEN %4$L = ''other'' AND NOT h.has THEN ''all'' ELSE %4$L END, %1$L, %5$L, %6$L::float8, %7$L::boolean) s '
        'WHERE %4$L <> ''same'' OR h.has',
        query_class, query, k, mode, skip_sha256, max_distance, exact,
        coalesce(current_setting('imsearch.rerank_depth', true), ''),
        coalesce(current_setting('imsearch.exact_max_rows', true), ''),
        coalesce(current_setting('imsearch.rerank_max_depth', true), ''),
        coalesce(current_setting('imsearch.rerank_margin', true), ''),
        coalesce(current_setting('imsearch.union_max_classes', true), ''),
        coalesce(current_setting('imsearch.union_min_rows', true), ''));
    FOR shard IN
        SELECT s.srvname, coalesce((SELECT string_agg(o, ' ') FROM unnest(s.srvoptions) o
                                    WHERE split_part(o, '=', 1) IN ('host', 'port', 'dbname')), '') AS address
        FROM pg_inherits h
        JOIN pg_foreign_table f ON f.ftrelid = h.inhrelid
        JOIN pg_foreign_server s ON s.oid = f.ftserver
        WHERE h.inhparent = 'public.images'::regclass
        ORDER BY 1
    LOOP
        conn := 'imsearch_' || shard.srvname;
        at := format('%s (%s)', shard.srvname, shard.address);
        BEGIN
            IF NOT conn = ANY (coalesce(imsearch_dblink.dblink_get_connections(), '{}')) THEN
                PERFORM imsearch_dblink.dblink_connect(conn, shard.srvname);
            END IF;
            IF imsearch_dblink.dblink_send_query(conn, remote) <> 1 THEN
                -- a connection kept from an earlier search, whose server has restarted since: once more, anew
                PERFORM imsearch_dblink.dblink_disconnect(conn);
                PERFORM imsearch_dblink.dblink_connect(conn, shard.srvname);
                IF imsearch_dblink.dblink_send_query(conn, remote) <> 1 THEN
                    RAISE EXCEPTION 'the query could not be sent';
                END IF;
            END IF;
            sent := sent || conn;
            sent_at := sent_at || at;
        EXCEPTION WHEN OTHERS THEN
            IF conn = ANY (coalesce(imsearch_dblink.dblink_get_connections(), '{}')) THEN
                PERFORM imsearch_dblink.dblink_disconnect(conn);
            END IF;
            IF NOT partial THEN
                FOREACH conn IN ARRAY sent LOOP
                    PERFORM imsearch_dblink.dblink_disconnect(conn);
                END LOOP;
                RAISE EXCEPTION 'shard % is unavailable: %', at, SQLERRM USING ERRCODE = 'IM002';
            END IF;
            RAISE WARNING 'partial answer: shard % is unavailable: %', at, SQLERRM;
        END;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(sent, 1), 0) LOOP
        BEGIN
            SELECT ids || array_agg(t.id), paths || array_agg(t.path), classes || array_agg(t.class),
                   distances || array_agg(t.distance)
            INTO ids, paths, classes, distances
            FROM imsearch_dblink.dblink_get_result(sent[i]) AS t(id bigint, path text, class text, distance float8);
            -- the empty result that ends the call and frees the connection for the next search
            PERFORM FROM imsearch_dblink.dblink_get_result(sent[i]) AS t(id bigint, path text, class text, distance float8);
        EXCEPTION WHEN OTHERS THEN
            PERFORM imsearch_dblink.dblink_disconnect(sent[i]);
            IF NOT partial THEN
                FOR j IN i + 1 .. array_length(sent, 1) LOOP
                    PERFORM imsearch_dblink.dblink_disconnect(sent[j]);
                END LOOP;
                RAISE EXCEPTION 'shard % is unavailable: %', sent_at[i], SQLERRM USING ERRCODE = 'IM002';
            END IF;
            RAISE WARNING 'partial answer: shard % is unavailable: %', sent_at[i], SQLERRM;
        END;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(ids, paths, classes, distances);
END
$function$
