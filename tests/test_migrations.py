"""The schema: Alembic owns it, and the code knows its head."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import psycopg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from imsearch.db.migrate import MIGRATION_LOCK, SCHEMA_REVISION, MigrationLocked, migrations_folder, upgrade
from imsearch.db.store import Store


def test_code_expects_the_newest_migration():
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_REVISION


def test_first_use_creates_the_schema(database_url):
    Store.open(database_url).close()
    with psycopg.connect(database_url) as conn:
        cols = dict(conn.execute(
            "SELECT column_name, udt_name FROM information_schema.columns WHERE table_name = 'images'").fetchall())
        indexes = {r[0]: r[1] for r in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'images'").fetchall()}
    assert {"id", "path", "class", "sha256", "width", "height", "bytes", "model", "embedding",
            "ingested_at"} <= set(cols)
    assert cols["embedding"] == "halfvec"
    whole = indexes["images_fold_hnsw"]
    assert "hnsw" in whole and "imsearch_fold(embedding)" in whole and "halfvec_cosine_ops" in whole
    assert not any(name.startswith("images_embedding_hnsw") for name in indexes)
    assert "(class)" in indexes["images_class_idx"]


def test_migrations_match_the_table_definitions(database_url):
    from alembic import command

    from imsearch.settings import sqlalchemy_url

    upgrade(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    command.check(cfg)  # raises when schema.py and the migrations disagree


def test_0006_folds_the_other_class_indexes_and_drops_the_full_width_ones(database_url):
    """An index the new query cannot use would only cost inserts; downgrading restores the full-width builder."""
    from alembic import command

    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)

    def other_indexes() -> list[str]:
        with psycopg.connect(database_url) as conn:
            return [r[0] for r in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname LIKE 'images_embedding_hnsw\\_o\\_%'").fetchall()]

    def index_other(cls: str) -> None:
        with psycopg.connect(database_url) as conn:
            conn.execute("SELECT imsearch_index_other(%s)", (cls,))

    command.upgrade(cfg, "0005")
    index_other("kitchen")
    [full] = other_indexes()
    assert "l2_normalize(embedding)" in full and "subvector" not in full
    command.upgrade(cfg, "0006")
    assert other_indexes() == []
    index_other("kitchen")
    [folded] = other_indexes()
    assert "subvector(embedding, 1, 1024)" in folded and "WHERE (class <> 'kitchen'::text)" in folded
    assert "m='16', ef_construction='400'" in folded
    command.downgrade(cfg, "0005")
    assert other_indexes() == []
    index_other("kitchen")
    assert "l2_normalize(embedding)" in other_indexes()[0]


FUNCTIONS = ("imsearch_search", "imsearch_nearest", "imsearch_class_correspondence", "imsearch_neighbours",
             "imsearch_class_index", "imsearch_duplicate_pairs", "imsearch_fold", "imsearch_index_all",
             "imsearch_index_class", "imsearch_class_group", "imsearch_index_group")
# Functions whose texts before this revision are written out in their migrations' Python (0002, 0003, 0008).
FROZEN_SINCE = {"imsearch_duplicate_pairs": "0008", "imsearch_index_class": "0013"}


def function_text(url: str, name: str) -> str | None:
    """The one function of that name (migration 0010 changed imsearch_nearest's signature), None when there is
    none (imsearch_search came with migration 0011)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT pg_get_functiondef(oid) FROM pg_proc WHERE proname = %s", (name,)).fetchall()
        assert len(rows) <= 1, name
        return rows[0][0] if rows else None


def test_the_sql_functions_that_run_are_the_planners_own_text(database_url):
    """imsearch_search plans every search (find's, and those of the SQL functions that call it), from the constants,
    index names and fold of imsearch.search; the migrated database runs exactly the text imsearch.search renders."""
    from imsearch.search import SQL_FUNCTIONS, function_sql

    upgrade(database_url)
    for name in SQL_FUNCTIONS:
        assert function_text(database_url, name) == function_sql(name), name
        assert "@" not in function_sql(name)


def test_each_revision_runs_its_frozen_function_text_up_and_down(database_url):
    """Migrations carry each function's full text as of their revision (migrations/sql); none rewrites a function
    by finding and replacing text in its definition."""
    from alembic import command

    from imsearch.settings import sqlalchemy_url

    folder = migrations_folder()
    for script in (folder / "versions").glob("*.py"):
        assert "pg_get_functiondef" not in script.read_text(), script.name
    cfg = Config()
    cfg.set_main_option("script_location", str(folder))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    # (step, revision reached, function texts it must run: migrations/sql/NAME_REVISION.sql)
    steps = [(command.upgrade, "0002", "0002"), (command.upgrade, "0004", "0004"), (command.upgrade, "0005", "0005"),
             (command.upgrade, "0006", "0006"), (command.downgrade, "0005", "0005"),
             (command.downgrade, "0003", "0002"), (command.upgrade, "0010", "0010"),
             (command.downgrade, "0009", "0006"), (command.upgrade, "0011", "0011"),
             (command.downgrade, "0010", "0010"), (command.upgrade, "0011", "0011"),
             (command.upgrade, "0012", "0012"), (command.downgrade, "0011", "0011"),
             (command.upgrade, "0012", "0012"), (command.upgrade, "0013", "0013"),
             (command.downgrade, "0012", "0012"), (command.upgrade, "0013", "0013"),
             (command.upgrade, "0015", "0015"), (command.downgrade, "0014", "0014"),
             (command.upgrade, "0015", "0015"), (command.upgrade, "0016", "0016"),
             (command.downgrade, "0015", "0015"), (command.upgrade, "0017", "0017"),
             (command.downgrade, "0016", "0016"), (command.upgrade, "0017", "0017"),
             (command.upgrade, "0018", "0018"), (command.downgrade, "0017", "0017"),
             (command.upgrade, "0018", "0018"), (command.upgrade, "0019", "0019"),
             (command.downgrade, "0018", "0018"), (command.upgrade, "0019", "0019"),
             (command.upgrade, "0020", "0020"), (command.downgrade, "0019", "0019"),
             (command.upgrade, "0020", "0020")]
    for step, revision, texts in steps:
        step(cfg, revision)
        for name in FUNCTIONS:
            if revision < FROZEN_SINCE.get(name, ""):
                continue
            last = revision if name in FROZEN_SINCE else texts
            frozen = [p for p in (folder / "sql").glob(f"{name}_*.sql") if p.stem[-4:] <= last]
            if not frozen:  # not created yet
                assert function_text(database_url, name) is None, (revision, name)
                continue
            path = max(frozen)  # as of this revision, or unchanged since an earlier one
            expected = path.read_text()
            if "0007" <= revision < "0011" and "enable_seqscan" not in expected:  # 0007 set it by ALTER FUNCTION
                expected = expected.replace("\nAS $function$", "\n SET enable_seqscan TO 'off'\nAS $function$", 1)
            assert function_text(database_url, name) == expected, (revision, path.name)


def test_frozen_texts_leave_out_iterative_scan_settings_on_pgvector_before_0_8():
    """pgvector 0.7 refuses a SET clause naming settings it does not have; imsearch supports it (exact scans)."""
    from imsearch.search import for_server, function_sql

    text = function_sql("imsearch_search")
    assert for_server(text, "0.8.0") == text
    older = for_server(text, "0.7.4")
    assert "hnsw.iterative_scan\" TO" not in older and "hnsw.max_scan_tuples" not in older
    assert len(older.splitlines()) == len(text.splitlines()) - 2
    neighbours = function_sql("imsearch_neighbours")
    assert "hnsw.iterative_scan\" TO 'off'" in neighbours
    assert len(for_server(neighbours, "0.7.4").splitlines()) == len(neighbours.splitlines()) - 1


def hold_migration_lock(url: str, application: str) -> psycopg.Connection:
    """A session of another program that takes imsearch's migration lock and keeps it (any login may)."""
    holder = psycopg.connect(url, autocommit=True, application_name=application)
    holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    return holder


def test_a_migration_says_who_holds_its_lock_and_gives_up_after_the_timeout(database_url, caplog):
    holder = hold_migration_lock(database_url, "bi-tool")
    try:
        pid, user = holder.execute("SELECT pg_backend_pid(), current_user").fetchone()
        started = time.monotonic()
        with pytest.raises(MigrationLocked) as refused:
            upgrade(database_url, lock_timeout=3)
        waited = time.monotonic() - started
    finally:
        holder.close()
    assert 3 <= waited < 12
    who = f"process {pid} (user {user}, application 'bi-tool')"
    assert str(refused.value).startswith(f"the migration lock of this database is held by {who}: waited 3 s")
    assert f"waiting for the migration lock, held by {who}" in caplog.text
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('public.images')").fetchone() == (None,)  # nothing ran


def test_a_migration_told_to_wait_longer_goes_on_once_the_lock_is_released(database_url):
    holder = hold_migration_lock(database_url, "imsearch migration")
    threading.Timer(2.0, holder.close).start()
    assert upgrade(database_url, lock_timeout=None) == SCHEMA_REVISION


def test_db_upgrade_names_the_holder_and_exits_1_after_lock_timeout(database_url):
    holder = hold_migration_lock(database_url, "bi-tool")
    try:
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        done = subprocess.run([sys.executable, "-c", "from imsearch.cli import main; main()", "--database-url",
                               database_url, "db", "upgrade", "--lock-timeout", "3"],
                              capture_output=True, text=True, timeout=120)
    finally:
        holder.close()
    assert done.returncode == 1
    assert f"imsearch: waiting for the migration lock, held by process {pid} " in done.stderr
    assert f"Error: the migration lock of this database is held by process {pid} " in done.stderr
    assert "--lock-timeout SECONDS" in done.stderr


def _synthetic_rows(url: str, rows: int, classes: tuple[str, ...], seed: int = 0) -> np.ndarray:
    """Non-negative ResNet-like rows in `classes` (the last one rare), copied in; their vectors."""
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector

    rng = np.random.default_rng(seed)
    centres = np.maximum(rng.normal(0, 1, (len(classes), 2048)), 0)
    labels = [classes[-1] if i % 50 == 0 else classes[i % (len(classes) - 1)] for i in range(rows)]
    vectors = (centres[[classes.index(c) for c in labels]] + np.maximum(rng.normal(0, 0.8, (rows, 2048)), 0))
    with psycopg.connect(url) as conn:
        register_vector(conn)
        with conn.cursor() as cur, cur.copy(
                "COPY images (path, class, sha256, width, height, bytes, model, embedding) FROM STDIN") as copy:
            for i, (label, v) in enumerate(zip(labels, vectors)):
                copy.write_row((f"/lib/{label}/{i}.jpg", label, f"{i:064x}", 640, 480, 1000, "m", HalfVector(v)))
    return vectors.astype(np.float32)


def test_0013_keeps_every_row_and_every_exact_answer_and_downgrades(database_url, monkeypatch):
    """The folded layout replaces the full-width indexes: the rows and what an exact scan answers in every mode stay
    the same (index answers vary between builds), and 0012's indexes and functions come back on downgrade."""
    from alembic import command

    from imsearch import search
    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    command.upgrade(cfg, "0012")
    vectors = _synthetic_rows(database_url, 3_300, ("a", "b", "c", "rare"))
    queries = vectors[:6] + 0.05

    def answers() -> list[list[tuple[int, float]]]:
        with psycopg.connect(database_url) as conn:
            from pgvector.psycopg import register_vector

            register_vector(conn)
            return [[(m.id, round(m.distance, 6)) for m in search.run(conn, q, mode, k=5, cls=cls, skip_sha=None,
                                                                   exact=True)]
                    for q in queries for mode, cls in (("all", None), ("same", "a"), ("same", "rare"),
                                                       ("other", "a"), ("other", "rare"))]

    def table() -> list[tuple]:
        with psycopg.connect(database_url) as conn:
            return conn.execute("SELECT id, path, class, sha256, width, height, bytes, model, embedding::text "
                                "FROM images ORDER BY id").fetchall()

    def vector_indexes() -> set[str]:
        with psycopg.connect(database_url) as conn:
            return {r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'images' AND indexdef LIKE '%hnsw (%embedding%'")}

    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT imsearch_index_class('a')")
    before, rows = answers(), table()
    assert vector_indexes() == {"images_embedding_hnsw", search.index_name("a").replace("fold", "embedding")}
    command.upgrade(cfg, "0013")
    assert table() == rows and answers() == before
    # 'a' holds a third of the library: the whole-table index serves it; 'rare' has too few rows for one
    assert vector_indexes() == {"images_fold_hnsw"}
    command.downgrade(cfg, "0012")
    assert table() == rows and answers() == before
    assert vector_indexes() == {"images_embedding_hnsw"} | {
        search.index_name(c).replace("fold", "embedding") for c in ("a", "b", "c")}


def test_0016_builds_the_whole_table_graph_denser_beside_the_old_one_and_keeps_every_answer(database_url):
    """The whole-table graph goes from pgvector's default links to m 32: built beside the old graph, which serves
    searches meanwhile, then put in its place under the name imsearch_search plans by; exact answers stay."""
    from alembic import command

    from imsearch import search
    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    command.upgrade(cfg, "0015")
    vectors = _synthetic_rows(database_url, 1_200, ("a", "b", "rare"))

    def graphs() -> dict[str, str]:
        with psycopg.connect(database_url) as conn:
            return dict(conn.execute(
                "SELECT c.relname, array_to_string(c.reloptions, ',') FROM pg_index x "
                "JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_am a ON a.oid = c.relam "
                "WHERE x.indrelid = 'images'::regclass AND a.amname = 'hnsw' AND c.relname NOT LIKE '%phash%'"))

    def answers(exact: bool) -> list[list[int]]:
        from pgvector.psycopg import register_vector

        with psycopg.connect(database_url) as conn:
            register_vector(conn)
            return [[m.id for m in search.run(conn, q, mode, k=5, cls="a", skip_sha=None, exact=exact)]
                    for q in vectors[:4] + 0.05 for mode in ("all", "other")]

    assert graphs() == {search.WHOLE_INDEX: "m=16,ef_construction=64"}
    before = answers(exact=True)
    command.upgrade(cfg, "0016")
    assert graphs() == {search.WHOLE_INDEX: "m=32,ef_construction=128"}
    assert answers(exact=True) == before and answers(exact=False) == before
    command.downgrade(cfg, "0015")
    assert graphs() == {search.WHOLE_INDEX: "m=32,ef_construction=128"}  # it serves 0015 as well
    with psycopg.connect(database_url) as conn:  # a graph built from now on is the default one again
        conn.execute(f"DROP INDEX {search.WHOLE_INDEX}")
        conn.execute("SELECT imsearch_index_all()")
    assert graphs() == {search.WHOLE_INDEX: "m=16,ef_construction=64"}


def test_0018_builds_each_class_graph_denser_beside_the_old_one_and_keeps_every_answer(database_url):
    """Each class graph goes from pgvector's default links to m 32 as the whole-table one did in 0016: built beside
    the old graph, then put in its place under the name imsearch_search plans by; exact answers stay."""
    from alembic import command

    from imsearch import search
    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    command.upgrade(cfg, "0017")
    vectors = _synthetic_rows(database_url, 3_300, ("a", "b", "c", "rare"))
    with psycopg.connect(database_url) as conn:  # as an ingest of 0017 builds them
        for cls in ("a", "b", "c"):
            conn.execute("SELECT imsearch_index_class(%s)", (cls,))

    def graphs() -> dict[str, str]:
        with psycopg.connect(database_url) as conn:
            return dict(conn.execute(
                "SELECT c.relname, array_to_string(c.reloptions, ',') FROM pg_index x "
                "JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_am a ON a.oid = c.relam "
                "WHERE x.indrelid = 'images'::regclass AND a.amname = 'hnsw' AND starts_with(c.relname, %s)",
                (search.CLASS_INDEX_PREFIX,)))

    def answers(exact: bool) -> list[list[int]]:
        from pgvector.psycopg import register_vector

        with psycopg.connect(database_url) as conn:
            register_vector(conn)
            return [[m.id for m in search.run(conn, q, mode, k=5, cls=cls, skip_sha=None, exact=exact)]
                    for q in vectors[:3] + 0.05 for mode in ("same", "other") for cls in ("a", "rare")]

    names = {search.index_name(c) for c in ("a", "b", "c")}
    assert graphs() == dict.fromkeys(names, "m=16,ef_construction=64")
    before = answers(exact=True)
    command.upgrade(cfg, "0018")
    assert graphs() == dict.fromkeys(names, "m=32,ef_construction=128")
    with psycopg.connect(database_url) as conn:  # each still holds its own class's rows alone
        for cls in ("a", "b", "c"):
            predicate = conn.execute("SELECT pg_get_expr(x.indpred, x.indrelid) FROM pg_index x "
                                     "WHERE x.indexrelid = %s::regclass", (search.index_name(cls),)).fetchone()[0]
            assert predicate == f"(class = '{cls}'::text)"
    assert answers(exact=True) == before and answers(exact=False) == before
    command.downgrade(cfg, "0017")
    assert graphs() == dict.fromkeys(names, "m=32,ef_construction=128")  # they serve 0017 as well
    with psycopg.connect(database_url) as conn:  # a graph built from now on is the default one again
        conn.execute(f"DROP INDEX {search.index_name('a')}")
        conn.execute("SELECT imsearch_index_class('a')")
    assert graphs()[search.index_name("a")] == "m=16,ef_construction=64"


def test_0020_downgrade_drops_the_group_graphs_and_keeps_every_answer(database_url):
    """Migration 0020 builds no graph; a group graph imsearch built after it goes on downgrade with the functions
    that define it (0019's planner never asks it), and the rows and their exact answers stay."""
    from alembic import command
    from pgvector.psycopg import register_vector

    from imsearch import search
    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    command.upgrade(cfg, "0020")
    vectors = _synthetic_rows(database_url, 1_200, ("a", "b", "rare"))

    def state() -> tuple[list[str], list[str], list[list[int]]]:
        with psycopg.connect(database_url) as conn:
            register_vector(conn)
            return ([r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relname LIKE %s ORDER BY 1",
                                                (search.GROUP_INDEX_PREFIX + "%",))],
                    [r[0] for r in conn.execute("SELECT proname FROM pg_proc WHERE proname LIKE '%group%' "
                                                "ORDER BY 1")],
                    [[m.id for m in search.run(conn, q, mode, k=5, cls="a", skip_sha=None, exact=True)]
                     for q in vectors[:4] + 0.05 for mode in ("all", "other")])

    with psycopg.connect(database_url, autocommit=True) as conn:
        for group in range(search.GROUPS):
            conn.execute("SELECT imsearch_index_group(%s)", (group,))
    groups, functions, answers = state()
    assert groups == sorted(search.group_index_name(n) for n in range(search.GROUPS))
    assert functions == ["imsearch_class_group", "imsearch_index_group"]
    command.downgrade(cfg, "0019")
    assert state() == ([], [], answers)
    command.upgrade(cfg, "0020")
    assert state()[1:] == (functions, answers)


def test_a_large_library_migrates_only_through_db_upgrade_with_its_progress(database_url, monkeypatch):
    """Rebuilding the vector indexes takes minutes at a million rows: other commands say what to run."""
    from alembic import command

    from imsearch.db import migrate
    from imsearch.db.store import ensure_schema
    from imsearch.errors import SchemaOutdated
    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    command.upgrade(cfg, "0012")
    _synthetic_rows(database_url, 300, ("a", "b", "rare"))
    monkeypatch.setattr(migrate, "LONG_MIGRATION_ROWS", 200)
    with pytest.raises(SchemaOutdated, match=rf"schema revision 0012, this imsearch needs {SCHEMA_REVISION}, which "
                                             r"rebuilds the "
                                             r"vector indexes of more than 200 stored images .*"
                                             r"run `imsearch db upgrade`"):
        ensure_schema(database_url, upgrade_older=True)
    seen: list[tuple[str, int, int]] = []
    assert upgrade(database_url, progress=lambda *a: seen.append(a)) == SCHEMA_REVISION
    Store(database_url).close()


def test_the_fold_in_sql_is_the_fold_in_python(database_url):
    """imsearch_fold (what the indexes hold) and imsearch.search.fold (what benchmarks and tests compute) agree."""
    from pgvector import HalfVector
    from pgvector.psycopg import register_vector

    from imsearch import search

    upgrade(database_url)
    rng = np.random.default_rng(3)
    with psycopg.connect(database_url) as conn:
        register_vector(conn)
        for v in np.maximum(rng.normal(0, 1, (3, 2048)), 0).astype(np.float16).astype(np.float32):
            folded = conn.execute("SELECT imsearch_fold(%s)", (HalfVector(v),)).fetchone()[0].to_numpy()
            assert folded.shape == (search.FOLD_DIMENSIONS,)
            np.testing.assert_allclose(folded, search.fold(v), rtol=2e-3, atol=2e-3)
