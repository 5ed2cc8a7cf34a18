"""Plain SQL for BI tools: the functions and views of migration 0002, the read-only role, duplicates."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from click.testing import CliRunner
from PIL import Image

from imsearch import ImsearchError
from imsearch.cli import cli
from imsearch.db.indexes import ensure_class_indexes
from imsearch.db.sqlaccess import (
    READER_FUNCTIONS,
    READER_VIEWS,
    grant_reader,
)
from imsearch.search import CLASS_INDEX_PREFIX
from tests.conftest import shared_library

_roles = itertools.count()


@pytest.fixture(scope="module")
def shared(server_url, weights, tmp_path_factory):
    with shared_library(server_url, weights, tmp_path_factory, "sql") as library:
        yield library


@pytest.fixture
def conn(shared):
    with psycopg.connect(shared[2], autocommit=True) as c:
        yield c


def ids_by_path(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT path, id FROM images").fetchall())


def hnsw_scans(conn: psycopg.Connection, pattern: str = "images_fold_hnsw%") -> int:
    """How often the HNSW indexes named like `pattern` were scanned (this backend's counts flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return conn.execute("SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes WHERE indexrelname LIKE %s",
                        (pattern,)).fetchone()[0]


@pytest.fixture
def reader_role(shared):
    """A fresh role name; the role and its grants are dropped afterwards (roles belong to the whole server)."""
    name = f"imsearch_test_reader_{os.getpid()}_{next(_roles)}"
    yield name
    with psycopg.connect(shared[2], autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            c.execute(f'DROP OWNED BY "{name}"')
            c.execute(f'DROP ROLE "{name}"')


def as_role(url: str, name: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{name}:{password}@{host}", parts.path, parts.query, parts.fragment))


def test_nearest_equals_find_in_every_mode(shared, conn):
    app, photos, _ = shared
    ids = ids_by_path(conn)
    queries = [sorted(photos.glob(f"{cls}/*.jpg"))[i] for i, cls in enumerate(["kitchen", "bedroom", "bathroom"])]
    for mode in ("all", "same", "other"):
        for query, result in zip(queries, app.find(queries, mode)):
            rows = conn.execute("SELECT rank, id, path, class, distance FROM imsearch_nearest(%s, 5, %s)",
                                (ids[str(query.resolve())], mode)).fetchall()
            assert [r[0] for r in rows] == list(range(1, len(result.matches) + 1))
            assert len(rows) == (3 if mode == "same" else 5)  # the image itself is left out
            assert [(r[1], r[2], r[3]) for r in rows] == [(m.id, m.path, m.cls) for m in result.matches], mode
            assert [r[4] for r in rows] == pytest.approx([m.distance for m in result.matches], abs=1e-4)
            assert str(query.resolve()) not in [r[2] for r in rows]


def drop_class_indexes(conn: psycopg.Connection) -> None:
    for (index,) in conn.execute("SELECT indexname FROM pg_indexes WHERE starts_with(indexname, %s)",
                                 (CLASS_INDEX_PREFIX,)).fetchall():
        conn.execute(f'DROP INDEX "{index}"')


def test_nearest_equals_find_through_the_class_indexes(shared, conn, exact_max_rows, monkeypatch):
    """Past the exact-scan size, find searches a class with an index of its own through it in mode same, and each
    of the four other classes through its own in mode other; so does the function, with as many index scans."""
    app, photos, _ = shared
    exact_max_rows(0, conn, app.store.conn)
    assert ensure_class_indexes(app.store, 0) == sorted(c for c, _ in app.classes())
    try:
        ids = ids_by_path(conn)
        queries = [sorted(photos.glob(f"{cls}/*.jpg"))[0] for cls in ("dining_room", "living_room")]
        for mode, pattern, per_query in (("same", CLASS_INDEX_PREFIX + "%", 1), ("other", CLASS_INDEX_PREFIX + "%", 4)):
            results = app.find(queries, mode)
            app.store.conn.execute("SELECT pg_stat_force_next_flush()")  # find's own scans counted before ours
            before, others = hnsw_scans(conn, pattern), hnsw_scans(conn)
            for query, result in zip(queries, results):
                rows = conn.execute("SELECT id, distance FROM imsearch_nearest(%s, 5, %s)",
                                    (ids[str(query.resolve())], mode)).fetchall()
                assert [r[0] for r in rows] == [m.id for m in result.matches], mode
                assert [r[1] for r in rows] == pytest.approx([m.distance for m in result.matches], abs=1e-4)
            assert hnsw_scans(conn, pattern) - before == 2 * per_query, mode
            assert hnsw_scans(conn) - others == 2 * per_query, mode
    finally:
        drop_class_indexes(conn)


def test_the_sql_functions_search_through_finds_own_planner(conn):
    """imsearch_nearest and imsearch_class_correspondence call imsearch_search, as find does, and plan nothing."""
    for function in READER_FUNCTIONS[:2]:
        definition = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)", (function,)).fetchone()[0]
        assert "imsearch_search(" in definition, function
        assert not any(word in definition for word in ("<=>", "hnsw", "set_config", "enable_")), function


def test_nearest_defaults_to_five_in_mode_all_and_takes_k(conn):
    some_id = conn.execute("SELECT min(id) FROM images").fetchone()[0]
    assert len(conn.execute("SELECT * FROM imsearch_nearest(%s)", (some_id,)).fetchall()) == 5
    assert len(conn.execute("SELECT * FROM imsearch_nearest(%s, 19)", (some_id,)).fetchall()) == 19
    assert len(conn.execute("SELECT * FROM imsearch_nearest(%s, 10, 'same')", (some_id,)).fetchall()) == 3


def test_nearest_says_what_is_wrong(conn):
    some_id = conn.execute("SELECT min(id) FROM images").fetchone()[0]
    with pytest.raises(psycopg.errors.NoDataFound, match="no stored image has id -1"):
        conn.execute("SELECT * FROM imsearch_nearest(-1)")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown mode 'near'"):
        conn.execute("SELECT * FROM imsearch_nearest(%s, 5, 'near')", (some_id,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="k must be between 1 and 1000"):
        conn.execute("SELECT * FROM imsearch_nearest(%s, 0)", (some_id,))


def test_functions_scan_the_hnsw_index_where_find_does(conn):
    """Mode all scans the index; a filtered mode scans exactly up to imsearch.exact_max_rows, then the index.

    At 20 rows, at the test server's default settings, the planner would rather scan the table: the functions
    turn sequential scans off for their own duration, as find does for its query (migration 0007).
    """
    some_id = conn.execute("SELECT min(id) FROM images WHERE class = 'kitchen'").fetchone()[0]

    def scans(sql: str, *params: object) -> int:
        before = hnsw_scans(conn)
        conn.execute(sql, params).fetchall()
        return hnsw_scans(conn) - before

    assert scans("SELECT * FROM imsearch_nearest(%s, 5, 'all')", some_id) == 1
    assert scans("SELECT * FROM imsearch_nearest(%s, 5, 'other')", some_id) == 0  # 16 rows: exact, as find
    exact = conn.execute("SELECT id, distance FROM imsearch_nearest(%s, 5, 'other')", (some_id,)).fetchall()
    conn.execute("SET imsearch.exact_max_rows = 0")  # no class index: the whole-table index, iteratively
    assert scans("SELECT * FROM imsearch_nearest(%s, 5, 'other')", some_id) == 1
    assert conn.execute("SELECT id, distance FROM imsearch_nearest(%s, 5, 'other')", (some_id,)).fetchall() == exact
    assert scans("SELECT * FROM imsearch_class_correspondence(5)") == 20
    assert scans("SELECT * FROM imsearch_duplicate_pairs(0.01)") == 20
    # The functions' own settings end with them.
    settings = conn.execute("SELECT current_setting('enable_indexscan'), current_setting('enable_sort'), "
                            "current_setting('hnsw.ef_search'), current_setting('hnsw.iterative_scan'), "
                            "current_setting('enable_seqscan')").fetchone()
    assert settings == ("on", "on", "40", "off", "on")


def test_class_correspondence_counts_where_find_puts_each_class(shared, conn):
    app, photos, _ = shared
    counts: Counter[tuple[str, str]] = Counter()
    for result in app.find(sorted(photos.glob("*/*.jpg")), "other"):
        counts.update((result.query_class, m.cls) for m in result.matches)
    rows = conn.execute("SELECT class, match_class, matches, share FROM imsearch_class_correspondence()").fetchall()
    assert {(r[0], r[1]): r[2] for r in rows} == dict(counts)
    for cls in {r[0] for r in rows}:
        assert sum(r[3] for r in rows if r[0] == cls) == pytest.approx(1.0)
        assert all(r[1] != cls for r in rows if r[0] == cls)
    assert conn.execute("SELECT * FROM class_correspondence").fetchall() == rows
    confusion = conn.execute("SELECT class, match_class, matches FROM imsearch_class_correspondence(3, 'all')")
    assert sum(r[2] for r in confusion.fetchall()) == 20 * 3


def test_views_show_images_without_vectors_and_class_shares(shared, conn):
    photos = shared[1]
    catalog = conn.execute("SELECT * FROM image_catalog ORDER BY path")
    assert [d.name for d in catalog.description] == ["id", "path", "class", "bytes", "width", "height",
                                                     "ingested_at"]
    rows = catalog.fetchall()
    first = sorted(photos.glob("*/*.jpg"))[0]
    assert len(rows) == 20
    assert rows[0][1:4] == (str(first.resolve()), first.parent.name, first.stat().st_size)
    with Image.open(first) as im:
        assert rows[0][4:6] == im.size
    summary = conn.execute("SELECT class, images, share FROM class_summary ORDER BY class").fetchall()
    assert summary == [(cls, 4, pytest.approx(0.2)) for cls in sorted(p.name for p in photos.iterdir())]


def test_reader_reads_views_and_functions_and_cannot_write(shared, reader_role):
    app, _, url = shared
    reader = grant_reader(app.store.conn, reader_role, "s3cret-pass")
    assert reader.created and reader.password is None
    with psycopg.connect(as_role(url, reader_role, "s3cret-pass"), autocommit=True) as c:
        assert c.execute("SELECT current_user").fetchone() == (reader_role,)
        assert c.execute("SELECT count(*) FROM image_catalog").fetchone() == (20,)
        assert len(c.execute("SELECT * FROM class_summary").fetchall()) == 5
        assert len(c.execute("SELECT * FROM class_correspondence").fetchall()) == 20
        some_id = c.execute("SELECT min(id) FROM image_catalog").fetchone()[0]
        assert len(c.execute("SELECT * FROM imsearch_nearest(%s, 3, 'other')", (some_id,)).fetchall()) == 3
        c.execute("SELECT * FROM imsearch_duplicate_pairs(0.01)").fetchall()
        writes = [
            "INSERT INTO images (path, sha256, width, height, bytes, model, embedding) "
            "SELECT path || 'x', sha256, width, height, bytes, model, embedding FROM images LIMIT 1",
            "UPDATE images SET class = 'x'",
            "DELETE FROM images",
            "CREATE TABLE stolen (id int)",
            "INSERT INTO image_catalog (path) VALUES ('x')",
            "DELETE FROM image_catalog",
            "DROP VIEW class_summary",
        ]
        denied = (psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege)
        for sql in writes:  # every transaction of the role starts read-only
            with pytest.raises(denied):
                c.execute(sql)
        c.execute("SET default_transaction_read_only = off")  # the role may lift that; its privileges still hold
        for sql in writes:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(sql)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT embedding FROM images LIMIT 1")
    assert app.store.count() == 20


def test_grant_reader_updates_a_role_and_refuses_a_superuser(shared, reader_role):
    app = shared[0]
    first = grant_reader(app.store.conn, reader_role)
    assert first.created and first.password and len(first.password) >= 20
    conn = app.store.conn
    hashed = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (reader_role,)).fetchone()[0]
    assert hashed.startswith("SCRAM-SHA-256$") and first.password not in hashed
    again = grant_reader(app.store.conn, reader_role, "another-one")
    assert not again.created and again.password is None
    assert conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (reader_role,)).fetchone()[0] != hashed
    grants = conn.execute(
        "SELECT has_table_privilege(%(r)s, 'image_catalog', 'SELECT'), "
        "has_function_privilege(%(r)s, %(f)s, 'EXECUTE'), "
        "has_table_privilege(%(r)s, 'images', 'SELECT')", {"r": reader_role, "f": READER_FUNCTIONS[0]}).fetchone()
    assert grants == (True, True, False)
    me = conn.execute("SELECT current_user").fetchone()[0]
    with pytest.raises(ImsearchError, match="is the role imsearch connects as"):
        grant_reader(app.store.conn, me)
    with pytest.raises(ImsearchError, match="not a usable role name"):
        grant_reader(app.store.conn, "Robert'); DROP TABLE images;--")


