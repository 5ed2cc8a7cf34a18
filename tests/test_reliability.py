"""Nothing lost, nothing mixed up: bad and hostile files, other models, old schemas, failed connections.

The bad-input matrix (tests/badfiles.py) is made once from real room photos and ingested once through the
command line; each case is then one test. Crash, Ctrl-C, concurrency and dropped connections: tests/test_crash.py.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from click.testing import CliRunner, Result

from imsearch.cli import cli
from imsearch.db.connect import explain_connect_error, redact
from imsearch.db.migrate import SCHEMA_REVISION, migrations_folder, upgrade
from imsearch.files import printable
from imsearch.settings import sqlalchemy_url

from . import badfiles
from .badfiles import BAD, GOOD, SQL
from .conftest import ROOMS, copy_photos, with_database

_names = itertools.count()


def rows(url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def invoke(url: str, weights: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--database-url", url, *args], env={"IMSEARCH_WEIGHTS": weights})


def one_error_line(result: Result) -> str:
    """The error a command printed: exactly one line, no traceback, exit status 1."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0].removeprefix("Error: ")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(url)
    return cfg


# -- the bad-input matrix ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    url: str
    root: Path
    result: Result
    stored: dict[str, tuple[str | None, int, int, int]]  # path -> (class, width, height, dimensions)
    earlier_before: list[tuple]
    earlier_after: list[tuple]
    warnings: list[str]

    def distance(self, a: str, b: str) -> float:
        return rows(self.url, "SELECT a.embedding <=> b.embedding FROM images a, images b "
                              "WHERE a.path = %s AND b.path = %s",
                    str(self.root / a), str(self.root / b))[0][0]


EARLIER = "SELECT id, path, class, sha256, embedding::text, ingested_at FROM images ORDER BY id"


@pytest.fixture(scope="module")
def matrix(server_url, weights, tmp_path_factory) -> Iterator[Matrix]:
    """Every case of tests/badfiles.py in one folder, ingested by `imsearch ingest` into a database that
    already holds 5 other photos."""
    name = f"imsearch_matrix_{os.getpid()}_{next(_names)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    base = tmp_path_factory.mktemp("matrix")
    earlier = copy_photos(base / "earlier", 1)
    assert invoke(url, weights, "ingest", str(earlier), "--device", "cpu").exit_code == 0
    before = rows(url, EARLIER)
    root = badfiles.build(base / "photos", sorted((ROOMS / "test").glob("*/*.jpg")))
    with warnings.catch_warnings(record=True) as caught:
        result = invoke(url, weights, "ingest", str(root), "--device", "cpu")
    stored = {p: (c, w, h, d) for p, c, w, h, d in rows(
        url, "SELECT path, class, width, height, vector_dims(embedding) FROM images WHERE starts_with(path, %s)",
        str(root.resolve()) + "/")}
    yield Matrix(url, root.resolve(), result, stored, before, rows(url, EARLIER),
                 [f"{w.category.__name__}: {w.message}" for w in caught])
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_input_is_named_once_with_its_reason(matrix, case):
    shown = printable(badfiles.reported_path(matrix.root, case))
    lines = [line for line in matrix.result.stderr.splitlines() if line.startswith(shown + ": ")]
    assert len(lines) == 1, matrix.result.stderr
    assert lines[0][len(shown) + 2:].startswith(case.reason)
    assert str(matrix.root / case.path) not in matrix.stored


@pytest.mark.parametrize("case", GOOD, ids=lambda c: c.id)
def test_awkward_input_is_stored_once_under_its_exact_path_and_class(matrix, case):
    path = str(matrix.root / case.path)
    assert path in matrix.stored
    cls, width, height, dims = matrix.stored[path]
    assert cls == case.path.split("/")[0]
    assert dims == 2048 and width > 0 and height > 0
    assert printable(path) not in matrix.result.stderr


def test_matrix_ingest_exits_1_naming_only_the_bad_files(matrix):
    result = matrix.result
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    expected = {f"{printable(badfiles.reported_path(matrix.root, c))}: " for c in BAD}
    lines = result.stderr.splitlines()
    assert len(lines) == len(BAD)
    assert {line[:line.index(": ") + 2] for line in lines} == expected
    assert result.stdout.startswith(f"{len(GOOD)} added, 0 updated, 0 skipped, {len(BAD)} failed in ")
    assert len(matrix.stored) == len(GOOD)
    assert matrix.warnings == []


def test_rows_stored_before_are_untouched(matrix):
    assert len(matrix.earlier_before) == 5
    assert matrix.earlier_after[:5] == matrix.earlier_before
    assert rows(matrix.url, "SELECT count(*) FROM images")[0][0] == 5 + len(GOOD)


