"""Shards: a library spread over PostgreSQL servers with PostgreSQL's own postgres_fdw and dblink.

The coordinator (the database imsearch connects to) holds `images` as a table partitioned by the hash of path; each
partition is a postgres_fdw foreign table on one shard server, whose own `images` table is a whole imsearch library
at the same schema revision, with its own indexes and its own imsearch_search. A shard holds exactly one hash
partition, so the row of a path lives on one shard, and that shard's UNIQUE(path) is the library's:

- writes go through the coordinator's `images`, which routes each row to its shard (ingest, load, moves);
- a search calls every shard's imsearch_search at once through dblink and keeps the nearest k
  (imsearch_shard_search, migration 0014);
- migrations and index upkeep run on every shard (`shard_urls`).

Adding shards lays the hash space out again (`add`): shards added to a library without rows, or with `rebalance`,
share it equally (modulus N); a shard added to a library with rows takes half of the largest partition, so only that
half moves. Removing a shard gives its rows to the shard it was split from, or lays the rest out equally. Rows move
through the coordinator in one transaction; docs/scaling.md says what a crash in its commit can leave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from ..errors import ImsearchError
from ..search import DBLINK_SCHEMA
from .connect import connect, redact, scalar

log = logging.getLogger(__name__)

SERVER_PREFIX = "imsearch_shard_"  # foreign servers imsearch_shard_1, _2, ...; partitions images_shard_1, ...
PARTITION_PREFIX = "images_shard_"
STAGING = "imsearch_relayout"  # the new layout's partitioned table while rows move
# The libpq options a shard's foreign server takes from its URL; user and password go to the user mapping.
SERVER_OPTIONS = ("host", "hostaddr", "port", "dbname", "sslmode", "sslrootcert", "sslcert", "sslkey",
                  "connect_timeout", "options", "application_name", "target_session_attrs")
USER_OPTIONS = ("user", "password")
# postgres_fdw options of every shard: pgvector's operators may be pushed down (extensions), shards are scanned
# at once under an Append (async_capable), rows go in batches (batch_size) and come back in large fetches.
FDW_OPTIONS = {"extensions": "vector", "async_capable": "true", "batch_size": "1000", "fetch_size": "1000"}
MOVE_CHUNK = 5_000  # rows moved between shards per statement

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Shard:
    """One shard as the coordinator's catalog describes it: its foreign server, where it is (no password), and its
    hash partition of the library; `rows` when counted."""

    server: str
    url: str
    modulus: int
    remainder: int
    rows: int | None = None

    @property
    def share(self) -> float:
        return 1 / self.modulus

    def to_json(self) -> dict[str, object]:
        return {"server": self.server, "url": self.url, "modulus": self.modulus, "remainder": self.remainder,
                "share": round(self.share, 6), "rows": self.rows}


def sharded(conn: psycopg.Connection[Any]) -> bool:
    """Whether this database is a sharded library's coordinator (its `images` is partitioned)."""
    return bool(scalar(conn, "SELECT coalesce((SELECT relkind = 'p' FROM pg_class "
                             "WHERE oid = to_regclass('public.images')), false)"))


LAYOUT = """
SELECT s.srvname, s.srvoptions, u.umoptions, c.relname, pg_get_expr(c.relpartbound, c.oid)
FROM pg_inherits h
JOIN pg_class c ON c.oid = h.inhrelid
JOIN pg_foreign_table f ON f.ftrelid = c.oid
JOIN pg_foreign_server s ON s.oid = f.ftserver
LEFT JOIN pg_user_mappings u ON u.srvid = s.oid AND u.usename = current_user
WHERE h.inhparent = 'public.images'::regclass
ORDER BY s.srvname
"""


def _options(items: Sequence[str] | None) -> dict[str, str]:
    return dict(o.split("=", 1) for o in items or ())


def _bound(text: str) -> tuple[int, int]:
    """(modulus, remainder) of 'FOR VALUES WITH (modulus 4, remainder 1)'."""
    inner = text[text.index("(") + 1:text.rindex(")")]
    parts = dict(p.strip().split() for p in inner.split(","))
    return int(parts["modulus"]), int(parts["remainder"])