def test_grant_reader_command_prints_a_new_password_once(shared, reader_role):
    url = shared[2]
    runner = CliRunner()
    result = runner.invoke(cli, ["--database-url", url, "db", "grant-reader", reader_role], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"created read-only role {reader_role} on database ")
    assert "password: " in result.stdout
    given = runner.invoke(cli, ["--database-url", url, "db", "grant-reader", reader_role],
                          env={"IMSEARCH_READER_PASSWORD": "from-the-env"}, catch_exceptions=False)
    assert given.stdout.startswith(f"updated read-only role {reader_role}") and "password" not in given.stdout


def test_reader_objects_are_the_ones_the_migration_made(conn):
    views = {r[0] for r in conn.execute("SELECT viewname FROM pg_views WHERE schemaname = 'public'")}
    assert views == set(READER_VIEWS)
    for signature in READER_FUNCTIONS:
        row = conn.execute("SELECT has_function_privilege('public', to_regprocedure(%s), 'EXECUTE')",
                           (signature,)).fetchone()
        assert row == (False,), signature  # the function exists, and only granted roles may call it


def test_duplicates_finds_a_copy_and_a_reencode_and_nothing_else(app, photos, database_url, weights):
    copied = sorted(photos.glob("kitchen/*.jpg"))[0]
    shutil.copy2(copied, photos / "living_room" / "copied.jpg")
    reencoded = sorted(photos.glob("bedroom/*.jpg"))[1]
    with Image.open(reencoded) as im:
        im.convert("RGB").save(photos / "bedroom" / "reencoded.jpg", "JPEG", quality=75)
    assert app.ingest(photos).added == 22
    groups, used = app.duplicates()
    expected = [
        [str(reencoded.resolve()), str((photos / "bedroom" / "reencoded.jpg").resolve())],
        [str(copied.resolve()), str((photos / "living_room" / "copied.jpg").resolve())],
    ]
    assert [[i.path for i in g.images] for g in groups] == [sorted(e) for e in expected]
    byte_copy = groups[1]
    assert [i.nearest for i in byte_copy.images] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert used.sample > 0 and used.bits < used.hash_neighbour_bits_p05  # calibrated on the stored photos

    runner = CliRunner()
    base = ["--database-url", database_url, "duplicates", "--weights", weights]
    result = runner.invoke(cli, base, catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].split() == ["group", "id", "class", "nearest", "path"]
    assert f"2 group(s) of duplicates, 4 image(s); {used.verdict()}" in result.stdout
    printed = json.loads(runner.invoke(cli, [*base, "--json"], catch_exceptions=False).stdout)
    assert [[i["path"] for i in g["images"]] for g in printed] == [sorted(e) for e in expected]
    assert [g["group"] for g in printed] == [1, 2]
    assert runner.invoke(cli, [*base, "--threshold", "2"]).exit_code == 2


