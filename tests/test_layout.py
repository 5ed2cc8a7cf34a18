"""The index layout of migration 0013 on a library with a rare class: which index each mode searches, and that the
rare class's answers (same and other) are the exact ones for queries that are not stored."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from pgvector import HalfVector
from pgvector.psycopg import register_vector

from imsearch import search
from imsearch.db import indexes
from imsearch.db.store import Store

CLASSES = ("bathroom", "bedroom", "dining_room", "kitchen", "living_room")
RARE = "wine_cellar"
ROWS = 6_000


def scans(conn: psycopg.Connection) -> dict[str, int]:
    conn.execute("SELECT pg_stat_force_next_flush()")
    return dict(conn.execute("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'images' "
                             "AND starts_with(indexrelname, 'images_fold_hnsw')").fetchall())


@pytest.fixture
def library(database_url, exact_max_rows):
    """6,000 ResNet-like rows (non-negative, clustered by class, scene elements shared across classes) in five
    common classes and one of 0.5 %; the exact-scan size lowered to 20 so that the rare class has an index."""
    rng = np.random.default_rng(11)
    elements = np.maximum(rng.normal(0, 1, (64, 2048)), 0) * (rng.random((64, 2048)) < 0.1)
    labels = [RARE if i % 200 == 0 else CLASSES[i % 5] for i in range(ROWS)]
    prefer = {c: rng.dirichlet(np.full(64, 0.2)) for c in (*CLASSES, RARE)}

    def draw(cls: str, n: int) -> np.ndarray:
        picks = [rng.choice(64, 6, replace=False, p=prefer[cls]) for _ in range(n)]
        return np.stack([elements[p].sum(0) for p in picks]) + np.maximum(rng.normal(0, 0.3, (n, 2048)), 0)

    with Store.open(database_url) as store:
        exact_max_rows(20, store.conn)
        register_vector(store.conn)
        with store.conn.cursor() as cur, cur.copy(
                "COPY images (path, class, sha256, model, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "text", "varchar", "text", "halfvec"])
            for i, (label, v) in enumerate(zip(labels, np.concatenate([draw(c, 1) for c in labels]))):
                copy.write_row((f"/lib/{label}/{i}.jpg", label, f"{i:064x}", "m", HalfVector(v)))
        store.conn.execute("ANALYZE images")
        assert indexes.ensure_class_indexes(store, 20) == sorted((*CLASSES, RARE))  # each at most half the rows
        yield store, draw


def test_each_mode_searches_the_index_its_plan_names(library):
    store, draw = library
    q = draw(RARE, 1)[0]
    own = indexes.class_index_name
    expected = {("all", None): {"images_fold_hnsw"}, ("same", "kitchen"): {own("kitchen")},
                ("same", RARE): {own(RARE)}, ("other", "kitchen"): {own(c) for c in (*CLASSES, RARE) if c != "kitchen"},
                ("other", RARE): {own(c) for c in CLASSES}}  # mode other: each other class through its own index
    for (mode, cls), used in expected.items():
        before = scans(store.conn)
        search.run(store, q, mode, k=5, cls=cls, skip_sha=None)
        after = scans(store.conn)
        assert {n for n, c in after.items() if c > before.get(n, 0)} == used, (mode, cls)


def test_the_rare_class_gets_its_exact_top_five_in_modes_same_and_other(library):
    store, draw = library
    found = wanted = 0
    for q in np.concatenate([draw(RARE, 10), draw("kitchen", 10)]):
        for mode in ("same", "other"):
            got = [m.id for m in search.run(store, q, mode, k=5, cls=RARE, skip_sha=None)]
            exact = [m.id for m in search.run(store, q, mode, k=5, cls=RARE, skip_sha=None, exact=True)]
            found += len(set(got) & set(exact))
            wanted += len(exact)
    assert found / wanted >= 0.99


def test_past_union_min_rows_mode_all_searches_the_graphs_of_the_classes_its_answer_names(library):
    """In a library past imsearch.union_min_rows (migration 0017), mode all asks the graphs of the classes the
    whole-table graph's answer names too, where the library has at most imsearch.union_max_classes classes, and
    ranks the union: at a million rows the whole-table graph finds a far query's classes more often than its rows.
    Every layout gives the exact top five."""
    store, draw = library
    conn = store.conn
    own = {indexes.class_index_name(c) for c in (*CLASSES, RARE)}
    queries = np.concatenate([draw(c, 2) for c in (*CLASSES, RARE)])

    def layout(mode: str) -> tuple[list[set[str]], float]:
        used, found = [], 0
        for q in queries:
            before = scans(conn)
            got = [m.id for m in search.run(store, q, mode, k=5, cls="kitchen", skip_sha=None)]
            after = scans(conn)
            exact = [m.id for m in search.run(store, q, mode, k=5, cls="kitchen", skip_sha=None, exact=True)]
            used.append({n for n, c in after.items() if c > before.get(n, 0)})
            found += len(set(got) & set(exact))
        return used, found / (5 * len(queries))

    used, recall = layout("all")
    assert recall == 1.0 and all(u == {search.WHOLE_INDEX} for u in used)  # 6,000 rows: below 250,000
    conn.execute("SET imsearch.union_min_rows = 1000")
    used, recall = layout("all")
    assert recall == 1.0
    assert all(search.WHOLE_INDEX in u and 1 <= len(u - {search.WHOLE_INDEX}) and u - {search.WHOLE_INDEX} <= own
               for u in used)
    # more classes than union_max_classes (in 100 tight classes it found no more): the whole-table graph alone, in
    # mode all as in mode other
    conn.execute("SET imsearch.union_max_classes = 4")
    for mode in ("all", "other"):
        used, recall = layout(mode)
        assert recall == 1.0 and all(u == {search.WHOLE_INDEX} for u in used)


def test_past_union_max_classes_modes_all_and_other_search_every_group_graph(library):
    """A library of more classes than imsearch.union_max_classes past union_min_rows gets the group graphs
    (migration 0020), and modes all and other then search all of them, the query's own group in mode other
    filtered past its class, instead of the whole-table graph; every answer is the exact one."""
    store, draw = library
    conn = store.conn
    counts = dict(store.classes())
    assert indexes.ensure_group_indexes(store, counts) == []  # 6,000 rows in 6 classes: no groups
    groups = [search.group_index_name(n) for n in range(search.GROUPS)]
    assert indexes.ensure_group_indexes(store, counts, min_rows=1000, max_classes=4) == groups
    assert indexes.ensure_group_indexes(store, counts, min_rows=1000, max_classes=4) == []  # built once
    held = dict(conn.execute("SELECT imsearch_class_group(class), count(*) FROM images GROUP BY 1").fetchall())
    assert held == {g: sum(n for c, n in counts.items() if search.class_group(c) == g) for g in held}
    conn.execute("SET imsearch.union_min_rows = 1000")
    conn.execute("SET imsearch.union_max_classes = 4")
    queries = np.concatenate([draw(c, 2) for c in (*CLASSES, RARE)])
    for mode, cls in (("all", None), ("other", "kitchen"), ("other", RARE)):
        found = 0
        for q in queries:
            before = scans(conn)
            got = search.run(store, q, mode, k=5, cls=cls, skip_sha=None)
            after = scans(conn)
            assert {n for n, c in after.items() if c > before.get(n, 0)} == set(groups), mode
            exact = search.run(store, q, mode, k=5, cls=cls, skip_sha=None, exact=True)
            assert cls not in {m.cls for m in got}
            found += len({m.id for m in got} & {m.id for m in exact})
        assert found == 5 * len(queries), (mode, cls)
    # as many classes as union_max_classes: mode other is the union of the class graphs again
    conn.execute("SET imsearch.union_max_classes = 8")
    before = scans(conn)
    search.run(store, queries[0], "other", k=5, cls="kitchen", skip_sha=None)
    after = scans(conn)
    assert {n for n, c in after.items() if c > before.get(n, 0)} == {
        indexes.class_index_name(c) for c in (*CLASSES, RARE) if c != "kitchen"}
