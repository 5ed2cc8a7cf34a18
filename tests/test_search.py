"""find: the three modes, self-exclusion, index against exact scan, and distances as pgvector computes them."""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import psycopg
import pytest
from pgvector import HalfVector

from imsearch import UnknownClass
from imsearch import search as search_mod
from imsearch.db import indexes
from imsearch.db.indexes import class_index_name
from imsearch.db.store import Store
from imsearch.errors import ImsearchError
from imsearch.search import CLASS_INDEX_PREFIX, WHOLE_INDEX
from tests.conftest import ROOMS, copy_photos


@pytest.fixture
def queries(tmp_path):
    """Unseen room photos, 2 per class, in test/<class>/ folders."""
    return sorted(copy_photos(tmp_path / "queries", 2, split="test").glob("*/*.jpg"))


def test_stored_photo_comes_back_first_at_distance_zero_with_include_self(stored, photos):
    query = sorted(photos.glob("dining_room/*.jpg"))[1]
    [result] = stored.find(query, include_self=True, exact=True)
    assert result.matches[0].path == str(query.resolve())
    assert result.matches[0].distance < 0.001
    [without] = stored.find(query, exact=True)
    assert str(query.resolve()) not in [m.path for m in without.matches]
    assert len(without.matches) == 5


def test_same_class_returns_only_the_query_class(stored, queries):
    for result in stored.find(queries, "same"):
        assert result.query_class == result.query.split("/")[-2]
        assert len(result.matches) == 4  # 4 stored photos per class
        assert {m.cls for m in result.matches} == {result.query_class}


def test_other_classes_returns_none_of_the_query_class(stored, queries):
    for result in stored.find(queries, "other"):
        assert len(result.matches) == 5
        assert result.query_class not in {m.cls for m in result.matches}


def test_all_mode_ranks_by_distance(stored, queries):
    for result in stored.find(queries, "all", k=7):
        assert [m.rank for m in result.matches] == list(range(1, 8))
        distances = [m.distance for m in result.matches]
        assert distances == sorted(distances)


def test_index_and_exact_scan_agree_on_a_small_set(stored, queries):
    for mode in ("all", "same", "other"):
        approx = stored.find(queries, mode)
        exact = stored.find(queries, mode, exact=True)
        for a, e in zip(approx, exact):
            assert [m.path for m in a.matches] == [m.path for m in e.matches]


def test_distances_equal_pgvector_on_the_stored_vectors(stored, photos, database_url):
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    [result] = stored.find(query, include_self=True, exact=True)
    with psycopg.connect(database_url) as conn:
        for m in result.matches:
            (d,) = conn.execute(
                "SELECT a.embedding <=> b.embedding FROM images a, images b WHERE a.path = %s AND b.id = %s",
                (str(query.resolve()), m.id)).fetchone()
            assert m.distance == pytest.approx(d, abs=1e-5)


def test_a_search_leaves_the_sessions_settings_as_they_were(app, photos, exact_max_rows):
    """imsearch_search changes the planner's settings for its own duration only (its SET clauses)."""
    exact_max_rows(3)
    app.ingest(photos)
    conn = app.store.conn
    names = ("enable_sort", "enable_seqscan", "enable_indexscan", "hnsw.ef_search", "hnsw.iterative_scan")
    before = [conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] for name in names]
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    for mode in ("all", "same", "other"):
        app.find(query, mode, k=3)
        app.find(query, mode, exact=True)
    assert [conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] for name in names] == before


def test_class_modes_need_a_known_class(stored, tmp_path):
    odd = tmp_path / "nowhere" / "photo.jpg"
    odd.parent.mkdir()
    odd.write_bytes(sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0].read_bytes())
    with pytest.raises(UnknownClass, match="pass --class NAME"):
        stored.find(odd, "same")
    [result] = stored.find(odd, "same", query_class="kitchen")
    assert {m.cls for m in result.matches} == {"kitchen"}
    with pytest.raises(UnknownClass, match="'garage' is not stored"):
        stored.find(odd, "other", query_class="garage")


def test_stored_copy_gives_the_query_its_class(stored, photos, tmp_path):
    copy = tmp_path / "elsewhere.jpg"
    copy.write_bytes(sorted(photos.glob("bedroom/*.jpg"))[0].read_bytes())
    [result] = stored.find(copy, "same")
    assert result.query_class == "bedroom"