def test_neighbours_gives_each_stored_images_nearest_others_through_the_whole_table_index(conn):
    """imsearch_neighbours, the planner's entry for stored images (the audit, the calibration and
    imsearch_duplicate_pairs call it): at 20 rows the index finds what an exact scan does, one index scan per image,
    the image itself left out."""
    exact: dict[int, list[tuple[int, float]]] = {}
    for a, b, d in conn.execute("SELECT a.id, b.id, a.embedding <=> b.embedding FROM images a JOIN images b "
                                "ON a.id <> b.id ORDER BY 3, 2").fetchall():
        exact.setdefault(a, []).append((b, d))
    before = hnsw_scans(conn)
    found = conn.execute("SELECT id, neighbour_id, distance FROM imsearch_neighbours(NULL, 3)").fetchall()
    assert hnsw_scans(conn) - before == 20
    got: dict[int, list[tuple[int, float]]] = {}
    for a, b, d in sorted(found, key=lambda r: (r[0], r[2], r[1])):
        got.setdefault(a, []).append((b, d))
    assert set(got) == set(exact)
    for a, nearest in got.items():
        assert [b for b, _ in nearest] == [b for b, _ in exact[a][:3]], a
        assert [d for _, d in nearest] == pytest.approx([d for _, d in exact[a][:3]], abs=1e-6)
    some = sorted(exact)[:2]
    assert {r[0] for r in conn.execute("SELECT * FROM imsearch_neighbours(%s, 2)", (some,)).fetchall()} == set(some)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="k must be between 1 and 1000, not 0"):
        conn.execute("SELECT * FROM imsearch_neighbours(NULL, 0)")
    # the pairs imsearch_duplicate_pairs returns are those neighbours within the distance
    limit = sorted(d for nearest in exact.values() for _, d in nearest)[10]
    pairs = {(min(a, b), max(a, b)) for a, nearest in got.items() for b, d in nearest if d <= limit}
    assert {(r[0], r[1]) for r in conn.execute("SELECT * FROM imsearch_duplicate_pairs(%s, 3)",
                                               (limit,)).fetchall()} == pairs
    settings = conn.execute("SELECT current_setting('hnsw.ef_search'), current_setting('enable_seqscan')").fetchone()
    assert settings == ("40", "on")
