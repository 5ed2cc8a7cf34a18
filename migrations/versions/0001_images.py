"""images: one row per stored image, with its 2048-d halfvec embedding, an HNSW cosine index and a class index.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import HALFVEC

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "images",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("path", sa.Text, nullable=False, unique=True, comment="absolute, resolved file path"),
        sa.Column("class", sa.Text, nullable=True,
                  comment="first-level sub-folder under the ingest root; NULL at the root"),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer, nullable=False, comment="pixels, upright (after EXIF orientation)"),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("model", sa.Text, nullable=False, comment="model identity: architecture:weights:preprocessing"),
        sa.Column("embedding", HALFVEC(2048), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index(
        "images_embedding_hnsw", "images", ["embedding"], postgresql_using="hnsw",
        postgresql_with={"m": 16, "ef_construction": 64}, postgresql_ops={"embedding": "halfvec_cosine_ops"},
    )
    op.create_index("images_class_idx", "images", ["class"])
    op.create_index("images_sha256_idx", "images", ["sha256"])
    op.create_index("images_model_idx", "images", ["model"])


def downgrade() -> None:
    op.drop_table("images")
