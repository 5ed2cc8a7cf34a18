"""The read-only role of `imsearch db grant-reader`: who is refused, and what a reader cannot do, on a real server.

A reader logs in as itself (the test server trusts local logins, so the password is not what is tested here;
tests/test_db_serve.py tries passwords over TCP). Roles belong to the whole server: each test drops its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
import pytest

from imsearch import ImsearchError
from imsearch.db.sqlaccess import READER_CONNECTION_LIMIT, READER_FUNCTIONS, READER_TEMP_FILE_LIMIT, grant_reader
from imsearch.db.store import Store
from tests.conftest import scratch_database

PASSWORD = "s3cret-pass"
_names = itertools.count()


@pytest.fixture(scope="module")
def imsearch_db(server_url):
    """An imsearch database (schema at head) holding three images with random vectors; no model needed."""
    with scratch_database(server_url, f"imsearch_test_readers_{os.getpid()}") as url:
        store = Store.open(url)
        store.conn.execute(
            """
            INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding)
            SELECT '/photos/kitchen/' || g || '.jpg', 'kitchen', md5(g::text), 1, 1, 1, 'test',
                   (SELECT array_agg(random() + 0 * x + 0 * g) FROM generate_series(1, 2048) x)::halfvec(2048)
            FROM generate_series(1, 3) g
            """
        )
        try:
            yield store, url
        finally:
            store.close()


@pytest.fixture
def admin(imsearch_db):
    with psycopg.connect(imsearch_db[1], autocommit=True) as c:
        yield c


@pytest.fixture
def new_role(imsearch_db, server_url):
    """Makes fresh role names; the roles, and what they own or were granted here or in the server's database, are
    dropped afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(f"imsearch_test_reader_{os.getpid()}_{next(_names)}")
        return made[-1]

    yield make
    for url in (imsearch_db[1], server_url):
        with psycopg.connect(url, autocommit=True) as c:
            for name in made:
                if c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                    c.execute(f'DROP OWNED BY "{name}"')
    with psycopg.connect(server_url, autocommit=True) as c:
        for name in reversed(made):
            c.execute(f'DROP ROLE IF EXISTS "{name}"')


def login(url: str, name: str) -> psycopg.Connection:
    return psycopg.connect(url, user=name, password=PASSWORD, autocommit=True)