@pytest.mark.parametrize("suffix, within", [("jpg", 0.01), ("png", 0.001)])
def test_exif_rotated_photo_matches_its_upright_twin(matrix, suffix, within):
    rotated, twin = f"dining_room/exif-rotated.{suffix}", f"dining_room/exif-twin.{suffix}"
    assert matrix.stored[str(matrix.root / rotated)][1:3] == (416, 320)  # upright width x height
    assert matrix.stored[str(matrix.root / twin)][1:3] == (416, 320)
    assert matrix.distance(rotated, twin) < within


def test_animated_gif_and_webp_are_embedded_by_their_first_frame(matrix):
    first = matrix.distance("dining_room/animated.gif", "dining_room/gif-frame-0.png")
    second = matrix.distance("dining_room/animated.gif", "dining_room/gif-frame-1.png")
    assert first < 0.01 and first < second
    assert matrix.distance("dining_room/animated.webp", "dining_room/webp-frame-0.png") < 0.01


@pytest.mark.parametrize("case", [c for c in badfiles.CASES if c.alias_of], ids=lambda c: c.id)
def test_a_photo_reached_through_a_symlink_is_stored_once_with_its_own_folder_as_class(matrix, case):
    assert case.alias_of is not None
    assert str(matrix.root / case.path) not in matrix.stored
    assert matrix.stored[str(matrix.root / case.alias_of)][0] == case.alias_of.split("/")[0]


def test_a_long_thin_image_is_resized_without_making_a_huge_frame(tmp_path):
    # Resizing 1x20000 pixels to a short side of 256 makes a 256x5,120,000 frame (3.9 GB) before the crop.
    strip = tmp_path / "strip.png"
    badfiles.strip_png(1, 20_000)(strip, sorted((ROOMS / "test").glob("*/*.jpg"))[0])
    peak = subprocess.run(  # in a fresh process, whose peak memory (VmHWM) is its own
        [sys.executable, "-c", "import re, sys; from pathlib import Path; from imsearch.model import pixels; "
                               "loaded = pixels.load(Path(sys.argv[1]).read_bytes(), sys.argv[1]); "
                               "assert loaded.pixels.shape == (224, 224, 3); "
                               "print(re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text())[1])",
         str(strip)], check=True, capture_output=True, text=True).stdout
    assert int(peak) < 500_000, f"peak memory {int(peak) // 1000} MB"


