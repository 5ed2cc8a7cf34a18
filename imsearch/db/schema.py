"""The schema as SQLAlchemy metadata: what the Alembic migrations create, and what `alembic check` compares."""

from __future__ import annotations

from pgvector.sqlalchemy import HALFVEC
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
)

from ..model.embed import DIMENSIONS

metadata = MetaData()

# One row per stored image. Public: analysts query it from BI tools (docs/sql.md).
images = Table(
    "images",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("path", Text, nullable=False, unique=True, comment="absolute, resolved file path"),
    Column("class", Text, nullable=True, comment="first-level sub-folder under the ingest root; NULL at the root"),
    Column("sha256", String(64), nullable=False),
    Column("width", Integer, nullable=False, comment="pixels, upright (after EXIF orientation)"),
    Column("height", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("model", Text, nullable=False, comment="model identity: architecture:weights:preprocessing"),
    # halfvec: pgvector indexes `vector` only up to 2,000 dimensions, halfvec up to 4,000.
    Column("embedding", HALFVEC(DIMENSIONS), nullable=False),
    Column("ingested_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

Index(
    "images_embedding_hnsw",
    images.c.embedding,
    postgresql_using="hnsw",
    postgresql_with={"m": 16, "ef_construction": 64},
    postgresql_ops={"embedding": "halfvec_cosine_ops"},
)
Index("images_class_idx", images.c["class"])
Index("images_sha256_idx", images.c.sha256)
Index("images_model_idx", images.c.model)
