"""Vectors to rows: the connection (connect), the schema revision and Alembic (migrate), the table (schema), rows
(store), the HNSW indexes imsearch builds (indexes), the embedded PostgreSQL (embedded), the files of its data
folder (datafolder) and its log (serverlog), its TCP access (server), perceptual hashes for older rows (hashes) and
BI access (sqlaccess)."""