def test_sql_looking_names_are_plain_data_to_find(matrix, weights):
    query = matrix.root / SQL / "photo.jpg"
    result = invoke(matrix.url, weights, "find", str(query), "--same-class", "--include-self", "--json",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    [item] = json.loads(result.stdout)
    assert item["query_class"] == SQL
    assert [(m["path"], m["class"]) for m in item["matches"]] == [(str(query), SQL)]
    assert rows(matrix.url, "SELECT to_regclass('public.images') IS NOT NULL") == [(True,)]


def test_reingest_skips_what_is_stored_and_names_the_bad_files_again(matrix, weights):
    again = invoke(matrix.url, weights, "ingest", str(matrix.root), "--device", "cpu")
    assert again.exit_code == 1
    assert again.stdout.startswith(f"0 added, 0 updated, {len(GOOD)} skipped, {len(BAD)} failed in ")
    assert sorted(again.stderr.splitlines()) == sorted(matrix.result.stderr.splitlines())


def test_a_newline_in_a_bad_file_name_stays_on_its_one_line(matrix):
    shown = printable(str(matrix.root / "kitchen" / "empty\nsecond line.jpg"))
    assert shown.endswith("/kitchen/empty\\nsecond line.jpg")
    assert f"{shown}: empty file (0 bytes)" in matrix.result.stderr.splitlines()


# -- another model, another schema -------------------------------------------------------------------------


@pytest.fixture
def ingested(database_url, weights, photos):
    assert invoke(database_url, weights, "ingest", str(photos), "--device", "cpu").exit_code == 0
    return photos


def test_another_model_is_refused_by_ingest_and_find_until_reembed(database_url, weights, other_weights, ingested):
    query = str(sorted(ingested.glob("kitchen/*.jpg"))[0])
    for args, action in (((("ingest", str(ingested))), "ingest"), (("find", query), "search")):
        line = one_error_line(invoke(database_url, weights, *args, "--weights", other_weights, "--device", "cpu"))
        assert line.startswith("the database holds 20 image(s) embedded with resnet50:file-")
        assert f"but this {action} uses resnet50:file-" in line
        assert "pass the same --weights as when they were stored" in line
        assert "`imsearch ingest DIR --reembed`" in line
    assert rows(database_url, "SELECT count(DISTINCT model), count(*) FROM images") == [(1, 20)]
    reembed = invoke(database_url, weights, "ingest", str(ingested), "--reembed", "--weights", other_weights,
                     "--device", "cpu")
    assert reembed.exit_code == 0 and reembed.stdout.startswith("0 added, 20 updated, 0 skipped, 0 failed")
    assert invoke(database_url, weights, "find", query, "--weights", other_weights, "--device", "cpu").exit_code == 0
    assert "embedded with" in one_error_line(invoke(database_url, weights, "find", query, "--device", "cpu"))


def test_another_preprocessing_is_refused_with_both_names(database_url, weights, ingested):
    query = str(sorted(ingested.glob("kitchen/*.jpg"))[0])
    line = one_error_line(invoke(database_url, weights, "find", query, "--preprocess", "square224", "--device", "cpu"))
    assert ":resize256-crop224, but this search uses resnet50:file-" in line and line.count(":whole224x224") == 1


def test_vectors_of_another_dimension_are_refused(database_url, weights, photos):
    upgrade(database_url)
    command.downgrade(alembic_config(database_url), "base")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE images (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, path text UNIQUE, "
                     "class text, sha256 char(64), width int, height int, bytes bigint, model text, "
                     "embedding halfvec(512), ingested_at timestamptz DEFAULT now())")
    command.stamp(alembic_config(database_url), "head")
    line = one_error_line(invoke(database_url, weights, "ingest", str(photos), "--device", "cpu"))
    assert line == (f"{redact(database_url)}: images.embedding is halfvec(512), but this imsearch stores "
                    "halfvec(2048) (ResNet-50 features); use another database for these vectors")


def test_an_older_schema_is_refused_until_db_upgrade(database_url, weights, ingested):
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_revision(SCHEMA_REVISION)
    older = head.down_revision
    assert isinstance(older, str), "needs a revision before the newest to go back to"
    command.downgrade(alembic_config(database_url), older)
    query = str(sorted(ingested.glob("kitchen/*.jpg"))[0])
    expected = (f"{redact(database_url)}: schema revision {older}, this imsearch needs {SCHEMA_REVISION}; "
                "run `imsearch db upgrade`")
    assert one_error_line(invoke(database_url, weights, "find", query, "--device", "cpu")) == expected
    assert one_error_line(invoke(database_url, weights, "ingest", str(ingested), "--device", "cpu")) == expected
    assert invoke(database_url, weights, "db", "upgrade").exit_code == 0
    assert invoke(database_url, weights, "find", query, "--device", "cpu").exit_code == 0
    assert rows(database_url, "SELECT count(*) FROM images") == [(20,)]


def test_a_schema_from_a_newer_imsearch_says_to_upgrade_imsearch(database_url, weights, ingested):
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    line = one_error_line(invoke(database_url, weights, "find", str(ingested / "x.jpg"), "--device", "cpu"))
    assert line == (f"{redact(database_url)}: schema revision 9999 is unknown to this imsearch (which needs "
                    f"{SCHEMA_REVISION}): a newer imsearch migrated it; upgrade imsearch")


def test_an_images_table_not_made_by_imsearch_is_left_alone(database_url, weights, ingested):
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM alembic_version")
    line = one_error_line(invoke(database_url, weights, "ingest", str(ingested), "--device", "cpu"))
    assert "an `images` table exists but no imsearch schema revision is recorded" in line
    assert rows(database_url, "SELECT count(*) FROM images") == [(20,)]


def test_vanished_files_are_reported_and_removed_only_with_prune(database_url, weights, ingested):
    gone = sorted(ingested.glob("bedroom/*.jpg"))[:2]
    for path in gone:
        path.unlink()
    report = invoke(database_url, weights, "ingest", str(ingested), "--device", "cpu")
    assert report.exit_code == 0
    assert report.stderr == f"2 stored file(s) under {ingested} no longer exist; `--prune` removes them\n"
    listed = json.loads(invoke(database_url, weights, "ingest", str(ingested), "--json", "--device", "cpu").stdout)
    assert listed["missing"] == [str(p.resolve()) for p in gone] and listed["pruned"] == 0
    assert rows(database_url, "SELECT count(*) FROM images") == [(20,)]
    pruned = invoke(database_url, weights, "ingest", str(ingested), "--prune", "--device", "cpu")
    assert pruned.exit_code == 0 and "pruned 2 row(s) of vanished files" in pruned.stdout
    assert rows(database_url, "SELECT count(*) FROM images") == [(18,)]
    assert rows(database_url, "SELECT count(*) FROM images WHERE path = ANY(%s)", [str(p.resolve()) for p in gone]) \
        == [(0,)]


# -- the connection ----------------------------------------------------------------------------------------


def test_missing_database_is_one_line(server_url, weights):
    url = with_database(server_url, "imsearch_no_such_database")
    line = one_error_line(invoke(url, weights, "find", "x.jpg"))
    assert line == (f'cannot connect to {redact(url)}: database "imsearch_no_such_database" does not exist '
                    "(create it, or fix the database name in DATABASE_URL)")


@pytest.mark.parametrize("url", ["postgresql://imsearch:secret@127.0.0.1:9/imsearch",
                                 "postgresql://imsearch:secret@/imsearch?host=/nonexistent/socket/folder"],
                         ids=["tcp", "unix-socket"])
def test_unreachable_server_is_one_line_without_the_password(url, weights):
    line = one_error_line(invoke(url, weights, "find", "x.jpg"))
    assert line.startswith(f"cannot connect to {redact(url)}: ")
    assert line.endswith("(no server answers there: is it running? check host and port in DATABASE_URL)")
    assert "secret" not in line


def test_malformed_url_is_one_line_without_the_password(weights):
    line = one_error_line(invoke("postgresql://imsearch:secret@[::1/imsearch", weights, "find", "x.jpg"))
    assert "secret" not in line and line.startswith("cannot connect to postgresql://imsearch:***@[::1/imsearch: ")
    assert line.endswith("(not a valid PostgreSQL URL: postgresql://user:password@host:5432/dbname)")


@pytest.fixture
def wrong_password_url(server_url):
    """A URL with a wrong password, on a server that checks it.

    A server whose URL carries a password checks it already. Elsewhere a role is given a password and a first
    pg_hba.conf line makes the server check it (a server may trust local connections), then both go.
    """
    parts = urlsplit(server_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    if parts.password:
        yield urlunsplit(parts._replace(netloc=f"{parts.username}:wrong-{parts.password}@{host}"))
        return
    with psycopg.connect(server_url, autocommit=True) as conn:
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])  # type: ignore[index]
        if not os.access(hba, os.W_OK):
            pytest.skip("this server trusts local connections and its pg_hba.conf is not writable here; "
                        "test_connect_errors_are_explained_in_one_line covers the message")
        role = f"imsearch_password_{os.getpid()}"
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right'")
        original = hba.read_text()
        hba.write_text(f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n" + original)
        conn.execute("SELECT pg_reload_conf()")
        try:
            yield urlunsplit(parts._replace(netloc=f"{role}:wrong@{host}"))
        finally:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"DROP ROLE {role}")