def as_user(url: str, name: str) -> str:
    """The same server and database, logged in as another role."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{name}:{PASSWORD}@{host}", parts.path, parts.query, parts.fragment))


def assert_untouched(admin: psycopg.Connection, name: str) -> None:
    """A refused grant leaves the role as it was: no password, no grants, no settings."""
    row = admin.execute(
        "SELECT a.rolpassword IS NULL, has_function_privilege(a.oid, %s, 'EXECUTE'), "
        "(SELECT count(*) FROM pg_db_role_setting s WHERE s.setrole = a.oid) "
        "FROM pg_authid a WHERE a.rolname = %s", (READER_FUNCTIONS[0], name)).fetchone()
    assert row == (True, False, 0)


@pytest.mark.parametrize("group", ["pg_execute_server_program", "pg_read_server_files", "pg_write_server_files",
                                   "pg_read_all_data", "pg_write_all_data", "a role of its own"])
def test_a_member_of_any_role_is_refused(imsearch_db, admin, new_role, group):
    name = new_role()
    if group == "a role of its own":
        group = new_role()
        admin.execute(f'CREATE ROLE "{group}" NOLOGIN')
    admin.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE "{group}"')
    with pytest.raises(ImsearchError, match=rf"^{name} is a member of {group}, whose rights it would have; .*"
                                            rf"`REVOKE {group} FROM {name}` first$"):
        grant_reader(imsearch_db[0].conn, name, PASSWORD)
    assert_untouched(admin, name)


@pytest.mark.parametrize("where", ["imsearch's database", "another database"])
def test_a_role_that_owns_a_table_anywhere_is_refused(imsearch_db, admin, new_role, server_url, where):
    name = new_role()
    admin.execute(f'CREATE ROLE "{name}" LOGIN')
    url = imsearch_db[1] if where == "imsearch's database" else server_url
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f'CREATE TABLE "{name}_notes" (note text)')
        c.execute(f'ALTER TABLE "{name}_notes" OWNER TO "{name}"')
        database = c.execute("SELECT current_database()").fetchone()[0]
    owned = f"table {name}_notes" if where == "imsearch's database" else f"pg_class [0-9]+ in database {database}"
    with pytest.raises(ImsearchError, match=rf"^{name} owns 1 object\(s\) \({owned}\), which it could change; "
                                            rf".*`REASSIGN OWNED BY {name} TO \.\.\.`"):
        grant_reader(imsearch_db[0].conn, name, PASSWORD)
    assert_untouched(admin, name)


@pytest.mark.parametrize("grant, shown", [
    ("INSERT ON images TO {}", "table images"),
    ("UPDATE (class) ON images TO {}", "column class of table images"),
    ("SELECT ON alembic_version TO {}", "table alembic_version"),
    ("CREATE ON SCHEMA public TO {}", "CREATE on schema public"),
    ("SELECT ON image_catalog TO {} WITH GRANT OPTION", "SELECT WITH GRANT OPTION on view image_catalog"),
])
def test_a_role_holding_other_privileges_is_refused(imsearch_db, admin, new_role, grant, shown):
    name = new_role()
    admin.execute(f'CREATE ROLE "{name}" LOGIN')
    admin.execute("GRANT " + grant.format(f'"{name}"'))
    with pytest.raises(ImsearchError, match=rf"^{name} holds privileges grant-reader does not give \({shown}\)"):
        grant_reader(imsearch_db[0].conn, name, PASSWORD)


@pytest.mark.parametrize("attribute", ["CREATEDB", "CREATEROLE", "REPLICATION", "BYPASSRLS"])
def test_a_role_with_an_attribute_beyond_login_is_refused(imsearch_db, admin, new_role, attribute):
    name = new_role()
    admin.execute(f'CREATE ROLE "{name}" LOGIN {attribute}')
    with pytest.raises(ImsearchError, match=rf"^{name} has {attribute} besides LOGIN, which a reader must not have; "
                                            rf".*`ALTER ROLE {name} NO{attribute}` first$"):
        grant_reader(imsearch_db[0].conn, name, PASSWORD)
    assert_untouched(admin, name)


def test_a_superuser_is_refused(imsearch_db, admin, new_role):
    name = new_role()
    admin.execute(f'CREATE ROLE "{name}" LOGIN SUPERUSER')
    with pytest.raises(ImsearchError, match=f"^{name} is a superuser; choose another name for the reader$"):
        grant_reader(imsearch_db[0].conn, name, PASSWORD)


def test_a_role_that_could_write_through_public_is_refused(imsearch_db, admin, new_role):
    name = new_role()
    admin.execute("CREATE TABLE guestbook (note text)")
    admin.execute("GRANT INSERT ON guestbook TO PUBLIC")
    try:
        with pytest.raises(ImsearchError, match=rf"^{name} could write through privileges every role has here "
                                                r"\(writes to guestbook\); revoke them from PUBLIC"):
            grant_reader(imsearch_db[0].conn, name, PASSWORD)
        assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None
    finally:
        admin.execute("DROP TABLE guestbook")


def test_a_reader_made_earlier_is_granted_again(imsearch_db, admin, new_role):
    """A reader as an earlier grant-reader left it (its grants, read-only by default) is updated, not refused."""
    name = new_role()
    database = admin.execute("SELECT current_database()").fetchone()[0]
    admin.execute(f'CREATE ROLE "{name}" LOGIN PASSWORD \'old\'')
    admin.execute(f'ALTER ROLE "{name}" SET default_transaction_read_only = on')
    admin.execute(f'GRANT CONNECT ON DATABASE "{database}" TO "{name}"')
    admin.execute(f'GRANT USAGE ON SCHEMA public TO "{name}"')
    admin.execute(f'GRANT SELECT ON image_catalog, class_summary, class_correspondence TO "{name}"')
    admin.execute("GRANT EXECUTE ON FUNCTION imsearch_nearest(bigint, integer, text, double precision), "
                  "imsearch_class_correspondence(integer, text), "
                  f'imsearch_duplicate_pairs(double precision, integer) TO "{name}"')
    reader = grant_reader(imsearch_db[0].conn, name, PASSWORD)
    assert not reader.created
    again = grant_reader(imsearch_db[0].conn, name, "another-one")
    assert not again.created and again.password is None
    settings = admin.execute("SELECT setconfig FROM pg_db_role_setting WHERE setrole = %s::regrole",
                             (name,)).fetchone()[0]
    assert sorted(settings) == ["default_transaction_read_only=on", "statement_timeout=60s",
                                f"temp_file_limit={READER_TEMP_FILE_LIMIT}"]


def test_a_reader_cannot_write_even_out_of_read_only_mode(imsearch_db, admin, new_role):
    name = new_role()
    grant_reader(imsearch_db[0].conn, name, PASSWORD)
    large_objects = admin.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()
    writes = {
        "INSERT INTO images (path) VALUES ('x')": "table images",
        "UPDATE images SET class = 'x'": "table images",
        "DELETE FROM images": "table images",
        "TRUNCATE images": "table images",
        "CREATE TABLE stolen (id int)": "schema public",
        "CREATE TEMP TABLE stolen (id int)": "temporary tables",
        "CREATE SCHEMA stolen": "database",
        "SELECT lo_from_bytea(0, 'x')": "function lo_from_bytea",
        "SELECT lo_create(0)": "function lo_create",
        "SELECT lo_creat(-1)": "function lo_creat",
        "SELECT lo_import('/etc/hostname')": "function lo_import",
        "SELECT pg_logical_emit_message(false, 'imsearch', 'x')": "function pg_logical_emit_message",
        "COPY image_catalog FROM PROGRAM 'id'": "external program",
        "COPY (SELECT 1) TO PROGRAM 'cat'": "external program",
        "SELECT pg_read_file('PG_VERSION')": "function pg_read_file",
        "SET temp_file_limit = -1": "temp_file_limit",
        f'ALTER ROLE "{name}" RESET temp_file_limit': "temp_file_limit",
    }
    with login(imsearch_db[1], name) as c:
        assert c.execute("SELECT current_user").fetchone() == (name,)
        c.execute("SET default_transaction_read_only = off")
        for statement, reason in writes.items():
            c.execute("BEGIN READ WRITE")
            try:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match=reason):
                    c.execute(statement)
            finally:
                c.execute("ROLLBACK")
    assert admin.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone() == large_objects
    # What was taken from PUBLIC: the database's owner keeps TEMPORARY.
    assert admin.execute("SELECT has_database_privilege('public', current_database(), 'TEMPORARY'), "
                         "has_database_privilege(current_database(), 'TEMPORARY'), "
                         "has_function_privilege('public', 'lo_from_bytea(oid, bytea)', 'EXECUTE')").fetchone() \
        == (False, True, False)


def test_a_reader_has_a_statement_timeout_and_a_temp_file_limit_it_cannot_lift(imsearch_db, new_role):
    """statement_timeout is a default the reader may change (docs/sql.md says so); temp_file_limit holds."""
    name = new_role()
    grant_reader(imsearch_db[0].conn, name, PASSWORD)
    with login(imsearch_db[1], name) as c:
        assert c.execute("SELECT current_setting('statement_timeout'), current_setting('temp_file_limit'), "
                         "current_setting('transaction_read_only')").fetchone() == ("1min", "1GB", "on")
        c.execute("SET default_transaction_read_only = off")
        c.execute(f'ALTER ROLE "{name}" RESET ALL')  # takes away only what the reader itself may set
    with login(imsearch_db[1], name) as c:
        assert c.execute("SELECT current_setting('statement_timeout'), "
                         "current_setting('temp_file_limit')").fetchone() == ("0", "1GB")


def test_a_reader_holds_at_most_its_connection_limit_and_the_owner_still_gets_in(imsearch_db, new_role):
    """100 logins of one reader take READER_CONNECTION_LIMIT slots; imsearch's role then opens ten of its own."""
    name = new_role()
    grant_reader(imsearch_db[0].conn, name, PASSWORD)
    held: list[psycopg.Connection] = []
    refused: list[str] = []
    try:
        for _ in range(100):
            try:
                held.append(login(imsearch_db[1], name))
            except psycopg.OperationalError as exc:
                refused.append(str(exc))
        assert len(held) == READER_CONNECTION_LIMIT
        assert len(refused) == 100 - READER_CONNECTION_LIMIT
        assert all(f'too many connections for role "{name}"' in r for r in refused)
        with contextlib.ExitStack() as stack:  # as `imsearch serve` with ten requests at once
            owners = [stack.enter_context(psycopg.connect(imsearch_db[1], autocommit=True)) for _ in range(10)]
            assert [c.execute("SELECT count(*) FROM images").fetchone()[0] for c in owners] == [3] * 10
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # and the reader cannot lift its own limit
            held[0].execute(f'BEGIN READ WRITE; ALTER ROLE "{name}" CONNECTION LIMIT -1')
    finally:
        for c in held:
            c.close()