def index_scans(conn: psycopg.Connection) -> dict[str, int]:
    """HNSW index scans on images so far, by index name (this connection's own counted first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return dict(conn.execute("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'images' "
                             "AND starts_with(indexrelname, %s) AND idx_scan > 0", (WHOLE_INDEX,)).fetchall())


def scans_of(conn: psycopg.Connection, search, *args, full: bool = False) -> dict[str, int]:
    """The HNSW index scans that `search(*args)` makes, by index name; the classes' own indexes are shown by their
    prefix, with the number of scans of all of them (with `full`, each by its own name)."""
    before = index_scans(conn)
    search(*args)
    counted: dict[str, int] = {}
    for name, n in index_scans(conn).items():
        if n > before.get(name, 0):
            short = CLASS_INDEX_PREFIX if name.startswith(CLASS_INDEX_PREFIX) and not full else name
            counted[short] = counted.get(short, 0) + n - before.get(name, 0)
    return counted


def every_class_indexed(monkeypatch) -> None:
    """Let every class past the exact-scan size have an index of its own, whatever its share of the library."""
    monkeypatch.setattr(indexes, "CLASS_INDEX_MAX_SHARE", 1.0)


def no_class_indexed(monkeypatch) -> None:
    """Give no class an index of its own: the test library's classes each hold 20%, above this share."""
    monkeypatch.setattr(indexes, "CLASS_INDEX_MAX_SHARE", 0.1)


def ids(matches) -> list[int]:
    return [m.id for m in matches]


def test_unfiltered_query_uses_the_hnsw_index_on_a_server_at_default_settings(stored, photos):
    """The test server runs at PostgreSQL's defaults, where the planner would rather scan the table and sort (here
    because 20 rows are few; at 100k rows because the TOASTed vectors hide the table's size): imsearch_search
    forbids it for its own duration."""
    conn = stored.store.conn
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    assert scans_of(conn, stored.find, query, "all") == {WHOLE_INDEX: 1}
    plain = conn.execute("EXPLAIN SELECT id FROM images ORDER BY embedding <=> %s LIMIT 5",
                         (HalfVector(np.ones(2048, np.float32)),)).fetchall()
    assert "Seq Scan on images" in "\n".join(r[0] for r in plain)
    assert conn.execute("SHOW enable_seqscan").fetchone() == ("on",)


def test_the_layout_is_one_whole_table_index_over_the_fold(stored):
    """Migration 0013: no full-width HNSW index is left, and the one whole-table index holds the fold."""
    conn = stored.store.conn
    rows = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'images' "
                        "AND indexdef LIKE '%USING hnsw%embedding%'").fetchall()
    assert [name for name, _ in rows] == [WHOLE_INDEX]  # 4 rows a class: no class wants one of its own
    assert "imsearch_fold(embedding)" in rows[0][1] and "halfvec_cosine_ops" in rows[0][1]
    assert conn.execute("SELECT to_regprocedure('imsearch_index_other(text)')").fetchone() == (None,)


def test_small_classes_are_scanned_exactly_and_large_ones_through_their_own_index(app, photos, exact_max_rows,
                                                                                  monkeypatch):
    app.ingest(photos)  # 4 rows a class: small
    conn = app.store.conn
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    assert scans_of(conn, app.find, query, "same") == {}  # the class's rows, exactly
    assert scans_of(conn, app.find, query, "other") == {}  # 16 rows, exactly
    exact_max_rows(3, conn)  # now large
    no_class_indexed(monkeypatch)
    assert indexes.ensure_class_indexes(app.store, 3) == []
    # the whole-table index, iteratively; in mode same at 4 rows a class the server may rather take the btree on
    # class and a sort (test_ingest_gives_no_index_to_a_class_of_a_large_share takes that choice away)
    assert scans_of(conn, app.find, query, "same") in ({}, {WHOLE_INDEX: 1})
    assert scans_of(conn, app.find, query, "other") == {WHOLE_INDEX: 1}
    for mode in ("same", "other"):
        assert ids(app.find(query, mode)[0].matches) == ids(app.find(query, mode, exact=True)[0].matches)
    # each class holds 20% of the library: at most today's CLASS_INDEX_MAX_SHARE, so each gets one
    monkeypatch.setattr(indexes, "CLASS_INDEX_MAX_SHARE", search_mod.CLASS_INDEX_MAX_SHARE)
    assert indexes.ensure_class_indexes(app.store, 3) == sorted(c for c, _ in app.classes())
    assert scans_of(conn, app.find, query, "same", full=True) == {class_index_name("bedroom"): 1}
    # the four other classes, each through its own index
    others = {class_index_name(c): 1 for c, _ in app.classes() if c != "bedroom"}
    assert scans_of(conn, app.find, query, "other", full=True) == others
    for mode in ("same", "other"):
        assert ids(app.find(query, mode)[0].matches) == ids(app.find(query, mode, exact=True)[0].matches)
    exact_max_rows(16, conn)  # the 16 rows outside bedroom are few again: exactly
    assert scans_of(conn, app.find, query, "other") == {}
    assert scans_of(conn, app.find, query, "same") == {}


