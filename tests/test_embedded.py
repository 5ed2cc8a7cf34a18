"""The embedded PostgreSQL imsearch starts when DATABASE_URL is unset: its buffer cache is sized for the indexes."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import psycopg

from imsearch.settings import build_memory_mb, shared_buffers_mb, start_embedded


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


def stop(pgdata: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        pgserver.get_server(pgdata).cleanup()


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
