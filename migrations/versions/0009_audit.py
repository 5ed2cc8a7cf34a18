"""audit: a perceptual hash per image, a duplicate calibration per model, and the findings of `imsearch audit`.

- `images.phash`: a 64-bit DCT perceptual hash of the upright decoded image, as `bit(64)` so that SQL can rank by
  Hamming distance (`phash <~> B'...'`) through an HNSW `bit_hamming_ops` index. It does not depend on the model.
  Rows stored before this revision have NULL until `imsearch db backfill-hashes` reads their files (no re-embedding).
- `model_calibration`: per model identity, how far harmless variants of stored photos (re-encode, half size, small
  crop) land from their originals against the distance to the nearest distinct photo, and the duplicate distance
  and hash threshold chosen from them (NULL distance: this model cannot tell a copy from a neighbour). The
  override columns are the user's.
- `image_audit`: what the last `imsearch audit` found, one row per finding, for BI tools. A finding goes with either
  of its images (ON DELETE CASCADE), and a trigger drops the findings of a row whose class, embedding or hash
  changes, so the table never describes rows as they no longer are.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import BIT
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

KINDS = "('label', 'leak', 'duplicate', 'outlier')"


def upgrade() -> None:
    op.add_column("images", sa.Column("phash", BIT(64), nullable=True,
                                      comment="64-bit perceptual hash (DCT) of the upright decoded image"))
    op.create_index("images_phash_hnsw", "images", ["phash"], postgresql_using="hnsw",
                    postgresql_ops={"phash": "bit_hamming_ops"})
    op.create_table(
        "model_calibration",
        sa.Column("model", sa.Text, primary_key=True, comment="model identity, as images.model"),
        sa.Column("sample", sa.Integer, nullable=False, comment="stored photos whose variants were embedded"),
        sa.Column("copy_distance_p95", sa.Float, nullable=True,
                  comment="cosine distance of re-encoded and half-size copies to their originals, 95th percentile"),
        sa.Column("copy_distance_max", sa.Float, nullable=True),
        sa.Column("crop_distance_p50", sa.Float, nullable=True, comment="5 % crops, median"),
        sa.Column("neighbour_distance_p05", sa.Float, nullable=True,
                  comment="cosine distance to the nearest distinct stored photo, 5th percentile"),
        sa.Column("duplicate_distance", sa.Float, nullable=True,
                  comment="largest distance counted as a duplicate; NULL where copies and neighbours overlap"),
        sa.Column("hash_copy_bits_max", sa.Integer, nullable=True),
        sa.Column("hash_neighbour_bits_p05", sa.Integer, nullable=True),
        sa.Column("hash_bits", sa.Integer, nullable=False, comment="largest Hamming distance counted as a duplicate"),
        sa.Column("override_distance", sa.Float, nullable=True,
                  comment="set by the user; wins over duplicate_distance"),
        sa.Column("override_hash_bits", sa.Integer, nullable=True, comment="set by the user; wins over hash_bits"),
        sa.Column("details", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "image_audit",
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.Text, nullable=False, comment="label, leak, duplicate or outlier"),
        sa.Column("score", sa.Float, nullable=False, comment="larger is more suspect; see docs/audit.md"),
        sa.Column("suggested_class", sa.Text, nullable=True, comment="label: the class its neighbours vote for"),
        sa.Column("partner_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=True,
                  comment="leak, duplicate: the other image; label, outlier: the nearest neighbour"),
        sa.Column("distance", sa.Float, nullable=True, comment="cosine distance to the partner"),
        sa.Column("hash_bits", sa.Integer, nullable=True, comment="Hamming distance of the two hashes"),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("audited_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(f"kind IN {KINDS}", name="image_audit_kind"),
    )
    op.create_index("image_audit_image_idx", "image_audit", ["image_id"])
    op.create_index("image_audit_partner_idx", "image_audit", ["partner_id"])
    op.create_index("image_audit_kind_idx", "image_audit", ["kind"])
    op.execute(
        """
        CREATE FUNCTION imsearch_audit_forget() RETURNS trigger
        LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
        BEGIN
            DELETE FROM image_audit WHERE image_id = NEW.id OR partner_id = NEW.id;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER images_audit_forget AFTER UPDATE OF class, embedding, phash ON images
        FOR EACH ROW WHEN (OLD.class IS DISTINCT FROM NEW.class OR OLD.embedding IS DISTINCT FROM NEW.embedding
                           OR OLD.phash IS DISTINCT FROM NEW.phash)
        EXECUTE FUNCTION imsearch_audit_forget()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER images_audit_forget ON images")
    op.execute("DROP FUNCTION imsearch_audit_forget()")
    op.drop_table("image_audit")
    op.drop_table("model_calibration")
    op.drop_index("images_phash_hnsw", table_name="images")
    op.drop_column("images", "phash")
