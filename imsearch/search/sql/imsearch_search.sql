CREATE OR REPLACE FUNCTION public.imsearch_class_index(prefix text, class text)
 RETURNS regclass
 LANGUAGE sql
 STABLE
AS $function$
-- the partial HNSW index of a class (prefix @CLASS_INDEX_PREFIX@, imsearch_index_class), NULL while it has none:
-- the prefix and the first 16 hex digits of the class's md5 (imsearch.search.index_name says the same in Python)
SELECT to_regclass(format('public.%I', prefix || left(md5(class), 16)))
$function$
CREATE OR REPLACE FUNCTION public.imsearch_fold(embedding halfvec)
 RETURNS halfvec
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
-- what the vector indexes hold (migration 0013): the embedding's two halves, each with fixed random signs, added:
-- a @FOLD_DIMENSIONS@-d random projection, half the bytes, that keeps the cosine order well enough to re-rank from
-- (docs/scaling.md). Names are qualified, as an index build evaluates it with an empty search_path, and every
-- product is in parentheses: operators named with OPERATOR() share one precedence
SELECT ((public.subvector(embedding, 1, @FOLD_DIMENSIONS@) OPERATOR(public.*) '@FOLD_SIGNS_1@'::public.halfvec)
        OPERATOR(public.+)
        (public.subvector(embedding, @FOLD_SECOND@, @FOLD_DIMENSIONS@) OPERATOR(public.*) '@FOLD_SIGNS_2@'::public.halfvec)
       )::public.halfvec(@FOLD_DIMENSIONS@)
$function$
CREATE OR REPLACE FUNCTION public.imsearch_index_all()
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- the whole-table index (migration 0013): every row's fold by cosine distance, in a graph twice as dense as
-- pgvector's default (migration 0016). A bulk load drops it while its rows go in and calls this after; it leaves an
-- index that exists as it is
BEGIN
    EXECUTE 'CREATE INDEX IF NOT EXISTS @WHOLE_INDEX@ ON images '
            'USING hnsw ((imsearch_fold(embedding)::halfvec(@FOLD_DIMENSIONS@)) halfvec_cosine_ops) '
            'WITH (m = @GRAPH_M@, ef_construction = @GRAPH_EF_CONSTRUCTION@)';
    RETURN '@WHOLE_INDEX@';
END
$function$
CREATE OR REPLACE FUNCTION public.imsearch_index_class(cls text)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- a class's own partial index (imsearch builds one for a class past @EXACT_MAX_ROWS@ rows that holds a small share of
-- the library): the unit-length fold by inner product, which orders rows as the fold's cosine distance does but is
-- an expression only these indexes hold, so the planner cannot take the whole-table index with a filter for it; a
-- graph as dense as the whole-table one (migration 0018)
DECLARE
    name text := '@CLASS_INDEX_PREFIX@' || left(md5(cls), 16);
BEGIN
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON images '
        'USING hnsw ((l2_normalize(imsearch_fold(embedding))::halfvec(@FOLD_DIMENSIONS@)) halfvec_ip_ops) '
        'WITH (m = @GRAPH_M@, ef_construction = @GRAPH_EF_CONSTRUCTION@) WHERE class = %L', name, cls);
    RETURN name;
END
$function$
CREATE OR REPLACE FUNCTION public.imsearch_class_group(class text)
 RETURNS integer
 LANGUAGE sql
 IMMUTABLE PARALLEL SAFE
AS $function$
-- which of the @GROUPS@ group graphs holds a class's rows (migration 0020): the first 32 bits of the class's md5, so
-- that every server and imsearch.search.class_group agree and a new class needs no graph built again; rows of no
-- class are in group 0
SELECT coalesce(((('x' || left(pg_catalog.md5(class), 8))::bit(32)::bigint) % @GROUPS@)::integer, 0)
$function$
CREATE OR REPLACE FUNCTION public.imsearch_index_group(grp integer)
 RETURNS text
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
-- one group graph (migration 0020): the unit-length fold of the rows whose class falls in group `grp`, as a class
-- index holds it. Built for a library of many classes past @UNION_MIN_ROWS@ rows, where the whole-table graph strands
-- queries between tight classes: every row is in exactly one group graph, and modes all and other search all
-- @GROUPS@ of them
DECLARE
    name text := '@GROUP_INDEX_PREFIX@' || grp;
