"""`find --max-distance D|duplicate`: matches beyond a cosine distance dropped after ranking, in the CLI, the
library, the web API and SQL's imsearch_nearest (migration 0010), with the name resolved from the calibration."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from imsearch import ImsearchError, search
from imsearch.audit.calibration import DUPLICATE, NotCalibrated
from imsearch.cli import cli
from imsearch.db.indexes import ensure_class_indexes
from imsearch.db.migrate import migrations_folder
from imsearch.db.sqlaccess import grant_reader
from imsearch.db.store import Store
from imsearch.web import create_app
from tests.conftest import shared_library

MODES = ("all", "same", "other")
NEAREST = "imsearch_nearest(bigint, integer, text, double precision)"
SEARCH = "imsearch_search(halfvec, integer, text, text, text, double precision, boolean)"
_roles = itertools.count()


@pytest.fixture(scope="module")
def shared(server_url, weights, tmp_path_factory):
    with shared_library(server_url, weights, tmp_path_factory, "maxdist") as library:
        yield library


@pytest.fixture
def conn(shared):
    with psycopg.connect(shared[2], autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def client(shared):
    with TestClient(create_app(shared[0]), base_url="http://localhost") as c:
        yield c


def find(url: str, weights: str, *args: str):
    return CliRunner().invoke(cli, ["--database-url", url, "find", *args, "--device", "cpu"],
                              env={"IMSEARCH_WEIGHTS": weights}, catch_exceptions=False)


def find_json(url: str, weights: str, *args: str) -> list[dict]:
    result = find(url, weights, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def query(photos: Path, cls: str = "kitchen", i: int = 0) -> Path:
    return sorted(photos.glob(f"{cls}/*.jpg"))[i]


def between(distances: list[float], n: int) -> float:
    """A limit halfway between the n-th and the (n+1)-th distance: keeps exactly the first n."""
    assert distances[n - 1] < distances[n], "ties at the cut: pick another query"
    return (distances[n - 1] + distances[n]) / 2


def nearest(conn: psycopg.Connection, image_id: int, k: int, mode: str, limit: float | None) -> list[tuple]:
    return conn.execute("SELECT rank, id, class, distance FROM imsearch_nearest(%s, %s, %s, %s)",
                        (image_id, k, mode, limit)).fetchall()


def image_id(conn: psycopg.Connection, path: Path) -> int:
    return conn.execute("SELECT id FROM images WHERE path = %s", (str(path.resolve()),)).fetchone()[0]


@pytest.fixture
def calibrated(shared, conn):
    """A model_calibration row for the stored model, as `imsearch calibrate` would write it; deleted afterwards."""
    model = conn.execute("SELECT DISTINCT model FROM images").fetchone()[0]

    def calibrate(distance: float | None, override: float | None = None) -> str:
        conn.execute(
            "INSERT INTO model_calibration (model, sample, copy_distance_p95, neighbour_distance_p05, "
            "duplicate_distance, hash_bits, override_distance) VALUES (%s, 10, 0.004, 0.017, %s, 8, %s) "
            "ON CONFLICT (model) DO UPDATE SET duplicate_distance = excluded.duplicate_distance, "
            "override_distance = excluded.override_distance",
            (model, distance, override),
        )
        return model

    yield calibrate
    conn.execute("DELETE FROM model_calibration")


def test_find_drops_exactly_the_matches_beyond_the_distance(shared, weights):
    app, photos, url = shared
    q = str(query(photos))
    [everything] = find_json(url, weights, q, "-k", "10")
    distances = [m.distance for m in app.find(q, k=10)[0].matches]
    for keep in (0, 3, 9):
        limit = between(distances, keep) if keep else distances[0] / 2
        [within] = find_json(url, weights, q, "-k", "10", "--max-distance", repr(limit))
        assert within == {**everything, "matches": everything["matches"][:keep]}, keep
    # a match exactly at the limit stays (<=), as in SQL
    [at] = app.find(q, k=10, max_distance=distances[2])
    assert [m.distance for m in at.matches] == distances[:3] and [m.rank for m in at.matches] == [1, 2, 3]
    table = find(url, weights, q, "-k", "10", "--max-distance", repr(between(distances, 3)))
    assert table.exit_code == 0
    assert f"{q}: only 3 stored image(s) match mode all within --max-distance" in table.stderr


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("-1", "-1.0"), ("2", "2.0"), ("inf", "inf"),
                                          ("nonsense", "'nonsense'")])
def test_a_limit_that_is_no_cosine_distance_is_one_line_naming_it(shared, weights, value, shown):
    app, photos, url = shared
    result = find(url, weights, str(query(photos)), "--max-distance", value)
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("Error: max_distance must be a cosine distance") and line.endswith(f"not {shown}")
    with pytest.raises(ImsearchError, match=f"^max_distance must be a cosine distance.*not {shown}$"):
        app.find(query(photos), max_distance=value)


def test_nearest_with_max_distance_equals_find_in_every_mode(shared, conn, weights):
    app, photos, url = shared
    for mode, q in zip(MODES, (query(photos, "kitchen"), query(photos, "bedroom", 1), query(photos, "bathroom", 2))):
        unlimited = nearest(conn, image_id(conn, q), 5, mode, None)
        limit = between([r[3] for r in unlimited], 2)
        rows = nearest(conn, image_id(conn, q), 5, mode, limit)
        assert rows == unlimited[:2], mode
        [found] = find_json(url, weights, str(q), "--mode", mode, "--max-distance", repr(limit))
        assert [(r[0], r[1], r[2]) for r in rows] == [(m["rank"], m["id"], m["class"]) for m in found["matches"]]
        assert [r[3] for r in rows] == pytest.approx([m["distance"] for m in found["matches"]], abs=1e-6)


def test_every_plan_of_nearest_drops_the_same_tail(shared, conn, exact_max_rows, monkeypatch):
    """The function has a query per plan (exact, whole-table index, whole-table index with a filter, class index,
    and exact again while the whole-table index is down); each keeps the k nearest less those beyond
    max_distance."""
    app, photos, _ = shared
    ids = [image_id(conn, query(photos, cls)) for cls in ("dining_room", "living_room")]

    def check() -> None:
        for mode in MODES:
            for i in ids:
                unlimited = nearest(conn, i, 5, mode, None)
                limit = between([r[3] for r in unlimited], 2)
                assert nearest(conn, i, 5, mode, limit) == unlimited[:2], mode
                assert nearest(conn, i, 5, mode, 0) == [], mode

    check()  # 4 rows a class: exact
    exact_max_rows(0, conn, app.store.conn)
    check()  # no class index: the whole-table index, iteratively
    assert ensure_class_indexes(app.store, 0)
    try:
        check()  # mode same through the class's index, mode other through the other classes' indexes
        conn.execute(f"DROP INDEX {search.WHOLE_INDEX}")
        check()  # mode all exactly while the whole-table index is down
    finally:
        conn.execute("SELECT imsearch_index_all()")
        for (index,) in conn.execute("SELECT indexname FROM pg_indexes WHERE starts_with(indexname, %s)",
                                     (search.CLASS_INDEX_PREFIX,)).fetchall():
            conn.execute(f'DROP INDEX "{index}"')


def test_nearest_refuses_a_max_distance_that_is_no_cosine_distance(shared, conn):
    some_id = conn.execute("SELECT min(id) FROM images").fetchone()[0]
    for value, shown in (("NaN", "NaN"), (-1, "-1"), (2, "2")):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
            conn.execute("SELECT * FROM imsearch_nearest(%s, 5, 'all', %s::double precision)", (some_id, value))
        assert refused.value.diag.message_primary == ("max_distance must be a cosine distance, at least 0 and "
                                                      f"below 2, or NULL, not {shown}")
    assert nearest(conn, some_id, 5, "all", None) == conn.execute(
        "SELECT rank, id, class, distance FROM imsearch_nearest(%s)", (some_id,)).fetchall()


def test_duplicate_without_a_calibration_is_a_one_line_error(shared, conn, weights):
    app, photos, url = shared
    result = find(url, weights, str(query(photos)), "--max-distance", DUPLICATE)
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("Error: no duplicate distance is calibrated for model ") and "imsearch calibrate" in line
    assert conn.execute("SELECT imsearch_duplicate_distance()").fetchone()[0] is None


def test_duplicate_is_the_calibrated_distance_and_the_override_wins(shared, conn, weights, calibrated):
    app, photos, url = shared
    q = query(photos)
    qid = image_id(conn, q)
    distances = [r[3] for r in nearest(conn, qid, 5, "all", None)]
    calibrated(between(distances, 1))
    assert app.max_distance(DUPLICATE) == between(distances, 1)
    assert conn.execute("SELECT imsearch_duplicate_distance()").fetchone()[0] == between(distances, 1)
    [found] = find_json(url, weights, str(q), "--max-distance", DUPLICATE)
    assert [m["id"] for m in found["matches"]] == [r[1] for r in nearest(conn, qid, 5, "all", None)[:1]]

    calibrated(between(distances, 1), override=between(distances, 3))
    assert app.max_distance(DUPLICATE) == between(distances, 3)
    [found] = find_json(url, weights, str(q), "--max-distance", DUPLICATE)
    in_sql = conn.execute("SELECT id FROM imsearch_nearest(%s, 5, 'all', imsearch_duplicate_distance())",
                          (qid,)).fetchall()
    assert [m["id"] for m in found["matches"]] == [r[0] for r in in_sql] and len(in_sql) == 3

    calibrated(None)  # copies and neighbours overlap: no distance to give
    with pytest.raises(NotCalibrated, match="cannot tell a copy from a neighbour"):
        app.max_distance(DUPLICATE)
    assert conn.execute("SELECT imsearch_duplicate_distance()").fetchone()[0] is None


def test_duplicate_distance_is_null_while_rows_of_two_models_are_stored(shared, conn, calibrated):
    calibrated(0.01)
    with conn.transaction():  # rolled back at the end
        conn.execute("INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding) "
                     "SELECT '/elsewhere.jpg', class, sha256, width, height, bytes, 'another', embedding "
                     "FROM images LIMIT 1")
        assert conn.execute("SELECT imsearch_duplicate_distance()").fetchone()[0] is None
        raise psycopg.Rollback()
    assert conn.execute("SELECT imsearch_duplicate_distance()").fetchone()[0] == 0.01


def test_web_api_takes_max_distance_and_refuses_what_is_no_distance(shared, client, calibrated):
    app, photos, _ = shared
    data = query(photos, "living_room").read_bytes()

    def post(**form: str):
        return client.post("/api/find", files={"file": ("q.jpg", data, "image/jpeg")}, data=form)

    [everything] = post(k="10").json()
    limit = between([m["distance"] for m in everything["matches"]], 4)
    response = post(k="10", max_distance=repr(limit))
    assert response.status_code == 200, response.text
    assert response.json()[0]["matches"] == everything["matches"][:4]
    assert post(k="10", max_distance="").json()[0]["matches"] == everything["matches"]
    for value in ("NaN", "-1", "nonsense", DUPLICATE):
        response = post(max_distance=value)
        assert response.status_code == 400, (value, response.text)
        detail = response.json()["detail"]
        assert "\n" not in detail and ("max_distance" in detail or "calibrated" in detail), detail
    calibrated(limit)
    response = post(k="10", max_distance=DUPLICATE)
    assert response.status_code == 200, response.text
    assert response.json()[0]["matches"] == everything["matches"][:4]
    page = client.get("/").text
    assert 'name="max_distance"' in page and f'<option value="{DUPLICATE}">' in page


def test_find_help_names_the_option_and_the_calibrated_name():
    result = CliRunner().invoke(cli, ["find", "--help"])
    assert "--max-distance D" in result.output and f"`{DUPLICATE}`" in " ".join(result.output.split())


def test_the_function_that_runs_is_the_planners_own_text_and_the_newest_frozen_one(database_url):
    Store.open(database_url).close()
    with psycopg.connect(database_url) as c:
        text = c.execute("SELECT pg_get_functiondef(%s::regprocedure)", (NEAREST,)).fetchone()[0]
    assert text == search.function_sql("imsearch_nearest")
    assert text == max((migrations_folder() / "sql").glob("imsearch_nearest_*.sql")).read_text()


def test_0010_up_down_up_keeps_a_readers_execute_grant(database_url):
    """The new argument makes a new function: the old one is dropped, and whoever could call it may call the new
    ones (and the old one again after a downgrade); PUBLIC may not."""
    from alembic import command
    from alembic.config import Config

    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    name = f"imsearch_test_reader_{os.getpid()}_{next(_roles)}"

    def state() -> list[tuple]:
        with psycopg.connect(database_url, autocommit=True) as c:
            return c.execute(
                "SELECT replace(p.oid::regprocedure::text, ',', ', '), pg_get_functiondef(p.oid), "
                "has_function_privilege(%s, p.oid, 'EXECUTE'), "
                "EXISTS (SELECT FROM aclexplode(p.proacl) a WHERE a.grantee = 0), obj_description(p.oid, 'pg_proc') "
                "FROM pg_proc p WHERE p.proname IN ('imsearch_nearest', 'imsearch_duplicate_distance', "
                "'imsearch_search') ORDER BY 1",
                (name,)).fetchall()

    def called_by_reader() -> int:
        with psycopg.connect(database_url, user=name, password="pass-word", autocommit=True) as c:
            some = c.execute("SELECT min(id) FROM image_catalog").fetchone()[0]
            return len(c.execute("SELECT * FROM imsearch_nearest(%s, 2)", (some,)).fetchall())

    command.upgrade(cfg, "0009")
    with psycopg.connect(database_url, autocommit=True) as c:
        [before] = c.execute(
            "SELECT replace(p.oid::regprocedure::text, ',', ', '), pg_get_functiondef(p.oid), "
            "obj_description(p.oid, 'pg_proc') FROM pg_proc p WHERE p.proname = 'imsearch_nearest'").fetchall()
        c.execute(
            "INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding) "
            "SELECT '/photos/kitchen/' || g || '.jpg', 'kitchen', md5(g::text), 1, 1, 1, 'test', "
            "(SELECT array_agg(random() + 0 * x + 0 * g) FROM generate_series(1, 2048) x)::halfvec(2048) "
            "FROM generate_series(1, 3) g")
        database = c.execute("SELECT current_database()").fetchone()[0]
        # a reader as grant-reader made it before revision 0010 (its part that matters here)
        c.execute(f"CREATE ROLE \"{name}\" LOGIN PASSWORD 'pass-word'")
        c.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{name}"')
        c.execute(f'GRANT USAGE ON SCHEMA public TO "{name}"')
        c.execute(f'GRANT SELECT ON image_catalog TO "{name}"')
        c.execute(f'GRANT EXECUTE ON FUNCTION imsearch_nearest(bigint, integer, text) TO "{name}"')
    try:
        assert called_by_reader() == 2
        command.upgrade(cfg, "head")
        head = state()
        assert [(r[0], r[2], r[3]) for r in head] == [("imsearch_duplicate_distance()", True, False),
                                                      (NEAREST, True, False), (SEARCH, True, False)]
        assert head[1][1] == search.function_sql("imsearch_nearest")
        assert called_by_reader() == 2
        command.downgrade(cfg, "0009")
        [old] = state()
        assert (old[0], old[1], old[4]) == before and old[2:4] == (True, False)
        assert called_by_reader() == 2
        command.upgrade(cfg, "head")
        assert state() == head
        assert called_by_reader() == 2
        store = Store.open(database_url)
        try:
            grant_reader(store.conn, name, "pass-word")  # a reader so migrated is one grant-reader updates, not refuses
        finally:
            store.close()
    finally:
        with psycopg.connect(database_url, autocommit=True) as c:
            if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                c.execute(f'DROP OWNED BY "{name}"')
                c.execute(f'DROP ROLE "{name}"')