def _url(server: dict[str, str], user: dict[str, str]) -> str:
    """A libpq URI as imsearch takes DATABASE_URL: the user and password before the @, the rest as parameters."""
    auth = quote(user.get("user", ""), safe="")
    if "password" in user:
        auth += ":" + quote(user["password"], safe="")
    query = urlencode({k: v for k, v in server.items() if k in SERVER_OPTIONS and k != "dbname"})
    return f"postgresql://{auth}@/{quote(server.get('dbname', ''), safe='')}?{query}"


def _shown(server: dict[str, str], user: dict[str, str]) -> str:
    """A shard's address as messages show it: user@host:port/dbname, no password."""
    host = server.get("host", "localhost")
    return f"{user.get('user', '')}@{host}:{server.get('port', '5432')}/{server.get('dbname', '')}"


def shards(conn: psycopg.Connection[Any], *, count: bool = False) -> list[Shard]:
    """The coordinator's shards, by server name; with `count`, each one's rows (counted on the shard)."""
    if not sharded(conn):
        return []
    found = []
    for server, srvoptions, umoptions, partition, bound in conn.execute(LAYOUT).fetchall():
        modulus, remainder = _bound(bound)
        rows = None
        if count:
            counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(partition))).fetchone()
            rows = int(counted[0]) if counted else 0
        found.append(Shard(server, _shown(_options(srvoptions), _options(umoptions)), modulus, remainder, rows))
    return found


def shard_urls(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(server, URL with its credentials) of each shard: where imsearch itself connects to migrate a shard and keep
    its indexes, as the coordinator does (its user mapping for the current user)."""
    if not sharded(conn):
        return []
    return [(server, _url(_options(srvoptions), _options(umoptions)))
            for server, srvoptions, umoptions, _, _ in conn.execute(LAYOUT).fetchall()]


def _same_place(a: dict[str, str], b: dict[str, str]) -> bool:
    keys = ("host", "port", "dbname")
    defaults = {"host": "localhost", "port": "5432", "dbname": ""}
    return all(a.get(k, defaults[k]) == b.get(k, defaults[k]) for k in keys)


def check_shard(url: str) -> None:
    """Refuse a database that cannot be a new shard: one holding rows or shards of its own."""
    conn = connect(url)
    try:
        if sharded(conn):
            raise ImsearchError(f"{redact(url)}: is a sharded library's coordinator itself; a shard must be a plain, "
                                "empty imsearch database")
        rows = scalar(conn, "SELECT count(*) FROM images")
        if rows:
            raise ImsearchError(f"{redact(url)}: holds {rows} image(s); a new shard must be empty (its rows would "
                                "be lost to the library: `imsearch export` them and `imsearch load` them after)")
    finally:
        conn.close()


def _prepare_coordinator(conn: psycopg.Connection[Any]) -> None:
    """postgres_fdw, and dblink in a schema of its own that PUBLIC may not use: a reader must not open connections
    from this server. Both come with PostgreSQL's contrib; creating them takes a superuser (or a role the server's
    owner allowed)."""
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(DBLINK_SCHEMA)))
        conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(DBLINK_SCHEMA)))
        conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS dblink SCHEMA {}").format(sql.Identifier(DBLINK_SCHEMA)))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ImsearchError(f"the coordinator cannot create postgres_fdw and dblink: {str(exc).splitlines()[0]} "
                            "(a superuser must run `imsearch db shard add` once, or create both extensions)") from None
    except psycopg.errors.UndefinedFile:
        raise ImsearchError("the coordinator's PostgreSQL lacks contrib's postgres_fdw or dblink (install the "
                            "server's contrib package)") from None


def _new_server(conn: psycopg.Connection[Any], url: str, taken: set[str]) -> str:
    """A foreign server and the current user's mapping for the shard at url; returns the server's name."""
    given = conninfo_to_dict(url)
    n = 1
    while f"{SERVER_PREFIX}{n}" in taken:
        n += 1
    name = f"{SERVER_PREFIX}{n}"
    options = {k: str(v) for k, v in given.items() if k in SERVER_OPTIONS and v is not None}
    options.update(FDW_OPTIONS)
    conn.execute(sql.SQL("CREATE SERVER {} FOREIGN DATA WRAPPER postgres_fdw OPTIONS ({})").format(
        sql.Identifier(name), sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v))
                                                 for k, v in options.items())))
    user = {k: str(v) for k, v in given.items() if k in USER_OPTIONS and v is not None}
    mapping = sql.SQL("CREATE USER MAPPING FOR CURRENT_USER SERVER {}").format(sql.Identifier(name))
    if user:
        mapping += sql.SQL(" OPTIONS ({})").format(sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in user.items()))
    conn.execute(mapping)
    return name


def equal_layout(servers: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Every server an equal share: modulus N, one remainder each."""
    return {s: (len(servers), i) for i, s in enumerate(servers)}