BEGIN
    IF grp IS NULL OR grp < 0 OR grp >= @GROUPS@ THEN
        RAISE EXCEPTION 'a group is a number from 0 to @GROUPS@ - 1, not %', grp
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON images '
        'USING hnsw ((l2_normalize(imsearch_fold(embedding))::halfvec(@FOLD_DIMENSIONS@)) halfvec_ip_ops) '
        'WITH (m = @GRAPH_M@, ef_construction = @GRAPH_EF_CONSTRUCTION@) WHERE imsearch_class_group(class) = %s',
        name, grp);
    RETURN name;
END
$function$
CREATE OR REPLACE FUNCTION public.imsearch_search(query halfvec, k integer DEFAULT 5, mode text DEFAULT 'all'::text, query_class text DEFAULT NULL::text, skip_sha256 text DEFAULT NULL::text, max_distance double precision DEFAULT NULL::double precision, exact boolean DEFAULT false)
 RETURNS TABLE(rank integer, id bigint, path text, class text, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'on'
 SET "hnsw.ef_search" TO '@RERANK_DEPTH@'
 SET "hnsw.iterative_scan" TO 'relaxed_order'
 SET "hnsw.max_scan_tuples" TO '@MAX_SCAN_TUPLES@'
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
    exact_max bigint := coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, @EXACT_MAX_ROWS@);
    depth integer := coalesce(nullif(current_setting('imsearch.rerank_depth', true), '')::integer, @RERANK_DEPTH@);
    max_depth integer := coalesce(nullif(current_setting('imsearch.rerank_max_depth', true), '')::integer,
                                  @RERANK_MAX_DEPTH@);
    margin double precision := coalesce(nullif(current_setting('imsearch.rerank_margin', true), '')::float8,
                                        @RERANK_MARGIN@);
    -- the most classes mode other searches one by one, and mode all sends its whole-table answer's classes to their
    -- own graphs in (0: neither), and the rows past which mode all does that (the table's estimate, reltuples)
    union_max integer := coalesce(nullif(current_setting('imsearch.union_max_classes', true), '')::integer,
                                  @UNION_MAX_CLASSES@);
    union_min_rows bigint := coalesce(nullif(current_setting('imsearch.union_min_rows', true), '')::bigint,
                                      @UNION_MIN_ROWS@);
    filter text := CASE mode WHEN 'same' THEN ' AND i.class = $5' WHEN 'other' THEN ' AND i.class <> $5' ELSE '' END;
    scan_exactly boolean := exact;
    -- one search of the candidates: a class's own index or a group graph (format: the rows it holds, the branch's
    -- number), or a small class exactly (format: the class, the branch's number)
    index_branch text := 'SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance, '
        '1 + (l2_normalize(imsearch_fold(i.embedding))::halfvec(@FOLD_DIMENSIONS@) <#> $7) AS fold, %2$s AS branch '
        'FROM images i WHERE %1$s AND i.sha256 IS DISTINCT FROM $2 '
        'ORDER BY l2_normalize(imsearch_fold(i.embedding))::halfvec(@FOLD_DIMENSIONS@) <#> $7 LIMIT $8';
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
    IF k IS NULL OR k < 1 OR k > @MAX_K@ THEN
        RAISE EXCEPTION 'k must be between 1 and @MAX_K@, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode IS NULL OR mode NOT IN (@MODES@) THEN
        RAISE EXCEPTION 'unknown mode %; use one of all, same, other', quote_nullable(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- NULL: no limit. NaN sorts above every number, so NaN >= 2 holds; said on its own for a clearer condition
    IF max_distance = 'NaN' OR max_distance < 0 OR max_distance >= 2 THEN
        RAISE EXCEPTION 'max_distance must be a cosine distance, at least 0 and below 2, or NULL, not %',
            max_distance USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF query IS NULL OR vector_dims(query) <> @DIMENSIONS@ THEN
        RAISE EXCEPTION 'query must be a halfvec of @DIMENSIONS@ dimensions, not %',
            coalesce(vector_dims(query)::text || ' dimensions', 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode <> 'all' THEN
        IF query_class IS NULL THEN
            RAISE EXCEPTION 'mode % needs the query''s class', mode USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT FROM images i WHERE i.class = query_class) THEN
            RAISE EXCEPTION 'class % is not stored', quote_literal(query_class) USING ERRCODE = '@UNKNOWN_CLASS@';
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
        max_depth := least(greatest(max_depth, depth), CASE WHEN iterative THEN @MAX_SCAN_TUPLES@ ELSE 1000 END);
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
                    IF imsearch_class_index('@CLASS_INDEX_PREFIX@', others[n]) IS NOT NULL THEN
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
            FOR n IN 0 .. @GROUPS@ - 1 LOOP
                IF to_regclass(format('public.%I', '@GROUP_INDEX_PREFIX@' || n)) IS NULL THEN
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
        ELSIF mode = 'same' AND imsearch_class_index('@CLASS_INDEX_PREFIX@', query_class) IS NOT NULL THEN
            -- a class with its own index, searched like an unfiltered one
            branches := ARRAY[format(index_branch, format('i.class = %L', query_class), 1)];
        ELSIF branches IS NOT NULL THEN
            -- mode other as the union of the other classes' searches (an iterative scan of the whole-table graph
            -- would first cross the query's own class, where its nearest rows are), or of the group graphs
            NULL;
        ELSIF to_regclass('public.@WHOLE_INDEX@') IS NOT NULL AND (mode = 'all' OR iterative) THEN
            -- the whole-table index; with a filter (a large class, or many classes but the query's) scanned
            -- iteratively (pgvector >= 0.8) until `depth` rows pass it. While a bulk load has the index down: exactly
            branches := ARRAY['SELECT i.id, i.path, i.class, i.embedding <=> $1 AS distance, '
                              'imsearch_fold(i.embedding)::halfvec(@FOLD_DIMENSIONS@) <=> $6 AS fold, 1 AS branch '
                              'FROM images i WHERE i.sha256 IS DISTINCT FROM $2' || filter
                              || ' ORDER BY imsearch_fold(i.embedding)::halfvec(@FOLD_DIMENSIONS@) <=> $6 LIMIT $8'];
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
                                  WHERE imsearch_class_index('@CLASS_INDEX_PREFIX@', c) IS NOT NULL LIMIT union_max);
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
CREATE OR REPLACE FUNCTION public.imsearch_neighbours(ids bigint[], k integer DEFAULT 10)
 RETURNS TABLE(id bigint, neighbour_id bigint, distance double precision)
 LANGUAGE plpgsql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
 SET plan_cache_mode TO 'force_custom_plan'
 SET enable_indexscan TO 'on'
 SET enable_sort TO 'off'
 SET "hnsw.ef_search" TO '@NEIGHBOURS_DEPTH@'
 SET "hnsw.iterative_scan" TO 'off'
 SET enable_seqscan TO 'off'
AS $function$
-- the planner's second entry: each of these stored images' (NULL: every stored image's) k nearest other stored
-- images through the whole-table index, its nearest `depth` by the fold re-ranked by the exact distance, unranked;
-- the audit, the calibration and imsearch_duplicate_pairs use it (sorts off: else the planner may sort the table by
-- the fold for each image rather than search the index; the ranking of the candidates still sorts)
#variable_conflict use_column
DECLARE
    depth integer;
BEGIN
    IF k IS NULL OR k < 1 OR k > @MAX_K@ THEN
        RAISE EXCEPTION 'k must be between 1 and @MAX_K@, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    depth := least(greatest(@NEIGHBOURS_DEPTH@, 4 * k), 1000);
    PERFORM set_config('hnsw.ef_search', depth::text, true);
    RETURN QUERY
    SELECT s.id, m.id, m.distance
    FROM images s
    CROSS JOIN LATERAL (
        SELECT c.id, c.embedding <=> s.embedding AS distance
        FROM (
            SELECT i.id, i.embedding
            FROM images i
            WHERE i.id <> s.id
            ORDER BY imsearch_fold(i.embedding)::halfvec(@FOLD_DIMENSIONS@) <=> imsearch_fold(s.embedding)
            LIMIT depth
        ) c
        ORDER BY 2
        LIMIT k
    ) m
    WHERE ids IS NULL OR s.id = ANY(ids);
END
$function$
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
                RAISE EXCEPTION 'shard % is unavailable: %', at, SQLERRM USING ERRCODE = '@SHARD_DOWN@';
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
                RAISE EXCEPTION 'shard % is unavailable: %', sent_at[i], SQLERRM USING ERRCODE = '@SHARD_DOWN@';
            END IF;
            RAISE WARNING 'partial answer: shard % is unavailable: %', sent_at[i], SQLERRM;
        END;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(ids, paths, classes, distances);
END
$function$