def test_large_classes_of_a_small_share_get_their_own_index_and_mode_same_uses_it(app, photos, tmp_path,
                                                                                  exact_max_rows, monkeypatch):
    exact_max_rows(3)  # every class of 4 photos counts as large
    every_class_indexed(monkeypatch)
    app.ingest(photos)
    counts = dict(app.classes())
    assert indexes.indexed_classes(app.store.conn, counts) == set(counts)
    conn = app.store.conn
    for cls in counts:
        query = sorted(photos.glob(f"{cls}/*.jpg"))[0]
        others = {class_index_name(c): 1 for c in counts if c != cls}
        for mode, scans in (("same", {class_index_name(cls): 1}), ("other", others)):
            assert scans_of(conn, app.find, query, mode, full=True) == scans, (cls, mode)
            [indexed] = app.find(query, mode)
            [exact] = app.find(query, mode, exact=True)
            assert [m.path for m in indexed.matches] == [m.path for m in exact.matches]
            assert ({m.cls for m in indexed.matches} == {cls}) == (mode == "same")
    # a new class gets its index at the end of the ingest that brings it
    cellar = tmp_path / "more" / "wine_cellar"
    cellar.mkdir(parents=True)
    for src in sorted((ROOMS / "base" / "kitchen").glob("*.jpg"))[4:8]:
        shutil.copy2(src, cellar / src.name)
    assert app.ingest(cellar.parent).added == 4
    assert indexes.indexed_classes(app.store.conn, ["wine_cellar"]) == {"wine_cellar"}


def test_only_classes_of_a_small_share_of_the_library_want_an_index():
    counts = {"most": 6_000, "rest": 2_999, "small": 1_001, "tiny": 1_000}  # 11,000 rows
    assert indexes.CLASS_INDEX_MAX_SHARE == search_mod.CLASS_INDEX_MAX_SHARE == 0.5
    assert indexes.wanted_class_indexes(counts, 1_000) == ["rest", "small"]  # 27% and 9%; not "most", over half
    assert indexes.wanted_class_indexes(counts, 1_001) == ["rest"]
    assert indexes.wanted_class_indexes({"all": 5_000}, 1_000) == []  # the whole-table index is the class's
    assert indexes.wanted_class_indexes({}, 0) == []


def test_db_upgrade_gives_a_class_the_index_the_share_rule_now_wants(app, photos, exact_max_rows, monkeypatch):
    """Schema 0015 indexes classes of up to half the library (an eighth before): an upgraded library gets the
    indexes its classes now want from `imsearch db upgrade`, not only from its next ingest."""
    exact_max_rows(3)
    no_class_indexed(monkeypatch)  # the rule before: classes of 20% got none
    app.ingest(photos)
    assert indexes.indexed_classes(app.store.conn, dict(app.classes())) == set()
    monkeypatch.setattr(indexes, "CLASS_INDEX_MAX_SHARE", search_mod.CLASS_INDEX_MAX_SHARE)  # today's rule
    app.upgrade()
    assert indexes.indexed_classes(app.store.conn, dict(app.classes())) == {c for c, _ in app.classes()}


def test_ingest_gives_no_index_to_a_class_of_a_large_share(app, photos, exact_max_rows, monkeypatch):
    """A class past the exact-scan size that holds more than CLASS_INDEX_MAX_SHARE of the library gets no index of
    its own: mode same searches the whole-table index with the filter, iteratively."""
    exact_max_rows(3)
    no_class_indexed(monkeypatch)
    app.ingest(photos)  # 5 classes of 20% each
    conn = app.store.conn
    assert indexes.indexed_classes(conn, dict(app.classes())) == set()
    assert conn.execute("SELECT count(*) FROM pg_indexes WHERE starts_with(indexname, %s)",
                        (CLASS_INDEX_PREFIX,)).fetchone() == (0,)
    conn.execute("DROP INDEX images_class_idx")  # at 4 rows a class the server would rather read them all by it
    for cls in ("kitchen", "bedroom"):
        query = sorted(photos.glob(f"{cls}/*.jpg"))[0]
        assert scans_of(conn, app.find, query, "same") == {WHOLE_INDEX: 1}
        [found] = app.find(query, "same")
        assert {m.cls for m in found.matches} == {cls} and len(found.matches) == 3
        assert ids(found.matches) == ids(app.find(query, "same", exact=True)[0].matches)


