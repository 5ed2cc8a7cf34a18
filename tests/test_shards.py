"""A library spread over shard servers: the coordinator's partitioned `images`, rows routed to their shard, every
search answered by all shards at once and merged, the same answers as on one server, and a shard that is down
named in the error.

Three embedded servers of their own (a coordinator and two shards), a fresh database on each per test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os

import numpy as np
import psycopg
import pytest

from imsearch import Imsearch, search
from imsearch.db import embedded, shards
from imsearch.db.migrate import upgrade
from imsearch.db.store import Row, Store
from imsearch.errors import DatabaseUnavailable, ImsearchError
from imsearch.modes import MODES
from tests.conftest import copy_photos, scratch_database

MODEL = "resnet50:file-0123abcd:resize256-crop224"
CLASSES = ("bathroom", "bedroom", "kitchen")
_counter = itertools.count()


@pytest.fixture(scope="module")
def servers():
    """Three embedded servers: the coordinator's and two shards'."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(embedded.temporary()) for _ in range(3)]


@pytest.fixture
def cluster(servers):
    """(coordinator URL, [shard URLs]): a fresh database on each server, dropped afterwards."""
    name = f"imsearch_shards_{os.getpid()}_{next(_counter)}"
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(scratch_database(s, name)) for s in servers]
        yield urls[0], urls[1:]


def rows(n: int, seed: int = 0, start: int = 0) -> list[Row]:
    """n synthetic rows in three classes, each vector a class centre plus noise (ReLU-like: all >= 0)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(np.random.default_rng(99).standard_normal((len(CLASSES), 2048)))
    out = []
    for i in range(start, start + n):
        c = i % len(CLASSES)
        v = np.maximum(centres[c] + 0.8 * rng.standard_normal(2048), 0).astype(np.float32)
        out.append(Row(f"/library/{CLASSES[c]}/{i:05d}.jpg", CLASSES[c], f"{i:064x}", 640, 480, 1000 + i, MODEL, v))
    return out


def answers(where, queries: np.ndarray, *, exact: bool) -> dict[tuple[int, str], list[tuple[int, str, float]]]:
    """Every mode's top 5 for each query (class bedroom for the class modes): (id, path, distance) each."""
    return {(q, mode): [(m.id, m.path, round(m.distance, 5))
                        for m in search.run(where, queries[q], mode, k=5, cls="bedroom", skip_sha=None, exact=exact)]
            for q in range(len(queries)) for mode in MODES}


def queries(n: int = 4) -> np.ndarray:
    return np.abs(np.random.default_rng(7).standard_normal((n, 2048))).astype(np.float32)


def stored(url: str, n: int) -> Store:
    upgrade(url)
    store = Store(url)
    data = rows(n)
    for i in range(0, n, 500):
        store.upsert(data[i:i + 500])
    return store


def shard_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]


def test_shards_added_to_a_library_take_its_rows_and_answer_exactly_as_it_did(cluster):
    coordinator, shard_urls = cluster
    store = stored(coordinator, 1_200)
    before = answers(store, queries(), exact=True)
    store.close()

    with Imsearch(coordinator) as app:
        relaid = app.add_shards(shard_urls)
        assert relaid.moved == 1_200
        assert sorted((s.modulus, s.remainder) for s in relaid.shards) == [(2, 0), (2, 1)]
        assert [shard_rows(u) for u in shard_urls] == [s.rows for s in relaid.shards]
        assert all(s.rows > 400 for s in relaid.shards)  # the hash of path splits them about evenly
        store = app.store
        assert store.sharded
        assert answers(store, queries(), exact=True) == before
        # through each shard's own index, re-ranked: at this size every answer is the exact one
        assert answers(store, queries(), exact=False) == before
        count, ids, paths = store.conn.execute(
            "SELECT count(*), count(DISTINCT id), count(DISTINCT path) FROM images").fetchone()
        assert count == ids == paths == 1_200
        # the views BI tools read work on the coordinator as before
        assert sum(n for _, n, *_ in store.conn.execute("SELECT * FROM class_summary").fetchall()) == 1_200


