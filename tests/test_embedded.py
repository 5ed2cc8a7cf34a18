"""The embedded PostgreSQL imsearch starts when DATABASE_URL is unset: its buffer cache is sized for the indexes."""

from __future__ import annotations

import warnings
from pathlib import Path

import psycopg

from imsearch.settings import shared_buffers_mb, start_embedded


def buffers_mb(uri: str) -> int:
    with psycopg.connect(uri) as conn:
        return conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers')) / 2^20").fetchone()[0]


def stop(pgdata: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        pgserver.get_server(pgdata).cleanup()


def test_the_second_start_has_the_sized_buffer_cache_and_a_chosen_value_is_kept(tmp_path):
    pgdata = tmp_path / "pgdata"
    try:
        assert buffers_mb(start_embedded(pgdata)) == 128  # initdb's value: it can only change at a restart
        stop(pgdata)
        uri = start_embedded(pgdata)
        assert buffers_mb(uri) == shared_buffers_mb() > 128
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_buffers = '200MB'")
        for _ in range(2):
            stop(pgdata)
            assert buffers_mb(start_embedded(pgdata)) == 200
    finally:
        stop(pgdata)