@pytest.mark.parametrize("layout", ["class indexes", "whole-table index", "a small class", "a large class unindexed"])
def test_mode_other_searches_each_other_class_or_the_whole_table_index_and_equals_the_exact_answer(
        app, photos, exact_max_rows, monkeypatch, layout):
    """Mode other with few other classes, each with its own index or small enough to scan exactly, is the union of
    one search of each (migration 0015); where one of them is large and has no index, one iterative scan of the
    whole-table index."""
    exact_max_rows(3)  # the 16 rows outside a class are past the exact-scan size, and so is each class of 4
    if layout == "whole-table index":
        no_class_indexed(monkeypatch)
    app.ingest(photos)
    conn = app.store.conn
    if layout in ("a small class", "a large class unindexed"):
        conn.execute(f'DROP INDEX "{class_index_name("kitchen")}"')
        conn.commit()
    if layout == "a small class":
        exact_max_rows(4, conn)  # kitchen's 4 rows are scanned exactly; the others keep their indexes
    for cls in sorted(c for c, _ in app.classes()):
        others = {class_index_name(c): 1 for c, _ in app.classes() if c not in (cls, "kitchen")}
        if layout == "class indexes":
            scans = {class_index_name(c): 1 for c, _ in app.classes() if c != cls}
        elif layout == "a small class" or cls == "kitchen" and layout == "a large class unindexed":
            scans = others  # kitchen's rows exactly, or kitchen asking
        else:
            scans = {WHOLE_INDEX: 1}
        for query in sorted(photos.glob(f"{cls}/*.jpg"))[:2]:
            assert scans_of(conn, app.find, query, "other", full=True) == scans, (query, layout)
            [indexed] = app.find(query, "other", k=16)
            [exact] = app.find(query, "other", k=16, exact=True)
            assert len(indexed.matches) == 16 and cls not in {m.cls for m in indexed.matches}
            assert [(m.id, m.distance) for m in indexed.matches] == [(m.id, m.distance) for m in exact.matches]


def test_check_recall_measures_every_mode_against_an_exact_scan(app, photos, monkeypatch, exact_max_rows):
    exact_max_rows(3)  # the filtered modes go through the index, not an exact scan
    app.ingest(photos)
    assert app.check_recall() == {"all": 1.0, "same": 1.0, "other": 1.0}  # 20 rows: the index finds them all
    # an index search that hands back the farthest must show in the figures
    nearest = search_mod.run

    def farthest(*args, k, exact=False, **kwargs):
        matches = nearest(*args, k=19, exact=exact, **kwargs)
        return matches[:k] if exact else matches[::-1][:k]
    monkeypatch.setattr(search_mod, "run", farthest)
    recall = app.check_recall()
    assert recall["all"] < 0.5 and recall["other"] < 0.5
    assert recall["same"] == 1.0  # 3 other photos a class: k = 5 takes them all, in whatever order
    assert all(r < 0.5 for r in app.check_recall(k=1).values())


