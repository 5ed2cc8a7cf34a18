"""find: the three modes, self-exclusion, index against exact scan, and distances as pgvector computes them."""

from __future__ import annotations

import logging
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
from imsearch.search import OTHER_INDEX_PREFIX
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
                             "AND starts_with(indexrelname, 'images_embedding_hnsw') AND idx_scan > 0").fetchall())


def scans_of(conn: psycopg.Connection, search, *args) -> dict[str, int]:
    """The HNSW index scans that `search(*args)` makes, by index name; class and other-class indexes are shown by their
    prefix, with the number of scans of all of them."""
    before = index_scans(conn)
    search(*args)
    counted: dict[str, int] = {}
    for name, n in index_scans(conn).items():
        if n > before.get(name, 0):
            short = name if len(name) < 25 else name[:24]
            counted[short] = counted.get(short, 0) + n - before.get(name, 0)
    return counted


def test_unfiltered_query_uses_the_hnsw_index_on_a_server_at_default_settings(stored, photos):
    """The test server runs at PostgreSQL's defaults, where the planner would rather scan the table and sort (here
    because 20 rows are few; at 100k rows because the TOASTed vectors hide the table's size): imsearch_search
    forbids it for its own duration."""
    conn = stored.store.conn
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    assert scans_of(conn, stored.find, query, "all") == {"images_embedding_hnsw": 1}
    plain = conn.execute("EXPLAIN SELECT id FROM images ORDER BY embedding <=> %s LIMIT 5",
                         (HalfVector(np.ones(2048, np.float32)),)).fetchall()
    assert "Seq Scan on images" in "\n".join(r[0] for r in plain)
    assert conn.execute("SHOW enable_seqscan").fetchone() == ("on",)


def test_small_classes_are_scanned_exactly_and_large_ones_through_their_own_index(app, photos, exact_max_rows):
    app.ingest(photos)  # 4 rows a class: small
    conn = app.store.conn
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    assert scans_of(conn, app.find, query, "same") == {}  # the class's rows, exactly
    assert scans_of(conn, app.find, query, "other") == {}  # 16 rows, exactly
    exact_max_rows(3, conn)  # now large, without indexes of their own yet: the whole-table index, iteratively
    for mode in ("same", "other"):  # (or, at 4 rows a class, the btree on class and a sort: the server's choice)
        assert [m.id for m in app.find(query, mode)[0].matches] == [m.id for m in app.find(query, mode,
                                                                                          exact=True)[0].matches]
    indexes.ensure_class_indexes(app.store, 3)
    assert scans_of(conn, app.find, query, "same")["images_embedding_hnsw_c_"] == 1
    assert scans_of(conn, app.find, query, "other")["images_embedding_hnsw_c_"] == 4  # one per other class
    assert sorted(app.index_other_classes()) == sorted(c for c, _ in app.classes())
    assert scans_of(conn, app.find, query, "other") == {"images_embedding_hnsw_o_": 1}
    exact_max_rows(16, conn)  # the 16 rows outside bedroom are few again: exactly, though its others are indexed
    assert scans_of(conn, app.find, query, "other") == {}


def test_large_classes_get_their_own_index_and_the_filtered_modes_use_it(app, photos, exact_max_rows):
    exact_max_rows(3)  # every class of 4 photos counts as large
    app.ingest(photos)
    counts = dict(app.classes())
    assert indexes.indexed_classes(app.store.conn, counts) == set(counts)
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    for mode in ("same", "other"):
        assert "images_embedding_hnsw_c_" in scans_of(app.store.conn, app.find, query, mode)
        [indexed] = app.find(query, mode)
        [exact] = app.find(query, mode, exact=True)
        assert [m.path for m in indexed.matches] == [m.path for m in exact.matches]


def test_other_class_indexes_make_mode_other_one_index_search_and_ingest_keeps_them(app, photos, tmp_path,
                                                                                  exact_max_rows):
    exact_max_rows(3)  # every class of 4 photos counts as large
    app.ingest(photos)
    counts = dict(app.classes())
    assert sorted(app.index_other_classes()) == sorted(counts)
    assert indexes.indexed_classes(app.store.conn, counts, OTHER_INDEX_PREFIX) == set(counts)
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    for mode, index in (("other", "images_embedding_hnsw_o_"), ("same", "images_embedding_hnsw_c_")):
        scans = scans_of(app.store.conn, app.find, query, mode)
        assert scans == {index: 1}, mode
        [indexed] = app.find(query, mode)
        [exact] = app.find(query, mode, exact=True)
        assert [m.path for m in indexed.matches] == [m.path for m in exact.matches]
        assert all(m.cls != "bedroom" for m in indexed.matches) if mode == "other" else True
    # a new class gets its other-class index at the end of the ingest that brings it
    cellar = tmp_path / "more" / "wine_cellar"
    cellar.mkdir(parents=True)
    for src in sorted((ROOMS / "base" / "kitchen").glob("*.jpg"))[4:8]:
        shutil.copy2(src, cellar / src.name)
    assert app.ingest(cellar.parent).added == 4
    assert "wine_cellar" in indexes.indexed_classes(app.store.conn, ["wine_cellar"], OTHER_INDEX_PREFIX)
    assert app.index_other_classes(drop=True) == [] and indexes.other_indexes(app.store.conn) == []