def test_a_reader_can_rebuild_the_stored_vectors_it_finds_from_one_hot_searches(imsearch_db, admin, new_role):
    """What docs/sql.md and docs/security.md say: whoever may search with vectors of their own can reconstruct the
    vectors of what they find. The cosine distance to the i-th unit vector is 1 - x[i] / |x|, so 2,048 searches
    give every found row's direction (all the model's meaning: distances ignore length)."""
    name = new_role()
    grant_reader(imsearch_db[0].conn, name, PASSWORD)
    with login(imsearch_db[1], name) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT embedding FROM images")
        rows = c.execute(
            """
            SELECT g, s.id, s.distance
            FROM generate_series(1, 2048) g,
                 imsearch_search((SELECT array_agg((x = g)::int ORDER BY x) FROM generate_series(1, 2048) x)::halfvec,
                                 3, 'all', NULL, NULL, NULL, true) s
            """
        ).fetchall()
    rebuilt: dict[int, np.ndarray] = {}
    for dimension, image, distance in rows:
        rebuilt.setdefault(image, np.zeros(2048))[dimension - 1] = 1 - distance
    stored = {i: np.array(json.loads(v), dtype=np.float64) for i, v in
              admin.execute("SELECT id, embedding::text FROM images").fetchall()}
    assert rebuilt.keys() == stored.keys()
    for image, vector in stored.items():
        unit = vector / np.linalg.norm(vector)
        assert np.abs(rebuilt[image] - unit).max() < 1e-3
        assert float(rebuilt[image] @ unit) > 0.9999