def test_check_recall_says_none_for_a_mode_nothing_could_be_asked_of(app, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for src in sorted((ROOMS / "base" / "kitchen").glob("*.jpg"))[:3]:
        shutil.copy2(src, loose / src.name)  # at the root: no class
    app.ingest(loose)
    assert app.check_recall() == {"all": 1.0, "same": None, "other": None}


def test_index_builds_take_imsearch_build_memory_and_say_when_the_graph_will_not_fit(app, photos, monkeypatch,
                                                                                      caplog, exact_max_rows):
    exact_max_rows(3)
    every_class_indexed(monkeypatch)
    monkeypatch.setenv("IMSEARCH_BUILD_MEMORY", "100MB")
    monkeypatch.setattr(indexes, "GRAPH_BYTES_PER_ROW", 2**30)  # 4 rows then need 4 GB
    with caplog.at_level(logging.WARNING, logger="imsearch.db.indexes"):
        app.ingest(photos)
    assert indexes.indexed_classes(app.store.conn, dict(app.classes())) == {c for c, _ in app.classes()}
    assert app.store.conn.execute("SHOW maintenance_work_mem").fetchone()[0] == "100MB"
    warned = [r.getMessage() for r in caplog.records if "IMSEARCH_BUILD_MEMORY" in r.getMessage()]
    assert len(warned) == 5 and "maintenance_work_mem is 100 MB" in warned[0]


def test_a_bad_build_memory_is_one_clear_error_and_the_rows_stay(app, photos, monkeypatch, exact_max_rows):
    exact_max_rows(3)
    every_class_indexed(monkeypatch)  # an index to build
    monkeypatch.setenv("IMSEARCH_BUILD_MEMORY", "lots")
    with pytest.raises(ImsearchError, match="IMSEARCH_BUILD_MEMORY='lots' is not a memory size"):
        app.ingest(photos)
    assert app.store.count() == 20


def test_a_same_class_query_is_never_served_by_another_class_index(app, photos, exact_max_rows, monkeypatch):
    """A class's partial index holds that class alone: a query of another class takes its own index, else the
    whole-table one with the filter, never the wrong class's (which would hold none of its rows)."""
    exact_max_rows(3)
    every_class_indexed(monkeypatch)
    app.ingest(photos)
    conn = app.store.conn
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    assert scans_of(conn, app.find, query, "same", full=True) == {class_index_name("bedroom"): 1}
    conn.execute(f'DROP INDEX "{class_index_name("bedroom")}"')  # leave the planner the other classes' indexes
    conn.execute("DROP INDEX images_class_idx")  # nor the btree on class and a sort
    [result] = app.find(query, "same")
    assert scans_of(conn, app.find, query, "same", full=True) == {WHOLE_INDEX: 1}
    assert {m.cls for m in result.matches} == {"bedroom"} and len(result.matches) == 3
    assert ids(result.matches) == ids(app.find(query, "same", exact=True)[0].matches)


def test_while_the_whole_table_index_is_down_every_mode_answers_exactly(app, photos, exact_max_rows, monkeypatch):
    """A bulk load drops the whole-table index and builds it again after (imsearch_index_all): meanwhile every mode
    scans exactly, and once it is back they search it again."""
    exact_max_rows(3)  # past the exact-scan size, the filtered modes would search the whole-table index
    no_class_indexed(monkeypatch)
    app.ingest(photos)
    conn = app.store.conn
    (definition,) = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (WHOLE_INDEX,)).fetchone()
    assert conn.execute("SELECT imsearch_index_all()").fetchone() == (WHOLE_INDEX,)  # there already: left as it is
    queries = [sorted(photos.glob(f"{cls}/*.jpg"))[0] for cls in ("bedroom", "kitchen")]
    conn.execute(f"DROP INDEX {WHOLE_INDEX}")
    for query in queries:
        for mode in ("all", "same", "other"):
            assert scans_of(conn, app.find, query, mode) == {}, mode
            [found] = app.find(query, mode, k=7)
            [exact] = app.find(query, mode, k=7, exact=True)
            assert [(m.id, m.distance) for m in found.matches] == [(m.id, m.distance) for m in exact.matches], mode
    assert conn.execute("SELECT imsearch_index_all()").fetchone() == (WHOLE_INDEX,)
    assert conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (WHOLE_INDEX,)).fetchone() \
        == (definition,)  # as migration 0013 built it
    for mode in ("all", "other"):
        assert scans_of(conn, app.find, queries[0], mode) == {WHOLE_INDEX: 1}, mode
    # mode same of a class without its own index: the whole-table index, or (at 4 rows a class) the btree on class
    assert scans_of(conn, app.find, queries[0], "same") in ({}, {WHOLE_INDEX: 1})


def test_the_index_gives_candidates_that_the_exact_distance_ranks(stored, photos, database_url):
    """The index gives the nearest imsearch.rerank_depth rows by the fold (at least 4k); the answer is their k
    nearest by the exact distance, which is the distance reported."""
    conn = stored.store.conn
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    vector = HalfVector(conn.execute("SELECT embedding FROM images WHERE path = %s",
                                     (str(query.resolve()),)).fetchone()[0].to_numpy())

    def candidates(k: int) -> tuple[list[tuple[int, float]], int]:
        """imsearch_search's answer in mode all, and how many tuples the whole-table index handed out for it."""
        conn.execute("SELECT pg_stat_force_next_flush()")
        (read,) = conn.execute("SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = %s",
                               (WHOLE_INDEX,)).fetchone()
        rows = conn.execute("SELECT id, distance FROM imsearch_search(%s, %s, 'all')", (vector, k)).fetchall()
        conn.execute("SELECT pg_stat_force_next_flush()")
        (after,) = conn.execute("SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = %s",
                                (WHOLE_INDEX,)).fetchone()
        return rows, after - read

    def exact(k: int) -> list[tuple[int, float]]:
        return conn.execute("SELECT id, embedding <=> %s FROM images ORDER BY 2, 1 LIMIT %s", (vector, k)).fetchall()

    rows, read = candidates(5)
    assert read == 20  # RERANK_DEPTH (200) is past the table's 20 rows: every row a candidate
    assert rows == exact(5)  # the distances reported are pgvector's own <=> on the stored halfvec
    conn.execute("SET imsearch.rerank_depth = 6")
    try:
        rows, read = candidates(1)
        assert read == 6 and len(rows) == 1
        assert rows[0][1] == pytest.approx(conn.execute(
            "SELECT embedding <=> %s FROM images WHERE id = %s", (vector, rows[0][0])).fetchone()[0], abs=0)
        rows, read = candidates(3)  # at least 4k candidates, whatever the setting
        assert read == 12 and len(rows) == 3
        assert [r[1] for r in rows] == sorted(r[1] for r in rows)
        for found_id, distance in rows:
            assert distance == conn.execute("SELECT embedding <=> %s FROM images WHERE id = %s",
                                            (vector, found_id)).fetchone()[0]
    finally:
        conn.execute("RESET imsearch.rerank_depth")
    assert candidates(5)[1] == 20