def split_layout(current: dict[str, tuple[int, int]], new: str) -> dict[str, tuple[int, int]]:
    """The new server takes half of the largest partition (the smallest modulus; the first server of those):
    (m, r) becomes (2m, r), and the new one gets (2m, r + m). Only that half of one shard's rows moves."""
    server = min(current, key=lambda s: (current[s][0], s))
    m, r = current[server]
    return {**current, server: (2 * m, r), new: (2 * m, r + m)}


def merge_layout(current: dict[str, tuple[int, int]], gone: str) -> dict[str, tuple[int, int]]:
    """The layout without `gone`: its rows go to the partition it was split from when that is one shard's (its
    twin, of the same modulus), else every remaining shard takes an equal share."""
    m, r = current[gone]
    rest = {s: b for s, b in current.items() if s != gone}
    if m % 2 == 0:
        twin = next((s for s, b in rest.items() if b == (m, (r + m // 2) % m)), None)
        if twin is not None:
            return {**rest, twin: (m // 2, r % (m // 2))}
    return equal_layout(sorted(rest))


def _layout(conn: psycopg.Connection[Any]) -> dict[str, tuple[str, tuple[int, int]]]:
    """server -> (partition, (modulus, remainder)) of a sharded coordinator."""
    return {server: (partition, _bound(bound))
            for server, _, _, partition, bound in conn.execute(LAYOUT).fetchall()}


def _dependent_views(conn: psycopg.Connection[Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, definition, grants) of each view over images, in creation order: a table taken apart and made
    again drops them, and they come back the same."""
    rows = conn.execute(
        """
        SELECT DISTINCT v.oid, v.relname, pg_get_viewdef(v.oid)
        FROM pg_depend d
        JOIN pg_rewrite w ON w.oid = d.objid
        JOIN pg_class v ON v.oid = w.ev_class
        WHERE d.refobjid = 'public.images'::regclass AND d.classid = 'pg_rewrite'::regclass AND v.oid <> d.refobjid
        ORDER BY v.oid
        """).fetchall()
    return [(name, definition, _grants(conn, oid)) for oid, name, definition in rows]


def _grants(conn: psycopg.Connection[Any], oid: int) -> list[tuple[str, str]]:
    """(grantee, privilege) of a table or view besides its owner's own."""
    return [(g, p) for g, p in conn.execute(
        """
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type
        FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
        WHERE c.oid = %s AND a.grantee <> c.relowner
        """, (oid,)).fetchall()]


def _regrant(conn: psycopg.Connection[Any], name: str, grants: list[tuple[str, str]]) -> None:
    for grantee, privilege in grants:
        conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
            sql.SQL(privilege), sql.Identifier(name),
            sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.SQL(grantee)))


def _staging_table(conn: psycopg.Connection[Any], layout: dict[str, tuple[int, int]]) -> dict[str, str]:
    """The new layout as a partitioned table beside images, a foreign partition on each server; returns
    server -> partition name."""
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE images INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING COMMENTS "
                         "INCLUDING CONSTRAINTS INCLUDING STORAGE) PARTITION BY HASH (path)").format(
        sql.Identifier(STAGING)))
    names = {}
    for server, (modulus, remainder) in layout.items():
        names[server] = f"{STAGING}_{server.removeprefix(SERVER_PREFIX)}"
        conn.execute(sql.SQL("CREATE FOREIGN TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS {}, REMAINDER {}) "
                             "SERVER {} OPTIONS (schema_name 'public', table_name 'images')").format(
            sql.Identifier(names[server]), sql.Identifier(STAGING), sql.Literal(modulus), sql.Literal(remainder),
            sql.Identifier(server)))
    return names


def _move(conn: psycopg.Connection[Any], source: str, where: sql.Composable, label: str,
          progress: Progress | None) -> int:
    """Move the rows of `source` (a partition, or the plain images table) that `where` picks into the new layout,
    which routes each to its shard, and delete them from source; returns how many moved."""
    # OFFSET 0 keeps the test on the coordinator: satisfies_hash_partition names a table of the coordinator's
    paths = [p for (p,) in conn.execute(sql.SQL("SELECT path FROM (SELECT path FROM {} OFFSET 0) s WHERE {}").format(
        sql.Identifier(source), where)).fetchall()]
    for start in range(0, len(paths), MOVE_CHUNK):
        chunk = paths[start:start + MOVE_CHUNK]
        conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE path = ANY(%s)").format(
            sql.Identifier(STAGING), sql.Identifier(source)), (chunk,))
        conn.execute(sql.SQL("DELETE FROM {} WHERE path = ANY(%s)").format(sql.Identifier(source)), (chunk,))
        if progress:
            progress(label, start + len(chunk), len(paths))
    return len(paths)


def _swap(conn: psycopg.Connection[Any], new: dict[str, str], old: dict[str, str]) -> None:
    """images takes the new layout's partitions; the old ones (foreign tables: their rows stay on the shards) go."""
    for partition in old.values():
        conn.execute(sql.SQL("ALTER TABLE images DETACH PARTITION {}").format(sql.Identifier(partition)))
        conn.execute(sql.SQL("DROP FOREIGN TABLE {}").format(sql.Identifier(partition)))
    for server, partition in new.items():
        bound = scalar(conn, "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE oid = %s::regclass",
                       (partition,))
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(sql.Identifier(STAGING),
                                                                           sql.Identifier(partition)))
        name = PARTITION_PREFIX + server.removeprefix(SERVER_PREFIX)
        conn.execute(sql.SQL("ALTER FOREIGN TABLE {} RENAME TO {}").format(sql.Identifier(partition),
                                                                           sql.Identifier(name)))
        conn.execute(sql.SQL("ALTER TABLE images ATTACH PARTITION {} {}").format(sql.Identifier(name),
                                                                                 sql.SQL(bound)))
    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(STAGING)))


