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


def test_plan_settings_hold_for_the_query_transaction_only(database_url):
    settings = (("hnsw.ef_search", "321"), ("enable_sort", "off"), ("plan_cache_mode", "force_custom_plan"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        with conn.transaction():
            search_mod.set_local(conn, settings)
            inside = [conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0] for name, _ in settings]
        after = conn.execute("SELECT current_setting('enable_sort')").fetchone()[0]
    assert inside == ["321", "off", "force_custom_plan"]
    assert after == "on"


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


def test_mode_sql_is_one_query_with_a_where_clause():
    assert "class = %(cls)s" in search_mod.mode_sql("same")
    assert "class <> %(cls)s" in search_mod.mode_sql("other")
    assert "class" not in search_mod.mode_sql("all").split("WHERE")[1].split("ORDER")[0]


def test_unfiltered_query_uses_the_hnsw_index_on_a_server_at_default_settings(stored):
    """The test server runs at PostgreSQL's defaults, where the planner would rather scan the table and sort (here
    because 20 rows are few; at 100k rows because the TOASTed vectors hide the table's size): the plan forbids it."""
    conn, vector = stored.store.conn, np.ones(2048, np.float32)
    plan = search_mod.plan("all", k=5, pgvector=stored.store.pgvector)
    assert ("enable_seqscan", "off") in plan.settings
    assert "Index Scan using images_embedding_hnsw" in search_mod.explain(conn, vector, "all", k=5, cls=None,
                                                                          query_plan=plan)
    untuned = search_mod.Plan(False, tuple(s for s in plan.settings if s[0] != "enable_seqscan"))
    assert "Seq Scan on images" in search_mod.explain(conn, vector, "all", k=5, cls=None, query_plan=untuned)
    assert conn.execute("SHOW enable_seqscan").fetchone() == ("on",)  # SET LOCAL: gone with the query


def test_plan_scans_small_classes_exactly_and_large_ones_through_their_own_index():
    counts = {"small": 400, "big": 50_000, "huge": 60_000}
    small = search_mod.plan("same", k=5, cls="small", counts=counts, indexed={"big", "huge"})
    big = search_mod.plan("same", k=5, cls="big", counts=counts, indexed={"big", "huge"})
    unindexed = search_mod.plan("same", k=5, cls="big", counts=counts, indexed=set(), pgvector=(0, 8, 2))
    old = search_mod.plan("same", k=5, cls="big", counts=counts, indexed=set(), pgvector=(0, 7, 4))
    other = search_mod.plan("other", k=5, cls="huge", counts=counts, indexed={"big", "huge"})
    assert small.exact and old.exact and not big.exact
    assert ("enable_sort", "off") in big.settings
    assert ("hnsw.iterative_scan", "relaxed_order") in unindexed.settings
    assert other.branches == (("big", False), ("small", True))
    one = search_mod.plan("other", k=5, cls="huge", counts=counts, indexed={"big", "huge"}, others_indexed={"huge"})
    assert one.class_index and not one.branches and ("hnsw.ef_search", str(search_mod.OTHER_EF_SEARCH)) in one.settings
    few = search_mod.plan("other", k=5, cls="big", counts={"big": 50_000, "small": 400}, others_indexed={"big"})
    assert few.exact  # 400 rows to read: exactly, index or not


def test_large_classes_get_their_own_index_and_the_filtered_modes_use_it(app, photos, monkeypatch):
    monkeypatch.setattr(search_mod, "EXACT_MAX_ROWS", 3)  # every class of 4 photos counts as large
    app.ingest(photos)
    counts = dict(app.classes())
    assert indexes.indexed_classes(app.store.conn, counts) == set(counts)
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    vector = app.embed([query])[0].vector
    for mode in ("same", "other"):
        plan = search_mod.plan(mode, k=5, cls="bedroom", counts=counts, indexed=set(counts))
        text = search_mod.explain(app.store.conn, vector, mode, k=5, cls="bedroom", query_plan=plan)
        assert "Index Scan using images_embedding_hnsw_c_" in text
        [indexed] = app.find(query, mode)
        [exact] = app.find(query, mode, exact=True)
        assert [m.path for m in indexed.matches] == [m.path for m in exact.matches]


def test_other_class_indexes_make_mode_other_one_index_search_and_ingest_keeps_them(app, photos, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(search_mod, "EXACT_MAX_ROWS", 3)  # every class of 4 photos counts as large
    app.ingest(photos)
    counts = dict(app.classes())
    assert sorted(app.index_other_classes()) == sorted(counts)
    assert indexes.indexed_classes(app.store.conn, counts, OTHER_INDEX_PREFIX) == set(counts)
    query = sorted(photos.glob("bedroom/*.jpg"))[0]
    vector = app.embed([query])[0].vector
    others = indexes.indexed_classes(app.store.conn, counts, OTHER_INDEX_PREFIX)
    for mode, index in (("other", "images_embedding_hnsw_o_"), ("same", "images_embedding_hnsw_c_")):
        plan = search_mod.plan(mode, k=5, cls="bedroom", counts=counts, indexed=set(counts), others_indexed=others)
        text = search_mod.explain(app.store.conn, vector, mode, k=5, cls="bedroom", query_plan=plan)
        assert f"Index Scan using {index}" in text and text.count("Index Scan") == 1, mode
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


def test_the_query_folds_the_embedding_as_the_other_class_index_does(app, photos, monkeypatch):
    """The index folds stored rows in SQL and find folds the query in Python: the two must be one fold."""
    monkeypatch.setattr(search_mod, "EXACT_MAX_ROWS", 3)
    app.ingest(photos)
    conn = app.store.conn
    image_id, embedding = conn.execute("SELECT id, embedding FROM images ORDER BY id LIMIT 1").fetchone()
    vector = embedding.to_numpy().astype(np.float32)
    fold = HalfVector(vector[:1024] - vector[1024:])
    same, other = conn.execute(
        f"SELECT {search_mod.FOLD} <=> %(f)s, {search_mod.FOLD} <=> %(g)s FROM images WHERE id = %(id)s",
        {"f": fold, "g": HalfVector(vector[1024:] - vector[:1024]), "id": image_id}).fetchone()
    assert same == pytest.approx(0, abs=1e-3) and other == pytest.approx(2, abs=1e-3)


def test_index_other_measures_its_recall_against_an_exact_scan(app, photos, monkeypatch):
    monkeypatch.setattr(search_mod, "EXACT_MAX_ROWS", 3)
    app.ingest(photos)
    assert app.check_other_indexes() is None  # nothing to check yet
    app.index_other_classes()
    assert app.check_other_indexes() == 1.0  # 16 rows per graph: the index finds them all
    # a query that ranks the farthest first must show in the figure
    monkeypatch.setattr(search_mod, "OTHER_QUERY", search_mod.OTHER_QUERY.replace("ORDER BY distance",
                                                                                  "ORDER BY distance DESC"))
    assert app.check_other_indexes() < 0.5


def test_index_builds_take_imsearch_build_memory_and_say_when_the_graph_will_not_fit(app, photos, monkeypatch,
                                                                                      caplog):
    monkeypatch.setattr(search_mod, "EXACT_MAX_ROWS", 3)
    monkeypatch.setenv("IMSEARCH_BUILD_MEMORY", "100MB")
    monkeypatch.setattr(indexes, "GRAPH_BYTES_PER_ROW", 2**30)  # 4 rows then need 4 GB
    with caplog.at_level(logging.WARNING, logger="imsearch.db.indexes"):
        app.ingest(photos)
    assert indexes.indexed_classes(app.store.conn, dict(app.classes())) == {c for c, _ in app.classes()}
    assert app.store.conn.execute("SHOW maintenance_work_mem").fetchone()[0] == "100MB"
    warned = [r.getMessage() for r in caplog.records if "IMSEARCH_BUILD_MEMORY" in r.getMessage()]
    assert len(warned) == 5 and "maintenance_work_mem is 100 MB" in warned[0]


def test_a_bad_build_memory_is_one_clear_error_and_the_rows_stay(app, photos, monkeypatch):
    monkeypatch.setattr(search_mod, "EXACT_MAX_ROWS", 3)
    monkeypatch.setenv("IMSEARCH_BUILD_MEMORY", "lots")
    with pytest.raises(ImsearchError, match="IMSEARCH_BUILD_MEMORY='lots' is not a memory size"):
        app.ingest(photos)
    assert app.store.count() == 20


def test_a_same_class_query_is_never_served_by_an_other_class_index(app, photos, monkeypatch):
    """`class = Y` implies `class <> X`: an other-class index with a filter would lose most of Y's neighbours."""
    monkeypatch.setattr(search_mod, "EXACT_MAX_ROWS", 3)
    app.ingest(photos)
    app.index_other_classes()
    counts = dict(app.classes())
    conn = app.store.conn
    conn.execute(f'DROP INDEX "{class_index_name("bedroom")}"')  # leave the planner nothing better to take
    plan = search_mod.plan("same", k=5, cls="bedroom", counts=counts, indexed={"bedroom"})
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        text = search_mod.explain(conn, np.ones(2048, np.float32), "same", k=5, cls="bedroom", query_plan=plan)
    assert OTHER_INDEX_PREFIX not in text