def test_a_filter_within_the_exact_scan_size_reads_every_candidate_whatever_the_table_size(database_url):
    """A filter that keeps at most imsearch.exact_max_rows rows: an exact scan. With index scans off and sequential
    scans still off, PostgreSQL would take the cheaper of two disabled plans, the whole-table HNSW index (here from
    ~2k rows on): the exact plan turns sequential scans on."""
    with Store.open(database_url) as store:
        conn = store.conn
        conn.execute(
            "INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding) "
            "SELECT '/photos/' || g, 'class ' || g % 5, md5(g::text), 1, 1, 1, 'test', "
            "(SELECT array_agg(random() + 0 * x + 0 * g) FROM generate_series(1, 2048) x)::halfvec(2048) "
            "FROM generate_series(1, 2500) g")
        conn.execute("ANALYZE images")
        rng = np.random.default_rng(7)

        def nearest(q: np.ndarray, mode: str, exact: bool) -> list[int]:
            return [m.id for m in search_mod.run(conn, q, mode, k=5, cls="class 0", skip_sha=None, exact=exact)]
        conn.execute("SET imsearch.exact_max_rows = 2000")  # the 2,000 rows outside class 0 too
        try:
            for q in rng.random((3, 2048), dtype=np.float32):
                for mode in ("same", "other"):  # 500 and 2,000 rows
                    assert scans_of(conn, nearest, q, mode, False) == {}, mode
                    assert nearest(q, mode, False) == nearest(q, mode, True), mode
                assert scans_of(conn, nearest, q, "all", True) == {}
            conn.execute("SET imsearch.exact_max_rows = 1999")  # one row short: each other class's 500 exactly
            assert scans_of(conn, nearest, q, "other", False) == {}
            assert nearest(q, "other", False) == nearest(q, "other", True)
            conn.execute("SET imsearch.exact_max_rows = 499")  # classes past it, with no index: the whole-table one
            assert scans_of(conn, nearest, q, "other", False).keys() == {WHOLE_INDEX}
        finally:
            conn.execute("RESET imsearch.exact_max_rows")


def test_a_mode_or_k_imsearch_search_would_refuse_is_one_clear_error_first(stored, photos):
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    with pytest.raises(ImsearchError, match="k must be between 1 and 1000, not 1001"):
        stored.find(query, k=1001)
    with pytest.raises(ImsearchError, match="unknown mode 'near'; use one of all, same, other"):
        stored.find(query, "near")
    with pytest.raises(ImsearchError, match="k must be between 1 and 1000, not 0"):
        stored.evaluate(photos, k=0)


def test_vector_and_hash_searches_are_written_in_the_search_package_alone():
    """Index choices live in one place: no distance operator of pgvector's on the embedding (`<=>`, `<#>`) in
    imsearch/ outside imsearch/search/ (the planner's template and its Python side), and the perceptual-hash search
    (`<~>`) in search/hashes.py alone, which the audit and the calibration both call."""
    from pathlib import Path

    package = Path(search_mod.__file__).resolve().parents[1]
    for path in sorted(package.rglob("*")):
        if path.suffix not in (".py", ".sql"):
            continue
        where, text = path.relative_to(package).as_posix(), path.read_text()
        if "<=>" in text or "<#>" in text:
            assert where.startswith("search/") and where != "search/hashes.py", where
        if "<~>" in text:
            assert where == "search/hashes.py", where


def test_the_planner_template_says_each_rule_once():
    """One ranking, one check of the iterative scan, one place that turns it off (for every index plan but the
    filtered scan of the whole-table index) and one that turns it on (widening past ef_search's 1,000), and one
    place for each half of the rule naming a class's index: the builder
    (imsearch_index_class) and the look-up (imsearch_class_index), which test_python_and_sql_name_a_class_index_alike
    holds equal."""
    from importlib.resources import files

    folder = files("imsearch.search") / "sql"
    template = (folder / "imsearch_search.sql").read_text()
    assert template.count("row_number()") == 1
    assert template.count("set_config('hnsw.iterative_scan'") == 2
    assert template.count("current_setting('hnsw.iterative_scan'") == 1
    assert sum(f.read_text().count("md5(") for f in folder.iterdir() if f.name.endswith(".sql")) == 3
    functions = re.split(r"(?m)^(?=CREATE OR REPLACE FUNCTION )", template)
    assert sorted(re.match(r"CREATE OR REPLACE FUNCTION public\.(\w+)\(", f)[1] for f in functions if "md5(" in f) \
        == ["imsearch_class_group", "imsearch_class_index", "imsearch_index_class"]


