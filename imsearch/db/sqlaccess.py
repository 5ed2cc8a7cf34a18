"""Plain SQL for BI tools: a read-only login role that can read imsearch's views, tables and functions.

The SQL objects themselves (imsearch_nearest, imsearch_class_correspondence, imsearch_duplicate_pairs and the
views image_catalog, class_summary, class_correspondence) belong to migration 0002, imsearch_duplicate_pairs as
migration 0008 re-created it; docs/sql.md shows them.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from ..errors import ImsearchError
from .connect import Where, connection

log = logging.getLogger(__name__)

# What a reader may use: SELECT on the views, EXECUTE on the functions (all created by migration 0002).
READER_VIEWS = ("image_catalog", "class_summary", "class_correspondence")
# ... and SELECT on these tables (migration 0009): the last audit's findings and the per-model calibration.
READER_TABLES = ("image_audit", "model_calibration")
# imsearch_nearest's signature and imsearch_duplicate_distance() are of migration 0010, imsearch_search of 0011.
READER_FUNCTIONS = (
    "imsearch_nearest(bigint, integer, text, double precision)",
    "imsearch_class_correspondence(integer, text)",
    "imsearch_duplicate_pairs(double precision, integer)",
    "imsearch_duplicate_distance()",
    "imsearch_search(halfvec, integer, text, text, text, double precision, boolean)",
)
# Each reader's session defaults (ALTER ROLE ... SET). The reader may change these itself: they are defaults.
READER_SETTINGS = (("default_transaction_read_only", "on"), ("statement_timeout", "60s"))
# Temporary files of one session; only a superuser may set it, so the reader cannot lift it.
READER_TEMP_FILE_LIMIT = "1GB"
# Sessions one reader may hold at once (ALTER ROLE ... CONNECTION LIMIT; a reader cannot change its own): a BI
# tool's pool fits, and one reader cannot take every slot of the server. Several readers add up: the room kept for
# imsearch itself is the server's reserved slots (embedded.RESERVED_CONNECTIONS on the embedded server).
READER_CONNECTION_LIMIT = 10
# pg_catalog functions every role may call by default that write whoever calls them: new large objects persist,
# and a WAL message goes to every logical replica. Writing to an existing large object is checked against that
# object's own privileges, so lo_put, lowrite and lo_truncate need nothing. lo_import (a server file into a new
# large object) is no default of PUBLIC's: listed in case someone granted it.
PUBLIC_WRITERS = ("lo_creat", "lo_create", "lo_from_bytea", "lo_import", "pg_logical_emit_message")
# The attributes a reader must not have, as pg_roles names them and as ALTER ROLE takes them away.
PRIVILEGED_ATTRIBUTES = (("rolcreatedb", "CREATEDB"), ("rolcreaterole", "CREATEROLE"),
                         ("rolreplication", "REPLICATION"), ("rolbypassrls", "BYPASSRLS"))

ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class Reader:
    """A read-only login role as `grant_reader` left it; `password` only when one was generated."""

    name: str
    created: bool
    password: str | None
    database: str


def grant_reader(where: Where, name: str, password: str | None = None) -> Reader:
    """Create (or update) a LOGIN role that can only read imsearch's views and call its functions.

    Without a password, a random one is generated and returned (the server keeps only its SCRAM hash).
    Refuses, changing nothing, a role that is more than a login (see `_refuse_more_than_a_login`) or that could
    write through what PUBLIC may do; takes from PUBLIC what lets any role write in this database
    (`_close_public_writes`), and says what it could not take. `where` is the Store, or a connection.
    """
    conn = connection(where)
    if not ROLE_NAME.fullmatch(name) or name.startswith("pg_"):
        raise ImsearchError(
            f"{name!r} is not a usable role name: use lower-case letters, digits and _ (not starting with pg_)"
        )
    generated = None
    if password is None:
        generated = password = secrets.token_urlsafe(18)
    if not password:
        raise ImsearchError("the password must not be empty")
    role = sql.Identifier(name)
    with conn.transaction():
        current_user, database, superuser = conn.execute(
            "SELECT current_user, current_database(), rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() or ("", "", False)
        if name == current_user:
            raise ImsearchError(f"{name} is the role imsearch connects as; choose another name for the reader")
        existing = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        if existing is not None:
            _refuse_more_than_a_login(conn, name, existing[0])
        _close_public_writes(conn, database, superuser)
        verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
        conn.execute(
            sql.SQL("{} ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                    "CONNECTION LIMIT {} PASSWORD {}").format(
                sql.SQL("ALTER" if existing else "CREATE"), role, sql.Literal(READER_CONNECTION_LIMIT),
                sql.Literal(verifier))
        )
        for setting, value in READER_SETTINGS:
            conn.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(role, sql.Identifier(setting),
                                                                     sql.Literal(value)))
        try:
            with conn.transaction():
                conn.execute(sql.SQL("ALTER ROLE {} SET temp_file_limit = {}").format(
                    role, sql.Literal(READER_TEMP_FILE_LIMIT)))
        except psycopg.errors.InsufficientPrivilege:
            log.warning("%s has no temp_file_limit: only a superuser may set one; as a superuser, run "
                        "`ALTER ROLE %s SET temp_file_limit = '%s'`", name, name, READER_TEMP_FILE_LIMIT)
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(
            sql.SQL(", ").join(sql.Identifier(v) for v in READER_VIEWS + READER_TABLES), role))
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
            sql.SQL(", ").join(sql.SQL(f) for f in READER_FUNCTIONS), role))
        _check_read_only(conn, name)
        _warn_what_stays_open(conn, name, database)
    return Reader(name=name, created=existing is None, password=generated, database=database)


def _refuse_more_than_a_login(conn: psycopg.Connection[Any], name: str, oid: int) -> None:
    """Refuse an existing role that could do more than the reader's grants allow, in any database.

    A superuser or a role with another attribute; a member of any role (pg_execute_server_program runs programs
    as the server's user, pg_read_server_files reads its files, and any role may own or write tables); the owner
    of anything (pg_shdepend holds every database's owners, and large objects' and default privileges' too); or a
    role holding privileges grant_reader does not give. A reader made earlier holds only those, so a second
    run still sets its password.
    """
    attributes = conn.execute(
        sql.SQL("SELECT rolsuper, {} FROM pg_roles WHERE oid = %s").format(
            sql.SQL(", ").join(sql.Identifier(column) for column, _ in PRIVILEGED_ATTRIBUTES)),
        (oid,),
    ).fetchone() or (False,)
    if attributes[0]:
        raise ImsearchError(f"{name} is a superuser; choose another name for the reader")
    extra = [keyword for (_, keyword), held in zip(PRIVILEGED_ATTRIBUTES, attributes[1:]) if held]
    if extra:
        raise ImsearchError(
            f"{name} has {', '.join(extra)} besides LOGIN, which a reader must not have; choose a new name for the "
            f"reader, or run `ALTER ROLE {name} {' '.join('NO' + k for k in extra)}` first"
        )
    (memberships,) = conn.execute(
        "SELECT array_agg(DISTINCT roleid::regrole::text ORDER BY roleid::regrole::text) "
        "FROM pg_auth_members WHERE member = %s",
        (oid,),
    ).fetchone() or (None,)
    if memberships:
        raise ImsearchError(
            f"{name} is a member of {', '.join(memberships)}, whose rights it would have; a reader belongs to no "
            f"role: choose a new name for the reader, or run `REVOKE {', '.join(memberships)} FROM {name}` first"
        )
    rows = conn.execute(
        """
        WITH here AS (SELECT oid FROM pg_database WHERE datname = current_database()),
        granted (classid, objid) AS (
            SELECT 'pg_database'::regclass::oid, oid FROM here
            UNION ALL SELECT 'pg_namespace'::regclass::oid, 'public'::regnamespace::oid
            UNION ALL SELECT 'pg_class'::regclass::oid, v::regclass::oid FROM unnest(%(views)s::text[]) v
            UNION ALL SELECT 'pg_proc'::regclass::oid, f::regprocedure::oid FROM unnest(%(functions)s::text[]) f
        )
        SELECT d.deptype = 'o',
               CASE WHEN d.dbid IN (0, (SELECT oid FROM here))
                    THEN pg_describe_object(d.classid, d.objid, d.objsubid)
                    ELSE d.classid::regclass || ' ' || d.objid || ' in database ' || coalesce(o.datname, '?')
               END
        FROM pg_shdepend d
        LEFT JOIN pg_database o ON o.oid = d.dbid
        WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = %(oid)s
          AND NOT (d.deptype = 'a' AND d.objsubid = 0 AND d.dbid IN (0, (SELECT oid FROM here))
                   AND (d.classid, d.objid) IN (SELECT classid, objid FROM granted))
        ORDER BY 1 DESC, 2
        """,
        {"oid": oid, "views": [f"public.{v}" for v in READER_VIEWS + READER_TABLES],
         "functions": list(READER_FUNCTIONS)},
    ).fetchall()
    owned = [what for is_owner, what in rows if is_owner]
    if owned:
        raise ImsearchError(
            f"{name} owns {len(owned)} object(s) ({_some(owned)}), which it could change; a reader owns nothing: "
            f"choose a new name for the reader, or run `REASSIGN OWNED BY {name} TO ...` in each database first"
        )
    # pg_shdepend names the objects, not the privileges: on the reader's own objects, only its own grants.
    beyond = [r[0] for r in conn.execute(
        """
        SELECT a.privilege_type || CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END
               || ' on ' || x.what
        FROM (
            SELECT 'database ' || datname AS what, datacl AS acl, 'CONNECT' AS granted
            FROM pg_database WHERE datname = current_database()
            UNION ALL SELECT 'schema public', nspacl, 'USAGE' FROM pg_namespace WHERE nspname = 'public'
            UNION ALL SELECT CASE relkind WHEN 'v' THEN 'view ' ELSE 'table ' END || oid::regclass, relacl, 'SELECT'
            FROM pg_class
            WHERE oid = ANY (%(views)s::regclass[])
            UNION ALL SELECT 'function ' || oid::regprocedure, proacl, 'EXECUTE' FROM pg_proc
            WHERE oid = ANY (%(functions)s::regprocedure[])
        ) x, aclexplode(x.acl) a
        WHERE a.grantee = %(oid)s AND (a.privilege_type <> x.granted OR a.is_grantable)
        ORDER BY 1
        """,
        {"oid": oid, "views": [f"public.{v}" for v in READER_VIEWS + READER_TABLES],
         "functions": list(READER_FUNCTIONS)},
    ).fetchall()]
    privileges = [what for _, what in rows] + beyond
    if privileges:
        raise ImsearchError(
            f"{name} holds privileges grant-reader does not give ({_some(privileges)}); choose a new name for the "
            "reader, or revoke them first"
        )


def _some(items: list[str], shown: int = 3) -> str:
    """The first few of a list, for a one-line message."""
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _close_public_writes(conn: psycopg.Connection[Any], database: str, superuser: bool) -> None:
    """Take from PUBLIC what lets every role write in imsearch's database, where this role may.

    TEMPORARY on the database: temporary tables are not bounded by temp_file_limit. Only the database's owner
    (or a superuser) may revoke it; the owner keeps it. The large-object and WAL-message functions of
    PUBLIC_WRITERS belong to the bootstrap superuser, so only a superuser may revoke them; otherwise
    `_warn_what_stays_open` says so and the grant goes on (a managed server has no superuser).
    """
    temp_for_all, owner = conn.execute(
        "SELECT has_database_privilege('public', oid, 'TEMPORARY'), pg_has_role(datdba, 'USAGE') "
        "FROM pg_database WHERE datname = current_database()"
    ).fetchone() or (False, False)
    if temp_for_all and not owner:
        raise ImsearchError(
            f"every role may create temporary tables in database {database}, and temporary tables are not bounded "
            f"by temp_file_limit; run `REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC` as its owner, then "
            "grant the reader again"
        )
    if temp_for_all:
        conn.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
    if superuser:
        signatures = [r[0] for r in conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc "
            "WHERE pronamespace = 'pg_catalog'::regnamespace AND proname = ANY(%s) ORDER BY 1",
            (list(PUBLIC_WRITERS),),
        ).fetchall()]
        conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(
            sql.SQL(", ").join(sql.SQL("pg_catalog.{}").format(sql.SQL(s)) for s in signatures)))


def _check_read_only(conn: psycopg.Connection[Any], name: str) -> None:
    """Refuse (rolling the grant back) when the role could still write through privileges PUBLIC holds."""
    (writable,) = conn.execute(
        """
        SELECT array(
            SELECT 'CREATE on schema ' || n.nspname FROM pg_namespace n
            WHERE has_schema_privilege(%(r)s, n.oid, 'CREATE')
            UNION ALL
            SELECT 'CREATE on database ' || current_database()
            WHERE has_database_privilege(%(r)s, current_database(), 'CREATE')
            UNION ALL
            SELECT 'TEMPORARY on database ' || current_database()
            WHERE has_database_privilege(%(r)s, current_database(), 'TEMPORARY')
            UNION ALL
            SELECT 'writes to ' || c.oid::regclass FROM pg_class c
            WHERE c.oid <> 'pg_catalog.pg_settings'::regclass  -- UPDATE on it is SET, which every role may do
              AND CASE WHEN c.relkind IN ('r', 'p', 'v', 'm', 'f')
                       THEN has_any_column_privilege(%(r)s, c.oid, 'INSERT, UPDATE')
                            OR has_table_privilege(%(r)s, c.oid, 'DELETE, TRUNCATE') END
            UNION ALL
            SELECT 'nextval on ' || c.oid::regclass FROM pg_class c
            WHERE CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(%(r)s, c.oid, 'USAGE, UPDATE') END
            UNION ALL
            SELECT 'EXECUTE on SECURITY DEFINER function ' || p.oid::regprocedure FROM pg_proc p
            WHERE p.prosecdef AND has_function_privilege(%(r)s, p.oid, 'EXECUTE')
              AND p.oid <> ALL (%(functions)s::regprocedure[])
            UNION ALL
            SELECT 'writes to every large object (lo_compat_privileges is on)'
            WHERE current_setting('lo_compat_privileges') = 'on'
            UNION ALL
            SELECT 'UPDATE on large object ' || m.oid FROM pg_largeobject_metadata m, aclexplode(m.lomacl) a
            WHERE a.grantee = 0 AND a.privilege_type = 'UPDATE'
        )
        """,
        {"r": name, "functions": list(READER_FUNCTIONS)},
    ).fetchone() or ([],)
    if "CREATE on schema public" in writable:
        raise ImsearchError(
            f"{name} could create objects (PostgreSQL before 15 lets every role create in schema public); "
            "run `REVOKE CREATE ON SCHEMA public FROM PUBLIC` as the schema owner, then grant the reader again"
        )
    if writable:
        raise ImsearchError(
            f"{name} could write through privileges every role has here ({_some(writable)}); revoke them from "
            "PUBLIC as their owner, then grant the reader again"
        )


def _warn_what_stays_open(conn: psycopg.Connection[Any], name: str, database: str) -> None:
    """Log what a reader can still write that this role could not close: the grant itself goes on."""
    (callable_writers,) = conn.execute(
        "SELECT array_agg(p.oid::regprocedure::text ORDER BY 1) FROM pg_proc p "
        "WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY(%s) "
        "AND has_function_privilege(%s, p.oid, 'EXECUTE')",
        (list(PUBLIC_WRITERS), name),
    ).fetchone() or (None,)
    if callable_writers:
        log.warning("%s can still create large objects and WAL messages: every role may call these functions, "
                    "and only a superuser may change that; as one, run `REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC` "
                    "in database %s", name, ", ".join(callable_writers), database)
    reserved = _reserved_for_me(conn)
    if reserved is not None:
        log.warning("%s may hold %d connections, and every reader as many: nothing keeps room for imsearch's own "
                    "role on this server (%s); as a superuser, run `ALTER SYSTEM SET reserved_connections = 10` "
                    "(PostgreSQL 16 or later; a restart applies it) and `GRANT pg_use_reserved_connections TO %s`",
                    name, READER_CONNECTION_LIMIT, reserved, conn.info.user)
    (elsewhere,) = conn.execute(
        "SELECT array_agg(datname::text ORDER BY datname) FROM pg_database "
        "WHERE datallowconn AND datname <> current_database() AND has_database_privilege(%s, oid, 'CONNECT')",
        (name,),
    ).fetchone() or (None,)
    if elsewhere:
        log.warning("%s may also connect to database(s) %s, where grant-reader closes nothing (PUBLIC may create "
                    "large objects there); to keep it out, run `REVOKE CONNECT ON DATABASE ... FROM PUBLIC` or "
                    "limit its logins to %s in pg_hba.conf", name, ", ".join(elsewhere), database)


def _reserved_for_me(conn: psycopg.Connection[Any]) -> str | None:
    """Why no connection slots are kept for the role imsearch connects as, else None: a superuser has
    superuser_reserved_connections, a member of pg_use_reserved_connections has reserved_connections."""
    superuser, super_slots, slots, member = conn.execute(
        "SELECT rolsuper, current_setting('superuser_reserved_connections')::int, "
        "coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int, "
        "coalesce(pg_has_role(current_user, (SELECT oid FROM pg_roles WHERE rolname = 'pg_use_reserved_connections'),"
        " 'USAGE'), false) FROM pg_roles WHERE rolname = current_user"
    ).fetchone() or (False, 0, 0, False)
    if superuser and super_slots > 0:
        return None
    if superuser:
        return "superuser_reserved_connections is 0"
    if member and slots > 0:
        return None
    if member:
        return f"reserved_connections is {slots}"
    return f"{conn.info.user} is no member of pg_use_reserved_connections"


def readers(conn: psycopg.Connection[Any]) -> list[str]:
    """Login roles that may call imsearch's functions and have a password (needs a superuser connection)."""
    rows = conn.execute(
        """
        SELECT a.rolname
        FROM pg_authid a
        WHERE a.rolcanlogin AND NOT a.rolsuper AND a.rolpassword IS NOT NULL
          AND has_function_privilege(a.oid, %s, 'EXECUTE')
        ORDER BY a.rolname
        """,
        (READER_FUNCTIONS[0],),
    ).fetchall()
    return [r[0] for r in rows]