def test_index_other_measures_its_recall_against_an_exact_scan(app, photos, monkeypatch, exact_max_rows):
    exact_max_rows(3)
    app.ingest(photos)
    assert app.check_other_indexes() is None  # nothing to check yet
    app.index_other_classes()
    assert app.check_other_indexes() == 1.0  # 16 rows per graph: the index finds them all
    # an index search that hands back the farthest must show in the figure
    nearest = search_mod.run

    def farthest(*args, k, exact=False, **kwargs):
        matches = nearest(*args, k=16, exact=exact, **kwargs)
        return matches[:k] if exact else matches[::-1][:k]
    monkeypatch.setattr(search_mod, "run", farthest)
    assert app.check_other_indexes() < 0.5


def test_index_builds_take_imsearch_build_memory_and_say_when_the_graph_will_not_fit(app, photos, monkeypatch,
                                                                                      caplog, exact_max_rows):
    exact_max_rows(3)
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
    monkeypatch.setenv("IMSEARCH_BUILD_MEMORY", "lots")
    with pytest.raises(ImsearchError, match="IMSEARCH_BUILD_MEMORY='lots' is not a memory size"):
        app.ingest(photos)
    assert app.store.count() == 20


def test_a_same_class_query_is_never_served_by_an_other_class_index(app, photos, exact_max_rows):
    """`class = Y` implies `class <> X`: an other-class index with a filter would lose most of Y's neighbours."""
    exact_max_rows(3)
    app.ingest(photos)
    app.index_other_classes()
    conn = app.store.conn
    conn.execute(f'DROP INDEX "{class_index_name("bedroom")}"')  # leave the planner nothing better to take
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    conn.execute("SET enable_bitmapscan = off")  # nor a bitmap of the btree on class
    try:
        [result] = app.find(query, "same")
        assert "images_embedding_hnsw_o_" not in scans_of(conn, app.find, query, "same")
    finally:
        conn.execute("RESET enable_bitmapscan")
    assert {m.cls for m in result.matches} == {"bedroom"} and len(result.matches) == 3


def test_mode_other_over_small_classes_reads_every_candidate_whatever_the_table_size(database_url):
    """Each other class small: an exact scan of `class <> X`. With index scans off and sequential scans still off,
    PostgreSQL would take the cheaper of two disabled plans, the whole-table HNSW index (here from ~2k rows on)."""
    with Store.open(database_url) as store:
        conn = store.conn
        conn.execute(
            "INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding) "
            "SELECT '/photos/' || g, 'class ' || g % 5, md5(g::text), 1, 1, 1, 'test', "
            "(SELECT array_agg(random() + 0 * x + 0 * g) FROM generate_series(1, 2048) x)::halfvec(2048) "
            "FROM generate_series(1, 2500) g")
        conn.execute("ANALYZE images")
        rng = np.random.default_rng(7)

        def other(q: np.ndarray, exact: bool) -> list[int]:
            return [m.id for m in search_mod.run(conn, q, "other", k=5, cls="class 0", skip_sha=None, exact=exact)]
        for q in rng.random((3, 2048), dtype=np.float32):
            assert scans_of(conn, other, q, False) == {}
            assert other(q, False) == other(q, True)


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
    """One ranking, one place that turns the iterative scan off, one check of it, one rule naming a class's index."""
    from importlib.resources import files

    folder = files("imsearch.search") / "sql"
    template = (folder / "imsearch_search.sql").read_text()
    assert template.count("row_number()") == 1
    assert template.count("set_config('hnsw.iterative_scan'") == 1
    assert template.count("current_setting('hnsw.iterative_scan'") == 1
    assert sum(f.read_text().count("md5(") for f in folder.iterdir() if f.name.endswith(".sql")) == 1


def test_python_and_sql_name_a_class_index_alike(database_url):
    """The index builders of migrations 0003 and 0006, imsearch_class_index (the planner's rule) and
    search.index_name (Python's, for `db index-other` and the checks after ingest) agree, for any class name."""
    from imsearch.db.migrate import upgrade
    from imsearch.search import CLASS_INDEX_PREFIX, index_name

    upgrade(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for cls in ("kitchen", "Küche", "living room", 'a "quoted" class', "x" * 200):
            for builder, prefix in (("imsearch_index_class", CLASS_INDEX_PREFIX),
                                    ("imsearch_index_other", OTHER_INDEX_PREFIX)):
                assert conn.execute("SELECT imsearch_class_index(%s, %s)", (prefix, cls)).fetchone() == (None,)
                (built,) = conn.execute(f"SELECT {builder}(%s)", (cls,)).fetchone()
                assert built == index_name(cls, prefix) == class_index_name(cls, prefix)
                assert conn.execute("SELECT imsearch_class_index(%s, %s)::text", (prefix, cls)).fetchone() == (built,)