def test_python_and_sql_name_a_class_index_alike(database_url):
    """The index builder imsearch_index_class, imsearch_class_index (the planner's rule) and search.index_name
    (Python's, for the checks after ingest) agree, for any class name."""
    from imsearch.db.migrate import upgrade
    from imsearch.search import CLASS_INDEX_PREFIX, index_name

    upgrade(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for cls in ("kitchen", "Küche", "living room", 'a "quoted" class', "x" * 200):
            assert conn.execute("SELECT imsearch_class_index(%s, %s)", (CLASS_INDEX_PREFIX, cls)).fetchone() == (None,)
            (built,) = conn.execute("SELECT imsearch_index_class(%s)", (cls,)).fetchone()
            assert built == index_name(cls) == class_index_name(cls)
            assert built.startswith(CLASS_INDEX_PREFIX) and len(built) == len(CLASS_INDEX_PREFIX) + 16
            assert conn.execute("SELECT imsearch_class_index(%s, %s)::text",
                                (CLASS_INDEX_PREFIX, cls)).fetchone() == (built,)


def test_python_and_sql_put_a_class_in_the_same_group_graph(database_url):
    """imsearch_class_group (the group graphs' predicate and the planner's rule, migration 0020) and
    search.class_group (the builds' sizes) agree, for any class name and for rows of no class; the builder takes
    only a group that exists."""
    from imsearch.db.migrate import upgrade
    from imsearch.search import GROUPS, class_group, group_index_name

    upgrade(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        names = ["kitchen", "Küche", "living room", 'a "quoted" class', "x" * 200,
                 *(f"class_{i:03d}" for i in range(40))]
        for cls in names:
            assert conn.execute("SELECT imsearch_class_group(%s)", (cls,)).fetchone() == (class_group(cls),)
        assert conn.execute("SELECT imsearch_class_group(NULL)").fetchone() == (class_group(None),) == (0,)
        assert {class_group(c) for c in names} == set(range(GROUPS))
        assert conn.execute("SELECT imsearch_index_group(3)").fetchone() == (group_index_name(3),)
        for bad in (-1, GROUPS, None):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="a group is a number"):
                conn.execute("SELECT imsearch_index_group(%s::integer)", (bad,))


def test_every_branch_of_a_union_is_asked_again_deeper(database_url, monkeypatch, exact_max_rows):
    """A union (here mode other) widens every branch when one's bound fails, even a class whose rows all lie beyond
    the k-th candidate: the bound assumes the graph gave the fold's nearest rows, which a deeper search of a settled
    branch makes up for (docs/scaling.md). The answer is the exact one. pg_stat_user_indexes counts the rows each
    index gave."""
    from pgvector.psycopg import register_vector

    rng = np.random.default_rng(5)
    near = rng.random((2000, 2048), dtype=np.float32)  # a random query is about as near to each of these
    far = np.zeros((2000, 2048), dtype=np.float32)
    far[:, :64] = 1 + rng.random((2000, 64), dtype=np.float32)  # a tight group off to one side
    query_class = rng.random((10, 2048), dtype=np.float32)
    with Store.open(database_url) as store:
        conn = store.conn
        exact_max_rows(20, conn)
        every_class_indexed(monkeypatch)
        register_vector(conn)
        with conn.cursor() as cur, cur.copy("COPY images (path, class, sha256, model, embedding) FROM STDIN") as copy:
            for i, (cls, v) in enumerate([("near", v) for v in near] + [("far", v) for v in far]
                                         + [("query", v) for v in query_class]):
                copy.write_row((f"/lib/{cls}/{i}.jpg", cls, f"{i:064x}", "test", HalfVector(v)))
        conn.execute("ANALYZE images")
        assert indexes.ensure_class_indexes(store, 20) == ["far", "near"]

        def read() -> dict[str, tuple[int, int]]:
            conn.execute("SELECT pg_stat_force_next_flush()")
            return {r[0]: (r[1], r[2]) for r in conn.execute(
                "SELECT indexrelname, idx_scan, idx_tup_read FROM pg_stat_user_indexes "
                "WHERE starts_with(indexrelname, %s)", (CLASS_INDEX_PREFIX,))}

        q = rng.random(2048, dtype=np.float32)
        conn.execute("SET imsearch.rerank_depth = 50")
        conn.execute("SET imsearch.rerank_max_depth = 800")
        try:
            before = read()
            got = [m.id for m in search_mod.run(conn, q, "other", k=5, cls="query", skip_sha=None)]
            after = read()
            (far_scans, far_rows), (near_scans, near_rows) = (
                tuple(a - b for a, b in zip(after[class_index_name(c)], before.get(class_index_name(c), (0, 0))))
                for c in ("far", "near"))
            assert near_scans == far_scans >= 2  # every pass asks both
            assert near_rows == far_rows == sum(min(50 * 4**i, 800) for i in range(near_scans))  # 50, 200, 800
            assert got == [m.id for m in search_mod.run(conn, q, "other", k=5, cls="query", skip_sha=None,
                                                        exact=True)]
        finally:
            conn.execute("RESET imsearch.rerank_depth")
            conn.execute("RESET imsearch.rerank_max_depth")


def test_a_query_far_from_every_row_is_asked_again_deeper_and_a_near_one_is_not(database_url):
    """Widening (migration 0015): where the k-th re-ranked candidate is not nearer than a row beyond the candidates
    could be, imsearch_search asks the index again four times as deep, up to imsearch.rerank_max_depth. Rows in tight
    groups of ten: a query inside a group settles at the first depth; a query far from every row (a random vector)
    is asked again, and finds the exact top five."""
    from pgvector.psycopg import register_vector

    rng = np.random.default_rng(3)
    centres = rng.random((300, 2048), dtype=np.float32)
    vectors = np.repeat(centres, 10, axis=0) + 0.05 * rng.random((3000, 2048), dtype=np.float32)
    with Store.open(database_url) as store:
        conn = store.conn
        register_vector(conn)
        with conn.cursor() as cur, cur.copy(
                "COPY images (path, class, sha256, width, height, bytes, model, embedding) FROM STDIN") as copy:
            for i, v in enumerate(vectors):
                copy.write_row((f"/lib/{i}.jpg", f"group {i // 10 % 5}", f"{i:064x}", 1, 1, 1, "test", HalfVector(v)))
        conn.execute("ANALYZE images")

        def nearest(q: np.ndarray) -> list[int]:
            return [m.id for m in search_mod.run(conn, q, "all", k=5, cls=None, skip_sha=None)]

        def exact(q: np.ndarray) -> list[int]:
            return [m.id for m in search_mod.run(conn, q, "all", k=5, cls=None, skip_sha=None, exact=True)]

        near = centres[7] + 0.05 * rng.random(2048, dtype=np.float32)
        far = rng.random(2048, dtype=np.float32)
        conn.execute("SET imsearch.rerank_depth = 100")
        conn.execute("SET imsearch.rerank_max_depth = 1000")
        try:
            # the near query settles sooner (at once, unless this build's graph strands it between the tight groups
            # at the first depth, which the check then catches); the far one goes to the deepest
            assert scans_of(conn, nearest, far) == {WHOLE_INDEX: 3}  # 100, 400, then imsearch.rerank_max_depth
            assert nearest(far) == exact(far)
            assert scans_of(conn, nearest, near)[WHOLE_INDEX] < 3
            assert nearest(near) == exact(near)
            # past ef_search's 1,000 through an iterative scan, with a margin too wide to ever answer early: a
            # fourth scan only where the third gave all 1,600 rows, and the fourth gives every row (3,000 of 6,400)
            conn.execute("SET imsearch.rerank_max_depth = 6400")
            conn.execute("SET imsearch.rerank_margin = 1000")
            assert scans_of(conn, nearest, far) == {WHOLE_INDEX: 4}
            assert nearest(far) == exact(far)
            # by default the widening stops at ef_search's 1,000 (migration 0019): 100, 400, 1,000
            conn.execute("RESET imsearch.rerank_max_depth")
            assert scans_of(conn, nearest, far) == {WHOLE_INDEX: 3}
            conn.execute("RESET imsearch.rerank_margin")
            conn.execute("SET imsearch.rerank_max_depth = 400")
            assert scans_of(conn, nearest, far) == {WHOLE_INDEX: 2}
            conn.execute("SET imsearch.rerank_max_depth = 100")  # no widening
            assert scans_of(conn, nearest, far) == {WHOLE_INDEX: 1}
        finally:
            conn.execute("RESET imsearch.rerank_depth")
            conn.execute("RESET imsearch.rerank_max_depth")
            conn.execute("RESET imsearch.rerank_margin")