def test_rows_written_through_the_coordinator_land_on_their_shard_once(cluster):
    coordinator, shard_urls = cluster
    upgrade(coordinator)
    with Imsearch(coordinator) as app:
        app.add_shards(shard_urls)
        store = app.store
        assert store.upsert(rows(300)) == (300, 0)
        assert store.upsert(rows(300, seed=1)) == (0, 300)  # the same paths: updated where they are
        assert sum(shard_rows(u) for u in shard_urls) == 300
        for url, shard in zip(shard_urls, sorted(app.shards(), key=lambda s: s.server)):
            with psycopg.connect(url) as conn:  # each shard holds the paths of its own hash partition only
                paths = [p for (p,) in conn.execute("SELECT path FROM images")]
            with psycopg.connect(coordinator) as conn:
                inside = conn.execute("SELECT count(*) FROM unnest(%s::text[]) p "
                                      "WHERE satisfies_hash_partition('images'::regclass, %s, %s, p)",
                                      (paths, shard.modulus, shard.remainder)).fetchone()[0]
            assert inside == len(paths) > 0
        first = store.conn.execute("SELECT id FROM images WHERE path = %s", (rows(1)[0].path,)).fetchone()[0]
        store.move(first, "/library/kitchen/moved.jpg", "kitchen")  # a new path may hash to the other shard
        assert store.conn.execute("SELECT id FROM images WHERE path = '/library/kitchen/moved.jpg'").fetchone() == (
            first,)
        assert store.copy_row(first, "/library/kitchen/copy.jpg", "kitchen")
        assert not store.copy_row(first, "/library/kitchen/copy.jpg", "kitchen")
        assert store.count() == 301 and sum(shard_rows(u) for u in shard_urls) == 301
        with pytest.raises(ImsearchError, match="runs where the rows are"):
            app.audit()


def test_a_third_shard_takes_half_of_one_and_removing_one_gives_its_rows_back(cluster, servers):
    coordinator, shard_urls = cluster
    store = stored(coordinator, 900)
    before = answers(store, queries(2), exact=True)
    store.close()
    with contextlib.ExitStack() as stack:
        third = stack.enter_context(scratch_database(servers[1], f"imsearch_third_{os.getpid()}_{next(_counter)}"))
        with Imsearch(coordinator) as app:
            app.add_shards(shard_urls)
            relaid = app.add_shards([third])
            assert sorted((s.modulus, s.remainder) for s in relaid.shards) == [(2, 1), (4, 0), (4, 2)]
            assert 0 < relaid.moved < 450 and shard_rows(third) == relaid.moved
            assert answers(app.store, queries(2), exact=True) == before
            with pytest.raises(ImsearchError, match="shard of this library already"):
                app.add_shards([third])

            relaid = app.remove_shard(third)  # back into the shard it was split from
            assert sorted((s.modulus, s.remainder) for s in relaid.shards) == [(2, 0), (2, 1)]
            assert sum(s.rows for s in relaid.shards) == 900 and shard_rows(third) == 0
            assert answers(app.store, queries(2), exact=True) == before
            app.remove_shard(shard_urls[0])
            with pytest.raises(ImsearchError, match="last shard"):
                app.remove_shard(shard_urls[1])
            assert shard_rows(shard_urls[1]) == 900
            assert answers(app.store, queries(2), exact=True) == before


def test_a_shard_that_holds_rows_is_refused(cluster):
    coordinator, shard_urls = cluster
    stored(shard_urls[0], 10).close()
    upgrade(coordinator)
    with Imsearch(coordinator) as app, pytest.raises(ImsearchError, match="holds 10 image"):
        app.add_shards(shard_urls)
    assert not shards.sharded(Store(coordinator).conn)


def test_a_shard_that_is_down_fails_the_search_naming_it_or_is_left_out_when_partial_answers_are_allowed(
        cluster):
    from imsearch.db.errors import translated

    coordinator, shard_urls = cluster
    with embedded.temporary() as spare:
        stored(coordinator, 600).close()
        with Imsearch(coordinator) as app:
            app.add_shards([shard_urls[0], spare])
            host = psycopg.conninfo.conninfo_to_dict(spare)["host"]
            down = next(s for s in app.shards() if host in s.url)
            assert len(search.run(app.store, queries(1)[0], "all", k=5, cls=None, skip_sha=None)) == 5
    # the spare shard's server is stopped now
    with Imsearch(coordinator) as app:
        store = app.store
        with pytest.raises(DatabaseUnavailable, match=f"shard {down.server} .*{host}.* is unavailable"):
            with translated("searching", store):
                search.run(store, queries(1)[0], "all", k=5, cls=None, skip_sha=None)
        warnings: list[str] = []
        store.conn.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
        store.conn.execute("SET imsearch.partial = on")
        partial = search.run(store, queries(1)[0], "all", k=5, cls=None, skip_sha=None)
        assert len(partial) == 5 and all(shard_rows(shard_urls[0]) for _ in partial)
        assert any(w.startswith(f"partial answer: shard {down.server}") for w in warnings)