def test_grant_reader_says_which_other_databases_a_reader_may_connect_to(imsearch_db, new_role, caplog):
    name = new_role()
    with caplog.at_level(logging.WARNING, logger="imsearch.db.sqlaccess"):
        grant_reader(imsearch_db[0].conn, name, PASSWORD)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{name} may also connect to database(s) ") and "template1" in warning


def test_without_a_superuser_grant_reader_closes_what_it_may_and_says_what_stays_open(server_url, new_role,
                                                                                       caplog):
    """As on a managed server: imsearch's role may create roles and owns imsearch's tables, not the database."""
    owner, name = new_role(), new_role()
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(f'CREATE ROLE "{owner}" LOGIN CREATEROLE PASSWORD \'{PASSWORD}\'')
    with scratch_database(server_url, f"imsearch_test_managed_{os.getpid()}") as admin_url:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute("CREATE EXTENSION vector")
            c.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
            database = c.execute("SELECT current_database()").fetchone()[0]
        url = as_user(admin_url, owner)
        store = Store.open(url)
        try:
            with pytest.raises(ImsearchError, match=rf"^every role may create temporary tables in database "
                                                    rf"{database}, .* `REVOKE TEMPORARY ON DATABASE {database} "
                                                    r"FROM PUBLIC` as its owner"):
                grant_reader(store.conn, name, PASSWORD)
            with psycopg.connect(admin_url, autocommit=True) as c:
                c.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
            with caplog.at_level(logging.WARNING, logger="imsearch.db.sqlaccess"):
                grant_reader(store.conn, name, PASSWORD)
            warnings = [r.getMessage() for r in caplog.records]
            assert warnings[0] == (f"{name} has no temp_file_limit: only a superuser may set one; as a superuser, "
                                   f"run `ALTER ROLE {name} SET temp_file_limit = '{READER_TEMP_FILE_LIMIT}'`")
            assert warnings[1].startswith(f"{name} can still create large objects and WAL messages: ")
            assert "`REVOKE EXECUTE ON FUNCTION lo_creat(integer), lo_create(oid), " in warnings[1]
            assert warnings[2].startswith(f"{name} may hold {READER_CONNECTION_LIMIT} connections, and every reader "
                                          f"as many: nothing keeps room for imsearch's own role on this server "
                                          f"({owner} is no member of pg_use_reserved_connections)")
            with login(admin_url, name) as c:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="temporary tables"):
                    c.execute("BEGIN READ WRITE; CREATE TEMP TABLE stolen (id int)")
                c.execute("ROLLBACK")
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="schema public"):
                    c.execute("BEGIN READ WRITE; CREATE TABLE stolen (id int)")
        finally:
            store.close()


