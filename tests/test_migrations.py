"""The schema: Alembic owns it, and the code knows its head."""

from __future__ import annotations

import psycopg
from alembic.config import Config
from alembic.script import ScriptDirectory

from imsearch.store import SCHEMA_REVISION, Store, migrations_folder, upgrade


def test_code_expects_the_newest_migration():
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_REVISION


def test_first_use_creates_the_schema(database_url):
    Store(database_url).close()
    with psycopg.connect(database_url) as conn:
        cols = dict(conn.execute(
            "SELECT column_name, udt_name FROM information_schema.columns WHERE table_name = 'images'").fetchall())
        indexes = {r[0]: r[1] for r in conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'images'").fetchall()}
    assert {"id", "path", "class", "sha256", "width", "height", "bytes", "model", "embedding",
            "ingested_at"} <= set(cols)
    assert cols["embedding"] == "halfvec"
    assert "hnsw" in indexes["images_embedding_hnsw"] and "halfvec_cosine_ops" in indexes["images_embedding_hnsw"]
    assert "(class)" in indexes["images_class_idx"]


def test_migrations_match_the_table_definitions(database_url):
    from alembic import command

    from imsearch.settings import sqlalchemy_url

    upgrade(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    command.check(cfg)  # raises when tables.py and the migrations disagree


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
