"""Plain SQL for BI tools: a read-only login role, and groups of near-duplicate stored images.

The SQL objects themselves (imsearch_nearest, imsearch_class_correspondence, imsearch_duplicate_pairs and the
views image_catalog, class_summary, class_correspondence) belong to migration 0002; docs/sql.md shows them.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .errors import ImsearchError, ModelMismatch
from .store import Store

# What a reader may use: SELECT on the views, EXECUTE on the functions (all created by migration 0002).
READER_VIEWS = ("image_catalog", "class_summary", "class_correspondence")
READER_FUNCTIONS = (
    "imsearch_nearest(bigint, integer, text)",
    "imsearch_class_correspondence(integer, text)",
    "imsearch_duplicate_pairs(double precision, integer)",
)

# Cosine distance at or below which two stored images count as duplicates. Measured with bench/duplicates.py on
# the shared base photos with the stand-in weights (docs/sql.md): byte copies and JPEG re-encodes fall below
# it (at most 0.0043), every distinct photo above (at least 0.0172).
DEFAULT_DUPLICATE_DISTANCE = 0.008
# Each image's nearest neighbours that are checked; larger groups still join up through their members.
DUPLICATE_NEIGHBOURS = 10

ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class Reader:
    """A read-only login role as `grant_reader` left it; `password` only when one was generated."""

    name: str
    created: bool
    password: str | None
    database: str


def grant_reader(store: Store, name: str, password: str | None = None) -> Reader:
    """Create (or update) a LOGIN role that can only read imsearch's views and call its functions.

    Without a password, a random one is generated and returned (the server keeps only its SCRAM hash).
    Refuses a name that is a superuser, the role imsearch itself connects as, or one that could write.
    """
    if not ROLE_NAME.fullmatch(name) or name.startswith("pg_"):
        raise ImsearchError(
            f"{name!r} is not a usable role name: use lower-case letters, digits and _ (not starting with pg_)"
        )
    generated = None
    if password is None:
        generated = password = secrets.token_urlsafe(18)
    if not password:
        raise ImsearchError("the password must not be empty")
    conn = store.conn
    role = sql.Identifier(name)
    with conn.transaction():
        current_user, database = conn.execute("SELECT current_user, current_database()").fetchone() or ("", "")
        if name == current_user:
            raise ImsearchError(f"{name} is the role imsearch connects as; choose another name for the reader")
        existing = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        if existing is not None and existing[0]:
            raise ImsearchError(f"{name} is a superuser; choose another name for the reader")
        verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
        conn.execute(
            sql.SQL("{} ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                    "PASSWORD {}").format(sql.SQL("ALTER" if existing else "CREATE"), role, sql.Literal(verifier))
        )
        conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(role))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(
            sql.SQL(", ").join(sql.Identifier(v) for v in READER_VIEWS), role))
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
            sql.SQL(", ").join(sql.SQL(f) for f in READER_FUNCTIONS), role))
        _check_read_only(conn, name)
    return Reader(name=name, created=existing is None, password=generated, database=database)


def _check_read_only(conn: psycopg.Connection[Any], name: str) -> None:
    """Refuse (rolling the grant back) when the role could still write or create, e.g. through a membership."""
    can_write, can_create = conn.execute(
        """
        SELECT has_table_privilege(%(r)s, 'public.images', 'INSERT, UPDATE, DELETE, TRUNCATE'),
               has_schema_privilege(%(r)s, 'public', 'CREATE') OR has_database_privilege(%(r)s, current_database(),
                                                                                         'CREATE')
        """,
        {"r": name},
    ).fetchone() or (False, False)
    if can_write:
        raise ImsearchError(f"{name} can write to the images table (through a role it belongs to or owns it); "
                            "choose a new role name for the reader")
    if can_create:
        raise ImsearchError(
            f"{name} could create objects (PostgreSQL before 15 lets every role create in schema public); "
            "run `REVOKE CREATE ON SCHEMA public FROM PUBLIC` as the schema owner, then grant the reader again"
        )


def readers(conn: psycopg.Connection[Any]) -> list[str]:
    """Login roles that may call imsearch's functions and have a password (needs a superuser connection)."""
    rows = conn.execute(
        """
        SELECT a.rolname
        FROM pg_authid a
        WHERE a.rolcanlogin AND NOT a.rolsuper AND a.rolpassword IS NOT NULL
          AND has_function_privilege(a.oid, 'imsearch_nearest(bigint, integer, text)', 'EXECUTE')
        ORDER BY a.rolname
        """
    ).fetchall()
    return [r[0] for r in rows]


@dataclass(frozen=True)
class DuplicateImage:
    """One member of a duplicate group; `nearest` is its distance to the closest other member."""

    id: int
    path: str
    cls: str | None
    nearest: float


@dataclass(frozen=True)
class DuplicateGroup:
    """Stored images linked by cosine distances at or below the threshold (connected components)."""

    number: int
    images: tuple[DuplicateImage, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.number,
            "images": [{"id": i.id, "path": i.path, "class": i.cls, "nearest": round(i.nearest, 6)}
                       for i in self.images],
        }


def duplicates(store: Store, threshold: float = DEFAULT_DUPLICATE_DISTANCE,
               neighbours: int = DUPLICATE_NEIGHBOURS) -> list[DuplicateGroup]:
    """Groups of near-duplicate stored images: pairs from the HNSW index in SQL, joined into components here."""
    if not 0 <= threshold < 2:
        raise ImsearchError(f"the threshold is a cosine distance between 0 and 2, not {threshold}")
    conn = store.conn
    models = conn.execute("SELECT count(DISTINCT model) FROM images").fetchone()
    if models is not None and models[0] > 1:
        raise ModelMismatch(
            f"the database holds images embedded with {models[0]} models, whose distances do not compare; "
            "run `imsearch ingest DIR --reembed` to re-embed them with one model"
        )
    pairs = conn.execute(
        "SELECT id, duplicate_id, distance FROM imsearch_duplicate_pairs(%s, %s)", (threshold, neighbours)
    ).fetchall()
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    nearest: dict[int, float] = {}
    for a, b, distance in pairs:
        parent[root(a)] = root(b)
        nearest[a] = min(nearest.get(a, distance), distance)
        nearest[b] = min(nearest.get(b, distance), distance)
    info = {
        r[0]: (r[1], r[2])
        for r in conn.execute("SELECT id, path, class FROM images WHERE id = ANY(%s)", (list(nearest),)).fetchall()
    }
    members: dict[int, list[DuplicateImage]] = {}
    for image_id, distance in nearest.items():
        if image_id in info:  # else deleted meanwhile
            path, cls = info[image_id]
            members.setdefault(root(image_id), []).append(DuplicateImage(image_id, path, cls, float(distance)))
    ordered = sorted((sorted(m, key=lambda i: i.path) for m in members.values() if len(m) > 1),
                     key=lambda m: m[0].path)
    return [DuplicateGroup(n, tuple(m)) for n, m in enumerate(ordered, start=1)]