@pytest.mark.parametrize("max_distance", ["NaN", "-1", "2", "Infinity", None])
def test_duplicate_pairs_refuses_a_max_distance_that_is_no_cosine_distance(admin, max_distance):
    """NaN sorts above every number in PostgreSQL: `distance <= 'NaN'` held for every pair of images."""
    assert len(admin.execute("SELECT * FROM imsearch_duplicate_pairs(1.99)").fetchall()) == 3
    with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        admin.execute("SELECT * FROM imsearch_duplicate_pairs(%s::double precision, 10)", (max_distance,))
    assert refused.value.diag.message_primary == \
        f"max_distance must be a cosine distance, at least 0 and below 2, not {max_distance or 'NULL'}"


@pytest.mark.parametrize("neighbours", [0, -1, 501, None])
def test_duplicate_pairs_refuses_neighbours_outside_1_to_500(admin, neighbours):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        admin.execute("SELECT * FROM imsearch_duplicate_pairs(0.5, %s::integer)", (neighbours,))
    assert refused.value.diag.message_primary == \
        f"neighbours must be between 1 and 500, not {'NULL' if neighbours is None else neighbours}"


def test_duplicates_refuses_nan(stored):
    with pytest.raises(ImsearchError, match="the duplicate distance is a cosine distance, at least 0 and below 2, "
                                            "not nan"):
        stored.duplicates(distance=float("nan"))


def test_0008_refuses_what_0007_answered_with_every_pair_and_downgrade_restores_0007(database_url):
    """The function keeps its grants and comment; downgrading puts back 0007's text, setting for setting."""
    from alembic import command
    from alembic.config import Config

    from imsearch.db.migrate import migrations_folder
    from imsearch.settings import sqlalchemy_url

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    function = "imsearch_duplicate_pairs(double precision, integer)"

    def definition() -> tuple[str, str, str]:
        with psycopg.connect(database_url) as c:
            return c.execute("SELECT pg_get_functiondef(p.oid), p.proacl::text, obj_description(p.oid, 'pg_proc') "
                             "FROM pg_proc p WHERE p.oid = %s::regprocedure", (function,)).fetchone()

    command.upgrade(cfg, "0007")
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("INSERT INTO images (path, sha256, width, height, bytes, model, embedding) "
                  "SELECT '/photos/' || g, md5(g::text), 1, 1, 1, 'test', "
                  "(SELECT array_agg(random() + 0 * x + 0 * g) FROM generate_series(1, 2048) x)::halfvec(2048) "
                  "FROM generate_series(1, 3) g")
        c.execute(f"GRANT EXECUTE ON FUNCTION {function} TO pg_monitor")
        assert len(c.execute("SELECT * FROM imsearch_duplicate_pairs('NaN')").fetchall()) == 3
    before = definition()
    command.upgrade(cfg, "0008")
    after = definition()
    assert after[0] != before[0] and after[1:] == before[1:]
    with psycopg.connect(database_url, autocommit=True) as c:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_distance must be"):
            c.execute("SELECT * FROM imsearch_duplicate_pairs('NaN')")
    command.downgrade(cfg, "0007")
    assert definition() == before