def test_wrong_password_is_one_line_without_the_password(wrong_password_url, weights):
    line = one_error_line(invoke(wrong_password_url, weights, "find", "x.jpg"))
    user = urlsplit(wrong_password_url).username
    assert line == (f"cannot connect to {redact(wrong_password_url)}: password authentication failed for user "
                    f'"{user}" (wrong user or password: check them in DATABASE_URL)')
    assert "wrong@" not in line


@pytest.mark.parametrize("text, shown, hint", [
    ('connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  password authentication '
     'failed for user "imsearch"', 'password authentication failed for user "imsearch"',
     "wrong user or password"),
    ('connection failed: connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: fe_sendauth: no '
     "password supplied", "fe_sendauth: no password supplied", "wrong user or password"),
    ('connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  database "photos" does not '
     "exist", 'database "photos" does not exist', "create it"),
    ('connection failed: connection to server at "10.0.0.5", port 5432 failed: FATAL:  role "bob" does not exist',
     'role "bob" does not exist', "no such user"),
    ("connection failed: failed to resolve host 'db.example': [Errno -2] Name or service not known",
     "failed to resolve host 'db.example': [Errno -2] Name or service not known", "unknown host name"),
    ('connection failed: connection to server at "10.0.0.5", port 5432 failed: timeout expired',
     "timeout expired", "did not answer in time"),
], ids=["wrong-password", "no-password", "no-database", "no-role", "unknown-host", "timeout"])
def test_connect_errors_are_explained_in_one_line(text, shown, hint):
    url = "postgresql://imsearch:secret@10.0.0.5:5432/photos"
    line = explain_connect_error(psycopg.OperationalError(text + "\n\tIs the server running?"), url)
    assert line.startswith(f"cannot connect to postgresql://imsearch:***@10.0.0.5:5432/photos: {shown} (")
    assert hint in line and "\n" not in line and "secret" not in line


def test_debug_lets_the_exception_through(server_url, weights):
    url = with_database(server_url, "imsearch_no_such_database")
    result = CliRunner().invoke(cli, ["--database-url", url, "--debug", "find", "x.jpg"],
                                env={"IMSEARCH_WEIGHTS": weights})
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "DatabaseUnavailable"
