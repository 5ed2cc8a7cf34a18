"""The perceptual-hash search: each stored image's nearest by the Hamming distance of its 64-bit hash, through the
HNSW index on images.phash (migration 0009). Its own kind beside the planner's vector searches, written once here
for the audit and the calibration (`<~>` appears nowhere else in the package)."""

from __future__ import annotations

from typing import Any

import psycopg

# Candidates per search (hnsw.ef_search), at least twice the neighbours fetched.
EF_SEARCH = 64

SQL = """
SELECT s.id, m.id, m.bits
FROM images s
CROSS JOIN LATERAL (
    SELECT i.id, (i.phash <~> s.phash)::int AS bits
    FROM images i
    WHERE i.id <> s.id AND i.phash IS NOT NULL
    ORDER BY i.phash <~> s.phash
    LIMIT %(n)s
) m
WHERE s.id = ANY(%(ids)s) AND s.phash IS NOT NULL AND m.bits <= %(bits)s
"""


def neighbours(conn: psycopg.Connection[Any], ids: list[int], n: int, max_bits: int = 64
               ) -> list[tuple[int, int, int]]:
    """Each of these stored images' n nearest other stored images by the hash, as (id, neighbour id, bits differing),
    those within max_bits; images without a hash have none. The index, not a scan: the table looks small to the
    planner (its vectors are stored out of line), which would rather read it all."""
    with conn.transaction():
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true), set_config('enable_seqscan', 'off', true)",
                     (str(max(EF_SEARCH, 2 * n)),))
        return conn.execute(SQL, {"n": n, "ids": ids, "bits": max_bits}).fetchall()
