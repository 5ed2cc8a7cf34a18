"""Fixtures: a real PostgreSQL with pgvector (testcontainers, else the embedded server), stand-in weights, photos.

Set IMSEARCH_TEST_DATABASE_URL to run the suite against a server of your own (a superuser connection: each test
creates and drops its own database).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"
CLASSES = ("bathroom", "bedroom", "dining_room", "kitchen", "living_room")


def with_database(url: str, name: str) -> str:
    """The same server URI with another database name."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # noqa: BLE001 - any failure means: no usable Docker engine here
        return False
    return True


@pytest.fixture(scope="session")
def server_url():
    """An admin URI of a real PostgreSQL server with pgvector, for the whole session."""
    given = os.environ.get("IMSEARCH_TEST_DATABASE_URL")
    if given:
        yield given
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("pgvector/pgvector:pg17", driver=None) as pg:
            yield pg.get_connection_url()
        return
    from imsearch.db import embedded

    with embedded.temporary() as url:  # PostgreSQL's default settings, as on a server nobody has tuned
        yield url


def passable(folder: Path) -> None:
    """Run as root, let the embedded server's system user pass (not list) this test run's temporary folders, which
    pytest makes 0700: imsearch itself widens no folder for it."""
    if os.name == "posix" and os.geteuid() == 0:
        for p in [folder, *folder.parents]:
            if p.stat().st_uid == 0 and not p.stat().st_mode & 0o001:
                p.chmod(p.stat().st_mode | 0o001)


@pytest.fixture(autouse=True)
def passable_tmp_path(request):
    if "tmp_path" in request.fixturenames:
        passable(request.getfixturevalue("tmp_path"))


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Tests never touch the user's own imsearch data or DATABASE_URL."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("imsearch-home")
    passable(home)
    mp.setenv("IMSEARCH_HOME", str(home))
    mp.delenv("DATABASE_URL", raising=False)
    mp.delenv("IMSEARCH_WEIGHTS", raising=False)
    yield
    mp.undo()


_counter = itertools.count()


@contextlib.contextmanager
def scratch_database(server_url: str, name: str):
    """A database of its own on the test server, dropped afterwards."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(server_url):
    """A fresh, empty database on the test server; dropped afterwards."""
    with scratch_database(server_url, f"imsearch_test_{os.getpid()}_{next(_counter)}") as url:
        yield url


@pytest.fixture
def exact_max_rows(monkeypatch):
    """Set the exact-scan size for one test: `exact_max_rows(rows, *open_connections)`. Ingest then indexes every
    class of more rows (imsearch.search.EXACT_MAX_ROWS), and imsearch_search plans for that size (the setting
    imsearch.exact_max_rows, through PGOPTIONS on connections opened from now on, and SET on those given)."""
    touched: list[psycopg.Connection] = []

    def set_size(rows: int, *conns: psycopg.Connection) -> None:
        from imsearch import search

        monkeypatch.setattr(search, "EXACT_MAX_ROWS", rows)
        monkeypatch.setenv("PGOPTIONS", f"-c imsearch.exact_max_rows={rows}")
        for conn in conns:
            conn.execute("SELECT set_config('imsearch.exact_max_rows', %s, false)", (str(rows),))
            touched.append(conn)

    yield set_size
    for conn in touched:
        if not conn.closed:
            conn.execute("RESET imsearch.exact_max_rows")


@pytest.fixture
def run(database_url, weights):
    """Run the `imsearch` command in-process on the test database with the stand-in weights."""
    from click.testing import CliRunner

    from imsearch.cli import cli

    def invoke(*args: str):
        return CliRunner().invoke(cli, ["--database-url", database_url, *args],
                                  env={"IMSEARCH_WEIGHTS": weights}, catch_exceptions=False)
    return invoke


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> str:
    """The stand-in ResNet-50 checkpoint (random weights, calibrated batch norm): matches mean nothing."""
    out = tmp_path_factory.mktemp("weights") / "standin.pth"
    subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), str(out)], check=True,
                   capture_output=True)
    return str(out)


@pytest.fixture(scope="session")
def other_weights(weights, tmp_path_factory) -> str:
    """A second checkpoint that differs from `weights`: another model as far as imsearch is concerned."""
    import torch

    state = torch.load(weights, weights_only=True)
    state["layer4.2.bn3.bias"] = state["layer4.2.bn3.bias"] + 0.5
    out = tmp_path_factory.mktemp("weights") / "other.pth"
    torch.save(state, out)
    return str(out)


def copy_photos(dest: Path, per_class: int, split: str = "base", start: int = 0) -> Path:
    """Copy `per_class` shared room photos of each class into dest/<class>/."""
    for cls in CLASSES:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOMS / split / cls).glob("*.jpg"))[start:start + per_class]:
            shutil.copy2(src, dest / cls / src.name)
    return dest


@contextlib.contextmanager
def shared_library(server_url: str, weights: str, tmp_path_factory, name: str):
    """One database holding 20 photos (4 per class) for a module's tests that only read: ingesting is the slow
    part. Yields (app, photos, url)."""
    from imsearch import Imsearch

    photos = copy_photos(tmp_path_factory.mktemp(name) / "photos", 4)
    with scratch_database(server_url, f"imsearch_test_{name}_{os.getpid()}") as url:
        with Imsearch(url, weights=weights, device="cpu") as app:
            assert app.ingest(photos).added == 20
            yield app, photos, url


@pytest.fixture
def photos(tmp_path) -> Path:
    """A small base folder: 4 room photos in each of the 5 classes."""
    return copy_photos(tmp_path / "photos", 4)


@pytest.fixture
def app(database_url, weights):
    from imsearch import Imsearch

    with Imsearch(database_url, weights=weights, device="cpu") as a:
        yield a


@pytest.fixture
def stored(app, photos):
    """`app` with `photos` ingested."""
    result = app.ingest(photos)
    assert result.added == 20 and not result.failed
    return app