def _convert(conn: psycopg.Connection[Any], layout: dict[str, tuple[int, int]], progress: Progress | None) -> int:
    """A plain library becomes a coordinator: its rows move to the shards, `images` becomes the partitioned table,
    and the views over it come back with their grants. image_audit's foreign keys go: no key can reference rows
    on other servers (docs/scaling.md). Returns the rows moved."""
    views = _dependent_views(conn)
    table_grants = _grants(conn, scalar(conn, "SELECT 'public.images'::regclass::oid"))
    next_id = scalar(conn, "SELECT coalesce(max(id), 0) + 1 FROM images")
    names = _staging_table(conn, layout)
    moved = _move(conn, "images", sql.SQL("true"), "moving rows to the shards", progress)
    for name, _, _ in reversed(views):
        conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier(name)))
    for (constraint,) in conn.execute(
            "SELECT conname FROM pg_constraint WHERE contype = 'f' AND confrelid = 'public.images'::regclass"
            " AND conrelid = 'public.image_audit'::regclass").fetchall():
        conn.execute(sql.SQL("ALTER TABLE image_audit DROP CONSTRAINT {}").format(sql.Identifier(constraint)))
    conn.execute("DROP TABLE images")
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO images").format(sql.Identifier(STAGING)))
    conn.execute(sql.SQL("ALTER TABLE images ALTER COLUMN id RESTART WITH {}").format(sql.Literal(int(next_id))))
    for server, partition in names.items():
        conn.execute(sql.SQL("ALTER FOREIGN TABLE {} RENAME TO {}").format(
            sql.Identifier(partition), sql.Identifier(PARTITION_PREFIX + server.removeprefix(SERVER_PREFIX))))
    _regrant(conn, "images", table_grants)
    for name, definition, grants in views:
        conn.execute(sql.SQL("CREATE VIEW {} AS {}").format(sql.Identifier(name), sql.SQL(definition)))
        _regrant(conn, name, grants)
    return moved


def _relayout(conn: psycopg.Connection[Any], layout: dict[str, tuple[int, int]], progress: Progress | None) -> int:
    """Move a sharded library to `layout` (server -> bound; a server left out is emptied): every row that is not
    where the new layout puts it moves there. Returns the rows moved."""
    current = _layout(conn)
    names = _staging_table(conn, layout)
    moved = 0
    for server, (partition, _) in current.items():
        where: sql.Composable = sql.SQL("true")
        if server in layout:
            m, r = layout[server]
            where = sql.SQL("NOT satisfies_hash_partition({}::regclass, {}, {}, path)").format(
                sql.Literal(STAGING), sql.Literal(m), sql.Literal(r))
        moved += _move(conn, partition, where, f"moving rows from {server}", progress)
    _swap(conn, names, {s: p for s, (p, _) in current.items()})
    return moved


