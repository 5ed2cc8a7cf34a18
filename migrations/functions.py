"""What the migrations share: create a SQL function from its frozen text (migrations/sql), carry EXECUTE from one
function to another, and size the memory of the index builds that rebuild a graph."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import op

from imsearch.search import for_server

SQL = Path(__file__).resolve().parent / "sql"  # each function's full text as of the revision that changed it


def create(*files: str) -> None:
    """Create each function from its frozen text, as this server's pgvector takes it."""
    version = op.get_bind().exec_driver_sql("SELECT extversion FROM pg_extension WHERE extname = 'vector'").scalar()
    for name in files:
        op.execute(for_server((SQL / name).read_text(), version))


def grantees(signature: str) -> list[str]:
    """The roles (PUBLIC included) holding EXECUTE on a function besides its owner, as GRANT names them, each
    followed by WITH GRANT OPTION where it had that."""
    rows = op.get_bind().exec_driver_sql(
        f"""
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
               || CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
        FROM pg_proc p
        CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
        LEFT JOIN pg_roles r ON r.oid = a.grantee
        WHERE p.oid = '{signature}'::regprocedure AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner
        ORDER BY 1
        """
    ).fetchall()
    return [r[0] for r in rows]


def grant(signature: str, roles: list[str], comment: str) -> None:
    """EXECUTE for these roles only (a new function's default grant to PUBLIC is revoked, as migration 0002 did),
    and the function's comment."""
    op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
    for role in roles:
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {role}")
    op.execute(f"COMMENT ON FUNCTION {signature} IS '{comment.replace(chr(39), chr(39) * 2)}'")


def size_build_memory(rows: int, per_row: int | None = None) -> None:
    """The maintenance_work_mem a graph of `rows` rows needs (imsearch.db.indexes), for this session's builds: a
    server left at PostgreSQL's 64 MB would build a large library's graph on disk, many times slower."""
    from imsearch.db.indexes import size_build_memory as size
    from imsearch.errors import ImsearchError

    raw = op.get_bind().connection.driver_connection
    try:
        with raw.transaction():  # a savepoint: a refused setting leaves the migration's transaction usable
            size(raw, rows, per_row=per_row)
    except ImsearchError as exc:  # a bad IMSEARCH_BUILD_MEMORY: the commands that build say so; migrate anyway
        logging.getLogger("alembic").warning("%s; building with the server's maintenance_work_mem", exc)
