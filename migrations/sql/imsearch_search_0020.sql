CREATE OR REPLACE FUNCTION public.imsearch_search(query halfvec, k integer DEFAULT 5, mode text DEFAULT 'all'::text, query_class text DEFAULT NULL::text, skip_sha256 text DEFAULT NULL::text, max_distance double precision DEFAULT NULL::double precision, exact boolean DEFAULT false)
 RETURNS TABLE(rank integer, id bigint, path text, class text, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'on'
 SET "hnsw.ef_search" TO '200'
 SET "hnsw.iterative_scan" TO 'relaxed_order'
 SET "hnsw.max_scan_tuples" TO '50000'
 SET enable_seqscan TO 'off'
AS $function$
-- imsearch's one search planner: imsearch find, the web page, evaluate and imsearch_nearest all come through here.
-- The vector indexes hold the embedding's fold (imsearch_fold, migration 0013): an index gives the nearest `depth`
-- candidates by the fold's distance, and one statement ranks them by the exact distance from the stored halfvec.
-- Where the candidates cannot rule out a nearer row beyond them, the search asks again deeper (migration 0015, the
-- loop below). A 2048-d halfvec is stored out of line (TOAST), so the table looks small to the planner, which would
-- rather scan it and sort than use an index: sequential scans stay off unless exact.
#variable_conflict use_column
DECLARE
    -- whether this server has iterative index scans: the SET clause above names them only where imsearch found
    -- pgvector >= 0.8 when it created the function (imsearch.search.for_server)
    iterative boolean := current_setting('hnsw.iterative_scan', true) IS NOT DISTINCT FROM 'relaxed_order';
    -- a session may move the exact-scan size, the first and the deepest re-ranking depth, and the margin of the
    -- widening in standard deviations of the fold's error: SET imsearch.NAME = N
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, 1000);
    depth integer := coalesce(nullif(current_setting('imsearch.rerank_depth', true), '')::integer, 200);
    max_depth integer := coalesce(nullif(current_setting('imsearch.rerank_max_depth', true), '')::integer,
                                  1000);
    margin double precision := coalesce(nullif(current_setting('imsearch.rerank_margin', true), '')::float8,
                                        4);
    -- the most classes mode other searches one by one, and mode all sends its whole-table answer's classes to their
    -- own graphs in (0: neither), and the rows past which mode all does that (the table's estimate, reltuples)
    union_max integer := coalesce(nullif(current_setting('imsearch.union_max_classes', true), '')::integer,
                                  8);
    union_min_rows bigint := coalesce(nullif(current_setting('imsearch.union_min_rows', true), '')::bigint,
                                      250000);
    filter text := CASE mode WHEN 'same' THEN ' AND i.class = $5' WHEN 'other' THEN ' AND i.class <> $5' ELSE '' END;
    scan_exactly boolean := exact;
    -- one search of the candidates: a class's own index or a group graph (format: the rows it holds, the branch's
    -- number), or a small class exactly (format: the class, the branch's number)
    index_branch text := 'SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance, '
        '1 + (l2_normalize(imsearch_fold(i.embedding))::halfvec(1024) <#> $7) AS fold, %2$s AS branch '
        'FROM images i WHERE %1$s AND i.sha256 IS DISTINCT FROM $2 '
        'ORDER BY l2_normalize(imsearch_fold(i.embedding))::halfvec(1024) <#> $7 LIMIT $8';
    exact_branch text := 'SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance, NULL::float8 AS fold, '
        '%2$s AS branch FROM images i WHERE i.class = %1$L AND i.sha256 IS DISTINCT FROM $2 '
        'ORDER BY i.embedding <=> $1 LIMIT $8';
    others text[];
    branches text[];
    bound double precision;
    filtered_scan boolean := false;
    nearest text;
    candidates bigint;
    -- the query's fold, and its unit length (the class indexes' inner product), computed once for every pass
    folded halfvec;
    unit halfvec;
    cand record;
    widens boolean := false;
    -- whether the classes of the first pass's answer are still to be searched through their own graphs
    refines boolean := false;
    near_classes text[];
    ids bigint[];
    paths text[];
    classes text[];
    distances double precision[];
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode IS NULL OR mode NOT IN ('all', 'same', 'other') THEN
        RAISE EXCEPTION 'unknown mode %; use one of all, same, other', quote_nullable(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NULL: no limit. NaN sorts above every number, so NaN >= 2 holds; said on its own for a clearer condition
    IF max_distance = 'NaN' OR max_distance < 0 OR max_distance >= 2 THEN
        RAISE EXCEPTION 'max_distance must be a cosine distance, at least 0 and below 2, or NULL, not %',
            max_distance USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF query IS NULL OR vector_dims(query) <> 2048 THEN
        RAISE EXCEPTION 'query must be a halfvec of 2048 dimensions, not %',
            coalesce(vector_dims(query)::text || ' dimensions', 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode <> 'all' THEN
        IF query_class IS NULL THEN
            RAISE EXCEPTION 'mode % needs the query''s class', mode USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT FROM images i WHERE i.class = query_class) THEN
            RAISE EXCEPTION 'class % is not stored', quote_literal(query_class) USING ERRCODE = 'IM001';
        END IF;
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = 'public.images'::regclass) = 'p' THEN
        -- a sharded library (imsearch db shard add): every shard plans and answers for its own rows, the nearest k
        -- of their answers ranked here
        nearest := 'SELECT s.id, s.path, s.class, s.distance FROM imsearch_shard_search($1, $3, $9, $5, $2, $4, $10) s '
                   'ORDER BY 4, 1 LIMIT $3';
    ELSE
        depth := least(greatest(depth, 4 * k), 1000);
        -- past pgvector's largest ef_search (1,000) an index gives more only through an iterative scan
        max_depth := least(greatest(max_depth, depth), CASE WHEN iterative THEN 50000 ELSE 1000 END);
        PERFORM set_config('hnsw.ef_search', depth::text, true);

        -- a filter that keeps at most exact_max rows is scanned exactly through the btree on class (counted no further)
        IF NOT exact AND mode = 'same' THEN
            SELECT count(*) INTO candidates FROM (SELECT FROM images i WHERE i.class = query_class LIMIT exact_max + 1) c;
            scan_exactly := candidates <= exact_max;
        ELSIF NOT exact AND mode = 'other' THEN
            SELECT count(*) INTO candidates FROM (SELECT FROM images i WHERE i.class <> query_class LIMIT exact_max + 1) c;
            scan_exactly := candidates <= exact_max;
        END IF;
        IF NOT scan_exactly AND union_max > 0 AND (mode = 'other' OR mode = 'all'
           AND (SELECT c.reltuples FROM pg_class c WHERE c.oid = 'public.images'::regclass) > union_min_rows) THEN
            -- the stored classes, one step each through the btree on class, as far as it takes to know whether there
            -- are more than union_max (besides the query's own in mode other)
            others := ARRAY(WITH RECURSIVE c(v) AS (
                                SELECT (SELECT min(i.class) FROM images i)
                                UNION ALL
                                SELECT (SELECT min(i.class) FROM images i WHERE i.class > c.v) FROM c WHERE c.v IS NOT NULL)
                            SELECT c.v FROM c WHERE c.v IS NOT NULL LIMIT union_max + 2);
        END IF;
        IF mode = 'other' THEN
            others := array_remove(others, query_class);
            -- the other classes, where there are at most union_max: each searched through its own index, or exactly
            -- where it is small
            IF cardinality(others) <= union_max THEN
                FOR n IN 1 .. cardinality(others) LOOP
                    IF imsearch_class_index('images_fold_hnsw_c_', others[n]) IS NOT NULL THEN
                        branches := branches || format(index_branch, format('i.class = %L', others[n]), n);
                    ELSIF (SELECT count(*) FROM (SELECT FROM images i WHERE i.class = others[n] LIMIT exact_max + 1) c)
                          <= exact_max THEN
                        branches := branches || format(exact_branch, others[n], n);
                    ELSE
                        branches := NULL;
                        EXIT;
                    END IF;
                END LOOP;
            END IF;
        END IF;
        IF NOT scan_exactly AND mode <> 'same' AND cardinality(others) > union_max THEN
            -- more classes than union_max, where the library has its group graphs (migration 0020): modes all and
            -- other are the union of one search of each, the query's own group in mode other scanned iteratively
            -- past its class. In tight classes the whole-table graph strands a query among the wrong ones (at a
            -- million rows in 101 classes 0.954 of real photos' top five, the groups 0.998; docs/scaling.md)
            FOR n IN 0 .. 8 - 1 LOOP
                IF to_regclass(format('public.%I', 'images_fold_hnsw_g' || n)) IS NULL THEN
                    branches := NULL;
                    EXIT;
                END IF;
                branches := branches || format(index_branch, format('imsearch_class_group(i.class) = %s', n)
                    || CASE WHEN mode = 'other' AND n = imsearch_class_group(query_class) THEN ' AND i.class <> $5'
                       ELSE '' END, n + 1);
            END LOOP;
            IF branches IS NOT NULL THEN
                -- asked once, at the widening's limit: eight bounds rarely all hold at the first depth, and a pass at
                -- four times it stopped on candidates the graphs had not given in full (0.988 of real photos' top
                -- five, where one pass at 1,000 found 0.998 in less time; docs/scaling.md)
                depth := max_depth;
                PERFORM set_config('hnsw.ef_search', least(depth, 1000)::text, true);
                filtered_scan := mode = 'other' OR depth > 1000;
            END IF;
        END IF;
        IF scan_exactly THEN
            NULL;
        ELSIF mode = 'same' AND imsearch_class_index('images_fold_hnsw_c_', query_class) IS NOT NULL THEN
            -- a class with its own index, searched like an unfiltered one
            branches := ARRAY[format(index_branch, format('i.class = %L', query_class), 1)];
        ELSIF branches IS NOT NULL THEN
            -- mode other as the union of the other classes' searches (an iterative scan of the whole-table graph
            -- would first cross the query's own class, where its nearest rows are), or of the group graphs
            NULL;
        ELSIF to_regclass('public.images_fold_hnsw') IS NOT NULL AND (mode = 'all' OR iterative) THEN
            -- the whole-table index; with a filter (a large class, or many classes but the query's) scanned
            -- iteratively (pgvector >= 0.8) until `depth` rows pass it. While a bulk load has the index down: exactly
            branches := ARRAY['SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance, '
                              'imsearch_fold(i.embedding)::halfvec(1024) <=> $6 AS fold, 1 AS branch '
                              'FROM images i WHERE i.sha256 IS DISTINCT FROM $2' || filter
                              || ' ORDER BY imsearch_fold(i.embedding)::halfvec(1024) <=> $6 LIMIT $8'];
            filtered_scan := mode <> 'all';
            -- the classes its answer names, searched through their own graphs too (the loop below), in a library past
            -- union_min_rows rows of at most union_max classes (`others` is then every class)
            refines := mode = 'all' AND coalesce(cardinality(others) <= union_max, false);
        ELSE
            scan_exactly := true;
        END IF;

        IF NOT scan_exactly THEN
            -- an index gives the candidates in order: else the planner reads the btree on class and sorts every row of
            -- the class by its fold (the ranking of the candidates still sorts, the one sort left to take)
            PERFORM set_config('enable_sort', 'off', true);
            -- only a filtered scan of the whole-table index iterates (until `depth` rows pass the filter); the widening
            -- below turns it on past ef_search's 1,000
            IF NOT filtered_scan THEN
                PERFORM set_config('hnsw.iterative_scan', 'off', true);
            END IF;
        END IF;
        IF scan_exactly THEN
            -- every candidate read and sorted: through the btree on class or the table, whichever costs less (with
            -- both kinds of scan off, PostgreSQL would take the cheaper disabled one: an HNSW index)
            PERFORM set_config('enable_indexscan', 'off', true);
            PERFORM set_config('enable_seqscan', 'on', true);
            nearest := 'SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance FROM images i '
                       'WHERE i.sha256 IS DISTINCT FROM $2' || filter || ' ORDER BY 4 LIMIT $3';
        ELSE
            widens := true;
        END IF;
    END IF;
    folded := imsearch_fold(query);
    unit := l2_normalize(folded);
    LOOP
        IF widens THEN
            -- each branch's nearest `depth` (by the fold through an index, or exactly), the nearest k of them all by
            -- the exact distance (a row two branches gave, once), and how near a row no branch gave could be
            -- (`bound`, below)
            nearest := 'SELECT d.id, d.path, d.class, d.distance, d.bound FROM (SELECT DISTINCT ON (c.id) c.id, '
                       'c.path, c.class, c.distance, min(CASE WHEN c.given < $8 THEN NULL WHEN c.fold IS NULL '
                       'THEN c.farthest ELSE c.reach + c.bias - $11 * c.spread END) OVER () AS bound '
                       'FROM (SELECT b.*, count(*) OVER w AS given, max(b.fold) OVER w AS reach, '
                       'max(b.distance) OVER w AS farthest, avg(b.distance - b.fold) OVER () AS bias, '
                       'stddev_pop(b.distance - b.fold) OVER () AS spread '
                       'FROM ((' || array_to_string(branches, ') UNION ALL (') || ')) b '
                       'WINDOW w AS (PARTITION BY b.branch)) c ORDER BY c.id) d ORDER BY 4, 1 LIMIT $3';
        END IF;
        ids := '{}'; paths := '{}'; classes := '{}'; distances := '{}';
        FOR cand IN EXECUTE nearest
            USING query, skip_sha256, k, max_distance, query_class, folded, unit, depth, mode, exact, margin
        LOOP
            ids := ids || cand.id; paths := paths || cand.path; classes := classes || cand.class;
            distances := distances || cand.distance;
            IF widens THEN
                bound := cand.bound;
            END IF;
        END LOOP;
        IF refines THEN
            -- in a library past union_min_rows rows in at most union_max classes, the whole-table graph leads a photo
            -- far from every row to the right classes more often than to the right rows in them: in mode all the
            -- classes of its answer that have a graph of their own are searched through it too, and the union ranked
            -- again (at a million rows in six classes 0.990 of real photos' top five, 0.978 without; in 100 classes
            -- 0.958 against 0.956, five times slower, so not there)
            refines := false;
            near_classes := ARRAY(SELECT DISTINCT c FROM unnest(classes) c
                                  WHERE imsearch_class_index('images_fold_hnsw_c_', c) IS NOT NULL LIMIT union_max);
            FOR n IN 1 .. cardinality(near_classes) LOOP
                branches := branches || format(index_branch, format('i.class = %L', near_classes[n]), n + 1);
            END LOOP;
            CONTINUE WHEN cardinality(near_classes) > 0;
        END IF;
        -- a row an index branch did not give lies at least `reach` away by the fold, so at least reach + bias -
        -- margin x spread by the exact distance (the fold's error over the candidates: its mean and standard
        -- deviation), but for an error past `margin` standard deviations; a row an exact branch did not give lies
        -- beyond its farthest; a branch that gave fewer than `depth` has no rows beyond. Where the k-th candidate is
        -- no farther than the nearest of these bounds, no row beyond is nearer; else every branch is asked again, 4x
        -- as deep (one whose own bound holds too: the bound assumes the graph gave the fold's nearest rows, which a
        -- deeper search of a settled branch makes up for; docs/scaling.md has what asking only the failing ones found)
        EXIT WHEN NOT widens OR depth >= max_depth OR coalesce(array_length(ids, 1), 0) < k OR bound IS NULL
                  OR distances[k] <= bound;
        depth := least(4 * depth, max_depth);
        PERFORM set_config('hnsw.ef_search', least(depth, 1000)::text, true);
        IF depth > 1000 THEN
            PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true);
        END IF;
    END LOOP;
    RETURN QUERY
        SELECT (row_number() OVER (ORDER BY n.d, n.i))::integer, n.i, n.p, n.c, n.d
        FROM unnest(ids, paths, classes, distances) AS n(i, p, c, d)
        WHERE max_distance IS NULL OR n.d <= max_distance ORDER BY 1;
END
$function$