@dataclass(frozen=True)
class Relaid:
    """What `add` or `remove` did: the shards now, and how many rows moved between servers."""

    shards: tuple[Shard, ...]
    moved: int

    def to_json(self) -> dict[str, object]:
        return {"shards": [s.to_json() for s in self.shards], "moved": self.moved}


def _servers(conn: psycopg.Connection[Any]) -> dict[str, dict[str, str]]:
    """Every foreign server imsearch made, with its options (one left by a failed add may hold no partition)."""
    return {s: _options(o) for s, o in conn.execute(
        "SELECT srvname, srvoptions FROM pg_foreign_server WHERE starts_with(srvname, %s)",
        (SERVER_PREFIX,)).fetchall()}


def refuse_known(conn: psycopg.Connection[Any], urls: Sequence[str]) -> None:
    """Refuse a URL naming a database that is a shard of this library already, or named twice."""
    current = set(_layout(conn)) if sharded(conn) else set()
    places = [(s, o) for s, o in _servers(conn).items() if s in current]
    for url in urls:
        given = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
        clash = next((s for s, o in places if _same_place(o, given)), None)
        if clash is not None:
            raise ImsearchError(f"{redact(url)}: is a shard of this library already ({clash})")
        places.append((f"given twice: {redact(url)}", given))


def add(conn: psycopg.Connection[Any], urls: Sequence[str], *, rebalance: bool = False,
        progress: Progress | None = None) -> Relaid:
    """Make the database behind `conn` (the coordinator) spread its library over these new shards too.

    Each URL names an empty imsearch database, migrated already (`imsearch db shard add` does both). One
    transaction: the servers, the new layout, the rows that move. A library without rows, or `rebalance`, is laid
    out equally over every shard; otherwise each new shard takes half of the largest partition.
    """
    refuse_known(conn, urls)
    was_sharded = sharded(conn)
    current = {s: b for s, (_, b) in _layout(conn).items()} if was_sharded else {}
    known = _servers(conn)
    rows = scalar(conn, "SELECT count(*) FROM images")
    _prepare_coordinator(conn)
    with conn.transaction():
        servers: list[str] = []
        for server in [s for s in known if s not in current]:  # left by a failed add or a remove: made again
            conn.execute(sql.SQL("DROP SERVER {} CASCADE").format(sql.Identifier(server)))
        for url in urls:
            servers.append(_new_server(conn, url, set(current) | set(servers)))
        if rebalance or not rows or not current:
            layout = equal_layout(sorted([*current, *servers], key=_number))
        else:
            layout = current
            for server in servers:
                layout = split_layout(layout, server)
        moved = _relayout(conn, layout, progress) if was_sharded else _convert(conn, layout, progress)
    return Relaid(tuple(shards(conn, count=True)), moved)


def remove(conn: psycopg.Connection[Any], url: str, *, progress: Progress | None = None) -> Relaid:
    """Take the shard at `url` out of the library: its rows move to the others first (`merge_layout`). The last
    shard cannot go: it holds the library (`imsearch export`, then `imsearch load` into a plain database)."""
    if not sharded(conn):
        raise ImsearchError("this library has no shards")
    given = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    rows = conn.execute(LAYOUT).fetchall()
    server = next((s for s, o, _, _, _ in rows if _same_place(_options(o), given)), None)
    if server is None:
        raise ImsearchError(f"{redact(url)}: is not a shard of this library (`imsearch db shard list` shows them)")
    if len(rows) == 1:
        raise ImsearchError(f"{server} is this library's last shard and holds all of it: `imsearch export` the "
                            "library, then `imsearch load` it into a database without shards")
    current = {s: b for s, (_, b) in _layout(conn).items()}
    with conn.transaction():
        moved = _relayout(conn, merge_layout(current, server), progress)
        conn.execute(sql.SQL("DROP SERVER {} CASCADE").format(sql.Identifier(server)))
    return Relaid(tuple(shards(conn, count=True)), moved)


def _number(server: str) -> int:
    return int(server.removeprefix(SERVER_PREFIX))

