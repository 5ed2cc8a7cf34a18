"""Alembic environment: the URL comes from imsearch's settings; migrations run under an advisory lock."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

from imsearch.db import embedded
from imsearch.db.migrate import APPLICATION_NAME, LOCK_TIMEOUT, MIGRATION_LOCK, take_lock
from imsearch.db.schema import metadata
from imsearch.search import LEGACY_PREFIX, WHOLE_INDEX
from imsearch.settings import Settings, sqlalchemy_url

config = context.config
target_metadata = metadata


def include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    """Compare only imsearch's own tables; views, functions and the vector indexes (expressions, per class) are
    managed by hand."""
    if type_ == "index" and reflected and name and name.startswith((WHOLE_INDEX, LEGACY_PREFIX)):
        return False
    return not (type_ == "table" and reflected and compare_to is None and name not in metadata.tables)


def run_migrations_online() -> None:
    url = config.attributes.get("url") or sqlalchemy_url(embedded.database_url(Settings.from_env()))
    engine = create_engine(url, connect_args={"application_name": APPLICATION_NAME})
    with engine.connect() as connection:
        try:
            take_lock(connection, config.attributes.get("lock_timeout", LOCK_TIMEOUT))
        finally:
            connection.commit()
        try:
            context.configure(connection=connection, target_metadata=target_metadata, include_object=include_object)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.attributes.get("url", "postgresql+psycopg://"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
