"""Vectors to rows: the connection and schema checks (store, schema), the embedded PostgreSQL (embedded), its TCP
access (server) and BI access (sqlaccess)."""
