"""The schema as SQLAlchemy metadata: what the Alembic migrations create, and what `alembic check` compares."""

from __future__ import annotations

from pgvector.sqlalchemy import BIT, HALFVEC
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from ..vectors import DIMENSIONS

metadata = MetaData()

# One row per stored image. Public: analysts query it from BI tools (docs/sql.md).
images = Table(
    "images",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("path", Text, nullable=False, unique=True, comment="absolute, resolved file path"),
    Column("class", Text, nullable=True, comment="first-level sub-folder under the ingest root; NULL at the root"),
    Column("sha256", String(64), nullable=False),
    Column("width", Integer, nullable=True, comment="pixels, upright (after EXIF orientation)"),
    Column("height", Integer, nullable=True),
    Column("bytes", BigInteger, nullable=True),
    Column("model", Text, nullable=False, comment="model identity: architecture:weights:preprocessing"),
    # halfvec: pgvector indexes `vector` only up to 2,000 dimensions, halfvec up to 4,000.
    Column("embedding", HALFVEC(DIMENSIONS), nullable=False),
    Column("ingested_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("phash", BIT(64), nullable=True, comment="64-bit perceptual hash (DCT) of the upright decoded image"),
)

# The vector indexes (over imsearch_fold(embedding), whole-table and per class) are made by migration 0013 and
# imsearch_index_class, outside this metadata: Alembic does not compare expression indexes.
Index("images_class_idx", images.c["class"])
Index("images_sha256_idx", images.c.sha256)
Index("images_model_idx", images.c.model)
Index("images_phash_hnsw", images.c.phash, postgresql_using="hnsw", postgresql_ops={"phash": "bit_hamming_ops"})

# Per model identity: how far harmless copies land from their originals against distinct neighbours (imsearch.audit).
model_calibration = Table(
    "model_calibration",
    metadata,
    Column("model", Text, primary_key=True, comment="model identity, as images.model"),
    Column("sample", Integer, nullable=False, comment="stored photos whose variants were embedded"),
    Column("copy_distance_p95", Float, nullable=True,
           comment="cosine distance of re-encoded and half-size copies to their originals, 95th percentile"),
    Column("copy_distance_max", Float, nullable=True),
    Column("crop_distance_p50", Float, nullable=True, comment="5 % crops, median"),
    Column("neighbour_distance_p05", Float, nullable=True,
           comment="cosine distance to the nearest distinct stored photo, 5th percentile"),
    Column("duplicate_distance", Float, nullable=True,
           comment="largest distance counted as a duplicate; NULL where copies and neighbours overlap"),
    Column("hash_copy_bits_max", Integer, nullable=True),
    Column("hash_neighbour_bits_p05", Integer, nullable=True),
    Column("hash_bits", Integer, nullable=False, comment="largest Hamming distance counted as a duplicate"),
    Column("override_distance", Float, nullable=True, comment="set by the user; wins over duplicate_distance"),
    Column("override_hash_bits", Integer, nullable=True, comment="set by the user; wins over hash_bits"),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("measured_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# What the last `imsearch audit` found, one row per finding (BI tools read it; docs/sql.md).
image_audit = Table(
    "image_audit",
    metadata,
    Column("image_id", BigInteger, ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    Column("kind", Text, nullable=False, comment="label, leak, duplicate or outlier"),
    Column("score", Float, nullable=False, comment="larger is more suspect; see docs/audit.md"),
    Column("suggested_class", Text, nullable=True, comment="label: the class its neighbours vote for"),
    Column("partner_id", BigInteger, ForeignKey("images.id", ondelete="CASCADE"), nullable=True,
           comment="leak, duplicate: the other image; label, outlier: the nearest neighbour"),
    Column("distance", Float, nullable=True, comment="cosine distance to the partner"),
    Column("hash_bits", Integer, nullable=True, comment="Hamming distance of the two hashes"),
    Column("model", Text, nullable=False),
    Column("audited_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('label', 'leak', 'duplicate', 'outlier')", name="image_audit_kind"),
)
Index("image_audit_image_idx", image_audit.c.image_id)
Index("image_audit_partner_idx", image_audit.c.partner_id)
Index("image_audit_kind_idx", image_audit.c.kind)