def test_ingest_and_find_on_a_sharded_library_give_what_one_server_gives(cluster, weights, tmp_path, server_url):
    from click.testing import CliRunner

    from imsearch.cli import cli

    coordinator, shard_urls = cluster
    photos = copy_photos(tmp_path / "photos", 3)
    query = next((tmp_path / "photos" / "kitchen").glob("*.jpg"))

    def invoke(url: str, *args: str):
        result = CliRunner().invoke(cli, ["--database-url", url, *args], env={"IMSEARCH_WEIGHTS": weights},
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    added = json.loads(invoke(coordinator, "db", "shard", "add", *shard_urls, "--json"))
    assert [s["rows"] for s in added["shards"]] == [0, 0] and added["moved"] == 0
    with scratch_database(server_url, f"imsearch_one_{os.getpid()}_{next(_counter)}") as one:
        found = {}
        for url in (coordinator, one):
            summary = json.loads(invoke(url, "ingest", str(photos), "--json"))
            assert summary["added"] == 15 and summary["failed"] == []
            assert json.loads(invoke(url, "ingest", str(photos), "--json"))["skipped"] == 15
            found[url] = [[(m["path"], round(m["distance"], 4)) for m in r["matches"]]
                          for flag in ((), ("--same-class",), ("--exclude-class",))
                          for r in json.loads(invoke(url, "find", str(query), "--json", *flag))]
        assert found[coordinator] == found[one]
    listed = json.loads(invoke(coordinator, "db", "shard", "list", "--json"))
    assert sum(s["rows"] for s in listed) == 15
    assert "imsearch_shard_1" in invoke(coordinator, "db", "shard", "list")


def test_db_upgrade_on_the_coordinator_migrates_every_shard(cluster):
    from imsearch.db.migrate import SCHEMA_REVISION

    coordinator, shard_urls = cluster
    upgrade(coordinator)
    with Imsearch(coordinator) as app:
        app.add_shards(shard_urls)
    with psycopg.connect(shard_urls[1], autocommit=True) as conn:  # as if this shard had missed a release
        conn.execute("DROP FUNCTION imsearch_shard_search(halfvec, integer, text, text, text, double precision, "
                     "boolean)")
        conn.execute("UPDATE alembic_version SET version_num = '0013'")
        conn.execute("ALTER TABLE images ALTER COLUMN id SET GENERATED ALWAYS")
    with Imsearch(coordinator) as app:
        assert app.upgrade().revision == SCHEMA_REVISION
    with psycopg.connect(shard_urls[1]) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (SCHEMA_REVISION,)


def test_a_reader_of_the_coordinator_searches_every_shard_but_cannot_open_connections_of_its_own(cluster):
    from imsearch.db.connect import connect

    coordinator, shard_urls = cluster
    stored(coordinator, 300).close()
    with Imsearch(coordinator) as app:
        app.add_shards(shard_urls)
        reader = app.grant_reader("bi_shards", "secret-pass")
    url = psycopg.conninfo.make_conninfo(coordinator, user=reader.name, password="secret-pass")
    conn = connect(url)
    try:
        got = conn.execute("SELECT count(*) FROM imsearch_nearest((SELECT min(id) FROM image_catalog), 5)").fetchone()
        assert got == (5,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT imsearch_dblink.dblink_connect('x', 'imsearch_shard_1')")
        with pytest.raises(psycopg.Error):
            conn.execute("DELETE FROM images")
    finally:
        conn.close()


def test_a_union_of_per_shard_limits_runs_as_async_foreign_scans_with_the_limit_pushed_down(cluster):
    from pgvector import HalfVector

    coordinator, shard_urls = cluster
    stored(coordinator, 200).close()
    with Imsearch(coordinator) as app:
        app.add_shards(shard_urls)
        parts = [s.server.replace(shards.SERVER_PREFIX, shards.PARTITION_PREFIX) for s in app.shards()]
        union = " UNION ALL ".join(f"(SELECT id, embedding <=> %(q)s AS d FROM {p} ORDER BY 2 LIMIT 5)" for p in parts)
        plan = "\n".join(r[0] for r in app.store.conn.execute(
            f"EXPLAIN (VERBOSE, COSTS OFF) SELECT * FROM ({union} OFFSET 0) u ORDER BY d LIMIT 5",
            {"q": HalfVector(queries(1)[0])}).fetchall())
    assert plan.count("Async Foreign Scan") == 2
    assert plan.count("LIMIT 5::bigint") == 2 and "<=>" in plan
